"""ReSpec: exact, adaptive speculative decoding for RL training of LLMs."""

from .engine import LLM, RequestOutput, Sample, SamplingParams

__all__ = ["LLM", "RequestOutput", "Sample", "SamplingParams"]
__version__ = "0.1.0"
