"""The batched generation engine: KV cache, sampling, the decode loop and the LLM facade."""

from .engine import Engine, GenerationStats, Request
from .llm import LLM, RequestOutput, Sample
from .params import SamplingParams

__all__ = ["LLM", "Engine", "GenerationStats", "Request", "RequestOutput", "Sample", "SamplingParams"]
