"""The EAGLE-3-style head as a drafter: catch up on the target's features, then draft ahead.

After every target forward (prefill or verify) the engine hands over the fused-layer features of the
positions it just committed (``prefill``, ``observe``). They stay pending, one block per row, until the next
``propose``, which runs them through the head in one forward (writing the head's KV cache at their
positions and yielding the first draft from the last one), then drafts one token per further step
from the head's own hidden state. The last pending entry always pairs with the row's newest token,
which is only known once sampled: after prefill that is the first generated token, after a verify
the residual or bonus token.

While the controller runs other arms, the engine captures the fused layers in those steps too and
``shadow`` appends them to the pending block (up to ``shadow_limit`` decoded entries per row), so switching
the head back on costs no target pass: ``catch_up`` runs the block through the head in one extend
forward. When a row's block is full (``absorb_due``) and the controller expects to draft again, the
engine runs that catch-up while the head still sits out, so the head never lags; otherwise a full
row stops growing and the next ``catch_up`` re-reads the rest from the target first.
The limit is long (256) because an RL rollout's tail, where the head pays again, comes after a
stretch of large-batch AR steps; the block costs 3 x hidden_size values per entry and row.

The prompt itself is the first pending block: ``prefill`` keeps its features and the first catch-up
runs the head over them, so an engine that keeps the head off (a large batch) never pays for it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ...models.decoder import DecoderLM, ForwardContext, write_and_read_cache
from ...models.eagle import EagleHead
from ...models.eagle_format import load_eagle_head
from ..cache import KVCache
from ..transfer import to_device
from .base import Drafter, DraftSampler, DraftState, Proposal, TargetTrace


class EagleDrafter(Drafter):
    name = "eagle"
    catch_up_kind = "target"
    shadows = True
    defers_prefill = True

    def __init__(self, head: EagleHead, target: DecoderLM, shadow_limit: int = 256) -> None:
        head.config.check_target(target.config)
        if shadow_limit < 0:
            raise ValueError(f"shadow_limit: must be >= 0 entries per row, got {shadow_limit}")
        self.head, self.target, self.shadow_limit = head, target, shadow_limit
        self.vocab_size = head.config.vocab_size
        self.capture_layers = tuple(head.config.fuse_layers)
        self.cache: KVCache | None = None

    @property
    def _draft_vocab(self) -> tuple[torch.Tensor | None, int]:
        """The head's reduced vocabulary (target ids) for the sampler, or None for the full one."""
        if self.head.draft_head is None:
            return None, 0
        return self.head.draft_to_target, self.vocab_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, target: DecoderLM) -> EagleDrafter:
        return cls(load_eagle_head(path, target), target)

    def learnable(self) -> EagleHead:
        return self.head

    # ------------------------------------------------------------------ state
    def allocate(self, rows: int, max_len: int, block: int) -> None:
        config, device, dtype = self.head.config, self.target.device, self.target.dtype
        if self.cache is None or not self.cache.fits(rows, max_len):
            self.cache = None
            self.cache = KVCache(config.as_model_config(), rows, max_len, dtype, device)
        self.block = max(block, 1)
        # The pending block's buffers outlive a generate call, as the KV cache does: shadowing grows
        # them to the limit during a long rollout, and regrowing them every call copies them again.
        kept = getattr(self, "features", None)
        if kept is None or kept.shape[0] < rows or kept.shape[1] < self.block or kept.dtype != dtype \
                or kept.device != torch.device(device):
            self.features = torch.zeros(rows, self.block, 3 * config.hidden_size, dtype=dtype, device=device)
            self.tokens = torch.zeros(rows, self.block, dtype=torch.int64, device=device)
        self.start = torch.zeros(rows, dtype=torch.int64, device=device)
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)
        self.host_start = np.zeros(rows, dtype=np.int64)
        self.host_count = np.zeros(rows, dtype=np.int64)
        self.host_prompt = np.zeros(rows, dtype=np.int64)  # pending entries that are prompt positions

    def _fused(self, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([captured[layer] for layer in self.capture_layers], dim=-1)

    def prefill(self, rows: slice, prompt_ids: torch.Tensor, prompt_lens: torch.Tensor,
                trace: TargetTrace | None) -> None:
        """The prompt becomes the rows' pending block: the head runs over it only when it first drafts
        for them (``catch_up``), so an engine that never turns it on never pays for it. Entries 0..n-2
        pair prompt features with the next prompt token; entry n-1 waits for the first sampled token."""
        width = prompt_ids.shape[1]
        self._ensure_width(width + self.shadow_limit + self.block)
        self.features[rows, :width] = self._fused(trace.captured)
        self.tokens[rows, :width] = trace.next_tokens
        self.start[rows], self.count[rows] = 0, prompt_lens
        self.host_start[rows], self.host_count[rows] = 0, trace.host_valid + 1
        self.host_prompt[rows] = trace.host_valid + 1

    def observe(self, trace: TargetTrace) -> None:
        batch, width = trace.next_tokens.shape
        self.features[:batch, :width] = self._fused(trace.captured)
        self.tokens[:batch, :width] = trace.next_tokens
        self.start[:batch], self.count[:batch] = trace.start, trace.valid
        self.host_start[:batch], self.host_count[:batch] = trace.host_start, trace.host_valid
        self.host_prompt[:batch] = 0

    def shadow(self, trace: TargetTrace) -> None:
        """Append the committed positions of a step the head sat out to each row's pending block, for
        rows whose block ends where the step began and stays within ``shadow_limit``."""
        batch = len(trace.host_valid)
        count = self.host_count[:batch]
        shadowed = count - self.host_prompt[:batch]  # the limit counts decoded positions, not the prompt
        keep = (self.host_start[:batch] + count == trace.host_start) & (shadowed + trace.host_valid <= self.shadow_limit)
        if not keep.any():
            return
        self._append(self._fused(trace.captured), np.where(keep, trace.host_valid, 0))

    def _append(self, fresh: torch.Tensor, added: np.ndarray) -> None:
        """Write ``fresh [B, T, F]`` at each row's block end and grow the row's block by ``added``. All T
        entries land on every row: entries past a row's count are never read as its own, so no mask (a
        device sync on GPUs) picks the rows and positions that count."""
        batch, width = fresh.shape[:2]
        self._ensure_width(int(self.host_count[:batch].max()) + width)
        index = (self.count[:batch, None] + torch.arange(width, device=fresh.device))[..., None]
        self.features[:batch].scatter_(1, index.expand_as(fresh), fresh)
        grown = self.host_count[:batch] + added
        self.count[:batch] = to_device(grown, fresh.device)
        self.host_count[:batch] = grown

    def absorb_due(self, batch: int) -> bool:
        """A row's shadow block could not take one more verify block: absorb before it starts to lag."""
        if self.shadow_limit == 0:
            return False
        shadowed = self.host_count[:batch] - self.host_prompt[:batch]
        return bool((shadowed >= max(1, self.shadow_limit - self.block + 1)).any())

    def lag(self, host_lengths: np.ndarray) -> int:
        batch = len(host_lengths)
        return int(max(0, (host_lengths - self.host_start[:batch] - self.host_count[:batch]).max(initial=0)))

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        self.cache.copy_rows(src, dst, length)
        host_src, host_dst = src.cpu().numpy(), dst.cpu().numpy()
        pending = int(self.host_count[host_src].max(initial=1))  # a shadowed row's buffer is mostly unused
        self.features[dst, :pending] = self.features[src, :pending]
        self.tokens[dst, :pending] = self.tokens[src, :pending]
        for tensor in (self.start, self.count):
            tensor[dst] = tensor[src]
        for array in (self.host_start, self.host_count, self.host_prompt):
            array[host_dst] = array[host_src]

    def catch_up(self, state: DraftState, target: DecoderLM, cache: KVCache) -> None:
        """Rows decoded without the head since their pending block: re-read the target's features of
        the missed positions (a read-only pass over the target's cache, stopping at the last fused
        layer) and append them to the pending block; then run the block through the head in one
        extend forward (``_absorb``), so the next ``propose`` is as narrow as after a verify."""
        batch = state.last_token.shape[0]
        synced = self.host_start[:batch] + self.host_count[:batch]
        gaps = state.host_lengths[:batch] - synced
        missed = int(gaps.max())
        if missed > 0:  # else shadowed all along: nothing to re-read from the target
            device = state.lengths.device
            first = to_device(synced, device)
            positions = torch.minimum(first[:, None] + torch.arange(missed, device=device), state.lengths[:, None] - 1)
            out = target(state.tokens_at(first, missed), positions, cache=cache, rows=slice(0, batch),
                         kv_len=int(state.host_lengths.max()), capture_layers=self.capture_layers, read_only=True,
                         num_layers=max(self.capture_layers) + 1)
            self._append(self._fused(out.captured), gaps)
        self._pair_tokens(state, int(self.host_count[:batch].max()))
        self._absorb(batch)

    def _absorb(self, batch: int) -> None:
        """Run every pending entry but each row's last through the head (the catch-up's one extend
        pass, so its cost is the catch-up's), leaving only the last pending for ``propose``."""
        width = int(self.host_count[:batch].max())
        if width <= 1:
            return
        start, last = self.start[:batch], self.count[:batch] - 1
        positions = start[:, None] + torch.arange(width - 1, device=start.device)
        kv_len = int((self.host_start[:batch] + width - 1).max())
        # Rows with fewer entries run their last one (or padding past it) here too: propose rewrites it.
        self._run(self.tokens[:batch, : width - 1], self.head.fuse(self.features[:batch, : width - 1]), positions,
                  slice(0, batch), kv_len)
        self.features[:batch, 0] = self.features[torch.arange(batch, device=start.device), last]
        self.start[:batch] = start + last
        self.count[:batch] = 1
        self.host_start[:batch] += self.host_count[:batch] - 1
        self.host_count[:batch] = 1
        self.host_prompt[:batch] = 0

    def _pair_tokens(self, state: DraftState, width: int) -> None:
        """Entry j pairs position start + j with the token after it; the last one stays last_token's.
        Entries whose next token lies in the prompt keep the pairing prefill gave them."""
        batch = state.last_token.shape[0]
        first = self.start[:batch] + 1
        prompt_len = state.lengths - state.generated + 1
        generated = first[:, None] + torch.arange(width, device=first.device) >= prompt_len[:, None]
        self.tokens[:batch, :width] = torch.where(generated, state.tokens_at(first, width), self.tokens[:batch, :width])

    def _ensure_width(self, width: int) -> None:
        if width <= self.features.shape[1]:
            return
        # Straight to what shadowing can fill: growing a step at a time (or by doubling) copied and
        # zeroed the buffer again and again, ~2 ms a step at batch 64 on a CPU.
        width = max(width, self.shadow_limit + self.block)
        features = self.features.new_zeros(self.features.shape[0], width, self.features.shape[2])
        tokens = self.tokens.new_zeros(self.tokens.shape[0], width)
        features[:, : self.features.shape[1]] = self.features
        tokens[:, : self.tokens.shape[1]] = self.tokens
        self.features, self.tokens = features, tokens

    # ------------------------------------------------------------------ drafting
    def _run(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, rows: slice,
             kv_len: int) -> torch.Tensor:
        """One head forward over entries (token, hidden) at ``positions``, through the head's cache."""
        ctx: ForwardContext = self.target._cache_context(positions, self.cache, rows, kv_len)
        q, k, v = self.head.project(self.target.embed(tokens), hidden, ctx.cos, ctx.sin)
        keys, values = write_and_read_cache(self.cache.keys[0], self.cache.values[0], k, v, ctx)
        return self.head.attend(q, keys, values, ctx.mask, hidden)

    def propose(self, state: DraftState, k: int, sampler: DraftSampler) -> Proposal:
        batch = state.last_token.shape[0]
        rows, index = slice(0, batch), torch.arange(batch, device=state.last_token.device)
        width = int(self.host_count[:batch].max())
        count, start = self.count[:batch], self.start[:batch]
        tokens = self.tokens[:batch, :width].clone()
        tokens[index, count - 1] = state.last_token
        positions = start[:, None] + torch.arange(width, device=tokens.device)
        kv_len = int((self.host_start[:batch] + width).max())
        hidden = self._run(tokens, self.head.fuse(self.features[:batch, :width]), positions, rows, kv_len)
        hidden = hidden[index, count - 1]
        position = start + count - 1  # of the entry whose output drafts the next token
        drafts, logprobs = [], []
        for step in range(k):
            token, q = sampler(step, self.head.head_logits(hidden, self.target), *self._draft_vocab)
            drafts.append(token)
            logprobs.append(q)
            if step == k - 1:
                break
            position = position + 1
            kv_len += 1
            hidden = self._run(token[:, None], hidden[:, None], position[:, None], rows, kv_len)[:, 0]
        return Proposal(tokens=torch.stack(drafts, dim=1), logprobs=torch.stack(logprobs, dim=1))
