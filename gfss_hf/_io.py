"""Atomic file and folder writers that give their results the mode of a plain write.

Every file the package, its scripts and the Space write goes through here: a reader (or a run killed mid-write)
never sees a half-written file or folder, and the result is readable by whoever the process's umask allows, as a
plain `open()` / `mkdir()` would be (`tempfile` creates private 0600 / 0700 entries).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "apply_umask",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "ensure_writable_dir",
]


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """
    Create `path` if needed and check that a file can be written in it, before any long work whose results would
    otherwise be lost at the end.

    Args:
        path (`str` or `os.PathLike`): the folder.
        what (`str`, *optional*): how error messages name it (e.g. the flag, `"--output_dir"`).

    Raises:
        `NotADirectoryError`: `path` is an existing file. `PermissionError` / `OSError`: it cannot be created or
        written to; the message names the folder and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is an existing file, not a folder; give a folder path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(
            f"{what} {str(path)!r} is not writable ({err.strerror}); give a folder you can write to."
        ) from err
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux: `/proc/self/status`)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere: set and restore (not atomic with respect to other threads, hence the fallback only).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """
    Give `path` the mode a plain `open()` / `mkdir()` would have: `0o666 & ~umask` for a file, `0o777 & ~umask` for
    a folder.

    `tempfile.mkstemp` / `mkdtemp` create 0600 / 0700 (private) entries, which an atomic write would otherwise hand
    on to the final file, unreadable to the group the umask allows; safetensors (0.8) also creates its files 0600.

    Args:
        path (`str` or `os.PathLike`): an existing file or folder.
        directory (`bool`, *optional*, defaults to `False`): `path` is a folder.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """
    Write `data` to `path` through a temporary file in the same folder and `os.replace`, so readers never see a
    half-written file. The file gets the mode of a plain write (`0o666 & ~umask`); parent folders are created.

    Args:
        path (`str` or `os.PathLike`): the destination file.
        data (`bytes`): its whole content.

    Example:

    ```python
    >>> atomic_write_bytes("out/mask.png", png_bytes)  # doctest: +SKIP
    ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        apply_umask(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"no space left on device while writing {str(path)!r}; free disk space and run again"
            ) from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see [`atomic_write_bytes`])."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`json.dumps(obj, sort_keys=True)` to `path` atomically (see [`atomic_write_bytes`]); for caches, not reports."""
    atomic_write_bytes(path, json.dumps(obj, sort_keys=True).encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False):
    """
    Build a folder in a temporary sibling and rename it into place on success, so that readers never see a half
    folder and a failure leaves nothing behind. The folder gets the mode of a plain `mkdir`.

    Args:
        path (`str` or `os.PathLike`): the folder to create; it must not exist, or be empty, unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder (only once the
            new one is complete).

    Example:

    ```python
    >>> with atomic_folder("out/model") as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    ```
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} is an existing file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"folder {str(path)!r} is not empty; give a new folder, or allow overwriting it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes a private folder) so that the result has the umask's mode.
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
