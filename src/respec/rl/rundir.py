"""The run directory: one writer at a time, a recorded identity, and nothing destroyed or mixed.

A training run owns its ``out_dir`` while it runs: an exclusive OS lock on ``out_dir/.lock`` (released
by the kernel when the process ends, however it ends) keeps a second writer out, and the lock file
names its holder. ``run.json`` records the run's identity: an id, the seed, the start time and a hash
of its config without the settings a resume may change (``RESUMABLE``). A new run refuses a directory
that holds another run (its config, metrics, checkpoints or TensorBoard events: a start that failed
before the model loaded leaves none of them); ``overwrite`` moves the old run's files aside
(``NAME.replaced-N``), never deletes them, and leaves anything else in the directory alone. A resume
compares the config with the run's own ``config.yaml`` (read through today's defaults and spellings)
and refuses a change beyond ``RESUMABLE`` unless it is allowed explicitly; ``record_resume`` notes it
in ``run.json`` once the trainer has found a checkpoint to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

import yaml

from ..utils.atomic import write_text_atomic
from ..utils.configs import from_dict
from .config import TrainConfig

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

RESUMABLE = ("steps", "eval_every", "checkpoint_every", "keep_last", "tensorboard", "out_dir", "distributed")
LOCK, IDENTITY, CONFIG = ".lock", "run.json", "config.yaml"
RUN_FILES = (CONFIG, "metrics.jsonl", "checkpoints", "tensorboard")  # what makes a directory a run
MOVED = (*RUN_FILES, IDENTITY, "report")  # what --overwrite moves aside


def config_hash(config: dict) -> str:
    """What makes two runs the same run: the config without the ``RESUMABLE`` settings."""
    fixed = {k: v for k, v in config.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ, as "field (old -> new)", the ``RESUMABLE`` ones left out."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in RESUMABLE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return changes


def _today(saved: dict) -> dict:
    """A saved config as today's code reads it (defaults filled in, old spellings upgraded), so a resume
    compares meanings; the raw file where it no longer loads."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            config = from_dict(saved, TrainConfig)
            config.rollout.upgrade_deprecated()
        return config.to_dict()
    except ValueError:
        return saved


class RunDirectory:
    """``out_dir`` held by this process from ``open`` to ``close``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self.identity: dict = {}
        self.config_changes: list[str] = []  # a resume's changes, recorded by ``record_resume``
        self.moved_aside: Path | None = None
        self._lock_file = None

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def open(self, config: dict, *, resume: bool = False, overwrite: bool = False,
             allow_config_change: bool = False) -> RunDirectory:
        """Take the lock, then check the directory against this run (see the module docstring)."""
        if resume and overwrite:
            raise ValueError("overwrite: a run either resumes its directory or replaces it, not both")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._check(config, resume, overwrite, allow_config_change)
        except BaseException:
            self.close()
            raise
        return self

    def _check(self, config: dict, resume: bool, overwrite: bool, allow_config_change: bool) -> None:
        if resume:
            if not (self.path / CONFIG).is_file():
                raise ValueError(f"resume: {self.path} holds no run to resume (no {CONFIG})")
            self._check_resume(config, allow_config_change)
            return
        if self.holds_run():
            if not overwrite:
                raise ValueError(f"out_dir: {self.path} holds another run{self._describe()}; continue it with "
                                 f"--resume, replace it with --overwrite (it is moved aside), or pick another out_dir")
            self.moved_aside = self._move_aside()
        self.identity = {"run_id": uuid.uuid4().hex[:12], "seed": config.get("seed"), "config_hash": config_hash(config),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumes": []}
        write_text_atomic(self.path / IDENTITY, json.dumps(self.identity, indent=2))

    def _describe(self) -> str:
        identity = self._read_identity()
        return f" (run {identity['run_id']}, started {identity['started']})" if identity else ""

    def _read_identity(self) -> dict:
        try:
            return json.loads((self.path / IDENTITY).read_text())
        except (OSError, ValueError):
            return {}

    def _check_resume(self, config: dict, allow_config_change: bool) -> None:
        try:
            saved = _today(yaml.safe_load((self.path / CONFIG).read_text()) or {})
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"resume: cannot read {self.path / CONFIG}: {err}") from None
        self.config_changes = config_changes(saved, config)
        if self.config_changes and not allow_config_change:
            raise ValueError(f"resume: the config differs from the run's in {', '.join(self.config_changes)}; "
                             f"pass --allow-config-change to continue the run with the new values")
        self.identity = self._read_identity() or {"run_id": uuid.uuid4().hex[:12], "seed": saved.get("seed"),
                                                  "config_hash": config_hash(saved), "started": None, "resumes": []}

    def record_resume(self, step: int) -> None:
        """Note in ``run.json`` that the run resumed from ``step`` (with the config changes allowed)."""
        self.identity.setdefault("resumes", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "config_changes": self.config_changes})
        write_text_atomic(self.path / IDENTITY, json.dumps(self.identity, indent=2))

    def _move_aside(self) -> Path:
        """The old run's files into ``NAME.replaced-N`` beside the directory (the lock, and whatever is
        not a run's, stay here)."""
        number = 1
        while (aside := self.path.with_name(f"{self.path.name}.replaced-{number}")).exists():
            number += 1
        aside.mkdir()
        for name in MOVED:
            if (self.path / name).exists():
                (self.path / name).rename(aside / name)
        return aside

    # ------------------------------------------------------------------ the lock
    def _acquire(self) -> None:
        if fcntl is None:
            return
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 -- held open for the run's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(f"out_dir: {self.path} is in use by {holder}; wait for it to finish or "
                             f"pick another out_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._lock_file = handle

    def close(self) -> None:
        """Release the lock (the kernel releases it anyway when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
