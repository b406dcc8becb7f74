"""``LLM``: the user-facing generator (model + tokenizer + engine), in the spirit of vLLM."""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.decoder import DecoderLM
from ..models.loading import load_model
from ..models.presets import DEFAULT_MODEL
from .controller import ControllerConfig
from .drafters import Drafter, make_drafters
from .engine import DEFAULT_KV_CACHE_BYTES, Engine, Request
from .params import SamplingParams
from .slots import Sequence
from .stats import GenerationStats

Prompt = str | list[int] | list[dict[str, str]]


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each sampled token under the sampling distribution (see sampling.py)
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sample]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LLM:
    """Load a model and generate from it.

    >>> llm = LLM("smollm2-135m")
    >>> out = llm.generate(["What is 17 + 25?"], SamplingParams(n=4, temperature=0.6), chat=True)
    >>> out[0].samples[0].text, out[0].samples[0].logprobs
    """

    def __init__(
        self,
        model: str | os.PathLike | DecoderLM = DEFAULT_MODEL,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        drafter: Drafter | str | os.PathLike | list | None = None,
        speculative: int | str | ControllerConfig | None = None,
    ) -> None:
        """``drafter``: one drafter or a list ("ngram", "self:N", an EAGLE head directory, a draft
        model, a Drafter). ``speculative``: None or "off" (plain decoding; None with one drafter: k = 4),
        an int k (one drafter, k drafts every step), or "adaptive" / a ControllerConfig to let the
        controller pick off or (drafter, k) every step."""
        device = torch.device(device) if device is not None else default_device()
        dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(device)
        if isinstance(model, DecoderLM):
            if tokenizer is None:
                raise ValueError("tokenizer: required when passing a model object")
            self.model, source = model, None
        else:
            self.model, source = load_model(model, device=device, dtype=dtype)
        self.tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) \
            else _load_tokenizer(tokenizer or source)
        self.drafters = make_drafters(drafter, self.model, self.tokenizer)
        self.engine = Engine(
            self.model, self._eos_ids(), max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes,
            decode_text=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            drafter=self.drafters, speculative=speculative,
        )

    @property
    def stats(self) -> GenerationStats:
        """Cumulative statistics of every ``generate`` call so far."""
        return self.engine.stats

    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(self.model.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return tuple(dict.fromkeys(ids))

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of one prompt: ids pass through; text is tokenized, via the chat template if asked."""
        if isinstance(prompt, str):
            if chat:
                return self._chat_ids([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, SequenceABC) and prompt and isinstance(prompt[0], dict):
            return self._chat_ids(list(prompt))
        return [int(t) for t in prompt]

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat: this tokenizer has no chat template; pass plain text with chat=False")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        chat: bool = False,
        progress: bool = True,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, each with ``n`` samples."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts: empty list; give at least one prompt")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str) and not prompt:
                raise ValueError(f"prompts[{i}]: empty prompt")
            requests.append(Request(self.encode(prompt, chat), p))
        results = self.engine.generate(requests, progress=progress)
        return [RequestOutput(prompt if isinstance(prompt, str) else None, request.prompt_ids,
                              [self._sample(seq) for seq in seqs])
                for prompt, request, seqs in zip(prompts, requests, results)]

    def _sample(self, seq: Sequence) -> Sample:
        ids = seq.token_ids
        text_ids = ids[:-1] if ids and ids[-1] in seq.stop_ids else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if seq.stop_text_hit is not None:
            text = text[: text.find(seq.stop_text_hit)] if seq.stop_text_hit in text else text
        return Sample(token_ids=list(ids), text=text, logprobs=list(seq.logprobs),
                      finish_reason=seq.finish_reason or "length")


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_tokenizer(source: Any):
    from transformers import AutoTokenizer

    if source is None:
        raise ValueError("tokenizer: no tokenizer source; pass tokenizer=PATH")
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer: cannot load a tokenizer from {path}: {err}") from err
