"""Integration tests on the real default model, SmolLM2-135M-Instruct (skipped without its package)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from respec import LLM, SamplingParams
from tests.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, pytest.mark.smollm2, requires_smollm2]

QUESTIONS = [
    "What is 17 + 25?", "Name three primary colors.", "Tom has 3 apples and buys 5 more. How many now?",
    "Write a haiku about the sea.", "What is the capital of France?", "Explain gravity in one sentence.",
    "2 * 21 = ?", "List the days of the week.", "Who wrote Hamlet?", "What is photosynthesis?",
    "Translate 'good morning' to Spanish.", "What is 100 divided by 4?", "Give me a synonym for happy.",
    "How many legs does a spider have?", "What color is the sky on a clear day?", "Say hello.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(llm):
    """transformers' greedy generate, one prompt at a time (no padding effects), on the same weights."""
    from respec.models import resolve_model_path

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"), dtype=torch.float32).eval()
    prompts = [llm.encode(q, chat=True) for q in QUESTIONS]
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=llm.engine.eos_token_ids[0], pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return hf, prompts, outputs


def test_logits_match_transformers(llm, reference):
    hf, prompts, _ = reference
    ids = torch.tensor([prompts[0] + prompts[1][:5]])
    with torch.no_grad():
        diff = (llm.model.logits(llm.model(ids).hidden) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_greedy_equals_transformers(llm, reference, max_num_seqs):
    _, prompts, expected = reference
    llm.engine.max_num_seqs = max_num_seqs
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS), progress=False)
    finally:
        llm.engine.max_num_seqs = 64
    assert [o.samples[0].token_ids for o in outs] == expected


def test_greedy_n4_equals_transformers(llm, reference):
    _, prompts, expected = reference
    outs = llm.generate(prompts, SamplingParams(n=4, temperature=0, max_new_tokens=NEW_TOKENS), progress=False)
    assert [[s.token_ids for s in o.samples] for o in outs] == [[e] * 4 for e in expected]


def test_sampled_answer_is_text(llm):
    out = llm.generate(["What is 17 + 25?"], SamplingParams(n=2, temperature=0.6, max_new_tokens=24, seed=0),
                       chat=True, progress=False)[0]
    assert all(s.text and len(s.logprobs) == len(s.token_ids) for s in out.samples)
    assert all(lp <= 0 for s in out.samples for lp in s.logprobs)


def test_the_shipped_head_loads_by_name_drafts_well_and_keeps_greedy_exact(llm):
    """The preset EAGLE-3 head: loaded without training, it accepts far above a random head on
    arithmetic prompts, and greedy SD with it equals greedy AR token for token."""
    prompts = [llm.encode(q, chat=True) for q in ("What is 17 + 25?", "What is 48 - 19?", "2 * 21 = ?")]
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    plain = [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)]
    speculative = LLM(llm.model, tokenizer=llm.tokenizer, drafter="smollm2-135m-eagle3", speculative=4)
    drafted = [o.samples[0].token_ids for o in speculative.generate(prompts, params, progress=False)]
    assert drafted == plain
    assert speculative.stats.spec.accept_len > 1.5  # a random head stays at ~1.0
