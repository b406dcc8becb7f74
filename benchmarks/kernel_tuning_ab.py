"""Does kernel tuning pay? One decoder forward + LM head with the fixed kernel rule vs the tuned table.

For SmolLM2-135M (fp32, CPU) at each (batch, tokens per row) shape of a decode step (tokens > 1: a
speculative verify), time the forward with ``fast_linear``'s fixed rule and with the choices of
``tune_linear_kernels``, interleaved, and report the medians and their ratio.

    python benchmarks/kernel_tuning_ab.py --out kernel_tuning_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from respec.engine.cache import KVCache
from respec.models import linear
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
    tuned = tune_linear_kernels([model])
    cache = KVCache(model.config, max(b for b, _ in SHAPES), CONTEXT + 16, model.dtype, model.device)
    prompt = torch.randint(0, 1000, (cache.keys[0].shape[0], CONTEXT))
    model(prompt, torch.arange(CONTEXT)[None].expand(prompt.shape[0], -1), cache=cache,
          rows=slice(0, prompt.shape[0]), kv_len=CONTEXT)
    rows = []
    print(f"{'batch':>5}{'tokens':>7}{'fixed ms':>10}{'tuned ms':>10}{'ratio':>7}")
    for batch, tokens in SHAPES:
        times = {"fixed": [], "tuned": []}
        for _ in range(args.repeats):
            for name, samples in times.items():
                linear.clear_kernel_choices()
                if name == "tuned":
                    linear.set_kernel_choices(tuned)
                samples.append(time_forward(model, cache, batch, tokens, calls=8) * 1e3)
        fixed, ours = statistics.median(times["fixed"]), statistics.median(times["tuned"])
        rows.append({"batch": batch, "tokens": tokens, "fixed_ms": fixed, "tuned_ms": ours, "ratio": fixed / ours})
        print(f"{batch:>5}{tokens:>7}{fixed:>10.1f}{ours:>10.1f}{fixed / ours:>7.2f}", flush=True)
    linear.set_kernel_choices(tuned)
    result = {"threads": torch.get_num_threads(), "choices": {f"{o}x{i}@{r}": k for (o, i, r), k in tuned.items()},
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
