"""Kernel tuning for small-batch matmuls: every kernel computes the same product, choices persist per
machine, and tuning stays out of the way when it is off or pointless."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from respec.models import kernel_tuning, native
from respec.models.linear import (
    KERNELS,
    ROW_BUCKETS,
    Linear,
    clear_kernel_choices,
    eligible_kernels,
    fast_linear,
    kernel_choices,
    row_bucket,
    run_kernel,
    set_kernel_choices,
)


@pytest.fixture(autouse=True)
def fresh_table(monkeypatch):
    clear_kernel_choices()
    monkeypatch.setattr(kernel_tuning, "_known", {})
    monkeypatch.delenv(kernel_tuning.DISABLE_ENV, raising=False)
    yield
    clear_kernel_choices()


def _col_major(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features).t().contiguous().t()


def _mid_sized(count: int = 2) -> nn.Module:
    """Layers big enough to be tuned (1 MiB each), small enough to time in a blink."""
    return nn.Sequential(*(Linear(512, 512) for _ in range(count)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_f_linear(kernel):
    torch.manual_seed(0)
    weight, bias = _col_major(64, 48), torch.randn(64)
    for rows in (1, 2, 5, 8, 48):
        x = torch.randn(rows, 48)
        expected = F.linear(x, weight, bias)
        assert torch.allclose(run_kernel(kernel, x, weight, bias), expected, atol=1e-5), (kernel, rows)
        # Leading dimensions are kept, as F.linear keeps them.
        batched = run_kernel(kernel, x.view(1, rows, 48), weight)
        assert batched.shape == (1, rows, 64)


def test_odd_shapes_only_get_kernels_that_can_run_them():
    assert eligible_kernels(63, 47) == ("gemm",)
    skinny = ("skinny", "stream") if native.available() else ()
    assert eligible_kernels(64, 47) == ("gemm", "n_split", *skinny)
    assert eligible_kernels(64, 47, rows=native.MAX_ROWS + 1) == ("gemm", "n_split")
    assert eligible_kernels(48, 47) == ("gemm", "n_split")  # not a whole number of column tiles
    assert eligible_kernels(63, 48) == ("gemm", "k_split")


def test_row_buckets_round_down():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 7, 8, 9, 48)] == [1, 2, 3, 3, 5, 5, 8, 8, 48]


def test_installed_choices_are_used_and_stay_exact():
    torch.manual_seed(0)
    weight, x = _col_major(64, 48), torch.randn(5, 48)
    for kernel in KERNELS:
        set_kernel_choices({(64, 48, row_bucket(5)): kernel})
        assert kernel_choices()[(64, 48, 5)] == kernel
        assert torch.allclose(fast_linear(x, weight), F.linear(x, weight), atol=1e-5)


def test_an_unknown_kernel_name_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'mkl'"):
        set_kernel_choices({(64, 48, 1): "mkl"})


def test_tuning_chooses_per_bucket_saves_and_reuses(tmp_path, monkeypatch):
    cache_file = tmp_path / "kernels.json"
    choices = kernel_tuning.tune_linear_kernels([_mid_sized()], cache_file=cache_file)
    assert set(choices) == {(512, 512, rows) for rows in ROW_BUCKETS}
    assert all(kernel in eligible_kernels(512, 512, rows) for (_, _, rows), kernel in choices.items())
    assert kernel_choices() == choices
    saved = json.loads(cache_file.read_text())
    assert list(saved) == [kernel_tuning.machine_key(torch.float32)]

    # A new process (fresh in-memory state) reads the file instead of timing again.
    clear_kernel_choices()
    monkeypatch.setattr(kernel_tuning, "_known", {})
    monkeypatch.setattr(kernel_tuning, "fastest_kernels", lambda *a: pytest.fail("timed again"))
    assert kernel_tuning.tune_linear_kernels([_mid_sized()], cache_file=cache_file) == choices


def test_a_damaged_cache_file_is_tuned_again(tmp_path):
    cache_file = tmp_path / "kernels.json"
    cache_file.write_text("{not json")
    choices = kernel_tuning.tune_linear_kernels([_mid_sized(1)], cache_file=cache_file)
    assert len(choices) == len(ROW_BUCKETS)
    json.loads(cache_file.read_text())


def test_tiny_models_and_the_off_switch_skip_tuning(tmp_path, monkeypatch):
    tiny = nn.Sequential(Linear(32, 32))
    assert kernel_tuning.tune_linear_kernels([tiny], cache_file=tmp_path / "k.json") == {}
    assert not (tmp_path / "k.json").exists()
    monkeypatch.setenv(kernel_tuning.DISABLE_ENV, "0")
    assert kernel_tuning.tune_linear_kernels([_mid_sized()], cache_file=tmp_path / "k.json") == {}
    assert kernel_choices() == {}


def test_shared_weights_are_timed_once():
    shared = Linear(512, 512)
    weights = kernel_tuning.tunable_weights([nn.Sequential(shared), nn.Sequential(shared)])
    assert len(weights) == 1
