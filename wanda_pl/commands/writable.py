"""Whether an output location can be written, and what a failed write means for the user.

Before the run: the folder the stage and lock go into must be writable (root writes anyway, except
on a read-only file system). While it writes: a full disk, a quota, a read-only file system, or a
denied write inside the stage is the user's to fix, said in one line; any other OSError is a crash.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

from ..errors import UserError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}


def not_writable(out: Path, given: str) -> Optional[str]:
    """Why ``out`` cannot be created or replaced (the nearest existing folder above it is not
    writable), or None."""
    place = out.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if os.access(place, os.W_OK | os.X_OK):
        return None
    why = "is on a read-only file system" if os.statvfs(place).f_flag & os.ST_RDONLY else "is not writable by this user"
    return (f"output_dir {given!r} cannot be written: {str(place)!r} {why}; choose a folder you can write, "
            f"or change its permissions")


def write_fault(err: OSError, given, out: Path, stage: Optional[Path] = None) -> Optional[UserError]:
    """A full disk or a refused write while the run writes its outputs (into ``stage``; None: while
    setting it up), as a user error; None for another fault (a denied read of an input is not ours
    to explain)."""
    filename = None if err.filename is None else Path(os.path.abspath(err.filename))
    ours = stage is None or (filename is not None and (filename == stage or stage in filename.parents))
    if err.errno not in _FULL and not (err.errno in _DENIED and ours):
        return None
    where = f" ({filename})" if filename is not None else ""
    kept = ", previous output kept" if out.exists() else ""
    fault = UserError(f"could not write output_dir {str(given)!r}: {os.strerror(err.errno)}{where}; "
                      f"nothing written{kept}")
    fault.__cause__ = err  # the traceback under WANDA_PL_DEBUG shows the write that failed
    return fault
