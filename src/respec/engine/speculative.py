"""One speculative decode step: draft, verify in one target forward, and report what each row emits.

The target runs ``[last_token, d_1 .. d_k]`` at positions ``L .. L+k`` of each row, which writes their
keys and values into the cache; the verifier (verify.py) decides how many drafts each row keeps.
Rejected entries stay in the cache past the row's new length, where attention never reads them and
the next step overwrites them. A row never drafts past its ``max_new_tokens`` budget, so the budget
is exact; stop tokens inside an accepted block end the row there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.decoder import DecoderLM
from .cache import KVCache
from .drafters.base import (
    ACCEPT_STREAM,
    TOKEN_STREAM,
    Drafter,
    DraftSampler,
    DraftState,
    Proposal,
    TargetTrace,
)
from .graphs import DecodeGraphs, target_forward
from .rng import uniforms
from .sampling import processed_logprobs_steps
from .slots import SlotTable
from .stats import SpecStats
from .timing import Marks
from .transfer import to_device
from .verify import verify_drafts


@dataclass
class StepResult:
    tokens: torch.Tensor  # [B, k+1]
    logprobs: torch.Tensor  # [B, k+1]
    counts: torch.Tensor  # [B] tokens emitted per row (>= 1)
    ends: torch.Tensor  # [B] bool: a stop token was emitted, a logprob is NaN, or the budget is spent
    finished: list[int] = field(default_factory=list)  # the rows where ``ends`` holds (host)
    num_accepted: np.ndarray | None = None  # [B] accepted drafts per row (host)
    draft_seconds: float = 0.0  # the drafter's proposal, when timed
    catch_up_seconds: float = 0.0  # its catch-up pass, when it had one and it was timed


def speculative_step(model: DecoderLM, cache: KVCache, slots: SlotTable, drafter: Drafter, k: int,
                     stats: SpecStats, *, catch_up: bool = False, time_drafter: bool = False,
                     shadowing: list[Drafter] = (), verify=verify_drafts, graphs: DecodeGraphs | None = None) -> StepResult:
    """Draft and verify once for the active rows ``0..B-1``; the caller commits the result.
    ``catch_up``: the drafter sat out earlier steps and first brings its state up to date.
    ``time_drafter``: measure the drafter's share of the step (on a GPU with CUDA events, read after
    the step's one device sync: no extra sync).
    ``shadowing``: drafters sitting this step out that keep up from its captured features.
    ``verify``: the verifier (``verify.verify_drafts``; the audit's negative control passes a broken one).
    ``graphs``: run the verify forward through captured CUDA graphs (graphs.py)."""
    batch = slots.active
    params = slots.row_params(0, batch)
    # Room: the last emitted token must stay within max_new_tokens, so a row drafts at most
    # budget - generated - 1 tokens (0 = a plain AR step through the verifier's bonus path).
    room = np.minimum(slots.host_max_new[:batch] - slots.host_generated[:batch] - 1, k)
    marks = Marks(model.device, time_drafter)
    proposal = _draft(model, cache, slots, drafter, k, catch_up, marks)
    offered = to_device(room, model.device)
    if proposal.lens is not None:
        offered = torch.minimum(offered, proposal.lens)
    ids = torch.cat((slots.last_token[:batch, None], proposal.tokens), dim=1)
    positions = slots.lengths[:batch, None] + torch.arange(k + 1, device=ids.device)
    kv_len = int(slots.host_lengths[:batch].max()) + k + 1
    capture = tuple(sorted({layer for d in (drafter, *shadowing) for layer in d.capture_layers}))
    out, logits = target_forward(model, cache, ids, positions, kv_len, capture, graphs)
    target = processed_logprobs_steps(logits, params)
    accept_u, resample_u = _verify_uniforms(slots, batch, k, model.device) if params.any_random else (None, None)
    verdict = verify(target, proposal.tokens, proposal.logprobs, accept_u, resample_u, params.temperature == 0,
                     offered, all_greedy=not params.any_random)
    result = _emitted(verdict, slots, batch)
    # The step's one device -> host transfer: what the host needs to book-keep and to finish rows.
    host = torch.stack((result.counts, verdict.num_accepted, offered, result.ends.long())).cpu().numpy()
    counts, host_accepted, host_offered = host[0].copy(), host[1], host[2]
    result.finished = np.flatnonzero(host[3]).tolist()
    catch_up_seconds, draft_seconds = marks.intervals()  # the events are done: the copy above waited for them
    result.num_accepted, result.draft_seconds, result.catch_up_seconds = host_accepted, draft_seconds, catch_up_seconds
    stats.record(host_accepted, host_offered, counts, k, f"{drafter.name}@v{drafter.version}")
    slots.spec_counts[:batch] += np.stack((np.ones_like(counts), host_offered, host_accepted), axis=1)
    if drafter.capture_layers or shadowing:
        trace = _trace(out.captured, verdict, result.counts, counts, slots, batch)
        if drafter.capture_layers:
            drafter.observe(trace)
        for idle in shadowing:
            idle.shadow(trace)
    slots.advance_block(result.tokens, result.logprobs, result.counts, counts)
    return result


def _draft(model: DecoderLM, cache: KVCache, slots: SlotTable, drafter: Drafter, k: int, catch_up: bool,
           marks: Marks) -> Proposal:
    """The drafter's catch-up (when it sat out steps) and proposal for the active rows, with a mark
    before, between and after them."""
    batch, state = slots.active, draft_state(slots)
    sampler = DraftSampler(slots.row_params(0, batch), slots.keys[:batch], state.host_generated, model.device)
    marks.mark()
    if catch_up:
        drafter.catch_up(state, model, cache)
    marks.mark()
    proposal = drafter.propose(state, k, sampler)
    marks.mark()
    return proposal


def draft_state(slots: SlotTable) -> DraftState:
    """The active rows as a drafter sees them between steps."""
    batch = slots.active
    return DraftState(last_token=slots.last_token[:batch], prev_token=slots.prev_token[:batch],
                      lengths=slots.lengths[:batch], host_lengths=slots.host_lengths[:batch],
                      sequences=slots.sequences[:batch], generated=slots.generated[:batch],
                      host_generated=slots.host_generated[:batch], out_tokens=slots.out_tokens[:batch])


def absorb_idle(model: DecoderLM, cache: KVCache, slots: SlotTable, drafter: Drafter) -> float:
    """Between steps: run an idle drafter's pending block through it now (its ``catch_up``), so it stays
    in sync while it sits out; returns the seconds it took (device work included)."""
    started = time.perf_counter()
    drafter.catch_up(draft_state(slots), model, cache)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - started


def _verify_uniforms(slots: SlotTable, batch: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft i is token index generated + i: the uniforms of its accept test and of its resample."""
    counters = slots.host_generated[:batch, None] + np.arange(k + 1)[None, :]
    keys = slots.keys[:batch, None]
    return (to_device(uniforms(keys, counters[:, :k], ACCEPT_STREAM), device),
            to_device(uniforms(keys, counters, TOKEN_STREAM), device))


def _trace(captured: dict, verdict, counts: torch.Tensor, host_counts: np.ndarray,
           slots: SlotTable, batch: int) -> TargetTrace:
    """Positions L .. L+k just verified: the first ``counts`` hold committed tokens, each followed by
    the next emitted token (an accepted draft, or the residual / bonus token at the end)."""
    return TargetTrace(captured=captured, start=slots.lengths[:batch].clone(), valid=counts,
                       next_tokens=verdict.tokens, host_start=slots.host_lengths[:batch].copy(),
                       host_valid=host_counts.copy())


def _emitted(verdict, slots: SlotTable, batch: int) -> StepResult:
    """Cut each row's block at its first stop token; flag rows that end this step."""
    width = verdict.tokens.shape[1]
    index = torch.arange(width, device=verdict.tokens.device)
    within = index[None, :] <= verdict.num_accepted[:, None]
    stop = (verdict.tokens[..., None] == slots.stop_ids[:batch, None, :]).any(-1) & within
    has_stop = stop.any(dim=1)
    first_stop = stop.long().argmax(dim=1)
    counts = torch.where(has_stop, first_stop + 1, verdict.num_accepted + 1)
    emitted = index[None, :] < counts[:, None]
    bad = (torch.isnan(verdict.logprobs) & emitted).any(dim=1)
    out_of_budget = slots.generated[:batch] + counts >= slots.max_new[:batch]
    return StepResult(tokens=verdict.tokens, logprobs=verdict.logprobs, counts=counts,
                      ends=has_stop | bad | out_of_budget)
