"""The start-up profile of the target: the time of one forward per (active rows, tokens per row).

The adaptive controller needs a prior for every cell of the grid batch 1, 2, 4, ... x tokens
1 .. K+1 before its first step. Timing every cell takes minutes on a busy CPU, so the profile times a
sparse subset (batch 1, 4, 16, ... and the largest; tokens 1, 2 and K+1), fills the rest by linear
interpolation, and leaves the error to the online corrections of the cost model, which measure every
cell a step falls on. It prints what it times and a progress bar with its remaining time, and is cached
on disk per model, device, dtype and thread count, and on CPU per CPU model and the kernels in use (a
faster kernel makes old timings wrong).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import native
from ..models.decoder import DecoderLM
from ..models.kernel_tuning import machine_key
from ..models.linear import kernel_choices
from ..utils.atomic import write_text_atomic
from ..utils.paths import cache_dir as default_cache_dir
from .cache import KVCache

PROFILE_CONTEXT = 192  # cached positions each profiled row attends to: a typical mid-rollout length
REPEATS = 2  # timed runs per cell after one warm-up; the best counts


def batch_grid(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including ``max_batch``."""
    grid = [1]
    while grid[-1] * 2 < max_batch:
        grid.append(grid[-1] * 2)
    if grid[-1] != max_batch:
        grid.append(max_batch)
    return grid


def timed_points(batches: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """The batch sizes and token counts the profile times: powers of 4 and the largest batch; 1, 2 and
    the largest token count."""
    timed_batches = [b for b in batches if b == batches[-1] or (b & (b - 1) == 0 and b.bit_length() % 2 == 1)]
    return timed_batches, sorted({1, min(2, max_tokens), max_tokens})


def profile_table(model: DecoderLM, max_batch: int, max_tokens: int, *, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> tuple[list[int], np.ndarray]:
    """(batch sizes, seconds ``[batches, tokens 1..max_tokens]``), timed once and cached."""
    batches = batch_grid(max_batch)
    path = cache_path(model, batches, max_tokens, cache_dir)
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        return data["batches"], dominated_minimum(np.asarray(data["table"]))
    timed_batches, timed_tokens = timed_points(batches, max_tokens)
    measured = _time_cells(model, timed_batches, timed_tokens, progress, path)
    table = dominated_minimum(interpolate(measured, timed_batches, timed_tokens, batches, max_tokens))
    if path is not None:
        write_text_atomic(path, json.dumps({"batches": batches, "table": table.tolist()}))
    return batches, table


def interpolate(measured: np.ndarray, timed_batches: list[int], timed_tokens: list[int], batches: list[int],
                max_tokens: int) -> np.ndarray:
    """The full grid from the timed cells: linear in the tokens per row, then linear in the batch."""
    tokens = np.arange(1, max_tokens + 1)
    rows = np.array([np.interp(tokens, timed_tokens, row) for row in measured])
    return np.array([np.interp(batches, timed_batches, column) for column in rows.T]).T


def dominated_minimum(table: np.ndarray) -> np.ndarray:
    """Each cell becomes the minimum over the cells with at least as much work (same or larger batch
    and tokens). A step never gets cheaper with more work, while a shared machine only ever makes a
    timing slower: a cell slower than a larger one is an interrupted measurement."""
    out = np.asarray(table, dtype=np.float64).copy()
    out = np.minimum.accumulate(out[::-1], axis=0)[::-1]
    return np.minimum.accumulate(out[:, ::-1], axis=1)[:, ::-1]


@torch.inference_mode()
def _time_cells(model: DecoderLM, batches: list[int], token_counts: list[int], progress: bool,
                path: Path | None) -> np.ndarray:
    max_tokens = token_counts[-1]
    context = min(PROFILE_CONTEXT, model.config.max_position_embeddings - max_tokens)
    cache = KVCache(model.config, batches[-1], context + max_tokens, model.dtype, model.device)
    if progress:
        print(f"profiling the target's step time for the adaptive controller, once for this model and machine: "
              f"{len(batches) * len(token_counts)} forward sizes (batch {batches[0]}-{batches[-1]} x "
              f"{token_counts[0]}-{max_tokens} tokens), the rest interpolated"
              + (f"; cached in {path.parent}" if path is not None else ""), file=sys.stderr, flush=True)
    table = np.zeros((len(batches), len(token_counts)))
    cells = [(i, j) for i in range(len(batches)) for j in range(len(token_counts))]
    for i, j in tqdm(cells, desc="profile", unit="cell", disable=not progress, leave=False):
        batch, tokens = batches[i], token_counts[j]
        ids = torch.randint(model.config.vocab_size, (batch, tokens), device=model.device)
        positions = (context + torch.arange(tokens, device=model.device)).expand(batch, tokens)
        best = float("inf")
        for _ in range(REPEATS + 1):  # the first run warms up
            start = time.perf_counter()
            out = model(ids, positions, cache=cache, rows=slice(0, batch), kv_len=context + tokens)
            model.logits(out.hidden).argmax(-1).cpu()
            best = min(best, time.perf_counter() - start)
        table[i, j] = best
    return table


def cache_path(model: DecoderLM, batches: list[int], max_tokens: int,
               cache_dir: str | os.PathLike | None) -> Path | None:
    """Where the profile of this model, dtype, device, grid and kernels is kept; None: ``cache_dir`` is ""."""
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
    timed = timed_points(batches, max_tokens)  # a sparse table is cached apart from a full one
    key = json.dumps([repr(model.config), str(model.dtype), device_name, batches, max_tokens, PROFILE_CONTEXT, timed])
    return Path(cache_dir) / "profiles" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
