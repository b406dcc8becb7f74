"""Time the small-batch matmul kernels on the model's own weights and keep the fastest per shape.

The best kernel for a few rows times a weight matrix differs between CPUs (see linear.py), so the
engine times each candidate once per machine: for every row bucket, each kernel runs over every
weight shape's matrices in turn (so each timing starts with its weights out of the caches, as in a
real decode step), best of a few passes. Choices are saved per machine in
the cache directory and installed into ``fast_linear``'s table. GPUs never use this path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..utils.atomic import write_text_atomic
from ..utils.paths import cache_dir
from . import native
from .linear import (
    KERNELS,
    NATIVE_KERNELS,
    ROW_BUCKETS,
    Linear,
    eligible_kernels,
    run_kernel,
    set_kernel_choices,
)

# Matrices smaller than this are tiny test models: their timings are noise and nothing to gain.
MIN_MATRIX_BYTES = 256 * 1024
PASSES = 3
DISABLE_ENV = "RESPEC_KERNEL_TUNING"
# What this process has read or tuned, per cache file: engines built again skip the file.
_known: dict[str, dict] = {}


def tunable_weights(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Column-major CPU weights that ``fast_linear`` multiplies: every Linear's and untied or tied LM heads."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        for sub in module.modules():
            weight = sub.weight if isinstance(sub, Linear) else getattr(sub, "head_weight", None)
            if isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dim() == 2 \
                    and weight.t().is_contiguous() and weight.numel() * weight.element_size() >= MIN_MATRIX_BYTES:
                found[id(weight)] = weight
    return list(found.values())


def machine_key(dtype: torch.dtype) -> str:
    cpu = _cpu_model()
    # The kernels on offer are part of the key: a table tuned without the compiled kernel is redone.
    offered = ",".join(k for k in KERNELS if native.available() or k not in NATIVE_KERNELS)
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}|kernels={offered}"


def tune_linear_kernels(modules: Iterable[nn.Module], cache_file: Path | None = None) -> dict[tuple, str]:
    """Choose a kernel per (out, in, row bucket) for the modules' weights, reusing saved choices for
    this machine; install and return them. ``RESPEC_KERNEL_TUNING=0`` turns tuning off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return {}
    by_shape: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for weight in tunable_weights(modules):
        by_shape[(*weight.shape, weight.dtype)].append(weight)
    if not by_shape:
        return {}
    cache_file = cache_file or cache_dir() / "kernels.json"
    if str(cache_file) not in _known:
        _known[str(cache_file)] = _read_saved(cache_file)
    saved = _known[str(cache_file)]
    keys = {dtype: machine_key(dtype) for dtype in {shape[2] for shape in by_shape}}
    entries = {shape: saved.setdefault(keys[shape[2]], {}) for shape in by_shape}
    changed = False
    with torch.no_grad():
        for rows in ROW_BUCKETS:
            untimed = {shape: weights for shape, weights in by_shape.items()
                       if entries[shape].get(_name(shape, rows)) not in eligible_kernels(*shape[:2], rows)}
            if untimed and not changed:
                print(f"timing the CPU's small-batch matmul kernels on the model's weights, once for this machine "
                      f"(saved in {cache_file})", file=sys.stderr, flush=True)
            for shape, kernel in (fastest_kernels(untimed, rows) if untimed else {}).items():
                entries[shape][_name(shape, rows)] = kernel
                changed = True
    if changed:
        _write_saved(cache_file, saved)
    choices = {(*shape[:2], rows): entries[shape][_name(shape, rows)] for shape in by_shape for rows in ROW_BUCKETS}
    set_kernel_choices(choices)
    return choices


def _name(shape: tuple[int, int, torch.dtype], rows: int) -> str:
    return f"{shape[0]}x{shape[1]}@{rows}"


def fastest_kernels(groups: dict[tuple, list[torch.Tensor]], rows: int) -> dict[tuple, str]:
    """Per shape, the eligible kernel with the shortest best-of-``PASSES`` time over its weights.

    A forward pass streams every weight of the model once, so a matrix is never still in the caches
    when its turn comes (unless the whole model fits in them). The timings reproduce that: each kernel
    runs over every shape's weights in turn before the next kernel, so between two timings of a shape
    all the other weights are read. Timing one shape's weights over and over instead kept them in a
    large L3 and chose compute-bound kernels that lose when the weights come from DRAM."""
    inputs = {shape: torch.randn(rows, shape[1], dtype=shape[2]) for shape in groups}
    eligible = {shape: eligible_kernels(*shape[:2], rows) for shape in groups}
    for shape, weights in groups.items():  # warm-up: first-call allocations and kernel selection
        for kernel in eligible[shape]:
            run_kernel(kernel, inputs[shape], weights[0])
    best = {(shape, kernel): float("inf") for shape in groups for kernel in eligible[shape]}
    for _ in range(PASSES):
        for kernel in KERNELS:
            for shape, weights in groups.items():
                if kernel in eligible[shape]:
                    start = time.perf_counter()
                    for weight in weights:
                        run_kernel(kernel, inputs[shape], weight)
                    best[shape, kernel] = min(best[shape, kernel], time.perf_counter() - start)
    return {shape: min(eligible[shape], key=lambda kernel: best[shape, kernel]) for shape in groups}


def _cpu_model() -> str:
    for line in native.cpu_info().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _read_saved(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no file yet, or a damaged one: tune again and overwrite it


def _write_saved(path: Path, data: dict) -> None:
    try:
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache directory only costs re-tuning in the next process
