"""The start-up profile: a sparse set of timed cells, the rest interpolated, progress on stderr."""

from __future__ import annotations

import numpy as np

from respec.engine.profile import (
    REPEATS,
    batch_grid,
    interpolate,
    profile_table,
    timed_points,
)
from respec.models.loading import load_model


def test_the_profile_times_powers_of_four_and_the_ends():
    assert timed_points(batch_grid(64), 5) == ([1, 4, 16, 64], [1, 2, 5])
    assert timed_points(batch_grid(48), 3) == ([1, 4, 16, 48], [1, 2, 3])
    assert timed_points(batch_grid(2), 1) == ([1, 2], [1])


def test_interpolation_is_exact_where_the_cost_is_linear():
    batches, tokens = batch_grid(64), np.arange(1, 6)
    truth = np.array([[0.01 + 0.002 * b + 0.0005 * b * t for t in tokens] for b in batches])
    timed_b, timed_t = timed_points(batches, 5)
    measured = truth[np.ix_([batches.index(b) for b in timed_b], [t - 1 for t in timed_t])]
    assert np.allclose(interpolate(measured, timed_b, timed_t, batches, 5), truth)


def test_a_fresh_profile_says_what_it_times_and_runs_only_those_cells(tiny_llama, tmp_path, capsys, monkeypatch):
    model, _ = load_model(tiny_llama)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    batches, table = profile_table(model, 16, 4, cache_dir=tmp_path, progress=True)
    timed_b, timed_t = timed_points(batches, 4)
    assert len(calls) == len(timed_b) * len(timed_t) * (REPEATS + 1) < len(batches) * 4 * (REPEATS + 1)
    assert table.shape == (len(batches), 4) and (table > 0).all()
    err = capsys.readouterr().err
    assert "profiling the target's step time" in err and str(tmp_path / "profiles") in err
    calls.clear()
    profile_table(model, 16, 4, cache_dir=tmp_path, progress=True)  # cached: nothing timed, nothing said
    assert not calls and "profiling" not in capsys.readouterr().err
