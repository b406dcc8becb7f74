"""Checkpoints of a training run, written so that a crash at any moment leaves a loadable run.

``RUN/checkpoints/step-000010/`` holds ``actor/`` (HF format: opens with transformers), ``drafter/``
(an EAGLE head, when the run trains one), ``trainer_state.pt`` (optimizer, scheduler, RNG states, data
position, controller) and ``COMPLETE``. Everything is written into a hidden staging directory that is
renamed into place only when whole, and ``COMPLETE`` is its last file: the policy and the drafter are
committed as one step. Resume takes the newest step with ``COMPLETE``. Older checkpoints beyond
``keep_last`` are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.decoder import DecoderLM
from ..models.loading import save_pretrained

PREFIX = "step-"
MARKER = "COMPLETE"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, actor: DecoderLM, state: dict[str, Any],
                    tokenizer: Any = None, drafter: Any = None, keep_last: int = 2) -> Path:
    """Write step ``step`` atomically, then prune all but the newest ``keep_last`` complete ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_pretrained(actor, staging / "actor", tokenizer=tokenizer)
        if drafter is not None:
            drafter.save_pretrained(staging / "drafter")
        torch.save(state, staging / "trainer_state.pt")
        _fsync_tree(staging)
        (staging / MARKER).write_text(str(step))
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones and staging directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)


def prune(root: Path, keep_last: int) -> None:
    complete = complete_checkpoints(root.parent)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(f".{PREFIX}*"):  # staging directories of crashed saves
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename that publishes them (a crash must not publish empty files)."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
