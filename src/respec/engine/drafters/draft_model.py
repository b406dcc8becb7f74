"""A smaller causal LM as drafter: a separate checkpoint or the target's own first N layers.

The draft model keeps its own KV cache in the engine's row layout. Each step starts by running the
last two committed-or-pending tokens (positions ``L - 1`` and ``L``): after a fully accepted block
the drafter never saw the last draft's successor, and re-running one known position is cheaper than
tracking which rows need it (vLLM PR #9730 is the bug this avoids). It then runs one token per draft.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ...models.decoder import DecoderLM
from ...models.loading import load_model
from ..cache import KVCache
from ..transfer import to_device
from .base import Drafter, DraftSampler, DraftState, Proposal, TargetTrace, check_vocab


class DraftModelDrafter(Drafter):
    name = "draft"
    catch_up_kind = "self"

    def __init__(self, model: DecoderLM) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.cache: KVCache | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, target: DecoderLM, target_tokenizer: Any = None,
                        drafter_tokenizer: Any = None) -> DraftModelDrafter:
        """Load a checkpoint (path or preset) on the target's device and dtype; check the vocabularies."""
        model, _ = load_model(path, device=target.device, dtype=target.dtype)
        check_vocab(model.config.vocab_size, target.config.vocab_size)
        if target_tokenizer is not None and drafter_tokenizer is not None:
            check_same_tokens(drafter_tokenizer, target_tokenizer)
        return cls(model.eval())

    @classmethod
    def truncated(cls, target: DecoderLM, num_layers: int) -> DraftModelDrafter:
        """A self-drafter from the target's first ``num_layers`` layers, its final norm and its head.

        The modules are the target's own (no copy), so it follows the actor as training updates it.
        """
        if not 1 <= num_layers < target.config.num_layers:
            raise ValueError(f"num_layers: must be in [1, {target.config.num_layers - 1}], got {num_layers}")
        draft = copy.copy(target)  # shallow: shares every parameter and buffer
        draft._modules = dict(target._modules)
        draft.layers = nn.ModuleList(target.layers[:num_layers])
        draft.config = dataclasses.replace(target.config, num_layers=num_layers)
        return cls(draft)

    # ------------------------------------------------------------------ Drafter interface
    def allocate(self, rows: int, max_len: int, block: int) -> None:
        if self.cache is None or not self.cache.fits(rows, max_len):
            self.cache = None
            self.cache = KVCache(self.model.config, rows, max_len, self.model.dtype, self.model.device)
        self.valid = np.zeros(rows, dtype=np.int64)  # per row: cache positions known to hold its tokens

    def prefill(self, rows: slice, prompt_ids: torch.Tensor, prompt_lens: torch.Tensor,
                trace: TargetTrace | None) -> None:
        width = prompt_ids.shape[1]
        positions = torch.arange(width, device=prompt_ids.device).expand_as(prompt_ids)
        self.model(prompt_ids, positions, cache=self.cache, rows=rows, kv_len=width)
        self.valid[rows] = prompt_lens.cpu().numpy()

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        self.cache.copy_rows(src, dst, length)
        self.valid[dst.cpu().numpy()] = self.valid[src.cpu().numpy()]

    def catch_up(self, state: DraftState, target: DecoderLM, cache: KVCache) -> None:
        """Run the draft model over the positions decoded without it (``propose`` re-feeds the last two)."""
        batch = state.last_token.shape[0]
        gaps = state.host_lengths[:batch] - 1 - self.valid[:batch]
        missed = int(gaps.max())
        if missed <= 0:
            return
        device = state.lengths.device
        first = to_device(self.valid[:batch].copy(), device)
        # Padding entries land on position lengths - 1, which ``propose`` rewrites before reading.
        positions = torch.minimum(first[:, None] + torch.arange(missed, device=device), (state.lengths - 1)[:, None])
        self.model(state.tokens_at(first, missed), positions, cache=self.cache, rows=slice(0, batch),
                   kv_len=int(state.host_lengths.max()))
        self.valid[:batch] = np.maximum(self.valid[:batch], state.host_lengths[:batch] - 1)

    def propose(self, state: DraftState, k: int, sampler: DraftSampler) -> Proposal:
        batch = state.last_token.shape[0]
        rows = slice(0, batch)
        longest = int(state.host_lengths[:batch].max())
        ids = torch.stack((state.prev_token, state.last_token), dim=1)
        positions = state.lengths[:, None] + torch.arange(-1, 1, device=ids.device)
        tokens, logprobs = [], []
        for step in range(k):
            out = self.model(ids, positions, cache=self.cache, rows=rows, kv_len=longest + step + 1)
            token, q = sampler(step, self.model.logits(out.hidden[:, -1]))
            tokens.append(token)
            logprobs.append(q)
            ids, positions = token[:, None], positions[:, -1:] + 1
        self.valid[:batch] = state.host_lengths[:batch] + 1  # prev and last token now sit at L - 1 and L
        return Proposal(tokens=torch.stack(tokens, dim=1), logprobs=torch.stack(logprobs, dim=1))


def check_same_tokens(drafter_tokenizer: Any, target_tokenizer: Any) -> None:
    """Refuse a drafter whose token strings differ from the target's (same size is not enough)."""
    draft_vocab, target_vocab = drafter_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if len(draft_vocab) != len(target_vocab):
        raise ValueError(f"drafter: tokenizer has {len(draft_vocab)} tokens, the target's has {len(target_vocab)}")
    differing = [t for t, i in draft_vocab.items() if target_vocab.get(t) != i]
    if differing:
        raise ValueError(f"drafter: {len(differing)} token strings map to different ids than in the target's "
                         f"tokenizer (first: {differing[0]!r})")
