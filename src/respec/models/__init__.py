"""Llama-family decoders (Llama/SmolLM2, Qwen2/2.5, Qwen3) and their loading and saving."""

from .config import ModelConfig, RopeConfig
from .decoder import DecoderLM, DecoderOutput
from .loading import load_model, resolve_model_path, save_pretrained
from .presets import DEFAULT_MODEL, PRESETS

__all__ = ["DEFAULT_MODEL", "PRESETS", "DecoderLM", "DecoderOutput", "ModelConfig", "RopeConfig",
           "load_model", "resolve_model_path", "save_pretrained"]
