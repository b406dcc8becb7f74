"""Llama-family decoders (Llama/SmolLM2, Qwen2/2.5, Qwen3) and their loading and saving."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"ModelConfig": "config", "RopeConfig": "config", "DecoderLM": "decoder", "DecoderOutput": "decoder",
            "load_model": "loading", "resolve_model_path": "loading", "save_pretrained": "loading",
            "DEFAULT_MODEL": "presets", "PRESETS": "presets"}
__all__ = ["DEFAULT_MODEL", "PRESETS", "DecoderLM", "DecoderOutput", "ModelConfig", "RopeConfig", "load_model",
           "resolve_model_path", "save_pretrained"]

if TYPE_CHECKING:
    from .config import ModelConfig, RopeConfig
    from .decoder import DecoderLM, DecoderOutput
    from .loading import load_model, resolve_model_path, save_pretrained
    from .presets import DEFAULT_MODEL, PRESETS


def __getattr__(name: str):
    """Submodules on first use, so that ``models.presets`` is read without importing torch."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
