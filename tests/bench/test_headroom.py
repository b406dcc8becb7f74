"""The speculation headroom bound, on cost curves whose answer is known."""

import numpy as np
import pytest

from respec.bench.headroom import expected_block, rate_needed, speculation_headroom


def flat(batch: int, tokens: int) -> float:  # memory bound: a step costs the same whatever it carries
    return 1.0


def linear(batch: int, tokens: int) -> float:  # compute bound: a step costs per row-token
    return 0.1 * batch * tokens


def test_a_flat_cost_curve_gains_the_block_length():
    room = speculation_headroom([101] * 4, flat, max_k=4)
    assert room.ar_steps == 100 and room.ar_decode_s == 100
    assert room.bound_steps == 20 and room.decode_speedup == pytest.approx(5.0)


def test_a_cost_linear_in_row_tokens_leaves_no_headroom():
    room = speculation_headroom([17, 40, 300], linear, max_k=3)
    assert room.decode_speedup == pytest.approx(1.0)


def test_prefill_dilutes_the_gain():
    room = speculation_headroom([11], flat, max_k=1, prefill_s=10.0)
    assert room.decode_speedup == pytest.approx(2.0)
    assert room.total_speedup == pytest.approx(20 / 15)


def test_measured_rates_give_less_than_a_perfect_drafter():
    perfect = speculation_headroom([65] * 2, flat, max_k=2)
    partial = speculation_headroom([65] * 2, flat, max_k=2, rates=np.array([0.5, 0.5]))
    assert expected_block(np.array([0.5, 0.5]), 2) == pytest.approx(1.75)
    assert 1.0 < partial.decode_speedup < perfect.decode_speedup


def test_short_rows_do_not_count_drafts_they_cannot_use():
    # One row of 2 tokens (1 decode step): a block of 3 emits only 1 for it, so AR's single step ties.
    room = speculation_headroom([2], lambda b, t: float(t), max_k=2)
    assert room.bound_decode_s == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, field", [({"max_k": 0}, "max_k"), ({"max_k": 2, "rates": [0.5]}, "rates"),
                                           ({"max_k": 1, "rates": [1.5]}, "rates")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        speculation_headroom([10], flat, **kwargs)


def test_empty_or_zero_budgets_are_refused():
    with pytest.raises(ValueError, match="budgets"):
        speculation_headroom([], flat, max_k=1)
    with pytest.raises(ValueError, match="budgets"):
        speculation_headroom([0], flat, max_k=1)


def test_rate_needed_is_where_the_bound_crosses_the_target():
    budgets = [40] * 3 + [200]
    rate = rate_needed(budgets, flat, max_k=2, speedup=1.5, prefill_s=1.0)
    at = speculation_headroom(budgets, flat, 2, np.full(2, rate), prefill_s=1.0).total_speedup
    below = speculation_headroom(budgets, flat, 2, np.full(2, rate - 0.01), prefill_s=1.0).total_speedup
    assert below < 1.5 <= at
    assert rate_needed(budgets, linear, max_k=2, speedup=1.1) is None  # no drafter pays when compute bound
