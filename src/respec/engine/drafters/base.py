"""The ``Drafter`` interface: what the engine asks of anything that proposes speculative tokens.

Per decode step the engine hands the drafter a ``DraftState`` (the active rows' last tokens and cache
lengths) and asks for up to ``k`` tokens per row. A learned drafter draws them with the engine's
``DraftSampler``, which applies each row's temperature, top-k and top-p exactly as the target's side
does and returns the processed distribution q the tokens were drawn from, so the verifier always
sees the q that was really sampled. A deterministic drafter (n-gram lookup) returns tokens only.

Drafters that keep a KV cache lay it out in the engine's slots: row ``i`` of the drafter's cache
belongs to active row ``i``, and the engine calls ``copy_rows`` whenever it copies or moves rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..rng import uniforms
from ..sampling import RowParams, processed_logprobs, sample_tokens
from ..snapshots import apply_snapshot
from ..transfer import to_device

if TYPE_CHECKING:
    from ...models.decoder import DecoderLM
    from ..cache import KVCache
    from ..slots import Sequence

# Counter-based RNG streams (see rng.py): each decision of a speculative step has its own stream, so
# no uniform that shaped an emitted token is ever reused for another decision.
TOKEN_STREAM = 0  # AR samples, and the residual or bonus token of a verify step
ACCEPT_STREAM = 1  # the accept/reject test of each draft
DRAFT_STREAM = 2  # the drafter's own sampling of draft tokens


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, k] int64 draft tokens (padding past ``lens``)
    logprobs: torch.Tensor | None = None  # [B, k, V] processed q they were drawn from; None = deterministic
    lens: torch.Tensor | None = None  # [B] drafts offered per row (default k)


@dataclass
class TargetTrace:
    """The target's view of tokens it just ran: prefill or verify. Drafters that fuse target hidden
    states (EAGLE-3) read them here; ``captured[layer]`` is ``[B, T, D]`` for positions
    ``start[b] .. start[b] + T - 1`` of which the first ``valid[b]`` hold committed tokens."""

    captured: dict[int, torch.Tensor]
    start: torch.Tensor  # [B] int64
    valid: torch.Tensor  # [B] int64
    next_tokens: torch.Tensor  # [B, T] the token after each position (the model's input at t + 1)
    host_start: np.ndarray  # ``start`` and ``valid`` on the host
    host_valid: np.ndarray


@dataclass
class DraftState:
    """The active rows ``0..B-1`` at the start of a speculative step."""

    last_token: torch.Tensor  # [B] sampled, not yet in the target's cache, at position ``lengths``
    prev_token: torch.Tensor  # [B] the token at position ``lengths - 1`` (already in the cache)
    lengths: torch.Tensor  # [B] positions held in the target's KV cache
    host_lengths: np.ndarray  # the same on the host, for sizes without a device sync
    sequences: list[Sequence]  # per row: prompt, request and sample index (for history lookups)
    generated: torch.Tensor  # [B] tokens emitted so far per row
    host_generated: np.ndarray  # the same on the host
    out_tokens: torch.Tensor  # [B, >= generated] emitted tokens per row

    def tokens_at(self, first: torch.Tensor, width: int) -> torch.Tensor:
        """``[B, width]`` tokens at positions ``first .. first + width - 1`` of each row, read from the
        emitted tokens (so positions must lie past the prompt); clamped at the newest, ``last_token``."""
        # Position ``lengths`` holds emitted token ``generated - 1``.
        last = self.generated - 1
        index = first[:, None] + torch.arange(width, device=first.device) - self.lengths[:, None] + last[:, None]
        index = torch.minimum(index.clamp(min=0), last[:, None])
        return self.out_tokens.gather(1, index)


class DraftSampler:
    """Draws draft tokens exactly as the target side will judge them (same processing of logits)."""

    def __init__(self, params: RowParams, keys: np.ndarray, generated: np.ndarray, device: torch.device) -> None:
        self.params, self.keys, self.generated, self.device = params, keys, generated, device

    def __call__(self, step: int, logits: torch.Tensor, vocab_index: torch.Tensor | None = None,
                 vocab_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft ``step`` (0-based) from ``logits [B, V]``: tokens [B] and processed logprobs q [B, V].

        A drafter with a reduced vocabulary passes logits over its own ``V'`` entries, ``vocab_index
        [V']`` (their sorted target ids) and the target's ``vocab_size``: the processing and the draw
        run over ``V'`` entries only, which gives the same distribution and, the index being sorted,
        the same inverse-CDF token as over the full vocabulary with ``-inf`` elsewhere; q is then
        spread onto the target's vocabulary for the verifier."""
        q = processed_logprobs(logits, self.params)
        draws = None
        if self.params.any_random:
            draws = to_device(uniforms(self.keys, self.generated + step, DRAFT_STREAM), self.device)
        tokens = sample_tokens(q, draws, self.params)
        if vocab_index is None:
            return tokens, q
        full = q.new_full((q.shape[0], vocab_size), float("-inf")).index_copy_(1, vocab_index, q)
        return vocab_index[tokens], full


class Drafter:
    """Proposes draft tokens for the engine's active rows. Hooks default to doing nothing."""

    vocab_size: int
    capture_layers: tuple[int, ...] = ()  # target layers whose outputs ``propose`` needs in the trace
    name: str = "drafter"  # how arms and statistics call it
    catch_up_kind: str = "none"  # what ``catch_up`` runs: "none", "target" (a read-only target pass), "self"
    shadows: bool = False  # keeps up from the target's features of steps it sits out (see ``shadow``)
    defers_prefill: bool = False  # ``prefill`` only keeps what it needs; the first ``catch_up`` runs it
    version: int = 0  # of the weights now in use (0: as loaded); the online learner publishes newer ones
    source = None  # a Mailbox or DirectorySource of newer weights (see ``subscribe``)
    swap_errors: list[str]

    def learnable(self) -> torch.nn.Module | None:
        """The module whose weights an online learner trains and publishes (None: nothing to learn)."""
        return None

    def subscribe(self, source) -> None:
        """Take newer weights from ``source`` (``.version`` and ``.latest()``) at decode-step boundaries."""
        if self.learnable() is None:
            raise ValueError(f"drafter {self.name!r} has no weights to update")
        self.source, self.swap_errors, self._rejected = source, [], 0

    def swap_if_newer(self) -> bool:
        """Between decode steps: load the source's newest snapshot if it is newer and sound. A bad one
        is rejected (and remembered, so it is not retried) and the current weights stay."""
        newest = self.source.version
        if newest <= self.version or newest == self._rejected:
            return False
        snapshot = self.source.latest()
        try:
            apply_snapshot(self.learnable(), snapshot)
        except ValueError as err:
            self._rejected = snapshot.version
            self.swap_errors.append(str(err))
            return False
        self.version = snapshot.version
        return True

    def allocate(self, rows: int, max_len: int, block: int) -> None:
        """Prepare per-row state for up to ``rows`` rows of up to ``max_len`` positions; a verify
        step covers ``block`` (k + 1) positions."""

    def prefill(self, rows: slice, prompt_ids: torch.Tensor, prompt_lens: torch.Tensor,
                trace: TargetTrace | None) -> None:
        """New prompts entered rows ``rows`` (right-padded ``prompt_ids [G, W]``)."""

    def observe(self, trace: TargetTrace) -> None:
        """The target just verified a block for the active rows (only if ``capture_layers``)."""

    def shadow(self, trace: TargetTrace) -> None:
        """The target ran a step this drafter sat out (``capture_layers`` captured): keep what it needs
        so that switching it back on needs no target pass. Only drafters with ``shadows`` get this."""

    def absorb_due(self, batch: int) -> bool:
        """After a step this drafter sat out: whether a row's kept state is full, so that the engine
        should run ``catch_up`` now (while idle) rather than let the row fall behind."""
        return False

    def lag(self, host_lengths: np.ndarray) -> int:
        """Positions per row (the most over the rows) that a ``catch_up`` would have to re-read."""
        return 0

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """The engine copied rows ``src`` into ``dst`` (first ``length`` positions matter)."""

    def catch_up(self, state: DraftState, target: DecoderLM, cache: KVCache) -> None:
        """The drafter sat out some steps (speculation off, or another drafter chosen): bring each
        row's state up to ``state.lengths`` in one pass. Called before ``propose`` after such a gap."""

    def finish(self, sequence: Sequence) -> None:
        """A sequence finished (history-based drafters remember it)."""

    def reset(self) -> None:
        """Forget what earlier generate calls taught (benchmarks: each run starts equal)."""

    def get_state(self) -> dict | None:
        """Host-side state that shapes future drafts (a trainer checkpoints it for an exact resume)."""
        return None

    def set_state(self, state: dict | None) -> None:
        """Restore what ``get_state`` returned."""

    def propose(self, state: DraftState, k: int, sampler: DraftSampler) -> Proposal:
        """Up to ``k`` draft tokens per active row."""
        raise NotImplementedError


def check_vocab(drafter_vocab: int, target_vocab: int) -> None:
    if drafter_vocab != target_vocab:
        raise ValueError(f"drafter: vocabulary size {drafter_vocab} does not match the target's {target_vocab}")


def named_drafters(drafter: Drafter | dict[str, Drafter] | None) -> dict[str, Drafter]:
    """The engine's drafters by name: one drafter (under its ``name``), a dict, or None (none)."""
    if drafter is None:
        return {}
    if isinstance(drafter, dict):
        return dict(drafter)
    return {getattr(drafter, "name", "drafter"): drafter}
