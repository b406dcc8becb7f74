"""What verifying deterministic (n-gram) drafts by coupling costs, against the one-hot-q test.

Coupled (the engine's path, verify.py): the target's own draw with plain decoding's uniforms, so n-gram
rollouts are plain decoding's samples token for token; on the GPU at all k + 1 positions at once (a
float64 inverse CDF over B x (k+1) x V, no host sync), on the CPU position by position for the rows
still accepting. One-hot q (the textbook path): accept draft x when u < p(x), then one residual or
bonus draw per row. All on the same random target logprobs, SmolLM2's vocabulary; medians of
interleaved repeats, one thread.

    python benchmarks/coupled_verify.py --out coupled_verify.json
    python benchmarks/coupled_verify.py --rollout --batches 8,32   # SmolLM2 n-gram rollouts, both CPU chains

``--rollout`` times whole n-gram rollouts of SmolLM2 (GSM8K questions or the built-in ones, T = 0.7,
k = 4, 64 tokens, 2 threads) with the row-by-row chain and with the all-positions one, paired per
repeat: each repeat starts the drafter from the same history (one earlier rollout of other seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from respec.engine import verify
from respec.engine.params import SamplingParams

VOCAB = 49152  # SmolLM2


def arms(batch: int, k: int, accept: float, seed: int = 0) -> dict:
    """The three verifiers on one batch whose drafts equal the target's own draw with probability
    ``accept`` at each position (else a random token), as an n-gram drafter's are."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.log_softmax(torch.randn(batch, k + 1, VOCAB, generator=gen) * 3, dim=-1)
    accept_u = torch.rand(batch, k, generator=gen, dtype=torch.float64)
    resample = torch.rand(batch, k + 1, generator=gen, dtype=torch.float64)
    own = verify.target_draws(target, resample)[:, :k]
    hit = torch.rand(batch, k, generator=gen) < accept
    drafts = torch.where(hit, own, torch.randint(0, VOCAB, (batch, k), generator=gen))
    greedy = torch.zeros(batch, dtype=torch.bool)
    offered = torch.ones(batch, k, dtype=torch.bool)
    return {"coupled, lazy (CPU path)": lambda: verify.verify_drafts(target, drafts, None, accept_u, resample, greedy),
            "coupled, all positions (GPU path)": lambda: verify._coupled_chain(target, drafts, resample, greedy, offered),
            "one-hot q": lambda: verify.verify_drafts(target, drafts, None, accept_u, resample[:, 0], greedy)}


def rollout_ab(batches: list[int], repeats: int) -> list[dict]:
    from respec import LLM
    from respec.data.tasks import load_questions

    torch.set_num_threads(2)
    llm = LLM("smollm2-135m", device="cpu", drafter="ngram", speculative=4, max_num_seqs=max(batches))
    ngram, lazy, rows = llm.engine.drafters["ngram"], verify._coupled_chain_lazy, []
    prompts = [llm.encode(q, chat=True) for q in load_questions(max(batches))]
    chains = {"row by row (CPU path)": lazy, "all positions (GPU path)": verify._coupled_chain}
    for batch in batches:
        times, spec = {name: [] for name in chains}, llm.stats.spec
        for r in range(repeats):
            ngram.reset()
            llm.generate(prompts[:batch], SamplingParams(temperature=0.7, max_new_tokens=64, seed=50 + r), progress=False)
            params = SamplingParams(temperature=0.7, max_new_tokens=64, seed=100 + r, ignore_eos=True)
            history, before = ngram.get_state(), (spec.drafted, spec.accepted)
            for name, chain in chains.items():
                verify._coupled_chain_lazy = chain  # the CPU engine calls this name
                ngram.set_state(history)
                start = time.perf_counter()
                llm.generate(prompts[:batch], params, progress=False)
                times[name].append(time.perf_counter() - start)
            verify._coupled_chain_lazy = lazy
        rate = (spec.accepted - before[1]) / max(spec.drafted - before[0], 1)
        rows.append({"batch": batch, "accept_rate": rate, **{n: statistics.median(t) for n, t in times.items()}})
        print(f"| {batch} | " + " | ".join(f"{statistics.median(t):.2f}" for t in times.values()) +
              f" | {rows[-1]['all positions (GPU path)'] / rows[-1]['row by row (CPU path)']:.2f}x | {rate:.2f} |",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--accept", type=float, default=0.4, help="per-position chance a draft is the target's draw")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="coupled_verify.json")
    parser.add_argument("--rollout", action="store_true", help="time whole SmolLM2 n-gram rollouts instead")
    args = parser.parse_args()
    if args.rollout:
        print("| batch | row by row s | all positions s | speed-up | accept rate |\n| --- | --- | --- | --- | --- |")
        rows = rollout_ab([int(b) for b in args.batches.split(",")], min(args.repeats, 3))
        with open(args.out, "w") as f:
            json.dump({"rollout": rows}, f, indent=1)
        return
    torch.set_num_threads(1)
    rows = []
    print(f"k = {args.k}, drafts right with probability {args.accept} per position, ms per verify (median)\n")
    for batch in (int(b) for b in args.batches.split(",")):
        runs = arms(batch, args.k, args.accept)
        times = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        rows.append({"batch": batch, **{name: 1e3 * statistics.median(t) for name, t in times.items()}})
    names = list(times)
    print("| batch | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1))
    for row in rows:
        print(f"| {row['batch']} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    with open(args.out, "w") as f:
        json.dump({"vocab": VOCAB, "k": args.k, "accept": args.accept, "ms": rows}, f, indent=1)


if __name__ == "__main__":
    main()
