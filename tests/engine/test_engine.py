"""The batched engine on tiny random models: exactness vs transformers, scheduling, stops, seeds, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from respec import LLM, SamplingParams
from respec.engine.sampling import RowParams, processed_logprobs
from tests.helpers import ragged_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_greedy_equals_transformers(llm, hf_model, max_num_seqs):
    prompts = ragged_prompts(16, llm.model.config.vocab_size)
    llm.engine.max_num_seqs = max_num_seqs
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24), progress=False)
    finally:
        llm.engine.max_num_seqs = 64
    for prompt, out in zip(prompts, outs):
        assert out.samples[0].token_ids == hf_greedy(hf_model, prompt, 24, eos=2)


def test_greedy_n_samples_share_prefill(llm, hf_model):
    prompts = ragged_prompts(16, llm.model.config.vocab_size, seed=1)
    outs = llm.generate(prompts, SamplingParams(n=4, temperature=0, max_new_tokens=16, ignore_eos=True),
                        progress=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_model, prompt, 16, eos=None)
        assert [s.token_ids for s in out.samples] == [expected] * 4


def test_refill_with_few_slots_matches_wide_batch(llm):
    prompts = ragged_prompts(10, llm.model.config.vocab_size, seed=2)
    params = [SamplingParams(temperature=0.9, max_new_tokens=5 + 3 * i, seed=i, ignore_eos=True)
              for i in range(10)]
    wide = llm.generate(prompts, params, progress=False)
    llm.engine.max_num_seqs = 3
    try:
        narrow = llm.generate(prompts, params, progress=False)
    finally:
        llm.engine.max_num_seqs = 64
    for a, b, p in zip(wide, narrow, params):
        assert a.samples[0].token_ids == b.samples[0].token_ids
        assert len(a.samples[0].token_ids) == p.max_new_tokens


def test_seed_is_independent_of_batch(llm):
    prompts = ragged_prompts(6, llm.model.config.vocab_size, seed=3)
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=123, ignore_eos=True)
    alone = llm.generate([prompts[0]], params, progress=False)[0]
    crowd = llm.generate(prompts, params, progress=False)[0]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in crowd.samples]
    assert alone.samples[0].token_ids != alone.samples[1].token_ids  # samples use distinct streams
    state = torch.get_rng_state()
    llm.generate([prompts[0]], SamplingParams(temperature=1.0, max_new_tokens=4), progress=False)
    assert torch.equal(state, torch.get_rng_state()), "generation advanced the global torch RNG"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)])
def test_logprobs_match_teacher_forced_recompute(llm, temperature, top_k, top_p):
    prompts = ragged_prompts(5, llm.model.config.vocab_size, seed=4)
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, seed=7)
    outs = llm.generate(prompts, params, progress=False)
    model = llm.model
    for prompt, out in zip(prompts, outs):
        for sample in out.samples:
            full = torch.tensor([prompt + sample.token_ids])
            with torch.no_grad():
                logits = model.logits(model(full).hidden)[0, len(prompt) - 1: -1]
            rows = len(sample.token_ids)
            row_params = RowParams(torch.full((rows,), temperature), torch.full((rows,), top_k),
                                   torch.full((rows,), top_p), any_filter=top_k > 0 or top_p < 1,
                                   any_greedy=temperature == 0, any_random=temperature > 0)
            expected = processed_logprobs(logits, row_params).gather(-1, torch.tensor(sample.token_ids)[:, None])
            diff = (torch.tensor(sample.logprobs) - expected[:, 0]).abs().max().item()
            assert diff <= 1e-4


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3])
def test_max_new_tokens_is_exact(llm, max_new_tokens):
    prompts = ragged_prompts(3, llm.model.config.vocab_size, seed=5)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=1),
                        progress=False)
    for out in outs:
        assert len(out.samples[0].token_ids) == max_new_tokens
        assert len(out.samples[0].logprobs) == max_new_tokens
        assert out.samples[0].finish_reason == "length"


def test_stop_token_ends_row_and_others_continue(llm):
    prompts = ragged_prompts(4, llm.model.config.vocab_size, seed=6)
    free = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), progress=False)
    stop_id = free[0].samples[0].token_ids[3]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_id]), progress=False)
    for before, after in zip(free, outs):
        tokens = before.samples[0].token_ids
        if stop_id in tokens:
            cut = tokens.index(stop_id) + 1
            assert after.samples[0].token_ids == tokens[:cut]
            assert after.samples[0].finish_reason == "stop"
        else:
            assert after.samples[0].token_ids == tokens


def test_stop_string_truncates_text(llm):
    prompt = ragged_prompts(1, llm.model.config.vocab_size, seed=8)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True),
                        progress=False)[0].samples[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]
    if len(stop.strip()) < 2:
        pytest.skip("generated text too short for a stop string")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[stop]),
                       progress=False)[0].samples[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and free.text.startswith(out.text)
    assert out.token_ids == free.token_ids[: len(out.token_ids)]


def test_text_prompts_and_chat_template(llm):
    outs = llm.generate(["What is 17 plus 25?"], SamplingParams(max_new_tokens=4, seed=0), chat=True,
                        progress=False)
    expected = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 plus 25?"}],
                                                 tokenize=False, add_generation_prompt=True)
    assert outs[0].prompt_token_ids == llm.tokenizer.encode(expected, add_special_tokens=False)
    assert isinstance(outs[0].samples[0].text, str)


@pytest.mark.parametrize("prompts,params,message", [
    ([], SamplingParams(), "prompts: empty"),
    ([""], SamplingParams(), r"prompts\[0\]: empty prompt"),
    ([[5] * 250], SamplingParams(max_new_tokens=10), r"prompts\[0\]: 250 prompt tokens"),
    ([[5, 6]], SamplingParams(n=100), "n: 100 samples exceed max_num_seqs"),
    ([[5, 10_000]], SamplingParams(), r"prompts\[0\]: token ids must be in"),
])
def test_bad_requests_name_the_field(llm, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, progress=False)


def test_stats_count_tokens(llm):
    before = llm.stats.generated_tokens
    llm.generate(ragged_prompts(2, llm.model.config.vocab_size), SamplingParams(max_new_tokens=5, ignore_eos=True),
                 progress=False)
    assert llm.stats.generated_tokens - before == 10


def test_prompts_come_as_any_sequence_of_texts_or_ids(llm):
    """A tuple of texts, a numpy array or tensor of ids: the same requests as lists; a float id, a
    non-prompt or an empty sequence is refused naming the prompt."""
    import numpy as np

    params = SamplingParams(temperature=0, max_new_tokens=4)
    ids = [[5, 17, 33], [7, 8, 9]]
    want = [o.samples[0].token_ids for o in llm.generate(ids, params, progress=False)]
    for prompts in (tuple(ids), np.array(ids), torch.tensor(ids), [np.array(p) for p in ids]):
        assert [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)] == want
    texts = [o.samples[0].token_ids for o in llm.generate(["hi", "the fox"], params, progress=False)]
    assert [o.samples[0].token_ids for o in llm.generate(("hi", "the fox"), params, progress=False)] == texts
    with pytest.raises(ValueError, match=r"^prompts\[0\]: token ids must be integers, got 1.7"):
        llm.generate([[1.7, 2.2]], params, progress=False)
    with pytest.raises(ValueError, match=r"^prompts: empty"):
        llm.generate((), params, progress=False)
    with pytest.raises(ValueError, match=r"^prompts: expected text, token ids"):
        llm.generate(42, params, progress=False)


def test_a_drafter_that_cannot_be_loaded_is_named_a_drafter(llm):
    with pytest.raises(ValueError, match=r"^drafter: 'no/such/head' is neither an existing path"):
        LLM(llm.model, tokenizer=llm.tokenizer, drafter="no/such/head", speculative=2)


@pytest.mark.parametrize("device, message", [("bogus", "is not a device"), ("cuda", "no usable GPU"),
                                             ("meta", "is not a device")])
def test_a_bad_device_is_refused_before_anything_loads(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=rf"^device: '{device}' .*{message}"):
        LLM("no-such-model-is-ever-loaded", device=device)
