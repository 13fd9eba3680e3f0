"""How a run that stops early says why: user errors, crashes, and interruptions.

A user error is something the user can act on: bad input, a file that is not what it should be, a
full disk, a read-only folder, an output folder another run holds. The CLI prints it as one
``error: ...`` line and exits with 2. The rule: a :class:`UserError` wherever it is raised, or a
refusal type (:data:`REFUSALS`) raised by wanda_pl's own code. Anything else, and a refusal type
raised inside a library, is a crash and keeps its traceback; ``WANDA_PL_DEBUG=1`` shows the
traceback of user errors too.

SIGINT and SIGTERM raise :class:`Interrupted`, a ``KeyboardInterrupt``: Lightning shuts down on it
gracefully and every ``finally`` runs, so the staging folder is removed (Python's default SIGTERM
ends the process without running any of them).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

DEBUG_VARIABLE = "WANDA_PL_DEBUG"
USER_ERROR_EXIT = 2
SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTHING_WRITTEN = "nothing written, previous output kept"

REFUSALS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            NotImplementedError, FloatingPointError)

# Our code: the package and cli.py beside it (the repository layout).
_OURS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "cli.py")


class UserError(ValueError):
    """Input or environment the run refuses; the message names the file or value and what is allowed.
    A ValueError, as the refusals before it, so callers that catch those catch it too."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``outcome`` says what the run left behind."""

    def __init__(self, signum: int, outcome: str = NOTHING_WRITTEN) -> None:
        self.signum, self.outcome = int(signum), outcome
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {outcome}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by a signal"


def debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return path == _OURS[1] or _OURS[0] in path.parents


def raised_by_us(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback (the ``raise``) is in our code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _ours(tb.tb_frame.f_code.co_filename)


def user_message(err: BaseException) -> Optional[str]:
    """The message of a user error, or None for a crash."""
    if isinstance(err, UserError) or (isinstance(err, REFUSALS) and raised_by_us(err)):
        return str(err)
    return None


def interruption(err: BaseException) -> Optional[Interrupted]:
    """The :class:`Interrupted` behind ``err`` (Lightning turns one into ``sys.exit(1)``), or None."""
    seen: List[BaseException] = []
    while err is not None and not any(err is s for s in seen):
        if isinstance(err, Interrupted):
            return err
        seen.append(err)
        err = err.__cause__ or err.__context__
    return None


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (handlers restored after)."""
    if not _main_thread():  # signal handlers can only be set there
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def signals_deferred(outcome: str) -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a commit must not stop half-way); one that
    came meanwhile is raised after it, as :class:`Interrupted` with ``outcome``."""
    if not _main_thread():
        yield
        return
    pending: List[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if pending:
        raise Interrupted(pending[0], outcome)
