"""Bad input files: each one gets a clear message naming it, a manifest record, and the rest of the
folder is still protected. Covers empty, truncated, corrupt and disguised files, decompression bombs,
unreadable files and folders, broken / looping / escaping symlinks, FIFOs, awkward names (spaces,
unicode, leading dashes, non-UTF-8 bytes) and outputs that would collide."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner

from trees import _picture, write_class_tree
from unprivileged import permissions_apply, run_ueguard
from ueguard.cli import main
from ueguard.data.folder import scan_folder
from ueguard.data.images import load_image
from ueguard.data.manifest import MANIFEST_NAME, read_manifest

import numpy as np

FAST = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
        "-o", "max_rounds=1", "-o", "pgd_steps=1", "-o", "train_steps=1", "--quiet"]
NON_UTF8 = os.fsdecode(b"class_0/caf\xe9.png")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width × height`` gray pixels, with a few bytes of data:
    the shape of a decompression bomb, without the memory needed to build a real one."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def write_bad_tree(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """Good images plus one of every kind of bad entry. Returns {source: (status, part of the message)}."""
    write_class_tree(root, n_per_class=4, classes=2, size=16)
    rng = np.random.default_rng(1)
    c0, c1 = root / "class_0", root / "class_1"
    good = (c0 / "img_000.png").read_bytes()
    expect: dict[str, tuple[str, str]] = {}

    def put(rel: str, data: bytes, status: str, message: str) -> None:
        (root / rel).write_bytes(data)
        expect[rel] = (status, message)

    put("class_0/zero.png", b"", "failed", "zero-byte file")
    put("class_0/truncated.png", good[: len(good) // 2], "failed", "truncated or corrupt")
    put("class_0/corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.bytes(300), "failed", "corrupt")
    put("class_0/fake.png", b"hello, I am a text file\n" * 4, "failed", "not an image")
    put("class_0/readme.txt", b"notes\n", "skipped", "unsupported file type '.txt'")
    put("class_1/bomb.png", bomb_png(100_000, 100_000), "failed", "over the limit of 2000")
    _picture(rng, 1, 50, 50).save(c1 / "large.png")  # 2500 pixels: over --max-pixels 2000 as well
    expect["class_1/large.png"] = ("failed", "2500 (50x50) pixels, over the limit of 2000")

    for name in ("with space.png", "ünïcødé 名前.png", "-dash.png", "--help.png"):
        _picture(rng, 0, 16, 16).save(c0 / name)
        expect[f"class_0/{name}"] = ("ok", "")
    os.mkfifo(c0 / "pipe.png")
    expect["class_0/pipe.png"] = ("skipped", "not a regular file")
    with open(os.fsencode(root / NON_UTF8), "wb") as fh:
        fh.write(good)
    expect[NON_UTF8] = ("ok", "")

    # Outputs that would collide (default --format png): the first in walk order is kept.
    _picture(rng, 1, 16, 16).save(c1 / "Pic.png")
    _picture(rng, 1, 16, 16).save(c1 / "pic.jpg")   # → pic.png: differs from Pic.png only in case
    _picture(rng, 1, 16, 16).save(c1 / "same.bmp")
    _picture(rng, 1, 16, 16).save(c1 / "same.png")  # → same.png, exactly the output of same.bmp
    expect["class_1/Pic.png"] = ("ok", "")
    expect["class_1/pic.jpg"] = ("failed", "only in letter case")
    expect["class_1/same.bmp"] = ("ok", "")
    expect["class_1/same.png"] = ("failed", "would overwrite the output of class_1/same.bmp; rename one")

    outside.mkdir(parents=True, exist_ok=True)
    _picture(rng, 1, 16, 16).save(outside / "elsewhere.png")
    (c1 / "broken.png").symlink_to("no-such-file.png")
    expect["class_1/broken.png"] = ("failed", "broken symbolic link")
    (c1 / "loop.png").symlink_to("loop.png")
    expect["class_1/loop.png"] = ("failed", "symbolic link loop")
    (c1 / "escape.png").symlink_to(outside / "elsewhere.png")
    expect["class_1/escape.png"] = ("skipped", "outside the source folder: not followed; pass --follow-symlinks")
    (c1 / "inside.png").symlink_to(c0 / "img_001.png")
    expect["class_1/inside.png"] = ("ok", "")
    (c1 / "folder_link").symlink_to(c0, target_is_directory=True)
    expect["class_1/folder_link"] = ("skipped", "symbolic link to a folder")
    for rel in [f"class_{k}/img_{i:03d}.png" for k in range(2) for i in range(4)]:
        expect[rel] = ("ok", "")
    return expect


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    expect = write_bad_tree(base / "src", base / "outside")
    result = CliRunner().invoke(main, ["protect", str(base / "src"), "--out", str(base / "out"), *FAST,
                                       "--max-pixels", "2000"], catch_exceptions=False)
    return base, expect, result


def test_every_bad_entry_is_recorded_with_a_message_naming_it(bad_run):
    base, expect, result = bad_run
    assert result.exit_code == 3, result.output
    records = {r["source"]: r for r in read_manifest(base / "out" / MANIFEST_NAME) if r["kind"] == "file"}
    assert set(records) == set(expect)
    for rel, (status, message) in expect.items():
        rec = records[rel]
        assert rec["status"] == status, (rel, rec)
        if status == "ok":
            assert rec["error"] is None
            continue
        assert message in rec["error"], (rel, rec["error"])
        if status == "failed":
            assert str(PurePosixPath(rel)) in rec["error"], (rel, rec["error"])  # names the file


def test_the_summary_names_failed_files_and_exit_status_is_3(bad_run):
    _, expect, result = bad_run
    failed = [rel for rel, (status, _) in expect.items() if status == "failed"]
    assert f"{len(failed)} file(s) failed" in result.output
    for rel in failed:
        assert rel in result.output, rel


def test_the_good_files_are_protected_and_nothing_else_is_written(bad_run):
    base, expect, _ = bad_run
    out = base / "out"
    for rel, (status, _) in expect.items():
        target = out / PurePosixPath(rel).with_suffix(".png")
        if status == "ok":
            saved, original = load_image(target), load_image(base / "src" / rel)
            assert saved.pixels.shape == original.pixels.shape
            assert not np.array_equal(saved.pixels, original.pixels), rel
        elif rel not in ("class_1/pic.jpg", "class_1/same.png"):  # those outputs belong to another source
            assert not target.exists(), rel
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == {MANIFEST_NAME} | {str(PurePosixPath(rel).with_suffix(".png"))
                                         for rel, (s, _) in expect.items() if s == "ok"}
    assert not (base / "outside" / "elsewhere.png.ueguard").exists()


def test_follow_symlinks_includes_links_out_of_the_source_and_to_folders(tmp_path):
    expect = write_bad_tree(tmp_path / "src", tmp_path / "outside")
    (tmp_path / "src" / "class_0" / "back_up").symlink_to(tmp_path / "src", target_is_directory=True)
    (tmp_path / "src" / "class_0" / "ext_link").symlink_to(tmp_path / "outside", target_is_directory=True)
    plain = {str(e.relpath): e for e in scan_folder(tmp_path / "src").entries}
    followed = {str(e.relpath): e for e in scan_folder(tmp_path / "src", follow_symlinks=True).entries}
    assert plain["class_1/escape.png"].skip_reason and plain["class_0/back_up"].skip_reason
    assert followed["class_1/escape.png"].skip_reason is None and followed["class_1/escape.png"].label == 1
    # a linked folder is walked once (its files appear under the link's name, with the link's class);
    # links back up (a loop) or to a folder already walked (a duplicate) are not walked again
    assert followed["class_0/ext_link/elsewhere.png"].label == 0 and plain["class_0/ext_link"].skip_reason
    assert "already walked" in followed["class_0/back_up"].skip_reason
    assert "already walked" in followed["class_1/folder_link"].skip_reason
    assert not any(rel.startswith("class_0/back_up/") for rel in followed)
    assert followed["class_1/broken.png"].error and followed["class_1/loop.png"].error
    assert len(expect) < len(followed)


def test_unreadable_file_and_folder_are_reported_and_the_rest_protected(tmp_path):
    reason = permissions_apply()
    if reason:
        pytest.skip(reason)
    src = tmp_path / "src"
    write_class_tree(src, n_per_class=3, classes=2, size=16)
    secret, locked = src / "class_0" / "secret.png", src / "class_1" / "locked"
    _picture(np.random.default_rng(0), 0, 16, 16).save(secret)
    locked.mkdir()
    _picture(np.random.default_rng(0), 1, 16, 16).save(locked / "inside.png")
    secret.chmod(0o000)
    locked.chmod(0o000)
    os.chmod(tmp_path, 0o755)
    try:
        done = run_ueguard("protect", str(src), "--out", str(tmp_path / "out"), *FAST)
    finally:
        locked.chmod(0o755)
        secret.chmod(0o644)
    assert done.returncode == 3, done.stderr
    records = {r["source"]: r for r in read_manifest(tmp_path / "out" / MANIFEST_NAME) if r["kind"] == "file"}
    assert records["class_0/secret.png"]["status"] == "failed"
    assert "secret.png: permission denied" in records["class_0/secret.png"]["error"]
    assert records["class_1/locked"]["status"] == "failed"
    assert "locked: cannot list this folder (Permission denied)" in records["class_1/locked"]["error"]
    assert "secret.png" in done.stderr and "locked" in done.stderr
    assert sum(r["status"] == "ok" for r in records.values()) == 6


@pytest.mark.parametrize("fmt, refused_message", [
    ("png", "would overwrite the output of class_0/a.PNG; rename one of them or use --format keep"),
    ("keep", "differs from the output of class_0/a.PNG only in letter case"),
])
def test_case_colliding_names_keep_the_first_and_refuse_the_second(tmp_path, fmt, refused_message):
    from ueguard.sdk.protect import _plan_outputs

    for name in ("a.PNG", "a.png", "b.png"):
        (tmp_path / "src" / "class_0").mkdir(parents=True, exist_ok=True)
        _picture(np.random.default_rng(0), 0, 8, 8).save(tmp_path / "src" / "class_0" / name, format="PNG")
    planned, refused = _plan_outputs(scan_folder(tmp_path / "src"), fmt)
    assert {str(k): str(v) for k, v in planned.items()} == {
        "class_0/a.PNG": "class_0/a.png" if fmt == "png" else "class_0/a.PNG", "class_0/b.png": "class_0/b.png"}
    assert list(map(str, refused)) == ["class_0/a.png"] and refused_message in refused[PurePosixPath("class_0/a.png")]
