"""Atomic file writes that follow the user's umask.

A reader sees the old content or the new one, never a torn file (a temporary file in the same folder, then
``os.replace``). The temporary file is created with mode 0666 minus the umask, like any file a program opens
for writing (``tempfile.mkstemp`` would make it 0600): every file of a run folder or a data root then has the
permissions the user's umask gives, the same as the logs and checkpoints other code writes there.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_bytes(path, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``fsync``: flush to disk before the rename (results, records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(str(tmp), flags, 0o666)
            break
        except FileExistsError:  # another writer picked the same name: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(str(tmp), str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
