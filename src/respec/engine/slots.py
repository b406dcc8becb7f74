"""Per-row decoding state, kept as preallocated tensors so the decode step never loops over rows.

Active rows live in slots ``0..B-1``. Device tensors hold what the decode step reads and writes;
numpy mirrors hold what the host must know without a device sync (positions for the RNG counters
and the attention length), updated by the same vectorised increments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .params import SamplingParams
from .rng import sample_key
from .sampling import RowParams


@dataclass
class Sequence:
    """One sample of one request, from admission until it finishes."""

    request_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_hit: str | None = None  # the stop string that ended it, if any
    verify_steps: int = 0  # speculative steps this sample took part in
    drafted: int = 0  # draft tokens offered to it
    accepted: int = 0  # of which accepted
    # per drafter with learnable weights: the weight versions in use while this sample was active
    drafter_versions: dict[str, list[int]] = field(default_factory=dict)


class SlotTable:
    """Device tensors and host mirrors for up to ``capacity`` concurrent rows."""

    def __init__(self, capacity: int, max_new_tokens: int, max_stop_ids: int, device: torch.device,
                 block: int = 1) -> None:
        self.capacity, self.device = capacity, device
        self.active = 0
        self.sequences: list[Sequence | None] = [None] * capacity

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.last_token = zeros(capacity)
        self.prev_token = zeros(capacity)  # the token at position lengths - 1 (drafters re-read it)
        self.lengths = zeros(capacity)  # positions held in the KV cache (the last token is not yet)
        self.generated = zeros(capacity)
        self.max_new = zeros(capacity)
        self.temperature = zeros(capacity, dtype=torch.float32)
        self.top_k = zeros(capacity)
        self.top_p = zeros(capacity, dtype=torch.float32)
        self.stop_ids = torch.full((capacity, max(1, max_stop_ids)), -1, dtype=torch.int64, device=device)
        # ``block - 1`` spare columns: a speculative step writes a whole block, emitted or not.
        self.out_tokens = zeros(capacity, max(1, max_new_tokens) + block - 1)
        self.out_logprobs = zeros(capacity, max(1, max_new_tokens) + block - 1, dtype=torch.float32)
        self.row_index = torch.arange(capacity, device=device)
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.host_lengths = np.zeros(capacity, dtype=np.int64)
        self.host_generated = np.zeros(capacity, dtype=np.int64)
        self.host_max_new = np.zeros(capacity, dtype=np.int64)
        self.spec_counts = np.zeros((capacity, 3), dtype=np.int64)  # verify steps, drafted, accepted
        self.stop_string_rows = 0  # active rows with stop strings: the host checks text only if > 0
        self._row_params: RowParams | None = None

    def _device_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.last_token, self.prev_token, self.lengths, self.generated, self.max_new, self.temperature,
                self.top_k, self.top_p, self.stop_ids, self.out_tokens, self.out_logprobs)

    def fill(self, start: int, sequences: list[Sequence]) -> None:
        """Write the settings of freshly admitted sequences into slots ``start..``."""
        end = start + len(sequences)
        params = [s.params for s in sequences]
        self.lengths[start:end] = self._tensor([len(s.prompt_ids) for s in sequences], torch.int64)
        self.generated[start:end] = 0
        self.max_new[start:end] = self._tensor([p.max_new_tokens for p in params], torch.int64)
        self.temperature[start:end] = self._tensor([p.temperature for p in params], torch.float32)
        self.top_k[start:end] = self._tensor([p.top_k for p in params], torch.int64)
        self.top_p[start:end] = self._tensor([p.top_p for p in params], torch.float32)
        self.stop_ids[start:end] = -1
        for offset, seq in enumerate(sequences):
            if seq.stop_ids:
                self.stop_ids[start + offset, : len(seq.stop_ids)] = self._tensor(list(seq.stop_ids), torch.int64)
            self.keys[start + offset] = sample_key(seq.seed, seq.sample_index)
            self.sequences[start + offset] = seq
        self.stop_string_rows += sum(1 for s in sequences if s.params.stop)
        self.host_lengths[start:end] = [len(s.prompt_ids) for s in sequences]
        self.host_generated[start:end] = 0
        self.host_max_new[start:end] = [p.max_new_tokens for p in params]
        self.spec_counts[start:end] = 0
        self.prev_token[start:end] = self._tensor([s.prompt_ids[-1] for s in sequences], torch.int64)
        self._row_params = None

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def row_params(self, lo: int, hi: int) -> RowParams:
        """Sampling settings of rows ``lo..hi``; cached for the full active batch between changes."""
        if (lo, hi) == (0, self.active) and self._row_params is not None:
            return self._row_params
        params = [s.params for s in self.sequences[lo:hi]]
        row_params = RowParams(
            temperature=self.temperature[lo:hi], top_k=self.top_k[lo:hi], top_p=self.top_p[lo:hi],
            any_filter=any(p.top_k > 0 or p.top_p < 1 for p in params),
            any_greedy=any(p.greedy for p in params),
            any_random=any(not p.greedy for p in params),
        )
        if (lo, hi) == (0, self.active):
            self._row_params = row_params
        return row_params

    def advance(self, lo: int, hi: int, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Record one new token per row of ``lo..hi`` (all device work, no sync)."""
        rows = self.row_index[lo:hi]
        generated = self.generated[lo:hi]
        self.out_tokens.index_put_((rows, generated), tokens)
        self.out_logprobs.index_put_((rows, generated), logprobs)
        self.last_token[lo:hi] = tokens
        self.generated[lo:hi] += 1
        self.host_generated[lo:hi] += 1

    def advance_block(self, tokens: torch.Tensor, logprobs: torch.Tensor, counts: torch.Tensor,
                      host_counts: np.ndarray) -> None:
        """Record ``counts [B]`` new tokens per row of ``0..B-1`` from ``tokens [B, T]`` after a verify
        step; the cache already holds the last token and the accepted drafts, so lengths advance too."""
        batch, width = tokens.shape
        rows = self.row_index[:batch, None].expand(batch, width)
        columns = self.generated[:batch, None] + torch.arange(width, device=self.device)
        self.out_tokens.index_put_((rows, columns), tokens)
        self.out_logprobs.index_put_((rows, columns), logprobs)
        last = (counts - 1)[:, None]
        with_last = torch.cat((self.last_token[:batch, None], tokens), dim=1)
        self.prev_token[:batch] = with_last.gather(1, last).squeeze(1)
        self.last_token[:batch] = tokens.gather(1, last).squeeze(1)
        self.generated[:batch] += counts
        self.lengths[:batch] += counts
        self.host_generated[:batch] += host_counts
        self.host_lengths[:batch] += host_counts

    def commit_to_cache(self, active: int) -> None:
        """The last tokens of rows ``0..active`` were just written to the KV cache."""
        self.prev_token[:active] = self.last_token[:active]
        self.lengths[:active] += 1
        self.host_lengths[:active] += 1

    def finished_mask(self, lo: int, hi: int, tokens: torch.Tensor) -> torch.Tensor:
        hit_stop = (tokens[:, None] == self.stop_ids[lo:hi]).any(dim=-1)
        return hit_stop | (self.generated[lo:hi] >= self.max_new[lo:hi])

    def collect(self, slot: int) -> Sequence:
        """Copy a finished row's tokens and logprobs to its Sequence and free nothing yet."""
        seq = self.sequences[slot]
        count = int(self.host_generated[slot])
        seq.token_ids = self.out_tokens[slot, :count].tolist()
        seq.logprobs = self.out_logprobs[slot, :count].tolist()
        seq.verify_steps, seq.drafted, seq.accepted = (int(c) for c in self.spec_counts[slot])
        return seq

    def compact(self, finished: list[int], move_cache) -> None:
        """Drop ``finished`` slots and move the last active rows into the holes (few copies)."""
        finished_set = set(finished)
        self.stop_string_rows -= sum(1 for slot in finished_set if self.sequences[slot].params.stop)
        new_active = self.active - len(finished_set)
        holes = sorted(s for s in finished_set if s < new_active)
        movers = [s for s in range(new_active, self.active) if s not in finished_set]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for tensor in self._device_tensors():
                tensor[dst] = tensor[src]
            for array in (self.keys, self.host_lengths, self.host_generated, self.host_max_new, self.spec_counts):
                array[holes] = array[movers]
            move_cache(src, dst, int(self.host_lengths[holes].max()))
            for hole, mover in zip(holes, movers):
                self.sequences[hole] = self.sequences[mover]
        for slot in range(new_active, self.active):
            self.sequences[slot] = None
        self.active = new_active
        self._row_params = None
