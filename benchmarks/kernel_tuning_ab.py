"""Does kernel tuning pay? One decoder forward + LM head with the fixed kernel rule vs tuned tables.

For SmolLM2-135M (fp32, CPU) at each (batch, tokens per row) shape of a decode step (tokens > 1: a
speculative verify), time the forward, interleaved, with ``fast_linear``'s fixed rule, with the
choices of ``tune_linear_kernels`` among the BLAS kernels only, and with the compiled skinny kernel
on offer too (when it builds here); report the medians and their ratios to the fixed rule.

    python benchmarks/kernel_tuning_ab.py --out kernel_tuning_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from respec.engine.cache import KVCache
from respec.models import linear, native
from respec.models.kernel_tuning import tune_linear_kernels
from respec.models.loading import load_model

SHAPES = ((1, 1), (1, 3), (1, 5), (4, 1), (4, 5), (8, 1))
CONTEXT = 200


def time_forward(model, cache, batch: int, tokens: int, calls: int) -> float:
    ids = torch.randint(0, 1000, (batch, tokens))
    positions = CONTEXT + torch.arange(tokens)[None].expand(batch, -1)
    for _ in range(2):
        model.logits(model(ids, positions, cache=cache, rows=slice(0, batch), kv_len=CONTEXT + tokens).hidden)
    start = time.perf_counter()
    for _ in range(calls):
        model.logits(model(ids, positions, cache=cache, rows=slice(0, batch), kv_len=CONTEXT + tokens).hidden)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, _ = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        with mock.patch.object(native, "supports", lambda out_features: False), \
                mock.patch.object(native, "available", lambda: False):
            tables = {"fixed": {}, "blas": tune_linear_kernels([model], Path(tmp) / "blas.json")}
        if native.available():
            tables["skinny"] = tune_linear_kernels([model], Path(tmp) / "skinny.json")
    cache = KVCache(model.config, max(b for b, _ in SHAPES), CONTEXT + 16, model.dtype, model.device)
    prompt = torch.randint(0, 1000, (cache.keys[0].shape[0], CONTEXT))
    model(prompt, torch.arange(CONTEXT)[None].expand(prompt.shape[0], -1), cache=cache,
          rows=slice(0, prompt.shape[0]), kv_len=CONTEXT)
    rows = []
    print(f"{'batch':>5}{'tokens':>7}" + "".join(f"{name + ' ms':>11}" for name in tables)
          + "".join(f"{name + ' x':>10}" for name in list(tables)[1:]))
    for batch, tokens in SHAPES:
        times: dict[str, list[float]] = {name: [] for name in tables}
        for _ in range(args.repeats):
            for name, samples in times.items():
                linear.clear_kernel_choices()
                linear.set_kernel_choices(tables[name])
                samples.append(time_forward(model, cache, batch, tokens, calls=8) * 1e3)
        ms = {name: statistics.median(samples) for name, samples in times.items()}
        rows.append({"batch": batch, "tokens": tokens, **{f"{name}_ms": v for name, v in ms.items()},
                     **{f"{name}_speedup": ms["fixed"] / ms[name] for name in list(tables)[1:]}})
        print(f"{batch:>5}{tokens:>7}" + "".join(f"{v:>11.1f}" for v in ms.values())
              + "".join(f"{ms['fixed'] / ms[name]:>10.2f}" for name in list(tables)[1:]), flush=True)
    best = tables[list(tables)[-1]]
    linear.set_kernel_choices(best)
    result = {"threads": torch.get_num_threads(), "native_kernel": native.available(),
              "choices": {f"{o}x{i}@{r}": k for (o, i, r), k in best.items()}, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
