"""AR, eagle:1 and the adaptive engine (a fresh controller) at one batch size, 96 tokens, interleaved in a
seeded order per repeat after one warm-up; prints the adaptive engine's steps per arm and each system's
median tokens/s and paired ratio against eagle:1, and the median time of the controller's ``choose``.

    python benchmarks/adaptive_ab.py BATCH REPEATS ["{'tuning': {'thompson_sharpness': 1.0}}"] [EAGLE_HEAD]
    # the third argument: ControllerConfig overrides (its constants in a nested 'tuning' mapping)
"""

from __future__ import annotations

import ast
import statistics
import sys
import time

import numpy as np

from respec import LLM
from respec.bench.adaptive import build_systems, repeat_params
from respec.data.tasks import load_questions


def main() -> None:
    batch, repeats = int(sys.argv[1]), int(sys.argv[2])
    overrides = ast.literal_eval(sys.argv[3]) if len(sys.argv) > 3 else {}
    head = sys.argv[4] if len(sys.argv) > 4 else "drafters/smollm2-eagle-gsm8k-1536"
    base = LLM("smollm2-135m", max_num_seqs=64)
    built = build_systems(base, [head, "ngram"], (1, 2), 64, 0, overrides)
    systems = {"ar": built["off"], "eagle:1": built["eagle:1"], "adaptive": built["adaptive"]}
    prompts = [base.encode(q, chat=True) for q in load_questions(batch, None)]
    controller, choose_s = systems["adaptive"].engine.controller, []
    untimed_choose = controller.choose

    def timed_choose(active: int):
        start = time.perf_counter()
        arm = untimed_choose(active)
        choose_s.append(time.perf_counter() - start)
        return arm

    controller.choose = timed_choose
    tokens_per_s: dict[str, list[float]] = {name: [] for name in systems}
    for rep in range(-1, repeats):  # repeat -1 warms every system up
        for i in np.random.default_rng([0, rep + 5]).permutation(len(systems)):
            name, llm = list(systems.items())[i]
            before = dict(llm.stats.arm_steps)
            start = time.perf_counter()
            llm.generate(prompts, repeat_params([96] * batch, 0.7, 0, rep), progress=False)
            rate = 96 * batch / (time.perf_counter() - start)
            if rep >= 0:
                tokens_per_s[name].append(rate)
            if name == "adaptive":
                arms = {a: n - before.get(a, 0) for a, n in llm.stats.arm_steps.items() if n - before.get(a, 0)}
                print(rep, "adaptive arms", arms, f"{rate:.1f} tok/s", flush=True)
    for name, rates in tokens_per_s.items():
        paired = statistics.median(a / b for a, b in zip(rates, tokens_per_s["eagle:1"]))
        print(name, f"median {statistics.median(rates):.1f} tok/s", f"paired vs eagle:1 {paired:.3f}")
    print(f"controller.choose: median {1e3 * statistics.median(choose_s):.3f} ms over {len(choose_s)} steps")


if __name__ == "__main__":
    main()
