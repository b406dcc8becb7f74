"""The batched generation engine: KV cache, sampling, the decode loop, drafters, the adaptive
controller and the LLM facade."""

from .controller import ControllerConfig
from .engine import Engine, Request
from .llm import LLM, RequestOutput, Sample
from .params import SamplingParams
from .stats import GenerationStats

__all__ = ["LLM", "ControllerConfig", "Engine", "GenerationStats", "Request", "RequestOutput", "Sample",
           "SamplingParams"]
