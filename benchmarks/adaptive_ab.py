"""AR, eagle:1 and the adaptive engine (a fresh controller) at one batch size, 96 tokens, interleaved in a
seeded order per repeat after one warm-up; prints the adaptive engine's steps per arm and each system's
median tokens/s and paired ratio against eagle:1.

    python benchmarks/adaptive_ab.py BATCH REPEATS ["{'thompson_sharpness': 1.0}"]   # ControllerConfig overrides
"""
import ast
import statistics
import sys
import time

import numpy as np

from respec import LLM
from respec.bench import load_questions
from respec.bench_adaptive import _params
from respec.engine.controller import ControllerConfig
from respec.engine.drafters import make_drafters

B, REPS = int(sys.argv[1]), int(sys.argv[2])
extra = ast.literal_eval(sys.argv[3]) if len(sys.argv) > 3 else {}
base = LLM("smollm2-135m", max_num_seqs=64)
prompts = [base.encode(q, chat=True) for q in load_questions(64, None)]
d = make_drafters([sys.argv[4] if len(sys.argv) > 4 else "drafters/smollm2-eagle-gsm8k-1536", "ngram"], base.model, base.tokenizer)
systems = {"ar": base,
           "eagle:1": LLM(base.model, tokenizer=base.tokenizer, drafter=next(iter(d.values())), speculative=1, max_num_seqs=64),
           "adaptive": LLM(base.model, tokenizer=base.tokenizer, drafter=list(d.values()),
                           speculative=ControllerConfig(max_draft_tokens=2, k_choices=(1, 2), **extra), max_num_seqs=64)}
res = {n: [] for n in systems}
for rep in range(-1, REPS):
    for i in np.random.default_rng([0, rep + 5]).permutation(len(systems)):
        name, llm = list(systems.items())[i]
        before = dict(llm.stats.arm_steps)
        t = time.perf_counter(); out = llm.generate(prompts[:B], _params([96] * B, 0.7, 0, rep), progress=False)
        wall = time.perf_counter() - t
        arms = {a: n - before.get(a, 0) for a, n in llm.stats.arm_steps.items() if n - before.get(a, 0)}
        if rep >= 0:
            res[name].append(96 * B / wall)
        if name == "adaptive":
            print(rep, "adaptive arms", arms, "%.1f tok/s" % (96 * B / wall), flush=True)
for name, v in res.items():
    print(name, f"median {statistics.median(v):.1f} tok/s", "paired vs eagle:1 {:.3f}".format(statistics.median(a / b for a, b in zip(v, res["eagle:1"]))))
