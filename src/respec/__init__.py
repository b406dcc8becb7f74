"""ReSpec: exact, adaptive speculative decoding for RL training of LLMs."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "ControllerConfig", "RequestOutput", "Sample", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import LLM, ControllerConfig, RequestOutput, Sample, SamplingParams


def __getattr__(name: str):
    """The engine on first use: importing torch takes seconds, and the command line speaks before it."""
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'respec' has no attribute {name!r}")
