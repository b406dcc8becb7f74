"""The EAGLE-3 head: persistence, checks against the target, cache consistency in the engine, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respec import LLM, SamplingParams
from respec.engine import speculative as speculative_module
from respec.engine.drafters import EagleDrafter
from respec.engine.drafters.base import DraftSampler
from respec.engine.rng import sample_key
from respec.engine.sampling import uniform_row_params
from respec.learner.distill import DistillBatch, ttt_forward, ttt_unroll
from respec.models.eagle import EagleConfig, EagleHead
from respec.models.eagle_format import load_eagle_head, save_eagle_head
from tests.helpers import random_head


def test_save_and_load_round_trip(target_llm, tmp_path):
    head = random_head(target_llm.model, draft_vocab_size=32)
    head.draft_to_target.copy_(torch.arange(0, 64, 2))
    save_eagle_head(head, tmp_path / "eagle", target_llm.model)
    loaded = load_eagle_head(tmp_path / "eagle", target_llm.model)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    hidden = torch.randn(3, target_llm.model.config.hidden_size)
    logits = loaded.logits(hidden, target_llm.model)
    outside = torch.ones(logits.shape[-1], dtype=torch.bool)
    outside[head.draft_to_target] = False
    assert torch.isinf(logits[:, outside]).all() and torch.isfinite(logits[:, ~outside]).all()


def test_mismatched_target_is_refused(target_llm, tmp_path):
    head = random_head(target_llm.model)
    config = EagleConfig(**{**head.config.__dict__, "vocab_size": head.config.vocab_size + 1})
    with pytest.raises(ValueError, match=rf"vocabulary size {config.vocab_size} .* {head.config.vocab_size}"):
        config.check_target(target_llm.model.config)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"architecture": "llama"}')
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        load_eagle_head(tmp_path / "bad", target_llm.model)


def reference_first_draft_logits(head: EagleHead, target, committed: list[int]) -> torch.Tensor:
    """The head's logits for the token after ``committed``, computed from scratch without caches."""
    ids = torch.tensor([committed[:-1]])
    out = target(ids, capture_layers=head.config.fuse_layers)
    features = torch.cat([out.captured[i] for i in head.config.fuse_layers], dim=-1)
    steps = ids.shape[1]
    cos, sin = target._rope(torch.arange(steps)[None])
    hidden = head.fuse(features)
    q, k, v = head.project(target.embed(torch.tensor([committed[1:]])), hidden, cos, sin)
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    return head.logits(head.attend(q, k, v, causal, hidden)[0, -1], target)


def unrolled_draft_logits(head: EagleHead, target, committed: list[int], drafted: list[int]) -> torch.Tensor:
    """The head's logits for draft step ``len(drafted)`` from the TTT unroll the learner trains."""
    ids = torch.tensor([committed[:-1]])
    out = target(ids, capture_layers=head.config.fuse_layers)
    features = torch.cat([out.captured[i] for i in head.config.fuse_layers], dim=-1)
    # Features past the last committed token are unknown at inference and must not matter: zeros.
    features = torch.nn.functional.pad(features, (0, 0, 0, len(drafted) + 1))
    depth = len(drafted)
    outputs = ttt_unroll(head, target, features, torch.tensor([committed + drafted]), depth + 1)
    return head.logits(outputs[depth][0, -1], target)


@pytest.mark.parametrize("k", [1, 3])
def test_engine_drafts_match_a_from_scratch_head(target_llm, k, monkeypatch):
    """After prefill, partial and full acceptance, every draft step's logits equal recomputing them
    from the committed and drafted tokens: step 0 from scratch (vLLM #9730 is this bug class), every
    step by the TTT unroll the learner trains, so training and inference agree."""
    model = target_llm.model
    head = random_head(model)
    llm = LLM(model, tokenizer=target_llm.tokenizer, drafter=EagleDrafter(head, model), speculative=k,
              max_num_seqs=3)
    checked = []

    class CheckingSampler(DraftSampler):
        drafted: list[torch.Tensor]

        def __call__(self, step, head_logits, vocab_index=None, vocab_size=0):
            logits = head_logits if vocab_index is None else head_logits.new_full(
                (head_logits.shape[0], vocab_size), float("-inf")).index_copy_(1, vocab_index, head_logits)
            self.drafted = [] if step == 0 else self.drafted
            slots = llm.engine.slots
            for row in range(slots.active):
                seq = slots.sequences[row]
                done = int(slots.host_generated[row])
                committed = seq.prompt_ids + slots.out_tokens[row, :done].tolist()
                drafted = [int(tokens[row]) for tokens in self.drafted]
                if step == 0:
                    expected = reference_first_draft_logits(head, model, committed)
                    torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
                expected = unrolled_draft_logits(head, model, committed, drafted)
                torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
                checked.append(step)
            tokens, q = super().__call__(step, head_logits, vocab_index, vocab_size)
            self.drafted.append(tokens)
            return tokens, q

    monkeypatch.setattr(speculative_module, "DraftSampler", CheckingSampler)
    prompts = [[5, 17, 33, 40, 41], [7, 8, 9], [60, 61, 62, 63, 64, 65, 66], [11, 12]]
    llm.generate(prompts, SamplingParams(temperature=0.8, max_new_tokens=20, ignore_eos=True, n=2, seed=3),
                 progress=False)
    assert checked.count(0) > 20 and set(checked) == set(range(k)) and 0 < llm.stats.spec.accepted


@pytest.mark.slow
def test_ttt_training_reduces_the_loss(target_llm):
    """The head overfits a fixed batch: distillation loss falls by at least half in 50 steps."""
    model = target_llm.model
    head = random_head(model, seed=1)
    torch.manual_seed(0)
    tokens = torch.randint(3, 96, (4, 24))
    with torch.no_grad():
        out = model(tokens, capture_layers=head.config.fuse_layers)
        features = torch.cat([out.captured[i] for i in head.config.fuse_layers], dim=-1)
        logits = model.logits(out.hidden)
    batch = DistillBatch(features=features, tokens=tokens, target_logits=logits,
                         prompt_lens=torch.tensor([4, 6, 8, 5]), lengths=torch.tensor([24, 24, 20, 24]))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(50):
        result = ttt_forward(head, model, batch, depths=3)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        first = first if first is not None else result.loss.item()
    # The loss is KL(p || q) itself (not cross-entropy), so all of it is removable.
    assert float(result.loss.detach()) <= 0.5 * first
    assert len(result.alpha) == 3 and result.tau_sim > 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.9),
                                                     (1.3, 40, 0.95)])
def test_reduced_vocab_drafts_equal_full_vocab_drafts(temperature, top_k, top_p):
    """A head with a reduced vocabulary samples over its own entries only; that must give exactly the
    tokens and q of sampling over the target's vocabulary with -inf outside (the path the statistical
    exactness tests cover), for the same uniforms and any top-k / top-p."""
    torch.manual_seed(0)
    rows, vocab, reduced = 64, 500, 120
    index = torch.randperm(vocab)[:reduced].sort().values
    logits = torch.randn(rows, reduced) * 3
    full_logits = torch.full((rows, vocab), float("-inf")).index_copy_(1, index, logits)
    params = uniform_row_params(rows, temperature, top_k, top_p)
    keys = np.array([sample_key(7, i) for i in range(rows)], dtype=np.uint64)
    generated = np.arange(rows, dtype=np.int64) % 5
    for step in range(3):
        sampler = DraftSampler(params, keys, generated, torch.device("cpu"))
        tokens, q = sampler(step, logits, index, vocab)
        full_tokens, full_q = sampler(step, full_logits)
        assert torch.equal(tokens, full_tokens)
        assert q.shape == (rows, vocab)
        torch.testing.assert_close(q, full_q, atol=1e-5, rtol=1e-5)
        assert torch.isinf(q[:, ~torch.isin(torch.arange(vocab), index)]).all()
