"""One table from several results files of one scale (``--merge``): each cell from the last file that
measured it, rows made under a method's former defaults left out, and the spread of every cell's runs."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _reproduce.cache import _json_dump
from _reproduce import render
from _reproduce.render import TIME_FORMAT, _command, render_table
from _reproduce.scales import ROWS


#: When a method's defaults revision landed (the commit that raised it, 3b4bb86 for SSC's deception term).
#: Results files written before protections recorded ``defaults_revision`` are attributed by their
#: ``time``: a row is read as the newest revision landed by then. That is exact for files this script
#: wrote, since a render reuses a protected folder only when it was made with the constants the code of
#: that render resolves (:func:`cached_protection`); a run that straddled a landing would be misread.
REVISION_LANDED = {("ssc", 2): "2026-12-02T05:52:04+0000"}
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _protection_row(key: str) -> str:
    """The results row a protections entry was made for: its key is ``<row>[@<prior>]-s<seed>`` (the entry's
    own ``row`` names the row that first made the folder, which may be a variant the defaults became)."""
    return re.sub(r"-s\d+$", "", key).partition("@")[0]


def row_revision(record: dict, row: str) -> int:
    """The defaults revision ``record``'s base row ``row`` was protected under: as its protections recorded
    it, else by the record's time (:data:`REVISION_LANDED`)."""
    recorded = {p["defaults_revision"] for key, p in record.get("protections", {}).items()
                if _protection_row(key) == row and "defaults_revision" in p}
    if len(recorded) > 1:
        raise ValueError(f"row {row} has protections of revisions {sorted(recorded)}")
    if recorded:
        return recorded.pop()
    when = datetime.strptime(record["time"], TIME_FORMAT)
    landed = [revision for (method, revision), at in REVISION_LANDED.items()
              if method == row and datetime.strptime(at, TIME_FORMAT) <= when]
    return max(landed, default=1)


def merge_records(records: list[tuple[str, dict]], rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    """One table from several results files of one scale: for every (row, column) the cells of the *last*
    file in ``records`` that measured it (all of that file's seeds), so a newer run overrides an older one
    and an older file fills what the newer left out. Only base rows at their method's current defaults
    revision are taken (a row made under former defaults is listed in ``dropped``); variants are constant
    searches, not the methods as shipped, and are left out. Returns ``results`` (render form: per row a list
    of cell dicts, ragged), ``columns`` (scratch first, then per prior, paradigm and defense in protocol
    order), ``notes`` (each cell's source mark) and ``sources`` / ``dropped``."""
    from ueguard.methods import METHODS as REGISTRY

    if not records:
        raise SystemExit("--merge: name at least one results file")
    tag = None
    chosen: dict[str, dict[str, tuple[int, list[dict]]]] = {}
    dropped: list[str] = []
    runs: dict[tuple[str, str], list[float]] = {}  # every distinct victim run's accuracy, file by file
    seen: dict[tuple[str, str], set[tuple]] = {}
    for index, (name, record) in enumerate(records):
        if record.get("bench") != "reproduce" or "results" not in record:
            raise SystemExit(f"--merge {name}: not a results file of bench/reproduce.py")
        if tag is None:
            tag = record["scale_tag"]
        elif record["scale_tag"] != tag:
            raise SystemExit(f"--merge {name}: scale {record['scale_tag']}, but {records[0][0]} is {tag}; "
                             f"one table holds one scale's cells")
        for row, per_seed in record["results"].items():
            if row not in rows:
                continue
            if row != "clean":
                revision, current = row_revision(record, row), REGISTRY.get(row).defaults_revision
                if revision != current:
                    dropped.append(f"{name}: {row} (made under defaults revision {revision}; now {current})")
                    continue
            for column in {c for seed_cells in per_seed for c in seed_cells}:
                cells = [s[column] for s in per_seed if column in s]
                chosen.setdefault(row, {})[column] = (index, cells)
                for cell in cells:  # files that re-render one cached run hold the same cell: counted once
                    fingerprint = (cell["accuracy"], cell.get("seconds"), tuple(cell.get("history", ())))
                    if fingerprint not in seen.setdefault((row, column), set()):
                        seen[row, column].add(fingerprint)
                        runs.setdefault((row, column), []).append(float(cell["accuracy"]))
    results: dict[str, list[dict[str, dict]]] = {}
    notes: dict[tuple[str, str], str] = {}
    used: set[int] = set()
    for row in (r for r in rows if r in chosen):
        width = max(len(cells) for _, cells in chosen[row].values())
        results[row] = [{} for _ in range(width)]
        for column, (index, cells) in chosen[row].items():
            for i, cell in enumerate(cells):
                results[row][i][column] = cell
            notes[row, column] = str(index + 1).translate(SUPERSCRIPT)
            used.add(index)
    order = {name: i for i, name in enumerate(("scratch", "finetune", "frozen", "linear", "none", "staged", "gray",
                                               "jpeg", "at", "disjoint", "akamaster", "user"))}

    def column_order(column: str) -> tuple:
        head, _, defense = column.partition("/")
        paradigm, _, prior = head.partition("·")
        return (bool(prior), order.get(prior, len(order)), prior, order.get(paradigm, len(order)), paradigm,
                order.get(defense, len(order)), defense)

    columns = sorted({c for per_seed in results.values() for s in per_seed for c in s}, key=column_order)
    sources = [{"mark": str(i + 1).translate(SUPERSCRIPT), "file": name, "time": record.get("time"),
                "cpu": record.get("environment", {}).get("cpu"), "command": record.get("command"),
                "priors": {k: v.get("note") for k, v in record.get("priors", {}).items()}, "used": i in used}
               for i, (name, record) in enumerate(records)]
    return {"scale_tag": tag, "results": results, "columns": columns, "notes": notes, "sources": sources,
            "dropped": dropped, "runs": runs}


def render_spread(runs: dict[tuple[str, str], list[float]], rows: list[str], columns: list[str]) -> str:
    """Markdown, laid out like the transposed merged table: for each cell with more than one distinct victim
    run in the files (a file that re-renders another's cached run adds none), the range of their accuracies
    and how many — how far a cell moves between seeds, re-trained priors, re-made protections, machines."""
    def text(key: tuple[str, str]) -> str:
        found = runs.get(key, [])
        return f"{min(found):.1f}–{max(found):.1f} ({len(found)})" if len(found) > 1 else "—"

    lines = ["| paradigm / defense | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    lines += [f"| {column} | " + " | ".join(text((row, column)) for row in rows) + " |" for column in columns
              if any(len(runs.get((row, column), [])) > 1 for row in rows)]
    return "\n".join(lines) + "\n"


def merge_main(files: list[Path], rows: tuple[str, ...], json_path: Path, argv: list[str] | None) -> None:
    """``--merge``: read the results files, write the merged table (``.json``, ``.md``, plots)."""
    records = []
    for path in files:
        try:
            records.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--merge {path}: cannot read it as JSON ({error})") from None
    merged = merge_records(records, rows)
    table = render_table(merged["results"], merged["columns"], notes=merged["notes"], transpose=True)
    legend = "".join(f"- {s['mark']} `{s['file']}` ({s['time']}, {s['cpu']}): `{s['command']}`\n"
                     for s in merged["sources"] if s["used"])
    dropped = "".join(f"- left out: {d}\n" for d in merged["dropped"])
    text = (f"Merged from {len(records)} results files of scale {merged['scale_tag']}: each cell is the last "
            f"listed file's measurement of it (its mark), mean ± sd over that file's seeds. Cells of different "
            f"marks are different runs (machine, re-trained prior, code of the day): compare a protection with "
            f"clean under the same mark. Test accuracy %; "
            f"[brackets]: published, ResNet-18 from scratch on all of CIFAR-10, 60 epochs.\n\n"
            + table + "\n" + legend + dropped
            + "\nEvery distinct victim run of a cell in these files (seeds, victim seeds, re-runs on other machines "
              "and priors): lowest–highest accuracy (runs).\n\n"
            + render_spread(merged["runs"], list(merged["results"]), merged["columns"]))
    record = {"bench": "reproduce-merge", **{k: merged[k] for k in ("scale_tag", "columns", "sources", "dropped")},
              "results": merged["results"], "notes": {f"{r}|{c}": m for (r, c), m in merged["notes"].items()},
              "runs": {f"{r}|{c}": v for (r, c), v in merged["runs"].items()},
              "table": table, "command": _command(argv),
              "time": time.strftime(TIME_FORMAT)}
    _json_dump(json_path, record)
    json_path.with_suffix(".md").write_text(text)
    plots = render.plot(merged["results"], merged["columns"], json_path.with_suffix(""))
    print(text)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {', '.join(str(p) for p in plots)}")

