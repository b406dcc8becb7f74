"""Checkpoints of a training run, written so that a crash at any moment leaves a loadable run.

``RUN/checkpoints/step-000010/`` holds ``actor/`` (HF format: opens with transformers),
``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, the online learner and its
head) and ``COMPLETE``. Everything is written into a hidden staging directory that is renamed into
place only when whole: the weights are checked finite before anything is written, the files are
checked present and the actor's safetensors whole (its header matches its size), and ``COMPLETE`` is
written last with every file's size. A resume takes the newest checkpoint whose files all match
``COMPLETE`` and falls back past a damaged one; older checkpoints beyond ``keep_last`` are deleted
only after the new one is in place, and a run removes only its own staging directories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.decoder import DecoderLM
from ..models.loading import save_pretrained

PREFIX = "step-"
MARKER = "COMPLETE"
STATE = "trainer_state.pt"
REQUIRED = ("actor/config.json", "actor/model.safetensors", STATE)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def save_checkpoint(run_dir: str | Path, step: int, actor: DecoderLM, state: dict[str, Any],
                    tokenizer: Any = None, keep_last: int = 2, owner: str = "") -> Path:
    """Write step ``step`` atomically, then prune all but the newest ``keep_last`` complete ones.
    ``owner`` (the run's id) names the staging directory, so pruning touches only this run's."""
    bad = non_finite_tensors(actor)
    if bad:
        raise ValueError(f"checkpoint: step {step} not saved, the actor's {bad[0]} holds NaN or inf "
                         f"({len(bad)} tensors); the last complete checkpoint stays the newest")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(final.name, owner), dir=root))
    try:
        save_pretrained(actor, staging / "actor", tokenizer=tokenizer)
        torch.save(state, staging / STATE)
        _check_written(staging)
        _fsync_tree(staging)
        sizes = {str(f.relative_to(staging)): f.stat().st_size for f in sorted(staging.rglob("*")) if f.is_file()}
        (staging / MARKER).write_text(json.dumps({"step": step, "files": sizes}, indent=1))
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(root, keep_last, owner, keep=final)
    return final


def _staging_prefix(name: str, owner: str) -> str:
    return f".{name}.{owner}." if owner else f".{name}."


def _check_written(staging: Path) -> None:
    """Every required file is there and the actor's safetensors is whole."""
    missing = [name for name in REQUIRED if not (staging / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint: {', '.join(missing)} missing after the save in {staging}")
    problem = safetensors_problem(staging / "actor" / "model.safetensors")
    if problem:
        raise ValueError(f"checkpoint: {problem} after the save")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (None: it is): its header must parse and its tensors' data
    must end exactly where the file does."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"{path} is unreadable ({err})"
    size = path.stat().st_size
    if size != 8 + length + end:
        return f"{path} has {size} bytes, its header describes {8 + length + end}"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint that claims to be complete cannot be loaded (None: it can): a file its
    ``COMPLETE`` lists is missing or has another size, or a required file is absent."""
    try:
        manifest = json.loads((path / MARKER).read_text())
        files = manifest["files"] if isinstance(manifest, dict) else None
    except (OSError, ValueError, KeyError):
        files = None  # an older checkpoint whose marker holds only the step: check the required files
    for name in REQUIRED:
        if not (path / name).is_file():
            return f"{name} is missing"
    if files is None:
        return safetensors_problem(path / "actor" / "model.safetensors")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with their ``COMPLETE`` marker, oldest first (staging directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def resume_candidates(run_dir: str | Path, step: int | None = None) -> list[Path]:
    """The sound checkpoints a resume may start from, the preferred first: newest first (a damaged one
    is reported and passed over), or only the one of ``step``, which must be sound."""
    candidates = complete_checkpoints(run_dir)
    if step is not None:
        chosen = [p for p in candidates if checkpoint_step(p) == step]
        if not chosen:
            steps = [checkpoint_step(p) for p in candidates]
            raise ValueError(f"resume_from: no complete checkpoint of step {step} in {checkpoint_dir(run_dir)} "
                             f"(complete: {steps or 'none'})")
        problem = checkpoint_problem(chosen[0])
        if problem:
            raise ValueError(f"resume_from: checkpoint {chosen[0]} is damaged: {problem}")
        return chosen
    sound = []
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            sound.append(path)
        else:
            warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to an earlier one",
                          RuntimeWarning, stacklevel=2)
    return sound


def latest_checkpoint(run_dir: str | Path, step: int | None = None) -> Path | None:
    """The newest sound checkpoint, or the one of ``step`` (see ``resume_candidates``); None: none."""
    candidates = resume_candidates(run_dir, step)
    return candidates[0] if candidates else None


def set_aside_after(run_dir: str | Path, step: int) -> Path | None:
    """A run resumed from ``step`` goes on from there: the checkpoints past it (an abandoned future, a
    damaged save) move into ``checkpoints/superseded-N/``, where resume and pruning no longer see them
    and nothing is lost. Returns that folder, or None when there was nothing past ``step``."""
    root = checkpoint_dir(run_dir)
    later = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name.removeprefix(PREFIX).isdigit()
             and checkpoint_step(p) > step]
    if not later:
        return None
    number = 1
    while (aside := root / f"superseded-{number}").exists():
        number += 1
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    return aside


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE, weights_only=False)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure means a damaged file
        raise ValueError(f"checkpoint: cannot read {path / STATE} ({type(err).__name__}: {err}); "
                         f"resume from an earlier step with --resume-from") from None


def clear_staging(run_dir: str | Path) -> None:
    """Remove every staging directory (saves that never finished); only for the holder of the run's lock."""
    root = checkpoint_dir(run_dir)
    for leftover in root.glob(f".{PREFIX}*") if root.is_dir() else ():
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def prune(root: Path, keep_last: int, owner: str = "", keep: Path | None = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and ``keep``, the one just saved); remove
    this run's leftover staging directories."""
    complete = complete_checkpoints(root.parent)
    for old in complete[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    if owner:
        for leftover in root.glob(f".{PREFIX}*.{owner}.*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename that publishes them (a crash must not publish empty files)."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
