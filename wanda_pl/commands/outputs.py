"""Output folders a run owns: written atomically, and never replacing anything the run did not write.

A run writes into a hidden sibling of ``output_dir`` and renames it into place only when it
succeeds. Every folder it commits carries a marker (``.wanda_pl-output.json``) listing the entries
it wrote. An existing ``output_dir`` is replaced only when it is empty, or when it is an output of
ours holding nothing beyond what its marker lists; anything else is refused before any work, as
are the working directory, the home folder, a filesystem root (and any folder above them) and any
folder holding an input of the run, or a location this user cannot write. Of a replaced folder
only the listed entries are deleted. One run at a time writes a given ``output_dir`` (:mod:`.lock`);
a full disk or a read-only folder while writing is reported as such, with nothing half-written.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set

from ..errors import UserError, signals_deferred
from .lock import output_lock
from .writable import not_writable, write_fault

log = logging.getLogger(__name__)

MARKER = ".wanda_pl-output.json"
_SHOWN = 5  # foreign entries named in a refusal


class OutputDirError(UserError):
    """An ``output_dir`` this run may not write (raised before any work)."""


def _forms(path) -> Set[Path]:
    """The absolute path as given and with symlinks resolved: a link and its target both count."""
    p = Path(path).expanduser()
    return {Path(os.path.abspath(p)), p.resolve()}


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def owned_entries(folder: Path) -> Optional[Set[str]]:
    """The entries (relative POSIX paths) a previous run of ours wrote into ``folder``, or None
    when ``folder`` carries no valid marker of ours."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "wanda_pl" or not isinstance(data.get("entries"), list):
        return None
    return {str(e) for e in data["entries"]}


def _walk(folder: Path, descend=lambda entry: True) -> Iterator[str]:
    """Every file, folder and link under ``folder`` (relative, sorted, parents before children, the
    marker left out), entering only the subfolders ``descend`` accepts."""
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        dirs[:] = sorted(dirs)
        for name in dirs + sorted(files):
            entry = (rel / name).as_posix()
            if entry != MARKER:
                yield entry
        dirs[:] = [d for d in dirs if descend((rel / d).as_posix())]


def _entries(folder: Path) -> List[str]:
    return list(_walk(folder))


def foreign_entries(folder: Path) -> List[str]:
    """Entries of an existing ``folder`` that no run of ours wrote; a foreign folder is named once
    and not walked (a refused folder may be huge)."""
    owned = owned_entries(folder)
    left = {p.name for p in leftovers(folder)} if owned is not None else set()
    owned = owned or set()
    return [e for e in _walk(folder, descend=owned.__contains__) if e not in owned and e not in left]


# What a run of ours killed outright (SIGKILL, power loss) leaves in a folder of ours, named so
# that nothing else is: a point's hidden stage, a temporary file of an atomic write, a lock file.
_LEFTOVER = re.compile(r"^\..+\.(partial\.[A-Za-z0-9_]{8}|wanda_pl-tmp\.[A-Za-z0-9_]{8}|wanda_pl\.lock)$")
TMP_TAG = ".wanda_pl-tmp."  # in every temporary file name of ours (see _LEFTOVER)


def leftovers(folder: Path) -> List[Path]:
    """The leftovers of killed runs of ours directly inside ``folder``."""
    try:
        return sorted(p for p in Path(folder).iterdir() if _LEFTOVER.match(p.name) and not p.is_symlink())
    except OSError:
        return []


def remove_leftovers(folder: Path) -> None:
    """Delete them from a folder of ours; a lock file only once no live run holds it (else refused)."""
    if owned_entries(folder) is None:
        return
    for path in leftovers(folder):
        log.warning("removing %s, left in %s by an earlier run of ours that was killed", path.name, folder)
        if path.name.endswith(".wanda_pl.lock"):
            with output_lock(path.with_name(path.name[1:-len(".wanda_pl.lock")])):
                pass  # released and removed by the lock itself
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_output_dir(output_dir, inputs: Mapping[str, object] = (), writes: Mapping[str, object] = ()) -> Path:
    """Refuse, before any work, an ``output_dir`` this run may not replace; return it resolved.

    ``inputs`` maps a name for the message (``model.init_args.name_or_path``) to a path the run
    reads (paths that do not exist are ignored); ``writes`` names folders others fill during the
    run (Lightning's ``trainer.default_root_dir``), which must lie outside it."""
    if output_dir is None or str(output_dir).strip() == "":
        raise OutputDirError("output_dir is empty; give a folder for the run's outputs")
    given = str(output_dir)
    forms = _forms(output_dir)
    out = Path(os.path.abspath(Path(output_dir).expanduser()))
    special = {"the current working directory": Path.cwd(), "the home folder": Path(os.path.expanduser("~"))}
    for form in forms:
        if form == Path(form.anchor):
            raise OutputDirError(f"output_dir {given!r} is a filesystem root; a run replaces its output_dir "
                                 f"as a whole: choose a new folder for it")
    for exact in (True, False):  # "is the home folder" before "holds the working directory"
        for form in forms:
            for what, where in special.items():
                if any(place == form if exact else _contains(form, place) for place in _forms(where)):
                    rel, hint = ("is", f", e.g. {os.path.join(given, 'run1')!r}") if exact else ("holds", "")
                    raise OutputDirError(f"output_dir {given!r} {rel} {what} ({where}); a run replaces its "
                                         f"output_dir as a whole and never touches what it did not create: "
                                         f"choose a new folder{hint}")
    for name, path in dict(writes).items():
        if path is not None and str(path) and any(_contains(form, place) for form in forms for place in _forms(path)):
            raise OutputDirError(f"{name}={str(path)!r} lies inside output_dir {given!r}: what is written there during "
                                 f"the run would be mixed into the run's output; put one of them elsewhere")
    items = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    for name, path in items:
        if path is None or not isinstance(path, (str, os.PathLike)) or str(path) == "":
            continue
        if not Path(path).expanduser().exists():
            continue
        for place in _forms(path):
            if any(_contains(form, place) for form in forms):
                raise OutputDirError(
                    f"output_dir {given!r} would overwrite the input {str(path)!r} ({name}); a run never "
                    f"replaces its inputs: choose another folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputDirError(f"output_dir {given!r} exists and is not a folder of ours; choose a new folder, "
                             f"or remove it yourself")
    if out.is_dir():
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:_SHOWN]) + (f" (and {len(foreign) - _SHOWN} more)" if len(foreign) > _SHOWN else "")
            kind = "an output of an earlier run with files added since" if owned_entries(out) is not None else \
                "not an output of wanda_pl"
            raise OutputDirError(
                f"output_dir {given!r} holds files this program did not write ({kind}): {shown}. A run replaces "
                f"its output_dir as a whole, so it only replaces empty folders and its own earlier outputs: "
                f"choose a new folder, or remove {given!r} yourself")
    reason = not_writable(out, given)
    if reason:
        raise OutputDirError(reason)
    return out




def _write_marker(stage: Path, command: str) -> None:
    claim(stage, _entries(stage), command)


def _remove_owned(folder: Path, owned: Set[str]) -> None:
    """Delete of ``folder`` only the entries in ``owned`` (and the marker), deepest first; whatever
    else it holds stays, and so does the folder then."""
    remove_leftovers(folder)
    for entry in sorted(owned | {MARKER}, key=lambda e: e.count("/"), reverse=True):
        path = folder / entry
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                path.rmdir()  # empty by now unless something foreign is inside: then it stays
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        log.warning("kept %s: it holds files this run did not write", folder)


@contextmanager
def staged_dir(output_dir, inputs: Mapping[str, object] = (), command: str = "run",
               writes: Mapping[str, object] = ()) -> Iterator[Path]:
    """A hidden sibling of ``output_dir`` to write into; committed in place of ``output_dir`` only if
    the body succeeds (a failed run leaves no half-written output and the previous one intact)."""
    out = check_output_dir(output_dir, inputs, writes)
    with ExitStack() as cleanup:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            cleanup.enter_context(output_lock(out, output_dir))
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
        except OSError as err:
            raise write_fault(err, output_dir, out) or err
        cleanup.callback(shutil.rmtree, stage, ignore_errors=True)
        try:
            yield stage
            with signals_deferred(f"the output in {str(out)!r} was complete before it"):
                _write_marker(stage, command)
                _commit(stage, out, output_dir, inputs)
        except OSError as err:
            raise write_fault(err, output_dir, out, stage) or err


def _commit(stage: Path, out: Path, given, inputs) -> None:
    try:  # the folder may have changed during a long run
        check_output_dir(given, inputs)
    except OutputDirError as err:
        kept = out.with_name(f"{out.name}.wanda_pl-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(stage, kept)
        raise OutputDirError(f"{err}\nIt changed during the run; this run's outputs are in {str(kept)!r}") from None
    if not out.exists():
        os.replace(stage, out)
        return
    owned = owned_entries(out) or set()
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old)  # onto an empty folder of ours: atomic on POSIX
    try:
        os.replace(stage, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove_owned(old, owned)


def config_inputs(config: Mapping, skip=("output_dir",), prefix: str = "") -> Dict[str, str]:
    """Every string in a (nested) run config that names an existing file or folder, keyed by its
    dotted config key: what the run may read, so what its output must not replace."""
    found: Dict[str, str] = {}
    values = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in values:
        name = f"{prefix}{key}"
        if str(key) in skip:
            continue
        if isinstance(value, (Mapping, list, tuple)):
            found.update(config_inputs(value, skip, name + "."))
        elif isinstance(value, str) and value and Path(value).expanduser().exists():
            found[name] = value
    return found


def run_inputs(config: Optional[Mapping] = None, **named) -> Dict[str, object]:
    """What a run reads, for :func:`check_output_dir`: the paths named in its config plus the
    ones resolved at run time (``model=`` the resolved model folder, ``ckpt_path=``, ...)."""
    return {**(config_inputs(config) if config else {}), **{k: v for k, v in named.items() if v is not None}}


def claim(folder, entries, command: str) -> None:
    """Add ``entries`` (relative paths this run wrote into ``folder``, a folder of ours) to its marker,
    atomically: a folder filled piece by piece (a sweep's points) stays ours as it grows, and what
    others put into it meanwhile does not become ours."""
    from importlib.metadata import version

    folder = Path(folder)
    owned = owned_entries(folder) or set()
    data = {"written_by": "wanda_pl", "version": version("wanda_pl"), "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entries": sorted(owned | set(entries))}
    fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}{TMP_TAG}", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)
