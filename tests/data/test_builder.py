"""Shared builder plumbing: the atomic writers."""

import os
import stat

import pytest

from gfss_hf._io import atomic_write_bytes, atomic_write_json, atomic_write_text, current_umask


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write_bytes(p, b"x"),
        lambda p: atomic_write_text(p, "x"),
        lambda p: atomic_write_json(p, {"x": 1}),
    ],
    ids=["bytes", "text", "json"],
)
@pytest.mark.parametrize("mask", [0o027, 0o002, 0o077])
def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path, write, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        write(tmp_path / "atomic")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode)
    assert mode == 0o666 & ~mask == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode), oct(mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=r"no space left on device while writing '.*results\.json'"):
        atomic_write_text(tmp_path / "results.json", "{}")
    assert list(tmp_path.iterdir()) == []
