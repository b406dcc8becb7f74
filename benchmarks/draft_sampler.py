"""What a draft step's sampling costs: over the head's reduced vocabulary vs over the target's.

An EAGLE head with a 4096-token draft vocabulary used to hand the sampler logits spread onto the
target's 49152 tokens (-inf elsewhere), so temperature, softmax and the inverse-CDF draw ran over
the full vocabulary at every draft step; now they run over the head's own entries and only q is
spread onto the target's vocabulary for the verifier. Same tokens, same q (tests/test_eagle.py).

    python benchmarks/draft_sampler.py --out draft_sampler.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from respec.engine.drafters.base import DraftSampler
from respec.engine.rng import sample_key
from respec.engine.sampling import uniform_row_params


def time_call(fn, calls: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--draft-vocab", type=int, default=4096)
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    index = torch.randperm(args.vocab)[: args.draft_vocab].sort().values
    rows = []
    print(f"{'batch':>5}{'full vocab ms':>15}{'draft vocab ms':>16}{'speed-up':>10}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        logits = torch.randn(batch, args.draft_vocab)
        keys = np.array([sample_key(1, i) for i in range(batch)], dtype=np.uint64)
        sampler = DraftSampler(uniform_row_params(batch, args.temperature), keys, np.zeros(batch, dtype=np.int64),
                               torch.device("cpu"))

        def full_vocab(logits=logits, sampler=sampler, batch=batch):
            spread = torch.full((batch, args.vocab), float("-inf")).index_copy_(1, index, logits)
            return sampler(0, spread)

        def draft_vocab(logits=logits, sampler=sampler):
            return sampler(0, logits, index, args.vocab)

        times = {"full": [], "draft": []}
        for _ in range(args.repeats):
            times["full"].append(time_call(full_vocab) * 1e3)
            times["draft"].append(time_call(draft_vocab) * 1e3)
        full, draft = statistics.median(times["full"]), statistics.median(times["draft"])
        rows.append({"batch": batch, "full_vocab_ms": full, "draft_vocab_ms": draft})
        print(f"{batch:>5}{full:>15.2f}{draft:>16.2f}{full / draft:>9.1f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"vocab": args.vocab, "draft_vocab": args.draft_vocab, "temperature": args.temperature,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
