"""``LLM``: the user-facing generator (model + tokenizer + engine), in the spirit of vLLM."""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.decoder import DecoderLM
from ..models.loading import load_model
from ..models.presets import DEFAULT_MODEL
from .device import parse_device, parse_dtype
from .drafters import Drafter, make_drafters
from .engine import DEFAULT_KV_CACHE_BYTES, Engine, Request
from .params import SamplingParams
from .slots import Sequence
from .speculation import ControllerConfig
from .stats import GenerationStats

Prompt = str | list[int] | list[dict[str, str]]


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each sampled token under the sampling distribution (see sampling.py)
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    # per drafter with learnable weights (EAGLE heads): the weight versions in use while it was sampled
    drafter_versions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sample]


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
        cuda_graphs: bool = False,
    ) -> None:
        """``drafter``: one drafter or a list ("ngram", "self:N", an EAGLE head directory, a draft
        model, a Drafter). ``speculative``: None or "off" (plain decoding; None with one drafter: k = 4),
        an int k (one drafter, k drafts every step), or "adaptive" / a ControllerConfig to let the
        controller pick off or (drafter, k) every step. ``cuda_graphs``: on a GPU, replay decode and
        verify forwards as CUDA graphs per batch and context bucket (engine/graphs.py; ignored on the CPU)."""
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
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
            drafter=self.drafters, speculative=speculative, cuda_graphs=cuda_graphs,
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
        bad = next((t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"prompts: token ids must be integers, got {bad!r}")
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
        prompts = _prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str) and not prompt:
                raise ValueError(f"prompts[{i}]: empty prompt")
            try:
                requests.append(Request(self.encode(prompt, chat), p))
            except ValueError as err:
                raise ValueError(str(err).replace("prompts:", f"prompts[{i}]:", 1)) from None
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
                      finish_reason=seq.finish_reason or "length",
                      drafter_versions={name: list(v) for name, v in seq.drafter_versions.items()})


def _prompt_list(prompts: Any) -> list:
    """One prompt (text, token ids, chat messages) or a sequence of them, as a list of prompts; arrays
    and tensors of ids become lists."""
    if hasattr(prompts, "tolist") and not isinstance(prompts, str):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or _is_single(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected text, token ids, chat messages or a list of them, "
                         f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: empty; give at least one prompt")
    return [p.tolist() if hasattr(p, "tolist") and not isinstance(p, str) else p for p in prompts]


def _is_single(prompt: Any) -> bool:
    """A list of token ids or of chat messages (rather than a list of prompts)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (int, float, dict, np.number))


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
