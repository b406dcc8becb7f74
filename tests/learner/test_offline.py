"""``respec drafter train`` end to end on a tiny model: answers kept in a file, training continued
from a saved head, and bad answer files refused with the file and line named."""

from __future__ import annotations

import json

import pytest
import torch

from respec.engine.llm import LLM
from respec.learner import offline
from respec.learner.answers import ANSWERS_FORMAT, Example, load_answer_files, load_answers, save_answers
from respec.learner.config import OfflineConfig
from respec.learner.offline import run_offline
from respec.models.eagle_format import load_eagle_head


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


def _config(tiny_llama, tmp_path, **overrides) -> OfflineConfig:
    settings = {"model": str(tiny_llama), "prompts": "arithmetic", "out": str(tmp_path / "head"), "num_prompts": 5,
                "max_new_tokens": 6, "epochs": 1, "batch_size": 2, "draft_vocab_size": 24, "seed": 0}
    return OfflineConfig(**{**settings, **overrides})


def test_answers_are_saved_then_reused_and_training_continues(tiny_llm, tiny_llama, tmp_path, monkeypatch):
    answers = tmp_path / "answers.jsonl"
    first = run_offline(_config(tiny_llama, tmp_path, examples=str(answers)), llm=tiny_llm)
    lines = answers.read_text().splitlines()
    assert json.loads(lines[0])["format"] == ANSWERS_FORMAT and len(lines) == 1 + 5
    saved = load_eagle_head(first, tiny_llm.model)
    assert saved.config.draft_vocab_size == 24

    # The second run generates nothing: it reads the answers and starts from the saved head.
    monkeypatch.setattr(offline, "collect_examples", lambda *args: pytest.fail("generated the answers again"))
    starts = []
    real_train = offline.train_head
    monkeypatch.setattr(offline, "train_head", lambda head, *args: starts.append(
        {k: v.clone() for k, v in head.state_dict().items()}) or real_train(head, *args))
    second = run_offline(_config(tiny_llama, tmp_path, examples=str(answers), init_from=str(first),
                                 out=str(tmp_path / "head2"), num_prompts=4, draft_vocab_size=8), llm=tiny_llm)
    assert all(torch.equal(starts[0][name], tensor) for name, tensor in saved.state_dict().items())
    continued = load_eagle_head(second, tiny_llm.model)
    assert torch.equal(continued.draft_to_target, saved.draft_to_target)  # its vocabulary, not a new one
    assert json.loads((second / "training.json").read_text())["init_from"] == str(first)


def test_batches_carry_the_targets_features_and_draft_vocabulary_logits(tiny_llm):
    """What the head is trained on: the fused layers at every position and the target's logits over
    the draft vocabulary at the trained ones (from prompt_len - 1), stored compactly in between."""
    model = tiny_llm.model
    examples = [Example(torch.tensor([3, 7, 9, 4, 11, 2]), 3), Example(torch.tensor([5, 6, 8, 10]), 1)]
    layers, vocab = (0, 1, 1), torch.tensor([2, 4, 9, 11, 17])
    offline.extract_targets(model, examples, layers, vocab)
    batch = offline.make_batch(examples, model.device)
    for row, ex in enumerate(examples):
        n = len(ex.tokens)
        with torch.no_grad():
            out = model(ex.tokens[None], capture_layers=layers)
            logits = model.logits(out.hidden)[0, :, vocab]
        features = torch.cat([out.captured[layer] for layer in layers], dim=-1)[0]
        torch.testing.assert_close(batch.features[row, :n], features, atol=2e-2, rtol=1e-2)  # stored in bf16
        trained = slice(ex.prompt_len - 1, n)
        torch.testing.assert_close(batch.target_logits[row, trained], logits[trained], atol=2e-2, rtol=1e-2)
        assert not batch.target_logits[row, : ex.prompt_len - 1].any()  # never trained on: not kept


def _write(path, header: dict, rows: list[str]) -> None:
    path.write_text("\n".join([json.dumps(header), *rows]) + "\n")


def test_answer_files_round_trip(tmp_path):
    examples = [Example(torch.tensor([1, 2, 3, 4]), 2), Example(torch.tensor([5, 6, 7]), 1)]
    save_answers(tmp_path / "a.jsonl", examples, {"model": "m", "vocab_size": 10})
    loaded, header = load_answers(tmp_path / "a.jsonl", 2, vocab_size=10)
    assert header["model"] == "m"
    assert [(ex.tokens.tolist(), ex.prompt_len) for ex in loaded] == [([1, 2, 3, 4], 2), ([5, 6, 7], 1)]
    assert len(load_answers(tmp_path / "a.jsonl", 1, vocab_size=10)[0]) == 1


def test_several_answer_files_are_read_whole_and_interleaved(tiny_llm, tiny_llama, tmp_path):
    a = [Example(torch.tensor([1, 2, 3]), 1), Example(torch.tensor([1, 4, 5]), 1), Example(torch.tensor([1, 6]), 1)]
    b = [Example(torch.tensor([7, 8, 9]), 2)]
    save_answers(tmp_path / "a.jsonl", a, {"model": "m", "vocab_size": 10})
    save_answers(tmp_path / "b.jsonl", b, {"model": "m", "vocab_size": 10})
    merged = load_answer_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], vocab_size=10)
    assert [ex.tokens.tolist() for ex in merged] == [[1, 2, 3], [1, 4, 5], [7, 8, 9], [1, 6]]  # by position
    many = [Example(torch.tensor([1, i % 9 + 1]), 1) for i in range(100)]
    save_answers(tmp_path / "many.jsonl", many, {"model": "m", "vocab_size": 10})
    merged = load_answer_files([tmp_path / "many.jsonl", tmp_path / "b.jsonl"], vocab_size=10)
    assert [ex.tokens.tolist() for ex in merged[:10]].count([7, 8, 9]) == 0  # b's one answer is its middle
    assert [ex.tokens.tolist() for ex in merged].index([7, 8, 9]) == 50  # a 10% held-out share leaves it in training
    vocab = tiny_llm.model.config.vocab_size
    for name in ("a", "b"):
        _write(tmp_path / f"{name}-tiny.jsonl", {"format": ANSWERS_FORMAT, "vocab_size": vocab},
               [json.dumps({"tokens": [1, 2, 3, 4, 5, 6], "prompt_len": 2})] * 3)
    out = run_offline(_config(tiny_llama, tmp_path, examples=f"{tmp_path}/a-tiny.jsonl, {tmp_path}/b-tiny.jsonl,"),
                      llm=tiny_llm)  # num_prompts 5 is not used: all 6 answers train the head
    assert load_eagle_head(out, tiny_llm.model) is not None
    with pytest.raises(ValueError, match="^examples: .*nope.jsonl not found; several answers files are read"):
        run_offline(_config(tiny_llama, tmp_path, examples=f"{tmp_path}/a-tiny.jsonl,{tmp_path}/nope.jsonl"),
                    llm=tiny_llm)


@pytest.mark.parametrize("header,rows,count,message", [
    ({"format": "other"}, [], 0, "not a drafter answers file"),
    ({"format": ANSWERS_FORMAT, "vocab_size": 99}, [], 0, "vocabulary of 99 tokens, the target has 10"),
    ({"format": ANSWERS_FORMAT, "vocab_size": 10}, ['{"tokens": [1, 2], "prompt_len": 1}'], 2,
     "holds 1 answers, num_prompts asks for 2"),
    ({"format": ANSWERS_FORMAT, "vocab_size": 10}, ["{oops"], 1, "line 2: not JSON"),
    ({"format": ANSWERS_FORMAT, "vocab_size": 10}, ['{"tokens": [1, 12], "prompt_len": 1}'], 1,
     "line 2: needs 'tokens'"),
    ({"format": ANSWERS_FORMAT, "vocab_size": 10}, ['{"tokens": [1, 2], "prompt_len": 5}'], 1, "line 2"),
])
def test_bad_answer_files_are_refused_by_name(tmp_path, header, rows, count, message):
    path = tmp_path / "bad.jsonl"
    _write(path, header, rows)
    with pytest.raises(ValueError, match="bad.jsonl") as err:
        load_answers(path, count, vocab_size=10)
    assert message in str(err.value)
