"""What the adaptive engine's machinery costs: the engine with both drafters and its controller pinned to
one arm, against an engine that runs that arm alone (AR for ``off``, the static drafter otherwise), per
decode step, paired, at each batch size.

Pinning skips only the controller's choice (~0.3 ms a step, measured separately); what remains is what
the adaptive engine does around a step: shadowing the head while it sits out, the controller's cost and
acceptance updates, the decision trace. 96 tokens per row, T = 0.7, REPEATS runs after one warm-up, the
two engines alternating which goes first.

    python benchmarks/pinned_arm.py 1,2,4,16 off 6
    python benchmarks/pinned_arm.py 2,4 eagle:1 6
"""

from __future__ import annotations

import statistics
import sys

from respec import LLM, SamplingParams
from respec.bench.adaptive import build_systems
from respec.data.tasks import load_questions

DRAFTERS = ["drafters/smollm2-eagle-gsm8k-1536", "ngram"]


def engines(arm_label: str) -> dict[str, LLM]:
    systems = build_systems(LLM("smollm2-135m", max_num_seqs=64), DRAFTERS, (1, 2), 64, 0)
    if arm_label not in systems or arm_label == "adaptive":
        raise SystemExit(f"arm: one of {[name for name in systems if name != 'adaptive']}, got {arm_label!r}")
    controller = systems["adaptive"].engine.controller
    arm = {a.label: a for a in controller.arms}[arm_label]
    controller.choose = lambda batch: arm
    return {"alone": systems[arm_label], "pinned": systems["adaptive"]}


def step_ms(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    stats = llm.stats
    seconds, steps = stats.decode_s, stats.decode_steps
    llm.generate(prompts, params, progress=False)
    return 1e3 * (stats.decode_s - seconds) / (stats.decode_steps - steps)


def main() -> None:
    batches = [int(b) for b in sys.argv[1].split(",")]
    arm_label = sys.argv[2] if len(sys.argv) > 2 else "off"
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    systems = engines(arm_label)
    prompts = [systems["alone"].encode(q, chat=True) for q in load_questions(max(batches), None)]
    print(f"arm {arm_label}: median ms per decode step (alone / pinned), paired ratio pinned / alone")
    for batch in batches:
        ms: dict[str, list[float]] = {name: [] for name in systems}
        for rep in range(repeats + 1):
            params = SamplingParams(temperature=0.7, max_new_tokens=96, ignore_eos=True, seed=rep)
            order = list(systems.items()) if rep % 2 else list(reversed(systems.items()))
            for name, llm in order:
                measured = step_ms(llm, prompts[:batch], params)
                if rep:  # the first round warms both up
                    ms[name].append(measured)
        ratio = statistics.median(p / a for p, a in zip(ms["pinned"], ms["alone"]))
        print(f"batch {batch:3d}: {statistics.median(ms['alone']):7.2f} / {statistics.median(ms['pinned']):7.2f} ms"
              f"  {ratio:.3f}x", flush=True)


if __name__ == "__main__":
    main()
