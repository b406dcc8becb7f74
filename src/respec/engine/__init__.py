"""The batched generation engine: KV cache, sampling, the decode loop, drafters, the adaptive
controller and the LLM facade."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"LLM": "llm", "RequestOutput": "llm", "Sample": "llm", "ControllerConfig": "speculation",
            "Engine": "engine", "Request": "engine", "SamplingParams": "params", "GenerationStats": "stats"}
__all__ = ["LLM", "ControllerConfig", "Engine", "GenerationStats", "Request", "RequestOutput", "Sample",
           "SamplingParams"]

if TYPE_CHECKING:
    from .engine import Engine, Request
    from .llm import LLM, RequestOutput, Sample
    from .params import SamplingParams
    from .speculation import ControllerConfig
    from .stats import GenerationStats


def __getattr__(name: str):
    """Submodules on first use: the speculation and parameter settings are read without importing torch."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
