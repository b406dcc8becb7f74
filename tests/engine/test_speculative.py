"""Batched speculative decoding with a KV cache on tiny fp32 models (checklist section B, 9-17).

The property under test: speculation never changes what the engine returns. Greedy SD must equal greedy
AR token for token (9), whatever the drafter proposes (10); the cache must hold exactly the committed
tokens after every round (11); returned logprobs must be the target's (12); stops and budgets must cut a
row exactly where AR would (13); no drafter means no speculation (14); a drafter with another vocabulary
is refused (15); at T > 0 the output distribution equals AR's (16, with a negative control proving the
test can fail); and acceptance is what the drafter's own predictions imply (17).

The tiny Llama of conftest has a 259-token vocabulary (the byte alphabet plus three specials). Test 16
uses its own 32-token model with peaky logits, so 10^5 samples fill the cells of a 3-token joint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from respec import LLM, SamplingParams
from respec.engine import engine as engine_module
from respec.engine import verify
from respec.engine.cache import KVCache
from respec.engine.drafters import Drafter, DraftModelDrafter, Proposal, make_drafter
from respec.engine.engine import Engine, Request
from respec.engine.sampling import RowParams, processed_logprobs
from respec.engine.slots import Sequence
from tests.conftest import make_tiny_checkpoint
from tests.helpers import (
    DISTRIBUTION_P_LIMIT,
    ar_samples,
    cells,
    generate_samples,
    prompts_for,
    ragged_prompts,
    save_random_checkpoint,
    two_sample_p_value,
)

LOGPROB_ATOL = 1e-4
KV_ATOL = 1e-5
ACCEPT_ALL_MIN = 0.99  # drafter == target


# ---------------------------------------------------------------------------------------------- helpers

def greedy(max_new_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **kwargs)


def first_samples(engine: Engine, prompts: list[list[int]],
                  params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
    """Engine-level generation (Sequence carries the per-sample speculative counters LLM's Sample drops)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    return [seqs[0] for seqs in engine.generate([Request(list(p), q) for p, q in zip(prompts, params)])]


def simulate_rounds(max_new_tokens: int, k: int, correct: int) -> tuple[int, int, int, list[int]]:
    """Verify steps, drafts offered, drafts accepted and the accepted-count histogram of one row whose
    drafter is right exactly ``correct`` times per round. The first token comes from the prefill; a
    round offers min(k, room) drafts, where room keeps the last emitted token within the budget."""
    generated, steps, drafted, accepted, histogram = 1, 0, 0, 0, [0] * (k + 1)
    while generated < max_new_tokens:
        room = min(max_new_tokens - generated - 1, k)
        hits = min(correct, room)
        steps, drafted, accepted = steps + 1, drafted + room, accepted + hits
        histogram[hits] += 1
        generated += hits + 1
    return steps, drafted, accepted, histogram


def divergence(model, prompt: list[int], expected: list[int], got: list[int]) -> str:
    """Where two greedy outputs part, with the target's top-2 logit margin there (a near-tie explains a
    flip between the verify and decode passes; a wide margin means a real bug)."""
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    with torch.no_grad():
        hidden = model(torch.tensor([prompt + expected[:index]])).hidden[:, -1]
        top2 = model.logits(hidden)[0].topk(2).values
    return (f"first difference at generated token {index}: expected {expected[index:index + 3]}, "
            f"got {got[index:index + 3]} (lengths {len(expected)}, {len(got)}); "
            f"target top-2 logit margin there {float(top2[0] - top2[1]):.2e}")


def assert_same_outputs(model, prompts, expected, got) -> None:
    """Token ids, finish reasons and logprobs of LLM outputs (first sample of each request) agree."""
    for prompt, want, have in zip(prompts, expected, got):
        want, have = want.samples[0], have.samples[0]
        assert have.token_ids == want.token_ids, divergence(model, prompt, want.token_ids, have.token_ids)
        assert have.finish_reason == want.finish_reason
        assert np.allclose(have.logprobs, want.logprobs, atol=LOGPROB_ATOL, rtol=0)


class ScriptedDrafter(Drafter):
    """Knows every prompt's greedy continuation and proposes its next ``correct`` tokens, then wrong ones,
    so a greedy verifier must accept exactly min(correct, offered) drafts per round."""

    def __init__(self, vocab_size: int, continuations: dict[tuple[int, ...], list[int]], correct: int) -> None:
        self.vocab_size, self.continuations, self.correct = vocab_size, continuations, correct

    def propose(self, state, k, sampler) -> Proposal:
        rows = []
        for row, seq in enumerate(state.sequences):
            reference, generated = self.continuations[tuple(seq.prompt_ids)], int(state.host_generated[row])
            upcoming = [reference[generated + i] if generated + i < len(reference) else 0 for i in range(k)]
            rows.append([t if i < self.correct else (t + 1) % self.vocab_size for i, t in enumerate(upcoming)])
        return Proposal(tokens=torch.tensor(rows, dtype=torch.int64, device=state.last_token.device))


class RandomDrafter(Drafter):
    """Uniformly random deterministic drafts (q = None): almost never what the target wants."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def propose(self, state, k, sampler) -> Proposal:
        tokens = torch.randint(self.vocab_size, (len(state.sequences), k), generator=self.generator)
        return Proposal(tokens=tokens.to(state.last_token.device))


class RaisingDrafter(Drafter):
    """Fails the test if the engine ever asks it for drafts."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def propose(self, state, k, sampler) -> Proposal:
        raise AssertionError("the drafter was asked for drafts")


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def vocab(target) -> int:
    return target[0].config.vocab_size


@pytest.fixture(scope="module")
def ar(target) -> LLM:
    model, tokenizer = target
    return LLM(model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory) -> Path:
    """A separate small draft model: same architecture and tokenizer, different random weights."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-draft"), "llama", seed=1)


def speculative_llm(target, drafter, k: int, draft_checkpoint: Path | None = None, **kwargs) -> LLM:
    """``drafter`` is a Drafter, a make_drafter spec, "checkpoint" (the separate draft model, loaded from
    its path) or "target" (the target itself as a separate draft model with its own cache)."""
    model, tokenizer = target
    if drafter == "checkpoint":
        drafter = str(draft_checkpoint)
    elif drafter == "target":
        drafter = DraftModelDrafter(model)
    return LLM(model, tokenizer=tokenizer, drafter=drafter, speculative=k, **kwargs)


# ----------------------------------------------------------------------- 9. greedy SD == greedy AR

FULL_GRID = [(batch, k) for batch in (1, 3, 8, 32) for k in (1, 2, 4, 8)]
REDUCED_GRID = [(1, 8), (3, 2), (8, 4), (32, 1)]  # every batch size and every k once
GREEDY_CASES = ([("self:1", batch, k) for batch, k in FULL_GRID]
                + [(drafter, batch, k) for drafter in ("ngram", "checkpoint", "target") for batch, k in REDUCED_GRID])


_GREEDY_REFERENCES: dict[int, tuple] = {}


def greedy_references(ar: LLM, vocab: int, batch: int):
    """Prompts, the two parameter sets and their AR outputs for a batch size (shared by every drafter and k).

    Ragged budgets make rows finish at different steps, so finished rows are compacted away mid-generation.
    "With EOS": the most common generated token (after the prefill's) becomes a stop token, with EOS on too,
    so rows stop at assorted positions inside speculative blocks (EOS itself is rare on a random model).
    """
    if batch not in _GREEDY_REFERENCES:
        prompts = ragged_prompts(batch, vocab, seed=100 + batch)
        free = [greedy(6 + (5 * i) % 11, ignore_eos=True) for i in range(batch)]
        free_ref = ar.generate(prompts, free, progress=False)
        common = Counter(t for out in free_ref for t in out.samples[0].token_ids[1:]).most_common(1)[0][0]
        stopped = [replace(p, ignore_eos=False, stop_token_ids=(common,)) for p in free]
        stopped_ref = ar.generate(prompts, stopped, progress=False)
        assert any(len(o.samples[0].token_ids) < p.max_new_tokens for o, p in zip(stopped_ref, stopped))
        _GREEDY_REFERENCES[batch] = prompts, free, free_ref, stopped, stopped_ref
    return _GREEDY_REFERENCES[batch]


@pytest.mark.parametrize("drafter,batch,k", GREEDY_CASES)
def test_greedy_speculative_equals_autoregressive(target, ar, vocab, draft_checkpoint, drafter, batch, k):
    prompts, free, free_ref, stopped, stopped_ref = greedy_references(ar, vocab, batch)
    llm = speculative_llm(target, drafter, k, draft_checkpoint)
    # The n-gram drafter rarely finds a match in a random model's first output, but later calls draft from
    # the earlier responses to the same prompts (its rollout history): whole blocks are accepted there and
    # stop tokens fall inside them.
    calls = [(free, free_ref)] * (2 if drafter == "ngram" else 1) + [(stopped, stopped_ref)]
    for params, expected in calls:
        assert_same_outputs(target[0], prompts, expected, llm.generate(prompts, params, progress=False))
    spec = llm.stats.spec
    assert spec.verify_steps > 0 and spec.drafted > 0
    if drafter in ("ngram", "target"):
        assert spec.accepted > 0, "no draft accepted: the test never exercised an accepted block"
    if drafter == "target":
        assert spec.accept_rate >= ACCEPT_ALL_MIN


def test_greedy_speculative_with_refill_equals_autoregressive(target, ar, vocab):
    """Fewer slots than requests: new prompts are prefilled while other rows are mid-speculation."""
    prompts = ragged_prompts(10, vocab, seed=7)
    params = [greedy(4 + 3 * i, ignore_eos=True) for i in range(10)]
    expected = ar.generate(prompts, params, progress=False)
    llm = speculative_llm(target, "self:1", 4, max_num_seqs=3)
    assert_same_outputs(target[0], prompts, expected, llm.generate(prompts, params, progress=False))


def test_greedy_speculative_n_samples_equal_autoregressive(target, ar, vocab):
    """n > 1: siblings get copies of the prefilled row in the target's and the drafter's caches."""
    prompts = ragged_prompts(4, vocab, seed=8)
    params = greedy(12, n=3, ignore_eos=True)
    expected = ar.generate(prompts, params, progress=False)
    got = speculative_llm(target, "self:1", 2).generate(prompts, params, progress=False)
    for want, have in zip(expected, got):
        assert [s.token_ids for s in have.samples] == [want.samples[0].token_ids] * 3


def test_greedy_rows_unchanged_next_to_sampled_rows(target, ar, vocab):
    """Greedy and sampled rows verified in one batch: the greedy rows still equal greedy AR."""
    prompts = ragged_prompts(8, vocab, seed=21)
    params = [greedy(12, ignore_eos=True) if i % 2 else SamplingParams(max_new_tokens=12, ignore_eos=True, seed=i)
              for i in range(8)]
    expected = ar.generate(prompts, params, progress=False)
    got = speculative_llm(target, "self:1", 4).generate(prompts, params, progress=False)
    assert_same_outputs(target[0], prompts[1::2], expected[1::2], got[1::2])


# ------------------------------------------------------------------------------- 10. drafter extremes

@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_target_as_drafter_accepts_everything(target, vocab, k, temperature):
    rounds = 3
    max_new = 1 + rounds * (k + 1)  # the prefill token, then rounds that each have room for k drafts
    llm = speculative_llm(target, "target", k)
    seqs = first_samples(llm.engine, ragged_prompts(8, vocab, seed=9),
                         SamplingParams(temperature=temperature, max_new_tokens=max_new, ignore_eos=True, seed=3))
    spec = llm.stats.spec
    assert spec.accept_rate >= ACCEPT_ALL_MIN
    for seq in seqs:
        assert len(seq.token_ids) == max_new
        # Each round emits its accepted drafts plus one residual or bonus token.
        assert len(seq.token_ids) == 1 + seq.verify_steps + seq.accepted
        if seq.accepted == seq.drafted:  # every round all-accepted: k + 1 tokens per round
            assert (seq.verify_steps, seq.drafted) == (rounds, rounds * k)
    assert spec.histogram[k] > 0
    if spec.accepted == spec.drafted:  # every round had room for k drafts by construction
        assert spec.accept_len == k + 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_drafter_accepts_almost_nothing(target, ar, vocab, temperature):
    prompts = ragged_prompts(8, vocab, seed=10)
    params = SamplingParams(temperature=temperature, max_new_tokens=16, ignore_eos=True, seed=4)
    llm = speculative_llm(target, RandomDrafter(vocab), 4)
    got = llm.generate(prompts, params, progress=False)
    spec = llm.stats.spec
    # A uniform draft matches the greedy token, or passes u < p(x), with probability 1/V on average.
    assert spec.drafted > 100 and spec.accept_rate < 0.05
    for out in got:
        assert len(out.samples[0].token_ids) == 16
    if temperature == 0:
        assert_same_outputs(target[0], prompts, ar.generate(prompts, params, progress=False), got)


@pytest.mark.parametrize("k,correct", [(1, 0), (1, 1)] + [(4, j) for j in range(5)])
def test_scripted_drafter_accepts_exactly_j(target, ar, vocab, k, correct):
    max_new = 14
    prompts = ragged_prompts(6, vocab, seed=11)
    params = greedy(max_new, ignore_eos=True)
    reference = [o.samples[0].token_ids for o in ar.generate(prompts, params, progress=False)]
    drafter = ScriptedDrafter(vocab, {tuple(p): r for p, r in zip(prompts, reference)}, correct)
    llm = speculative_llm(target, drafter, k)
    seqs = first_samples(llm.engine, prompts, params)
    steps, drafted, accepted, histogram = simulate_rounds(max_new, k, correct)
    for prompt, ref, seq in zip(prompts, reference, seqs):
        assert seq.token_ids == ref, divergence(target[0], prompt, ref, seq.token_ids)
        assert (seq.verify_steps, seq.drafted, seq.accepted) == (steps, drafted, accepted)
    assert llm.stats.spec.histogram == [len(prompts) * h for h in histogram]


# ------------------------------------------------------------------------------------ 11. KV invariant

def committed_tokens(slots, row: int) -> list[int]:
    """Prompt plus every emitted token but the last (which is not yet in the cache)."""
    generated = int(slots.host_generated[row])
    return slots.sequences[row].prompt_ids + slots.out_tokens[row, : generated - 1].tolist()


def assert_cache_holds(model, cache: KVCache, row: int, tokens: list[int], what: str) -> None:
    """Row ``row`` of ``cache`` holds, at positions < len(tokens), the keys and values of a fresh prefill."""
    length = len(tokens)
    fresh = KVCache(model.config, 1, length, model.dtype, model.device)
    with torch.no_grad():
        model(torch.tensor([tokens], device=model.device), cache=fresh, rows=slice(0, 1), kv_len=length)
    for layer in range(model.config.num_layers):
        for name, got, want in (("keys", cache.keys[layer], fresh.keys[layer]),
                                ("values", cache.values[layer], fresh.values[layer])):
            diff = float((got[row, :, :length] - want[0, :, :length]).abs().max())
            assert diff <= KV_ATOL, f"{what}: row {row}, layer {layer} {name} differ by {diff:.2e} from a fresh prefill"


def test_cache_check_detects_a_stale_position(target, vocab):
    """The comparison below has teeth: one stale position (a rejected draft left in place) is caught."""
    model = target[0]
    tokens = ragged_prompts(1, vocab, seed=22)[0] + [7, 8, 9]
    cache = KVCache(model.config, 2, len(tokens), model.dtype, model.device)
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache, rows=slice(1, 2), kv_len=len(tokens))
        assert_cache_holds(model, cache, 1, tokens, "intact")
        # Overwrite the last position with another token's keys and values.
        model(torch.tensor([[10]]), torch.tensor([[len(tokens) - 1]]), cache=cache, rows=slice(1, 2),
              kv_len=len(tokens))
    with pytest.raises(AssertionError, match="differ"):
        assert_cache_holds(model, cache, 1, tokens, "stale")


@pytest.mark.parametrize("drafter,temperature,acceptance", [
    ("scripted:0", 0.0, "none"), ("scripted:2", 0.0, "partial"), ("scripted:4", 0.0, "full"),
    ("target", 1.0, "full"), ("self:1", 1.0, "mixed"), ("checkpoint", 0.7, "mixed"),
])
def test_cache_equals_fresh_prefill_after_every_round(target, ar, vocab, draft_checkpoint, monkeypatch,
                                                      drafter, temperature, acceptance):
    model, k = target[0], 4
    prompts = ragged_prompts(8, vocab, seed=12)
    # Ragged budgets and 4 slots for 8 requests: rows are compacted and refilled between rounds.
    params = [SamplingParams(temperature=temperature, max_new_tokens=6 + 2 * i, ignore_eos=True, seed=i)
              for i in range(8)]
    if drafter.startswith("scripted:"):
        reference = [o.samples[0].token_ids for o in ar.generate(prompts, params, progress=False)]
        drafter = ScriptedDrafter(vocab, {tuple(p): r for p, r in zip(prompts, reference)}, int(drafter[9:]))
    llm = speculative_llm(target, drafter, k, draft_checkpoint, max_num_seqs=4)
    real_step, rounds = engine_module.speculative_step, []

    def checked_step(model_, cache, slots, drafter_, k_, stats, **kwargs):
        result = real_step(model_, cache, slots, drafter_, k_, stats, **kwargs)
        for row in range(slots.active):
            tokens = committed_tokens(slots, row)
            assert len(tokens) == slots.host_lengths[row] == int(slots.lengths[row])
            assert_cache_holds(model, cache, row, tokens, f"target cache after round {len(rounds)}")
            if isinstance(drafter_, DraftModelDrafter):
                # The draft model re-runs position L - 1 every round; everything before it must be right.
                assert_cache_holds(drafter_.model, drafter_.cache, row, tokens[:-1],
                                   f"drafter cache after round {len(rounds)}")
        rounds.append(result.counts.tolist())
        return result

    monkeypatch.setattr(engine_module, "speculative_step", checked_step)
    llm.generate(prompts, params, progress=False)
    histogram = llm.stats.spec.histogram
    assert len(rounds) > 5
    if acceptance == "none":
        assert histogram[0] == sum(histogram)
    elif acceptance == "partial":
        assert histogram[2] > 0 and histogram[k] == 0
    elif acceptance == "full":
        assert histogram[k] > 0
    else:
        assert histogram[0] > 0 and sum(histogram[1:]) > 0


# -------------------------------------------------------------------------------------- 12. logprobs

@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9)])
def test_speculative_logprobs_match_teacher_forced_recompute(target, vocab, temperature, top_k, top_p):
    model = target[0]
    prompts = ragged_prompts(5, vocab, seed=13)
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=7,
                            ignore_eos=True)
    llm = speculative_llm(target, "self:1", 2)
    outs = llm.generate(prompts, params, progress=False)
    spec = llm.stats.spec
    assert 0 < spec.accepted < spec.drafted  # both accepted drafts and residual tokens are checked
    for prompt, out in zip(prompts, outs):
        for sample in out.samples:
            with torch.no_grad():
                logits = model.logits(model(torch.tensor([prompt + sample.token_ids])).hidden)[0, len(prompt) - 1: -1]
            rows = len(sample.token_ids)
            row_params = RowParams(torch.full((rows,), temperature), torch.full((rows,), top_k),
                                   torch.full((rows,), top_p), any_filter=top_k > 0 or top_p < 1,
                                   any_greedy=temperature == 0, any_random=temperature > 0)
            expected = processed_logprobs(logits, row_params).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.isfinite(expected).all(), "a token outside the sampling support was emitted"
            diff = float((torch.tensor(sample.logprobs) - expected).abs().max())
            assert diff <= LOGPROB_ATOL


# -------------------------------------------------------------------------------------- 13. stopping

def distinct_prefix_prompt(ar: LLM, vocab: int, length: int, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation starts with ``length`` distinct tokens (so a stop id picked among
    them first occurs exactly where it was picked)."""
    for seed in range(200):
        prompt = ragged_prompts(1, vocab, seed=1000 + seed)[0]
        tokens = ar.generate([prompt], greedy(max_new_tokens, ignore_eos=True), progress=False)[0].samples[0].token_ids
        if len(set(tokens[:length])) == length:
            return prompt, tokens
    raise AssertionError("no prompt with a distinct greedy prefix")


@pytest.mark.parametrize("how", ["stop_token_ids", "eos"])
@pytest.mark.parametrize("position", [1, 2, 3, 4, 5])
def test_stop_token_inside_accepted_block_ends_row_there(target, ar, vocab, position, how):
    """k = 4 and the target as drafter: token 0 comes from the prefill, tokens 1-4 are accepted drafts of
    the first block and token 5 its bonus; a stop at any of them ends the row there."""
    model = target[0]
    prompt, reference = distinct_prefix_prompt(ar, vocab, 6, 16)
    stop = reference[position]
    if how == "eos":  # through the engine's EOS ids, not the request's stop ids
        engine = Engine(model, eos_token_ids=(stop,), drafter=DraftModelDrafter(model), speculative=4)
        seq = first_samples(engine, [prompt], greedy(16))[0]
    else:
        engine = speculative_llm(target, "target", 4).engine
        seq = first_samples(engine, [prompt], greedy(16, ignore_eos=True, stop_token_ids=(stop,)))[0]
    assert seq.token_ids == reference[: position + 1]
    assert len(seq.logprobs) == position + 1
    assert seq.finish_reason == "stop"
    assert seq.verify_steps == 1  # tokens 1..position came out of the first block


@pytest.mark.parametrize("drafter", ["target", "self:1"])
@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3])
def test_max_new_tokens_is_exact_with_speculation(target, ar, vocab, drafter, max_new_tokens):
    prompts = ragged_prompts(3, vocab, seed=14)
    llm = speculative_llm(target, drafter, 4)
    params = greedy(max_new_tokens, ignore_eos=True)
    assert_same_outputs(target[0], prompts, ar.generate(prompts, params, progress=False),
                        llm.generate(prompts, params, progress=False))
    sampled = llm.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=1),
                           progress=False)
    for out in sampled:
        sample = out.samples[0]
        assert len(sample.token_ids) == len(sample.logprobs) == max_new_tokens
        assert sample.finish_reason == "length"


@pytest.mark.parametrize("max_new_tokens", [2, 5, 9, 12])
def test_k_larger_than_room_left(target, ar, vocab, max_new_tokens):
    """k = 8 with budgets that leave less room: a row never drafts past its budget."""
    k = 8
    prompts = ragged_prompts(4, vocab, seed=15)
    params = greedy(max_new_tokens, ignore_eos=True)
    expected = ar.generate(prompts, params, progress=False)
    llm = speculative_llm(target, "target", k)
    seqs = first_samples(llm.engine, prompts, params)
    steps, drafted, _, _ = simulate_rounds(max_new_tokens, k, k)
    for prompt, want, seq in zip(prompts, expected, seqs):
        assert seq.token_ids == want.samples[0].token_ids
        assert (seq.verify_steps, seq.drafted) == (steps, drafted)


def test_finished_rows_receive_nothing_more(target, ar, vocab):
    """Rows ending at different rounds (budgets and a stop token) get exactly their tokens; the engine
    counts no token beyond them."""
    prompts = ragged_prompts(6, vocab, seed=16)
    free = ar.generate(prompts, greedy(13, ignore_eos=True), progress=False)
    stop = free[5].samples[0].token_ids[2]
    params = [greedy(m, ignore_eos=True) for m in (1, 2, 3, 5, 8)]
    params.append(greedy(13, ignore_eos=True, stop_token_ids=(stop,)))
    expected = ar.generate(prompts, params, progress=False)
    llm = speculative_llm(target, "target", 4)
    got = llm.generate(prompts, params, progress=False)
    assert_same_outputs(target[0], prompts, expected, got)
    assert got[5].samples[0].finish_reason == "stop"
    assert llm.stats.generated_tokens == sum(len(o.samples[0].token_ids) for o in got)


_STOP_STRING_CANDIDATES: list[tuple[list[int], list[int]]] = []


def stop_string_case(ar: LLM, vocab: int, positions: range) -> tuple[list[int], list[int], str, int]:
    """A prompt, its 20 greedy tokens, and a printable 2-character stop string first completed by the token at
    an index in ``positions`` (judged on the text the engine decodes, special tokens skipped)."""
    if not _STOP_STRING_CANDIDATES:
        prompts = ragged_prompts(64, vocab, seed=2000)
        outs = ar.generate(prompts, greedy(20, ignore_eos=True), progress=False)
        _STOP_STRING_CANDIDATES.extend((p, o.samples[0].token_ids) for p, o in zip(prompts, outs))
    for prompt, tokens in _STOP_STRING_CANDIDATES:
        texts = [ar.tokenizer.decode(tokens[:end], skip_special_tokens=True) for end in range(21)]
        for index in positions:
            stop = texts[index + 1][-2:]
            if len(stop) == 2 and stop.isprintable() and "\ufffd" not in stop \
                    and not any(stop in text for text in texts[: index + 1]):
                return prompt, tokens, stop, index
    raise AssertionError("no prompt with a usable stop string")


@pytest.mark.parametrize("position", [1, 3, 5])
def test_stop_string_ends_at_first_completing_token(target, ar, vocab, position):
    """The target drafts k = 4: the stop string completes inside the first block, which does not end the
    row otherwise; the row must end at the token completing it, exactly as AR does."""
    prompt, tokens, stop, index = stop_string_case(ar, vocab, range(position, position + 1))
    params = greedy(20, ignore_eos=True, stop=(stop,))
    expected = ar.generate([prompt], params, progress=False)[0].samples[0]
    llm = speculative_llm(target, "target", 4)
    got = llm.generate([prompt], params, progress=False)[0].samples[0]
    assert expected.token_ids == tokens[: index + 1] and expected.finish_reason == "stop"
    assert llm.stats.spec.verify_steps == 1  # one all-accepted block holds tokens 1-5
    assert got.token_ids == expected.token_ids
    assert got.finish_reason == "stop" and got.text == expected.text and stop not in got.text
    assert llm.stats.generated_tokens == len(got.token_ids)  # the block's tokens past the hit are not counted


@pytest.mark.parametrize("ending", ["budget", "stop_token"])
def test_stop_string_inside_final_block(target, ar, vocab, ending):
    """As above, but the block completing the stop string also spends the budget (or emits a stop token)."""
    prompt, tokens, stop, index = stop_string_case(ar, vocab, range(1, 3))
    if ending == "budget":  # the first block emits tokens 1-5, the last of the 6-token budget
        params = greedy(6, ignore_eos=True, stop=(stop,))
    else:
        params = greedy(20, ignore_eos=True, stop=(stop,), stop_token_ids=(tokens[index + 2],))
    expected = ar.generate([prompt], params, progress=False)[0].samples[0]
    got = speculative_llm(target, "target", 4).generate([prompt], params, progress=False)[0].samples[0]
    assert expected.token_ids == tokens[: index + 1] and expected.finish_reason == "stop"
    assert (got.token_ids, got.finish_reason, got.text) == (expected.token_ids, "stop", expected.text)


@pytest.mark.parametrize("drafter", [None, "target"])
def test_stop_string_completed_by_last_budgeted_token(target, ar, vocab, drafter):
    prompt, tokens, stop, index = stop_string_case(ar, vocab, range(1, 6))
    llm = ar if drafter is None else speculative_llm(target, drafter, 4)
    got = llm.generate([prompt], greedy(index + 1, ignore_eos=True, stop=(stop,)), progress=False)[0].samples[0]
    assert got.token_ids == tokens[: index + 1]
    assert got.finish_reason == "stop" and stop not in got.text


# ---------------------------------------------------------------------------------------- 14. SD off

def test_no_drafter_never_speculates(target, ar, vocab, monkeypatch):
    def no_speculation(*args, **kwargs):
        raise AssertionError("speculative_step called without a drafter")

    monkeypatch.setattr(engine_module, "speculative_step", no_speculation)
    model, tokenizer = target
    llm = LLM(model, tokenizer=tokenizer)
    assert not llm.drafters and llm.engine.draft_tokens == 0
    prompts = ragged_prompts(4, vocab, seed=17)
    params = greedy(12, ignore_eos=True)
    assert_same_outputs(model, prompts, ar.generate(prompts, params, progress=False),
                        llm.generate(prompts, params, progress=False))
    # A k without a drafter is refused rather than silently ignored.
    with pytest.raises(ValueError, match="speculative: .*exactly one drafter"):
        Engine(model, speculative=4)


def test_speculative_without_drafter_raises(target):
    model, tokenizer = target
    with pytest.raises(ValueError, match="speculative"):
        LLM(model, tokenizer=tokenizer, speculative=4)


@pytest.mark.parametrize("max_new_tokens", [0, 1])
def test_drafter_not_called_when_no_round_is_needed(target, vocab, max_new_tokens):
    """With budgets of 0 or 1 every token comes from the prefill: the drafter (a mock that raises) is
    installed but never asked; with a budget of 2 it is (so the mock is live)."""
    llm = speculative_llm(target, RaisingDrafter(vocab), 4)
    prompts = ragged_prompts(3, vocab, seed=18)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=0),
                        progress=False)
    assert [len(o.samples[0].token_ids) for o in outs] == [max_new_tokens] * 3
    with pytest.raises(AssertionError, match="asked for drafts"):
        llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True, seed=0), progress=False)


# ----------------------------------------------------------------------------------- 15. vocab mismatch

def test_draft_checkpoint_with_other_vocab_raises(target, vocab, tmp_path):
    path = save_random_checkpoint(tmp_path / "draft-300", vocab=300, hidden=32, layers=1, init=0.02, seed=0)
    model, tokenizer = target
    with pytest.raises(ValueError, match=rf"drafter: .*\b300\b.*\b{vocab}\b"):
        LLM(model, tokenizer=tokenizer, drafter=str(path), speculative=4)


@pytest.mark.parametrize("offset", [-1, 1])
def test_drafter_instance_with_other_vocab_raises(target, vocab, offset):
    model, tokenizer = target
    wrong = vocab + offset
    message = rf"drafter: .*\b{wrong}\b.*\b{vocab}\b"
    with pytest.raises(ValueError, match=message):
        LLM(model, tokenizer=tokenizer, drafter=RaisingDrafter(wrong), speculative=4)
    with pytest.raises(ValueError, match=message):
        Engine(model, drafter=RaisingDrafter(wrong))


def test_draft_tokenizer_with_other_token_strings_raises(target, tmp_path):
    """Same vocabulary size, different token strings (vLLM #5203): refused at construction."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = make_tiny_checkpoint(tmp_path / "draft-other-tokens", "llama", seed=2)
    model, tokenizer = target
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    # Specials first (ids 0-2, as in the target's), then the byte alphabet in reverse order.
    other.add_special_tokens(["<unk>", "<s>", "</s>"])
    other.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True))
    other_fast = PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(other_fast) == len(tokenizer)
    other_fast.save_pretrained(path)
    with pytest.raises(ValueError, match="token strings"):
        LLM(model, tokenizer=tokenizer, drafter=str(path), speculative=4)


@pytest.mark.parametrize("spec,message", [
    ("self:0", "num_layers"), ("self:2", "num_layers"), ("self:-1", "self:N"), ("self:", "self:N"),
    ("self:two", "self:N"), ("/nonexistent/drafter", "neither an existing path"),
])
def test_bad_drafter_specs_raise(target, spec, message):
    with pytest.raises(ValueError, match=message):
        make_drafter(spec, target[0], target[1])


@pytest.mark.parametrize("k", [0, 33, -1])
def test_bad_num_draft_tokens_raises(target, k):
    model, tokenizer = target
    with pytest.raises(ValueError, match=r"^speculative: k must be in \[1, 32\]"):
        LLM(model, tokenizer=tokenizer, drafter="ngram", speculative=k)


@pytest.mark.parametrize("speculative", [True, 2.5, "4", "static"])
def test_non_integer_speculative_raises_value_error(target, speculative):
    model, tokenizer = target
    with pytest.raises(ValueError, match="^speculative: expected"):
        LLM(model, tokenizer=tokenizer, drafter="ngram", speculative=speculative)


# -------------------------------------------------------------------- 16. T > 0: SD vs AR distribution

@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_speculative_distribution_equals_autoregressive(small_target, temperature, k, batch):
    """Two-sample chi-square of the joint of tokens 1-3 (and, for k = 4, of tokens 4-6) with the prompt.
    Token 1 comes from the prefill, so k = 1 generates 3 tokens; k = 4 generates 6 so that its first block
    is whole (4 drafts and the bonus: tokens 2-6)."""
    new_tokens = 3 if k == 1 else 6
    speculative, engine = generate_samples(small_target, prompts_for(batch), temperature, new_tokens,
                                           f"sd-{temperature}-{k}-{batch}", drafter="self:1", k=k)
    reference = ar_samples(small_target, temperature, batch)
    rate = engine.stats.spec.accept_rate
    assert 0.05 < rate < 0.95, f"acceptance {rate:.3f}: the drafter must both hit and miss for the test to bite"
    windows = [slice(1, 4)] if k == 1 else [slice(1, 4), slice(4, 7)]
    for window in windows:
        p_value = two_sample_p_value(cells(speculative, window), cells(reference, window))
        assert p_value > DISTRIBUTION_P_LIMIT, f"tokens {window.start}-{window.stop - 1}: p = {p_value:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["always_accept", "residual_from_p"])
def test_distribution_test_fails_for_broken_verifier(small_target, monkeypatch, broken):
    """Negative controls: a verifier that accepts every draft (vllm-ascend PR #13766) emits the drafter's
    distribution; one that redraws from p instead of the residual max(0, p - q) after a rejection
    over-weights tokens both models like. The same test must reject both."""
    if broken == "always_accept":
        def accept_all(target_logprobs, draft_tokens, *args):
            return torch.ones_like(draft_tokens, dtype=torch.bool)

        monkeypatch.setattr(verify, "_accept_mask", accept_all)
    else:
        real_next_token = verify._next_token

        def from_p(p_logprobs, draft_tokens, draft_logprobs, position, rejected, uniforms, greedy):
            return real_next_token(p_logprobs, draft_tokens, draft_logprobs, position, torch.zeros_like(rejected),
                                   uniforms, greedy)

        monkeypatch.setattr(verify, "_next_token", from_p)
    speculative, engine = generate_samples(small_target, prompts_for(1), 1.0, 3, f"{broken}-1.0-1-1",
                                           drafter="self:1", k=1)
    rate = engine.stats.spec.accept_rate
    assert rate == 1.0 if broken == "always_accept" else 0.05 < rate < 0.95
    p_value = two_sample_p_value(cells(speculative, slice(1, 4)), cells(ar_samples(small_target, 1.0, 1), slice(1, 4)))
    assert p_value < DISTRIBUTION_P_LIMIT


# ----------------------------------------------------- 17. acceptance follows from the drafter itself

def drafter_model(llm: LLM):
    """The draft model of a ``self:N`` or checkpoint drafter (a DecoderLM with its own LM head)."""
    return next(iter(llm.drafters.values())).model


def predicted_greedy_rounds(draft, prompt: list[int], response: list[int], k: int) -> tuple[int, int, int]:
    """(verify steps, drafts offered, drafts accepted) that greedy speculation must take on one row.

    Accepted drafts equal the target's tokens, so each draft of a round is conditioned on the true prefix:
    one teacher-forced pass of the draft model says, for every position, whether its greedy guess is the
    response token there. A round starting after g emitted tokens offers min(k, budget - g - 1) drafts
    and accepts the run of guesses that hold from position g on."""
    with torch.no_grad():
        hidden = draft(torch.tensor([prompt + response])).hidden[0]
        guesses = draft.logits(hidden).argmax(-1)[len(prompt) - 1: -1].tolist()  # guess for response[i]
    hits = [guess == token for guess, token in zip(guesses, response)]
    steps = offered = accepted = 0
    emitted = 1  # response[0] comes from the prefill
    while emitted < len(response):
        room = min(k, len(response) - emitted - 1)
        run = 0
        while run < room and hits[emitted + run]:
            run += 1
        steps, offered, accepted, emitted = steps + 1, offered + room, accepted + run, emitted + run + 1
    return steps, offered, accepted


@pytest.mark.parametrize("drafter,k", [("self:1", 4), ("self:1", 2), ("checkpoint", 3)])
def test_greedy_acceptance_equals_what_the_drafters_own_guesses_imply(target, ar, vocab, draft_checkpoint,
                                                                     drafter, k):
    """The acceptance counts of greedy SD are a pure function of the drafter's greedy guesses on the AR
    output, so they are predicted exactly (no recorded baseline to drift with kernel changes)."""
    prompts = ragged_prompts(12, vocab, seed=20)
    params = greedy(24, ignore_eos=True)
    llm = speculative_llm(target, drafter, k, draft_checkpoint)
    outputs = llm.generate(prompts, params, progress=False)
    assert [o.samples[0].token_ids for o in outputs] == [o.samples[0].token_ids
                                                         for o in ar.generate(prompts, params, progress=False)]
    want = np.sum([predicted_greedy_rounds(drafter_model(llm), p, o.samples[0].token_ids, k)
                   for p, o in zip(prompts, outputs)], axis=0)
    spec = llm.stats.spec
    assert (spec.verify_steps, spec.drafted, spec.accepted) == tuple(int(v) for v in want)
    assert 0 < spec.accepted < spec.drafted  # the drafter both hits and misses: the check has teeth


@pytest.mark.slow
def test_sampled_first_draft_acceptance_matches_the_overlap_of_p_and_q(target, vocab):
    """At T = 1 a first draft is accepted with probability sum_x min(p(x), q(x)) under the round's true
    prefix. Spying on the rounds gives each one's prefix; the accepted first drafts must match the sum
    of those probabilities within 4 standard deviations (a verifier that accepts too often or too
    rarely by a tenth fails)."""
    llm = speculative_llm(target, "self:1", 3)
    draft, model = drafter_model(llm), target[0]
    rounds, propose = [], llm.drafters["self:1"].propose

    def spy(state, k, sampler):
        rounds.extend((seq.request_index, int(g)) for seq, g in zip(state.sequences, state.host_generated))
        return propose(state, k, sampler)

    llm.drafters["self:1"].propose = spy
    prompts = ragged_prompts(24, vocab, seed=23)
    budget = 20
    # A seed per request: rows sharing a seed share their uniforms, and their acceptances are not independent.
    params = [SamplingParams(temperature=1.0, max_new_tokens=budget, ignore_eos=True, seed=9 + i)
              for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, progress=False)
    overlap = []
    with torch.no_grad():
        for request, generated in rounds:
            if generated >= budget - 1:  # no room for a draft
                continue
            ids = torch.tensor([prompts[request] + outputs[request].samples[0].token_ids[:generated]])
            p, q = (torch.softmax(m.logits(m(ids).hidden[0, -1]), -1) for m in (model, draft))
            overlap.append(float(torch.minimum(p, q).sum()))
    expected, spread = sum(overlap), sum(a * (1 - a) for a in overlap) ** 0.5
    accepted = llm.stats.spec.accepted_at[0]
    assert llm.stats.spec.offered_at[0] == len(overlap) > 100
    assert abs(accepted - expected) <= 4 * spread + 1, (accepted, expected, spread)


def test_sanity_of_helpers():
    """The helpers' own arithmetic: a round schedule and the chi-square on identical / disjoint samples."""
    assert simulate_rounds(6, 4, 4) == (1, 4, 4, [0, 0, 0, 0, 1])
    assert simulate_rounds(5, 8, 8) == (1, 3, 3, [0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert simulate_rounds(4, 4, 0) == (3, 3, 0, [3, 0, 0, 0, 0])
    same = torch.arange(1000) % 10
    assert two_sample_p_value(same, same) == pytest.approx(1.0)
    assert two_sample_p_value(same, same + 10) < 1e-12
