"""ReSpec: exact, adaptive speculative decoding for RL training of LLMs."""

from .engine import LLM, ControllerConfig, RequestOutput, Sample, SamplingParams

__all__ = ["LLM", "ControllerConfig", "RequestOutput", "Sample", "SamplingParams"]
__version__ = "0.1.0"
