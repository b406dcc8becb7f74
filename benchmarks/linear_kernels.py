"""Why ``fast_linear`` chooses its kernel: weight-streaming speed of small-batch matmuls on this CPU.

For each SmolLM2-135M weight shape and row count M, time ``F.linear`` on a row-major weight (what
transformers runs) and each of ``fast_linear``'s kernels on a column-major weight (gemm: the plain
GEMM; k_split: the reduction split in two halves; n_split: the output columns split), over enough
copies of the matrix to exceed the caches, and report GB/s of weights streamed, next to the
machine's read bandwidth from summing a 1 GiB tensor. The engine's tuner (kernel_tuning.py) makes
the same comparison on the model's own weights and keeps the fastest.

    python benchmarks/linear_kernels.py --out linear_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from respec.bench.throughput import measure_read_bandwidth
from respec.models.linear import eligible_kernels, run_kernel

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def stream_gb_s(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int = 5) -> float:
    fn(x, weights[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append(time.perf_counter() - start)
    return sum(w.numel() * 4 for w in weights) / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,5,8,32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = {"threads": torch.get_num_threads(), "read_bandwidth_gb_s": measure_read_bandwidth() / 1e9, "rows": []}
    print(f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s, {result['threads']} threads")
    print(f"{'matrix':<9}{'M':>4}{'F.linear':>10}{'gemm':>8}{'k_split':>9}{'n_split':>9}{'skinny':>8}  (GB/s)")
    for name, (out_f, in_f) in SHAPES.items():
        copies = max(2, 300_000_000 // (out_f * in_f * 4))  # > 256 MB: far beyond most caches
        row_major = [torch.randn(out_f, in_f) for _ in range(copies)]
        col_major = [w.t().contiguous().t() for w in row_major]
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, in_f)
            speeds = {"f_linear": stream_gb_s(F.linear, row_major, x)}
            for kernel in eligible_kernels(out_f, in_f, m):
                speeds[kernel] = stream_gb_s(lambda x, w, kernel=kernel: run_kernel(kernel, x, w), col_major, x)
            result["rows"].append({"matrix": name, "shape": [out_f, in_f], "rows": m, "gb_s": speeds})
            cells = "".join(f"{speeds.get(k, float('nan')):>{w}.1f}" for k, w in
                            (("f_linear", 10), ("gemm", 8), ("k_split", 9), ("n_split", 9), ("skinny", 8)))
            print(f"{name:<9}{m:>4}{cells}", flush=True)
        del row_major, col_major
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
