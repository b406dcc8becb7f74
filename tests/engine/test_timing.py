"""Marks time a step's parts without syncing the device; the verifier's all-greedy flag skips its device check."""

from __future__ import annotations

import time

import pytest
import torch

from respec.engine.timing import SLOTS, Marks
from respec.engine.verify import verify_drafts


def test_marks_give_the_intervals_between_them_on_the_cpu():
    marks = Marks(torch.device("cpu"))
    marks.mark()
    time.sleep(0.02)
    marks.mark()
    marks.mark()
    first, second = marks.intervals()
    assert 0.015 < first < 1.0 and 0 <= second < 0.01
    with pytest.raises(ValueError, match="marks"):
        marks.mark()


def test_disabled_marks_cost_nothing_and_read_zero():
    marks = Marks(torch.device("cpu"), enabled=False)
    for _ in range(SLOTS + 1):
        marks.mark()
    assert marks.intervals() == [0.0] * (SLOTS - 1)


def test_a_sampled_row_without_uniforms_is_refused_unless_the_caller_vouches_for_greedy():
    target = torch.log_softmax(torch.randn(2, 3, 7), dim=-1)
    drafts = target[:, :2].argmax(-1)
    greedy = torch.tensor([True, False])
    with pytest.raises(ValueError, match="accept_uniforms"):
        verify_drafts(target, drafts, None, None, None, greedy)
    every = torch.tensor([True, True])
    checked = verify_drafts(target, drafts, None, None, None, every)
    trusted = verify_drafts(target, drafts, None, None, None, every, all_greedy=True)
    assert torch.equal(checked.tokens, trusted.tokens) and checked.num_accepted.tolist() == [2, 2]
