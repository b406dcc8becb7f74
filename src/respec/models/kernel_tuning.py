"""Time the small-batch matmul kernels on the model's own weights and keep the fastest per shape.

The best kernel for a few rows times a weight matrix differs between CPUs (see linear.py), so the
engine times each candidate once per machine: for every weight shape of the model and every row
bucket, one pass over the model's matrices of that shape (so the weights stream from memory as in a
real decode step), candidates interleaved, best of a few passes. Choices are saved per machine in
the cache directory and installed into ``fast_linear``'s table. GPUs never use this path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomic
from .linear import ROW_BUCKETS, Linear, eligible_kernels, run_kernel, set_kernel_choices
from .presets import cache_dir

# Matrices smaller than this are tiny test models: their timings are noise and nothing to gain.
MIN_MATRIX_BYTES = 256 * 1024
# Per shape, time one pass over at most this many bytes of its matrices (enough to leave the caches
# of a loaded machine, little enough that tuning SmolLM2-135M takes a few seconds once).
PASS_BYTES = 48 * 1024 * 1024
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
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"


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
    choices: dict[tuple, str] = {}
    changed = False
    with torch.no_grad():
        for (out_features, in_features, dtype), weights in by_shape.items():
            entry = saved.setdefault(machine_key(dtype), {})
            for rows in ROW_BUCKETS:
                name = f"{out_features}x{in_features}@{rows}"
                if entry.get(name) not in eligible_kernels(out_features, in_features):
                    entry[name] = fastest_kernel(weights, rows)
                    changed = True
                choices[(out_features, in_features, rows)] = entry[name]
    if changed:
        _write_saved(cache_file, saved)
    set_kernel_choices(choices)
    return choices


def fastest_kernel(weights: list[torch.Tensor], rows: int) -> str:
    """The eligible kernel with the shortest best-of-``PASSES`` time over the weights."""
    out_features, in_features = weights[0].shape
    per_matrix = weights[0].numel() * weights[0].element_size()
    group = weights[: max(1, PASS_BYTES // per_matrix)]
    x = torch.randn(rows, in_features, dtype=weights[0].dtype)
    kernels = eligible_kernels(out_features, in_features)
    for kernel in kernels:  # warm-up: first-call allocations and kernel selection
        run_kernel(kernel, x, group[0])
    best = {kernel: float("inf") for kernel in kernels}
    for _ in range(PASSES):
        for kernel in kernels:
            start = time.perf_counter()
            for weight in group:
                run_kernel(kernel, x, weight)
            best[kernel] = min(best[kernel], time.perf_counter() - start)
    return min(best, key=best.get)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
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
