"""One protect run over the fault corpus (tests/fault_corpus.py) mixed with good images: every bad file
gets the manifest record its generator promises, the good ones are protected, the exit status is 3,
and nothing but ueguard's own messages reaches stderr. A new fault is covered by adding its generator
to ``fault_corpus.CORPUS``. Also: a run under an address-space limit (RLIMIT_AS) survives a file too
large for the memory left."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner
from PIL import Image

from fault_corpus import build_source
from ueguard.cli import main
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest

#: ops: model-free and one pass over the images, so the run costs little beyond decoding and saving. No
#: --size: the working size is then suggested from the files' headers, a path that reads every header.
RUN = ["--method", "ops", "--device", "cpu", "--quiet", "--keep-metadata"]
PILLOW_WARNING_LIMIT = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (an earlier load_image may have raised it)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    expect = build_source(base / "src")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = PILLOW_WARNING_LIMIT
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(main, ["protect", str(base / "src"), "--out", str(base / "out"), *RUN],
                                        catch_exceptions=False)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    records = {r["source"]: r for r in read_manifest(base / "out" / MANIFEST_NAME) if r["kind"] == "file"}
    return base, expect, result, records, caught


def test_each_fault_gets_its_record_naming_the_file(corpus_run):
    _, expect, result, records, _ = corpus_run
    assert set(records) == set(expect), result.output
    for rel, want in expect.items():
        record = records[rel]
        assert record["status"] == want.status, (rel, record)
        if want.status != "ok":  # a failed file's error names it (the skipped ones are named by "source")
            assert want.reason in record["error"], (rel, record["error"])
            assert want.status == "skipped" or rel in record["error"], (rel, record["error"])
        else:
            assert record["error"] is None
            notes = " ".join(record.get("notes") or [])
            assert (want.note in notes) if want.note else not notes, (rel, notes)


def test_the_good_files_and_the_noted_ones_are_protected(corpus_run):
    base, expect, _, records, _ = corpus_run
    for rel, want in expect.items():
        if want.status != "ok":
            continue
        output = base / "out" / records[rel]["output"]
        assert load_image(output).pixels.shape == load_image(base / "src" / rel).pixels.shape
        if want.check is not None:
            want.check(output)


def test_exit_status_3_and_a_summary_that_counts_right(corpus_run):
    _, expect, result, _, _ = corpus_run
    failed = [rel for rel, want in expect.items() if want.status == "failed"]
    protected = sum(want.status == "ok" for want in expect.values())
    noted = sum(bool(want.note) for want in expect.values())
    assert result.exit_code == 3, result.output
    assert f"protected {protected} image(s)" in result.output
    assert f"{len(failed)} file(s) failed; {protected} other image(s) were protected." in result.output
    assert f"ueguard: note: {noted} file(s) lost metadata" in result.output
    for rel in failed:
        assert f"failed: {rel}: " in result.output


def test_no_raw_pillow_warning_reaches_the_user(corpus_run):
    _, _, result, _, caught = corpus_run
    assert "DecompressionBombWarning" not in result.output and "Traceback" not in result.output
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_when_every_file_fails_the_summary_says_no_image_was_protected(tmp_path):
    from fault_corpus import bomb_header_jpeg

    (tmp_path / "src" / "a").mkdir(parents=True)
    bomb_header_jpeg(tmp_path / "src" / "a")
    result = CliRunner().invoke(main, ["protect", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *RUN])
    assert result.exit_code == 3, result.output
    assert "protected no image into" in result.output and "1 file(s) failed; no image was protected." in result.output
    assert "the others were protected" not in result.output


def large_plain_png(path: Path, side: int) -> None:
    """A real ``side``×``side`` RGB PNG of one colour, written row by row (a few hundred KB on disk): a
    plausible file, but one that needs gigabytes to decode and protect."""
    rows = zlib.compressobj(9)
    row = b"\x00" + b"\x80\x40\x20" * side
    body = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the address-space headroom")
def test_a_file_too_large_for_the_memory_left_fails_alone_under_an_address_space_limit(tmp_path):
    """Under RLIMIT_AS = what the process already maps + 1.5 GiB, a plausible 9000×9000 PNG (about 3 GiB
    to decode and protect) fails with its name and the reason; the small images are protected."""
    src = tmp_path / "src"
    build_source(src, generators=[])
    large_plain_png(src / "class_0" / "large.png", 9000)
    script = textwrap.dedent(f"""
        import resource, sys
        import torch, ueguard.cli, ueguard.methods, ueguard.sdk.protect  # mapped before the limit is set
        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 29), resource.RLIM_INFINITY))
        sys.argv = ["ueguard", "protect", {str(src)!r}, "--out", {str(tmp_path / 'out')!r}, *{RUN!r}]
        ueguard.cli.main()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 3, done.stderr
    records = {r["source"]: r for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "file"}
    large = records[str(PurePosixPath("class_0/large.png"))]
    assert large["status"] == "failed" and "9000x9000 pixels need about" in large["error"], large
    assert "large.png" in large["error"] and "large.png" in done.stderr
    assert sum(r["status"] == "ok" for r in records.values()) == 6
