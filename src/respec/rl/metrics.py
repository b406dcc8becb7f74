"""Metric sinks: ``metrics.jsonl`` always (one object per step), TensorBoard when asked for.

Names follow docs/ARCHITECTURE.md: ``train/reward``, ``sd/accept_len``, ``timing_s/rollout`` ...
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..utils.atomic import write_text_atomic


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = False, resume_after: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            self._truncate_after(resume_after)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise ValueError("tensorboard: install the 'tensorboard' package or set tensorboard=false") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self._file = self.path.open("a")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the checkpoint does not cover (they will be run again) and a
        line torn by a run killed mid-write."""
        if not self.path.is_file():
            return
        rows = read_rows(self.path)
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= step))

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
    return read_rows(path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics file. A torn last line (the run was killed while writing it) is left out
    with a warning naming the file and line; a bad line before the last is an error naming them."""
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as err:
            if index == last:
                warnings.warn(f"metrics: {path} line {index + 1} is torn (the run stopped while writing it); "
                              f"left out", RuntimeWarning, stacklevel=3)
                continue
            raise ValueError(f"metrics: {path} line {index + 1} is not a JSON object ({err})") from None
        rows.append(row)
    return rows
