"""The named worlds the benchmark compares policies on.

Each is a GPU, a model shape, a serving stack (calibrate.py), a drafter's acceptance curve with its
drift over RL steps, and one engine's share of a rollout. Three rollouts per world, at RL steps 0, 50
and 100 (a frozen drafter drifts across them). The serving stacks:

* ``paper``: the ReSpec paper's (verl + SGLang, EAGLE-3 trees), fitted to its 7B H100 grid: a fixed
  7.6 ms per speculative step and 0.78 ms per drafter forward, so a speculative step costs about 2-3
  AR steps at any batch;
* ``sglang``: EAGLE-3's own SGLang run (2.36x at batch 1 on Llama-3.1-8B): 0.54 ms per drafter forward
  and no fixed cost beyond the forwards.
"""

from __future__ import annotations

from .acceptance import CURVES, DRIFTS
from .hardware import GPUS, MODELS, PAPER_STACK, SGLANG_STACK, StepCosts
from .rollout import World
from .workload import Workload

STACKS = {"paper": PAPER_STACK, "sglang": SGLANG_STACK}


def world(name: str, model: str, stack: str, curve: str, drift: str, workload: Workload | None = None,
          gpu: str = "H100", **options: object) -> World:
    costs = StepCosts(GPUS[gpu], MODELS[model], STACKS[stack])
    return World(name, costs, CURVES[curve], DRIFTS[drift], workload or Workload(), **options)


def named_worlds() -> dict[str, World]:
    worlds = [
        world("7B H100, paper stack, frozen drafter", "qwen2.5-7b", "paper", "paper-fit", "frozen-paper"),
        world("7B H100, SGLang stack, frozen drafter", "qwen2.5-7b", "sglang", "paper-fit", "frozen-paper"),
        world("7B H100, SGLang stack, online drafter", "qwen2.5-7b", "sglang", "paper-fit", "online-held"),
        world("3B H100, SGLang stack, frozen drafter", "qwen2.5-3b", "sglang", "paper-fit", "frozen-paper",
              Workload(median=900, max_len=3072)),
        world("14B H100, SGLang stack, frozen drafter", "qwen2.5-14b", "sglang", "paper-fit", "frozen-paper"),
        world("Llama-3-8B H100, SGLang stack, EAGLE-3 published curve", "llama-3-8b", "sglang", "eagle3-published",
              "none", Workload(median=2500, max_len=16384)),
        world("7B H100, SGLang stack, our gsm8k head, frozen", "qwen2.5-7b", "sglang", "ours-gsm8k", "frozen-ours"),
        world("7B H100, SGLang stack, 256 rows, frozen drafter", "qwen2.5-7b", "sglang", "paper-fit", "frozen-paper",
              Workload(rows=256)),
    ]
    return {w.name: w for w in worlds}
