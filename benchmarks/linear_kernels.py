"""Why ``fast_linear`` exists: weight-streaming speed of small-batch matmuls on this CPU.

For each SmolLM2-135M weight shape and row count M, time ``F.linear`` on a row-major weight (what
transformers runs) against ``fast_linear`` on a column-major weight (what our engine runs), over
enough copies of the matrix to exceed the caches, and report GB/s of weights streamed, next to the
machine's read bandwidth from summing a 1 GiB tensor.

    python benchmarks/linear_kernels.py --out linear_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from respec.bench import measure_read_bandwidth
from respec.models.linear import fast_linear

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
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = {"threads": torch.get_num_threads(), "read_bandwidth_gb_s": measure_read_bandwidth() / 1e9, "rows": []}
    print(f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s, {result['threads']} threads")
    print(f"{'matrix':<9}{'M':>4}{'F.linear GB/s':>15}{'fast_linear GB/s':>18}{'ratio':>7}")
    for name, (out_f, in_f) in SHAPES.items():
        copies = max(2, 300_000_000 // (out_f * in_f * 4))  # > 256 MB: far beyond the caches
        row_major = [torch.randn(out_f, in_f) for _ in range(copies)]
        col_major = [w.t().contiguous().t() for w in row_major]
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, in_f)
            base = stream_gb_s(F.linear, row_major, x)
            ours = stream_gb_s(fast_linear, col_major, x)
            result["rows"].append({"matrix": name, "shape": [out_f, in_f], "rows": m,
                                   "f_linear_gb_s": base, "fast_linear_gb_s": ours})
            print(f"{name:<9}{m:>4}{base:>15.1f}{ours:>18.1f}{ours / base:>7.2f}")
        del row_major, col_major
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
