"""Metric sinks: ``metrics.jsonl`` always (one object per step), TensorBoard when asked for.

Names follow docs/ARCHITECTURE.md: ``train/reward``, ``sd/accept_len``, ``timing_s/rollout`` ...
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_after: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            self._truncate_after(resume_after)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise ValueError("tensorboard: install the 'tensorboard' package or set tensorboard=false") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the checkpoint does not cover (they will be run again)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run: {path} not found; is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
