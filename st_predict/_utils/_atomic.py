"""Writing outputs so that an interrupted process never leaves a half-written one in their place.

One mechanism for every output st_predict writes: saved models (:meth:`NH2ST.save`), training
checkpoints (:class:`~st_predict.train.EpochCheckpoint`) and the command line's files and folders.
Everything is written under a hidden name beside its target (same file system) and then renamed
into place: a file in one ``os.replace``; a new folder in one rename; into an existing folder file
by file (a chosen file last, e.g. ``model.pt``, whose presence marks a complete model); over an
existing folder by stepping the old one aside first and removing it only once the new one is in.
Standard library only, so the torch-only parts of the package can use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def staging_path(target: str | os.PathLike) -> Path:
    """The fixed hidden sibling ``.<name>.writing`` of ``target``: for writers that must agree on the
    name across processes (every DDP rank calls Lightning's ``save_checkpoint``; rank 0 writes)."""
    target = Path(target)
    return target.with_name(f".{target.name}.writing")


def commit_file(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Flush ``staged`` to disk and rename it over ``target`` in one step."""
    _fsync(Path(staged))
    os.replace(staged, target)


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden path beside ``target`` to write; on success it replaces ``target`` in one
    rename, so ``target`` is either the old file or the complete new one. On failure the hidden file
    is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep colleagues out: the mode open() would give
    try:
        yield Path(tmp)
        commit_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_folder(
    target: str | os.PathLike, *, replace: bool = False, last: str | None = None, create: bool = True
) -> Iterator[Path]:
    """Yield a hidden folder beside ``target`` to write a whole output into (``create=False``: a path
    that does not exist yet, for writers that create their folder themselves).

    On success: a missing ``target`` is the folder renamed (one rename). An existing ``target`` gets
    the new files moved in one by one (files named ``last`` after all others), replacing files of the
    same name and keeping the others; with ``replace=True`` it is replaced as a whole instead (the old
    folder is renamed aside, the new one renamed in, then the old one removed). On failure nothing of
    the run is left and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    staging = work / "new"
    if create:
        staging.mkdir()
    try:
        yield staging
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
        for p in files:
            _fsync(p)
        if not target.exists():
            os.rename(staging, target)
        elif replace:
            os.rename(target, work / "old")
            os.rename(staging, target)
        else:
            for p in files:
                dest = target / p.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
