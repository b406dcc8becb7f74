"""The batched generation loop: admit and prefill requests, decode, finish, refill.

Each decode step runs the model once over the active rows (one new token per row, each at its own
position), samples with per-row settings and counter-based randomness, and records the token on
the device. The host learns which rows finished from a single small transfer per step, and only
then loops, over the finished rows, to hand results back and refill their slots from the queue.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.decoder import DecoderLM
from ..models.kernel_tuning import tune_linear_kernels
from .cache import KVCache
from .controller import OFF, Arm, make_controller
from .drafters.base import Drafter, TargetTrace, check_vocab, named_drafters
from .graphs import DecodeGraphs, target_forward
from .params import SamplingParams
from .rng import random_seed, uniforms
from .sampling import sample
from .slots import Sequence, SlotTable
from .speculation import ControllerConfig
from .speculative import absorb_idle, speculative_step
from .stats import GenerationStats
from .stops import stop_string_hits
from .transfer import to_device
from .verify import verify_drafts

DEFAULT_KV_CACHE_BYTES = 4 << 30


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams


class Engine:
    """Generates with ``model`` (the very modules the trainer updates: no copy of the weights)."""

    def __init__(
        self,
        model: DecoderLM,
        eos_token_ids: tuple[int, ...] = (),
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 4096,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        decode_text: Callable[[list[int]], str] | None = None,
        drafter: Drafter | dict[str, Drafter] | None = None,
        speculative: int | str | ControllerConfig | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.drafters = named_drafters(drafter)
        self._versioned = {name: d for name, d in self.drafters.items() if d.learnable() is not None}
        for each in self.drafters.values():
            check_vocab(each.vocab_size, model.config.vocab_size)
        if model.device.type == "cpu":  # before the cost profile below, which times these kernels
            tune_linear_kernels([model, *(d.learnable() for d in self.drafters.values() if d.learnable() is not None)])
        self.controller = make_controller(speculative, self.drafters, model, max_num_seqs)
        self.verify = verify_drafts  # the exact verifier; the audit's negative control swaps in a broken one
        self.stats = GenerationStats()
        if self.controller is not None:
            self.stats.trace = self.controller.trace

        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = min(max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.decode_text = decode_text
        self.cache: KVCache | None = None
        self.slots = SlotTable(0, 0, 0, model.device)  # sized per generate() call in _prepare
        self._synced: set[str] = set()  # drafters whose state covers every active row's tokens
        # Decode and verify forwards as replayed CUDA graphs (graphs.py); tests set a fake-capturing one.
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.graphs: DecodeGraphs | None = None

    def _captures(self) -> int:
        return self.graphs.captures if self.graphs is not None else 0

    def _live_graphs(self) -> DecodeGraphs | None:
        """The captured graphs, when on and made for the cache in use."""
        return self.graphs if self.graphs is not None and self.graphs.cache is self.cache else None

    @property
    def draft_tokens(self) -> int:
        """The largest k any step may draft (0 without drafters): sizes the cache and the slots."""
        return self.controller.max_k if self.controller is not None else 0

    # ---------------------------------------------------------------- public API
    def generate(self, requests: list[Request], progress: bool = False) -> list[list[Sequence]]:
        """Return, per request, its ``n`` finished sequences (in sample order)."""
        self._validate(requests)
        sequences = [self._sequences_of(i, r) for i, r in enumerate(requests)]
        # Shortest prompts first: each prefill chunk then holds prompts of similar length, so little
        # compute is spent on padding. Results are still returned in request order.
        pending = sorted((seqs for seqs in sequences if seqs[0].params.max_new_tokens > 0),
                         key=lambda seqs: len(seqs[0].prompt_ids))
        queue = deque(pending)
        for seqs in sequences:
            if seqs[0].params.max_new_tokens == 0:
                for seq in seqs:
                    seq.finish_reason = "length"
        if queue:
            self._run(queue, progress)
        return sequences

    # ---------------------------------------------------------------- set-up
    def _validate(self, requests: list[Request]) -> None:
        if not requests:
            raise ValueError("prompts: empty list; give at least one prompt")
        for i, request in enumerate(requests):
            if not request.prompt_ids:
                raise ValueError(f"prompts[{i}]: empty prompt")
            vocab = self.model.config.vocab_size
            if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
                raise ValueError(f"prompts[{i}]: token ids must be in [0, {vocab})")
            total = len(request.prompt_ids) + request.params.max_new_tokens
            if total > self.max_model_len:
                raise ValueError(
                    f"prompts[{i}]: {len(request.prompt_ids)} prompt tokens + max_new_tokens "
                    f"{request.params.max_new_tokens} exceed the context length {self.max_model_len}")
            if request.params.n > self.max_num_seqs:
                raise ValueError(f"n: {request.params.n} samples exceed max_num_seqs {self.max_num_seqs}")

    def _sequences_of(self, index: int, request: Request) -> list[Sequence]:
        params = request.params
        seed = params.seed if params.seed is not None else random_seed()
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        return [Sequence(index, i, list(request.prompt_ids), params, seed, tuple(dict.fromkeys(stop_ids)))
                for i in range(params.n)]

    def _prepare(self, queue: deque[list[Sequence]]) -> None:
        groups = list(queue)
        rows_wanted = min(self.max_num_seqs, sum(len(g) for g in groups))
        # A verify pass writes k + 1 positions from the row's length, so the cache has k spare ones.
        max_len = max(len(g[0].prompt_ids) + g[0].params.max_new_tokens for g in groups) + self.draft_tokens
        per_row = KVCache.bytes_needed(self.model.config, 1, max_len, self.model.dtype)
        rows = min(rows_wanted, self.kv_cache_bytes // per_row)
        widest = max(len(g) for g in groups)
        if rows < widest:
            raise ValueError(f"kv_cache_bytes: {self.kv_cache_bytes} holds {rows} rows of {max_len} tokens, "
                             f"but a request needs {widest} rows")
        if self.cache is None or not self.cache.fits(rows, max_len):
            self.cache = self.graphs = None  # free the old ones before allocating
            self.cache = KVCache(self.model.config, rows, max_len, self.model.dtype, self.model.device)
        if self.cuda_graphs and (self.graphs is None or self.graphs.cache is not self.cache):
            self.graphs = DecodeGraphs(self.model, self.cache)
        max_stop = max(len(s.stop_ids) for g in groups for s in g)
        self.slots = SlotTable(rows, max(g[0].params.max_new_tokens for g in groups), max_stop, self.model.device,
                               block=self.draft_tokens + 1)
        for each in self.drafters.values():
            each.allocate(rows, max_len, self.draft_tokens + 1)
        self._synced = set(self.drafters)
        if self.controller is not None:
            self.controller.drafters_synced()

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def _run(self, queue: deque[list[Sequence]], progress: bool) -> None:
        self._prepare(queue)
        total = sum(len(g) for g in queue)
        bar = tqdm(total=total, desc="generate", unit="seq", disable=not progress, leave=False)
        start, generated_before = time.perf_counter(), self.stats.generated_tokens
        last_refresh = start
        while queue or self.slots.active:
            self._swap_drafters()
            self._admit(queue)
            done = self._decode_step()
            if progress:
                bar.update(done)
                now = time.perf_counter()
                if now - last_refresh > 0.5:  # live rate, refreshed twice a second
                    rate = (self.stats.generated_tokens - generated_before) / (now - start)
                    bar.set_postfix(tok_s=f"{rate:.1f}", rows=self.slots.active)
                    last_refresh = now
        bar.close()

    def _admit(self, queue: deque[list[Sequence]]) -> None:
        """Prefill as many queued requests as fit in free slots and the prefill token budget."""
        while queue and self.slots.active + len(queue[0]) <= self.slots.capacity:
            batch: list[list[Sequence]] = []
            free = self.slots.capacity - self.slots.active
            longest = 0
            while queue and len(queue[0]) <= free:
                longest_if_added = max(longest, len(queue[0][0].prompt_ids))
                if batch and longest_if_added * (len(batch) + 1) > self.max_prefill_tokens:
                    break
                group = queue.popleft()
                batch.append(group)
                free -= len(group)
                longest = longest_if_added
            self._prefill(batch)

    def _prefill(self, groups: list[list[Sequence]]) -> None:
        t0 = time.perf_counter()
        start, prompts = self.slots.active, [g[0].prompt_ids for g in groups]
        device = self.model.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(max(len(p) for p in prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.int64, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        rows = slice(start, start + len(prompts))
        capture = tuple(sorted({layer for d in self.drafters.values() for layer in d.capture_layers}))
        out = self.model(ids, positions, cache=self.cache, rows=rows, kv_len=width, capture_layers=capture)
        trace = self._prefill_trace(out.captured, ids, lengths)
        for each in self.drafters.values():
            each.prefill(rows, ids, lengths, trace)
        # A drafter that deferred its prefill runs it in a catch-up, timed as one (not as drafting).
        deferred = {name for name, each in self.drafters.items() if each.defers_prefill}
        self._synced -= deferred
        for name in deferred if self.controller is not None else ():
            self.controller.prefill_pending(name)
        last_hidden = out.hidden[torch.arange(len(prompts), device=device), lengths - 1]
        logits = self.model.logits(last_hidden)
        # Sample 0 of each request sits in the prefilled slot; siblings get copies of its cache rows.
        firsts = [g[0] for g in groups]
        siblings = [(row, s) for row, g in enumerate(groups) for s in g[1:]]
        ordered = firsts + [s for _, s in siblings]
        for seq in ordered:
            seq.drafter_versions = {name: [d.version] for name, d in self._versioned.items()}
        self.slots.fill(start, ordered)
        self.slots.active = start + len(ordered)
        if siblings:
            src = torch.tensor([start + row for row, _ in siblings], device=device)
            dst = torch.arange(start + len(groups), start + len(ordered), device=device)
            self._copy_rows(src, dst, width)
        row_of = torch.tensor(list(range(len(groups))) + [row for row, _ in siblings], device=device)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.prefill_s += time.perf_counter() - t0
        self._sample_and_commit(logits[row_of], start, self.slots.active)

    def _prefill_trace(self, captured: dict, ids: torch.Tensor, lengths: torch.Tensor) -> TargetTrace | None:
        if not captured:
            return None
        next_tokens = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)  # the last one is the sampled token, unknown yet
        host_lengths = lengths.cpu().numpy()
        return TargetTrace(captured=captured, start=torch.zeros_like(lengths), valid=lengths - 1,
                           next_tokens=next_tokens, host_start=np.zeros_like(host_lengths),
                           host_valid=host_lengths - 1)

    def _copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy rows in the target's cache and in the drafter's state alike."""
        self.cache.copy_rows(src, dst, length)
        for each in self.drafters.values():
            each.copy_rows(src, dst, length)

    def _swap_drafters(self) -> None:
        """Newer published drafter weights enter between steps (before admitting new rows, so those
        start with them)."""
        if self.controller is None:
            return
        for name, drafter in self.drafters.items():
            if drafter.source is not None and drafter.swap_if_newer():
                self.controller.drafter_updated(name)
                for seq in self.slots.sequences[:self.slots.active]:  # only on a swap: a few per run
                    seq.drafter_versions[name].append(drafter.version)

    def _decode_step(self) -> int:
        """One step for every active row; returns how many sequences finished."""
        slots = self.slots
        active = slots.active
        if active == 0:
            return 0
        if self.controller is None:
            return self._ar_step(active)
        t0 = time.perf_counter()  # the decision is part of the step's cost
        arm = self.controller.choose(active)
        self.stats.arm_steps[arm.label] = self.stats.arm_steps.get(arm.label, 0) + 1
        idle = {name: d for name, d in self.drafters.items() if d.shadows and name != arm.drafter}
        captures = self._captures()
        if arm.drafter is not None:
            finished = self._speculative_step(arm, t0, list(idle.values()), captures)
        else:
            finished = self._ar_step(active, list(idle.values()))
            self._synced.clear()
            # A step that captured a CUDA graph timed the capture: it teaches the costs nothing.
            self.controller.record(OFF, active, time.perf_counter() - t0, 0.0, None, active, 0.0,
                                   self._captures() == captures)
        for name, drafter in idle.items():  # kept up while it sat out: only what it could not keep is missed
            if drafter.absorb_due(self.slots.active) and self.controller.keeps_warm(name):
                seconds = absorb_idle(self.model, self.cache, self.slots, drafter)
                self.stats.absorb_s += seconds
                self.stats.decode_s += seconds
                self._synced.add(name)
                self.controller.drafter_synced(name)
            else:
                self.controller.drafter_lag(name, drafter.lag(self.slots.host_lengths[:self.slots.active]))
        return finished

    def _ar_step(self, active: int, shadowing: list[Drafter] = ()) -> int:
        t0 = time.perf_counter()
        slots = self.slots
        kv_len = int(slots.host_lengths[:active].max()) + 1
        capture = tuple(sorted({layer for d in shadowing for layer in d.capture_layers}))
        out, logits = target_forward(self.model, self.cache, slots.last_token[:active, None],
                                     slots.lengths[:active, None], kv_len, capture, self._live_graphs())
        if shadowing:
            trace = _one_position_trace(out.captured, slots, active)
            for drafter in shadowing:
                drafter.shadow(trace)
        slots.commit_to_cache(active)
        self.stats.decode_steps += 1
        finished = self._sample_and_commit(logits[:, -1], 0, active)
        self.stats.decode_s += time.perf_counter() - t0
        return finished

    def _speculative_step(self, arm: Arm, t0: float, shadowing: list[Drafter], captures: int) -> int:
        active = self.slots.active
        before = self.slots.host_generated[:active].copy()
        result = speculative_step(self.model, self.cache, self.slots, self.drafters[arm.drafter], arm.k,
                                  self.stats.spec, catch_up=arm.drafter not in self._synced,
                                  time_drafter=self.controller.times_drafter, shadowing=shadowing, verify=self.verify,
                                  graphs=self._live_graphs())
        self._synced = {arm.drafter}
        finished = list(result.finished)
        finished += self._stop_string_hits(0, active, finished, before)
        # Counted after the stop strings: a row they end mid-block keeps only the tokens up to the hit.
        emitted = int(self.slots.host_generated[:active].sum() - before.sum())
        self.stats.decode_steps += 1
        self.stats.generated_tokens += emitted
        seconds = time.perf_counter() - t0
        self.stats.decode_s += seconds
        self.controller.record(arm, active, seconds, result.draft_seconds, result.num_accepted, emitted,
                               result.catch_up_seconds, self._captures() == captures)
        return self._finish_rows(finished)

    def _sample_and_commit(self, logits: torch.Tensor, lo: int, hi: int) -> int:
        slots = self.slots
        params = slots.row_params(lo, hi)
        draws = to_device(uniforms(slots.keys[lo:hi], slots.host_generated[lo:hi]), logits.device) \
            if params.any_random else None  # all-greedy steps draw nothing
        tokens, logprobs = sample(logits, draws, params)
        slots.advance(lo, hi, tokens, logprobs)
        self.stats.generated_tokens += hi - lo
        ends = slots.finished_mask(lo, hi, tokens) | torch.isnan(logprobs)
        finished = (torch.nonzero(ends).flatten() + lo).tolist()  # the step's one device sync
        finished += self._stop_string_hits(lo, hi, finished)
        return self._finish_rows(finished)

    def _finish_rows(self, finished: list[int]) -> int:
        if not finished:
            return 0
        for slot in finished:
            self._finish(slot)
        self.slots.compact(finished, self._copy_rows)
        return len(finished)

    def _stop_string_hits(self, lo: int, hi: int, already: list[int],
                          before: np.ndarray | None = None) -> list[int]:
        return stop_string_hits(self.slots, self.decode_text, lo, hi, already, before)

    def _finish(self, slot: int) -> None:
        seq = self.slots.collect(slot)
        for each in self.drafters.values():
            each.finish(seq)
        if any(math.isnan(lp) for lp in seq.logprobs[-self.draft_tokens - 1:]):
            raise ValueError(
                f"logits: NaN or inf in the model's output for prompts[{seq.request_index}] "
                f"(sample {seq.sample_index}) at generated token {len(seq.token_ids) - 1}")
        if seq.stop_text_hit is not None or (seq.token_ids and seq.token_ids[-1] in seq.stop_ids):
            seq.finish_reason = "stop"
        else:
            seq.finish_reason = "length"


def _one_position_trace(captured: dict, slots: SlotTable, active: int) -> TargetTrace:
    """An AR step's view for shadowing drafters: one committed position per row, at its length. Views,
    not copies: the drafters read it before the step commits (which moves the lengths)."""
    ones = torch.ones(active, dtype=torch.int64, device=slots.lengths.device)
    return TargetTrace(captured=captured, start=slots.lengths[:active], valid=ones,
                       next_tokens=slots.last_token[:active, None], host_start=slots.host_lengths[:active],
                       host_valid=np.ones(active, dtype=np.int64))
