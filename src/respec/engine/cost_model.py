"""What a decode step costs: a start-up profile of the target, refined online from measured steps.

The target's time for a forward over ``tokens`` new positions in each of ``batch`` rows is profiled
once on a grid (batch 1, 2, 4, ... x tokens 1 .. K+1) and cached on disk per model, device, dtype and
thread count, and on CPU per CPU model and kernels in use (kernel set, tuned table, compiled build),
since a faster kernel makes the old timings wrong. Each step's measured time then corrects the grid
entry it fell on (an exponentially weighted ratio measured / profiled; at first a mean with the
prior), which also absorbs
what the profile leaves out (sampling, verification, book-keeping). An entry not measured yet borrows
the correction of the nearest measured batch size with the same tokens per row: that overhead changes
slowly with the batch, so a decaying batch (a rollout's long tail) does not pay to learn it again at
every size. A drafter's time per draft step is learned online only, per batch bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..models import native
from ..models.decoder import DecoderLM
from ..models.kernel_tuning import machine_key
from ..models.linear import kernel_choices
from ..utils.atomic import write_text_atomic
from ..utils.paths import cache_dir as default_cache_dir
from .cache import KVCache

# Once a grid cell has a few measurements, one step counts as at most this factor off its estimate:
# a stall of 2x would otherwise shift an arm's predicted time by a fifth and flip the choice.
SPIKE = 1.25
PROFILE_CONTEXT = 192  # cached positions each profiled row attends to: a typical mid-rollout length


def batch_grid(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch``."""
    grid = [1]
    while grid[-1] * 2 < max_batch:
        grid.append(grid[-1] * 2)
    if grid[-1] != max_batch:
        grid.append(max_batch)
    return grid


class CostModel:
    """Predicted seconds of a target forward, a drafter's proposal and a drafter's catch-up."""

    def __init__(self, batches: list[int], table: np.ndarray, decay: float = 0.8) -> None:
        if table.shape[0] != len(batches) or table.ndim != 2:
            raise ValueError(f"profile: table shape {table.shape} does not match {len(batches)} batch sizes")
        self.batches = np.asarray(batches, dtype=np.float64)
        self.table = np.asarray(table, dtype=np.float64)  # [batches, tokens 1..T]
        self.correction = np.ones_like(self.table)
        self.observed = np.zeros(self.table.shape, dtype=np.int64)  # measurements per entry
        self.decay = decay
        self.draft_step: dict[str, np.ndarray] = {}  # drafter -> seconds per draft step per bucket (nan = unknown)
        self.catch_up_scale: dict[str, float] = {}  # drafter -> measured / modelled catch-up time (EW)

    @property
    def max_tokens(self) -> int:
        return self.table.shape[1]

    def bucket(self, batch: int) -> int:
        return int(np.abs(np.log2(self.batches) - np.log2(max(batch, 1))).argmin())

    def _profiled(self, batch: int, tokens: int) -> float:
        column = self.table[:, min(tokens, self.max_tokens) - 1]
        value = float(np.interp(batch, self.batches, column))
        if batch > self.batches[-1]:  # past the grid: linear in the batch
            value *= batch / self.batches[-1]
        if tokens > self.max_tokens:  # past the grid: linear in the tokens per row
            row = self.table[self.bucket(batch)]
            per_token = (row[-1] - row[0]) / max(self.max_tokens - 1, 1)
            value += per_token * (tokens - self.max_tokens)
        return value

    def _correction(self, bucket: int, column: int) -> float:
        if self.observed[bucket, column]:
            return float(self.correction[bucket, column])
        measured = np.flatnonzero(self.observed[:, column])
        if measured.size == 0:
            return 1.0
        return float(self.correction[measured[np.abs(measured - bucket).argmin()], column])

    def observations(self, batch: int, tokens: np.ndarray) -> np.ndarray:
        """Steps measured on the grid cells that (batch, tokens[i]) steps fall on."""
        return self.observed[self.bucket(batch), np.minimum(tokens, self.max_tokens) - 1]

    def target_time(self, batch: int, tokens: int) -> float:
        """A step of the target over ``tokens`` positions per row (AR: 1, verify: k + 1), all included."""
        return self._profiled(batch, tokens) * self._correction(self.bucket(batch), min(tokens, self.max_tokens) - 1)

    def draft_time(self, drafter: str, batch: int, k: int) -> float:
        """``k`` draft steps; a drafter never measured at any batch size costs 0 (optimism: try it)."""
        known = self.draft_step.get(drafter)
        if known is None or np.all(np.isnan(known)):
            return 0.0
        bucket = self.bucket(batch)
        if np.isnan(known[bucket]):  # the nearest measured bucket stands in
            measured = np.flatnonzero(~np.isnan(known))
            bucket = int(measured[np.abs(measured - bucket).argmin()])
        return float(known[bucket]) * k

    def catch_up_time(self, kind: str, drafter: str, batch: int, missed: float, reread: float | None = None) -> float:
        """Bringing a drafter up to date after ``missed`` tokens per row decoded without it, of which a
        "target" drafter must re-read ``reread`` (default: all) from the target (the rest it shadowed)."""
        return self._catch_up_model(kind, drafter, batch, missed, reread) * self.catch_up_scale.get(drafter, 1.0)

    def _catch_up_model(self, kind: str, drafter: str, batch: int, missed: float, reread: float | None) -> float:
        if missed <= 0 or kind == "none":
            return 0.0
        own = self.draft_time(drafter, batch, 1) * self._extend_factor(batch, missed)
        reread = missed if reread is None else reread
        if kind == "target" and reread > 0:  # a read-only target pass over the positions not shadowed
            return self._profiled(batch, max(1, round(reread))) + own
        return own

    def _extend_factor(self, batch: int, entries: float) -> float:
        """The drafter's own extend pass over ``entries`` per row, in draft steps: it grows with the
        entries as a target forward over as many tokens per row grows over a one-token step, since
        both are one weight read plus per-token work (flat while memory bound at small batch, linear
        once compute bound at large batch); at least one step, as a pass costs a call like a step."""
        return max(1.0, self._profiled(batch, max(1, round(entries))) / self._profiled(batch, 1))

    def record_catch_up(self, kind: str, drafter: str, batch: int, missed: float, seconds: float,
                        reread: float | None = None) -> None:
        modelled = self._catch_up_model(kind, drafter, batch, missed, reread)
        if modelled <= 0 or seconds <= 0:
            return
        old = self.catch_up_scale.get(drafter)
        ratio = seconds / modelled
        self.catch_up_scale[drafter] = ratio if old is None else self.decay * old + (1 - self.decay) * ratio

    def record_target(self, batch: int, tokens: int, seconds: float) -> None:
        profiled = self._profiled(batch, tokens)
        if profiled <= 0 or seconds <= 0:
            return
        at = self.bucket(batch), min(tokens, self.max_tokens) - 1
        # A mean with one pseudo-measurement of the prior (the borrowed correction, or 1) until the
        # exponentially weighted average takes over: one noisy step cannot condemn an arm.
        weight = max(1 - self.decay, 1 / (self.observed[at] + 2))
        current, ratio = self._correction(*at), seconds / profiled
        if self.observed[at] >= 2:  # a shared machine stalls a step now and then: one spike moves it a little
            ratio = min(max(ratio, current / SPIKE), current * SPIKE)
        self.correction[at] = (1 - weight) * current + weight * ratio
        self.observed[at] += 1

    def record_draft(self, drafter: str, batch: int, k: int, seconds: float) -> None:
        known = self.draft_step.setdefault(drafter, np.full(len(self.batches), np.nan))
        bucket, per_step = self.bucket(batch), seconds / max(k, 1)
        old = known[bucket]
        known[bucket] = per_step if np.isnan(old) else self.decay * old + (1 - self.decay) * per_step

    # ---------------------------------------------------------------- profile
    @classmethod
    def profile(cls, model: DecoderLM, max_batch: int, max_tokens: int, *, cache_dir: str | os.PathLike | None = None,
                repeats: int = 2, decay: float = 0.8) -> CostModel:
        """Time the target on the grid, or load the timings cached for this model, device and dtype."""
        batches = batch_grid(max_batch)
        path = _cache_path(model, batches, max_tokens, cache_dir)
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            return cls(data["batches"], dominated_minimum(np.asarray(data["table"])), decay)
        table = dominated_minimum(_time_grid(model, batches, max_tokens, repeats))
        if path is not None:
            write_text_atomic(path, json.dumps({"batches": batches, "table": table.tolist()}))
        return cls(batches, table, decay)


def dominated_minimum(table: np.ndarray) -> np.ndarray:
    """Each cell becomes the minimum over the cells with at least as much work (same or larger batch
    and tokens). A step never gets cheaper with more work, while a shared machine only ever makes a
    timing slower: a cell slower than a larger one is an interrupted measurement."""
    out = np.asarray(table, dtype=np.float64).copy()
    out = np.minimum.accumulate(out[::-1], axis=0)[::-1]
    return np.minimum.accumulate(out[:, ::-1], axis=1)[:, ::-1]


@torch.inference_mode()
def _time_grid(model: DecoderLM, batches: list[int], max_tokens: int, repeats: int) -> np.ndarray:
    context = min(PROFILE_CONTEXT, model.config.max_position_embeddings - max_tokens)
    cache = KVCache(model.config, batches[-1], context + max_tokens, model.dtype, model.device)
    table = np.zeros((len(batches), max_tokens))
    for i, batch in enumerate(batches):
        for tokens in range(1, max_tokens + 1):
            ids = torch.randint(model.config.vocab_size, (batch, tokens), device=model.device)
            positions = (context + torch.arange(tokens, device=model.device)).expand(batch, tokens)
            best = float("inf")
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                out = model(ids, positions, cache=cache, rows=slice(0, batch), kv_len=context + tokens)
                model.logits(out.hidden).argmax(-1).cpu()
                best = min(best, time.perf_counter() - start)
            table[i, tokens - 1] = best
    return table


def _cache_path(model: DecoderLM, batches: list[int], max_tokens: int,
                cache_dir: str | os.PathLike | None) -> Path | None:
    if cache_dir is None:
        cache_dir = default_cache_dir()
    if str(cache_dir) == "":
        return None
    device = model.device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:  # the CPU, its threads and the kernels the step runs (a new kernel or table makes timings stale)
        choices = sorted(f"{shape}:{kernel}" for shape, kernel in kernel_choices().items())
        device_name = f"{machine_key(model.dtype)}|{native.build_tag()}|{choices}"
    key = json.dumps([repr(model.config), str(model.dtype), device_name, batches, max_tokens, PROFILE_CONTEXT])
    return Path(cache_dir) / "profiles" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
