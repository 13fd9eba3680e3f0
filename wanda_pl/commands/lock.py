"""One run at a time per output folder: an advisory lock on a hidden file beside it.

``flock`` locks belong to the open file, so the kernel drops the lock of a run that dies, however
it dies: a stale lock file (its holder's pid inside) never blocks the next run. The file is removed
when the run ends; a run that opened it just before then finds it gone and takes a fresh one.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError


def lock_file(out: Path) -> Path:
    return out.with_name(f".{out.name}.wanda_pl.lock")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


def _acquire(path: Path, given: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"output_dir {given!r} is being written by another run ({holder}; lock file "
                            f"{str(path)!r}): wait for it to finish, or choose another folder") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # we locked a file its holder had already removed


@contextmanager
def output_lock(out: Path, given=None) -> Iterator[Path]:
    """Hold the lock of output folder ``out`` for the block; refused at once when another run holds it."""
    path = lock_file(out)
    fd = _acquire(path, str(out if given is None else given))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:  # removed while still locked: whoever opens it meanwhile sees the inode change
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def check_free(out: Path, given=None) -> None:
    """Refuse now, before a model is loaded, an output folder another run is writing (the lock is
    taken for real, and checked again, when this run starts writing)."""
    if lock_file(out).is_file():
        with output_lock(out, given):
            pass
