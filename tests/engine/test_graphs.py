"""CUDA-graph decode steps, tested where no GPU is: the buckets, and the engine's graph path with a
fake capture that runs the step eagerly (so padding rows, padded context and the static buffers must
give exactly what the eager step gives)."""

from __future__ import annotations

import numpy as np
import pytest

from respec import LLM, SamplingParams
from respec.engine import graphs
from respec.engine.graphs import bucket_of, context_bucket, rows_buckets
from tests.helpers import ragged_prompts


def test_buckets_follow_the_serving_engines():
    assert rows_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert rows_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 96, 100]
    assert rows_buckets(3) == [1, 2, 3]
    assert [bucket_of(b, rows_buckets(100)) for b in (1, 3, 5, 33, 97, 100)] == [1, 4, 8, 64, 100, 100]
    with pytest.raises(ValueError, match="graphs"):
        bucket_of(101, rows_buckets(100))
    assert [context_bucket(n, 1000) for n in (1, 64, 65, 300, 999)] == [64, 64, 128, 512, 1000]


class FakeCapture:
    """Stands in for the CUDA capture: runs the step once (as the warm-up does) and replays eagerly."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fn):
        self.count += 1
        fn()
        return fn


def use_fake(monkeypatch, fake: FakeCapture) -> FakeCapture:
    monkeypatch.setattr(graphs.DecodeGraphs, "_cuda_capture", lambda self, fn: fake(fn))
    return fake


def generate(llm: LLM, prompts, params, fake: FakeCapture | None):
    if fake is not None:
        llm.engine.cuda_graphs = True  # as on a GPU
    return [o.samples[0] for o in llm.generate(prompts, params, progress=False)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_steps_equal_eager_steps_as_the_batch_shrinks(tiny_llama, monkeypatch, temperature):
    """11 ragged rows finishing at different steps cross the buckets 11 (the cache holds 11 rows) -> 8 -> 4 -> 2 -> 1 and the
    context buckets 64 -> the cache length: every token equal, every logprob equal to float rounding."""
    fake = FakeCapture()
    use_fake(monkeypatch, fake)
    eager, graphed = LLM(str(tiny_llama), device="cpu"), LLM(str(tiny_llama), device="cpu")
    prompts = ragged_prompts(11, eager.model.config.vocab_size, seed=5)
    budgets = [20 + 9 * i for i in range(11)]
    params = [SamplingParams(temperature=temperature, max_new_tokens=b, seed=i, ignore_eos=True)
              for i, b in enumerate(budgets)]
    want, got = generate(eager, prompts, params, None), generate(graphed, prompts, params, fake)
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids
        assert np.allclose(b.logprobs, a.logprobs, atol=1e-5)
    engine = graphed.engine
    keys = set(engine.graphs.graphs)
    assert fake.count == engine.graphs.captures == len(keys)  # once per bucket, then replayed
    assert {rows for rows, _, _, _ in keys} == {11, 8, 4, 2, 1} and {c for _, _, c, _ in keys} == {64, engine.cache.max_len}
    assert {width for _, width, _, _ in keys} == {1}
    assert eager.engine.graphs is None  # the CPU path is unchanged unless asked


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_steps_through_graphs_equal_eager_ones(tiny_llama, monkeypatch, temperature):
    """The verify forward (k + 1 tokens per row) replays a graph of its own width; with the n-gram
    drafter, greedy and sampled, every token equals the eager engine's."""
    fake = FakeCapture()
    use_fake(monkeypatch, fake)
    eager, graphed = (LLM(str(tiny_llama), device="cpu", drafter="ngram", speculative=2) for _ in range(2))
    prompts = ragged_prompts(6, eager.model.config.vocab_size, seed=9)
    params = [SamplingParams(n=2, temperature=temperature, max_new_tokens=30 + 7 * i, seed=i, ignore_eos=True)
              for i in range(6)]
    for llm in (eager, graphed):  # history for the n-gram drafter: some drafts right, some wrong
        generate(llm, prompts, [SamplingParams(n=2, temperature=temperature, max_new_tokens=40, seed=99,
                                               ignore_eos=True)] * 6, None)
    want = [o.samples for o in eager.generate(prompts, params, progress=False)]
    graphed.engine.cuda_graphs = True
    got = [o.samples for o in graphed.generate(prompts, params, progress=False)]
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            assert y.token_ids == x.token_ids and np.allclose(y.logprobs, x.logprobs, atol=1e-5)
    spec = graphed.stats.spec
    assert spec.drafted > 0 and (spec.accepted > 0 or temperature > 0)  # a random model's samples rarely repeat
    assert {width for _, width, _, _ in graphed.engine.graphs.graphs} == {3}
    assert fake.count == graphed.engine.graphs.captures


def test_a_new_cache_drops_the_graphs(tiny_llama, monkeypatch):
    use_fake(monkeypatch, FakeCapture())
    llm = LLM(str(tiny_llama), device="cpu")
    params = SamplingParams(temperature=0, max_new_tokens=8)
    generate(llm, [[1, 2, 3]], params, FakeCapture())
    first = llm.engine.graphs
    generate(llm, [[1, 2, 3]] * 3, SamplingParams(temperature=0, max_new_tokens=200), FakeCapture())
    assert llm.engine.graphs is not first and llm.engine.graphs.cache is llm.engine.cache


def test_an_eagle_head_fed_through_graphs_drafts_as_when_fed_eagerly(tiny_llama, monkeypatch):
    """The head reads the target's fused layers from the graph's static outputs (verify steps) and
    shadows them (off steps): with a schedule of off, EAGLE and n-gram steps, the drafts and the tokens
    equal the eager engine's."""
    from respec.engine.controller import OFF, Arm
    from respec.engine.drafters import EagleDrafter
    from tests.engine.test_controller import CyclingController
    from tests.helpers import random_head

    use_fake(monkeypatch, FakeCapture())
    schedule = [OFF, OFF, Arm("eagle", 2), Arm("ngram", 2), OFF, Arm("eagle", 1), Arm("eagle", 2)]
    outputs, drafts = [], []
    for use_graphs in (False, True):
        llm = LLM(str(tiny_llama), device="cpu")
        head = random_head(llm.model, seed=3)
        llm = LLM(llm.model, tokenizer=llm.tokenizer, drafter=[EagleDrafter(head, llm.model, shadow_limit=4), "ngram"],
                  speculative="adaptive")
        llm.engine.controller = CyclingController(schedule, warm=True)
        llm.engine.cuda_graphs = use_graphs
        seen, propose = [], llm.engine.drafters["eagle"].propose

        def spy(state, k, sampler, propose=propose, seen=seen):
            proposal = propose(state, k, sampler)
            seen.append(proposal.tokens.tolist())
            return proposal

        llm.engine.drafters["eagle"].propose = spy
        prompts = ragged_prompts(5, llm.model.config.vocab_size, seed=2)
        outputs.append(generate(llm, prompts, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True), None))
        drafts.append(seen)
    assert [s.token_ids for s in outputs[0]] == [s.token_ids for s in outputs[1]]
    assert drafts[0] == drafts[1] and len(drafts[0]) >= 10
    assert llm.engine.graphs is not None and len({w for _, w, _, _ in llm.engine.graphs.graphs}) == 3  # 1, 2, 3


def test_steps_that_capture_a_graph_are_recorded_untimed(tiny_llama, monkeypatch):
    """The controller learns no cost from a step that also captured a graph (capture is slow)."""
    from respec.engine.controller import OFF, Arm
    from tests.engine.test_controller import CyclingController

    class Recording(CyclingController):
        def record(self, *args) -> None:
            self.timed.append(args[7] if len(args) > 7 else True)

    fake = use_fake(monkeypatch, FakeCapture())
    llm = LLM(str(tiny_llama), device="cpu", drafter="ngram", speculative="adaptive")
    controller = llm.engine.controller = Recording([OFF, Arm("ngram", 2), OFF, Arm("ngram", 1)])
    controller.timed = []
    generate(llm, ragged_prompts(5, llm.model.config.vocab_size, seed=4),
             SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True), fake)
    assert controller.timed.count(False) == fake.count > 0 and controller.timed.count(True) > 0
