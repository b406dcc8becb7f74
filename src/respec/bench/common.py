"""What every benchmark shares: timing a fresh generate call, the table header, the JSON output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..engine.llm import LLM
from ..utils.atomic import write_text_atomic


def sync(llm: LLM) -> None:
    """Wait for the device, so wall times include its queued work."""
    if llm.model.device.type == "cuda":
        torch.cuda.synchronize()


def timed_fresh_generate(llm: LLM, prompts: list[list[int]], params) -> tuple[list, float]:
    """Generate with every drafter's history cleared first (no run may draft from an earlier run's
    answers); returns the outputs and the wall time, device work included."""
    for drafter in llm.drafters.values():
        drafter.reset()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=False)
    sync(llm)
    return outputs, time.perf_counter() - start


def run_header(result: dict, extra: str = "") -> str:
    """The first line of every bench table: what ran where."""
    line = f"model={result['model']} device={result['device']} dtype={result['dtype']} threads={result['threads']}"
    if "prompts" in result:
        line += f" prompts={result['prompts']}"
    return f"{line} {extra}" if extra else line


def write_json(result: dict, path: str | Path) -> Path:
    """The result as indented JSON, written whole (parents created: a long run must not be lost to a
    missing folder)."""
    return write_text_atomic(path, json.dumps(result, indent=2))
