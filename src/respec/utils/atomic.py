"""Files and directories that appear whole or not at all.

Everything ReSpec writes for a later process to read (models, drafter heads and snapshots, answer
files, timing caches) is written to a staging name beside its destination and renamed into place:
a crash or a concurrent reader never sees half of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a staging file renamed into place; parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text)
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out``; when the block ends without an error it
    replaces ``out`` (an existing one is moved aside first and deleted only afterwards), else it is
    removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path) -> None:
    # rename() is atomic; an existing directory is moved aside first and deleted only afterwards.
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
