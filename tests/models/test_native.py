"""The compiled kernels: the small-batch matmuls give F.linear's product wherever they run and a clean
None where they do not, with no autograd surprises and an off switch; RMSNorm and the decode
attention match PyTorch's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from respec.models import native
from respec.models.linear import run_kernel

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the compiled kernel is not built")


def _col_major(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features).t().contiguous().t()


MATMULS = [native.skinny_matmul, native.stream_matmul]


@pytest.mark.parametrize("matmul", MATMULS)
@pytest.mark.parametrize("out_features", [32, 64, 96, 1024, 2048])  # narrow and wide column tiles
@pytest.mark.parametrize("in_features", [1, 7, 576])  # 7 and 576: a pass of fewer weight rows at the end
def test_matches_f_linear_for_every_row_count(matmul, out_features, in_features):
    torch.manual_seed(out_features + in_features)
    weight = _col_major(out_features, in_features)
    for rows in range(1, native.MAX_ROWS + 1):
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(matmul(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    # Leading dimensions are kept and a non-contiguous input is fine.
    x = torch.randn(in_features, 2, 3).permute(1, 2, 0)
    torch.testing.assert_close(matmul(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("matmul", MATMULS)
def test_the_same_result_on_one_thread(matmul):
    weight, x = _col_major(1024, 64), torch.randn(5, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = matmul(x, weight)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, matmul(x, weight), atol=0, rtol=0)


@pytest.mark.parametrize("matmul", MATMULS)
def test_calls_it_does_not_take_return_none(matmul):
    weight = _col_major(64, 16)
    assert matmul(torch.randn(native.MAX_ROWS + 1, 16), weight) is None
    assert matmul(torch.randn(2, 16).bfloat16(), weight.bfloat16()) is None
    assert matmul(torch.randn(2, 16), weight.contiguous()) is None  # row-major weight
    assert matmul(torch.randn(2, 16), _col_major(40, 16)) is None  # not whole vectors of columns


def test_training_falls_back_to_autograd():
    weight = _col_major(64, 16).requires_grad_()
    x = torch.randn(3, 16)
    run_kernel("skinny", x, weight).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, weight).square().sum(), weight)[0]
    torch.testing.assert_close(weight.grad, expected)
    with torch.no_grad():  # inference through the compiled kernel, bias added after
        bias = torch.randn(64)
        torch.testing.assert_close(run_kernel("skinny", x, weight, bias), F.linear(x, weight, bias), atol=1e-4,
                                   rtol=1e-5)


def test_the_off_switch():
    env = {**os.environ, native.DISABLE_ENV: "0"}
    code = "from respec.models import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dim", [1, 17, 64, 576])
def test_rms_norm_matches_the_pytorch_module(dim):
    from respec.models.decoder import RMSNorm

    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for shape in [(1, dim), (3, 5, dim), (70, dim)]:  # 70 rows: the multi-threaded path
        x = torch.randn(*shape) * 3
        with torch.no_grad():
            fused = native.rms_norm(x, norm.weight, norm.eps)
            reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
            torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(norm(x), fused, atol=0, rtol=0)  # the module takes the fused path
    # Training keeps autograd: no compiled call when a gradient is wanted.
    x = torch.randn(2, dim, requires_grad=True)
    assert native.rms_norm(x, norm.weight, norm.eps) is None
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    assert native.rms_norm(torch.randn(2, dim).double(), norm.weight.double(), 1e-5) is None


def _reference_attention(q, keys, values, first_row, positions):
    """SDPA over the cache rows, each token masked to the positions up to its own."""
    batch, heads = q.shape[0], q.shape[2]
    length = int(positions.max()) + 1
    k = keys[first_row:first_row + batch, :, :length]
    v = values[first_row:first_row + batch, :, :length]
    mask = (torch.arange(length)[None, None, :] <= positions[:, :, None])[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                         enable_gqa=keys.shape[1] != heads)
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (9, 3, 64), (4, 4, 128), (8, 1, 32)])
@pytest.mark.parametrize("steps", [1, 5, 17])
def test_decode_attention_matches_sdpa_on_ragged_rows(heads, kv_heads, dim, steps):
    torch.manual_seed(heads * dim + steps)
    slots, max_len, batch, first_row = 7, 96, 4, 2
    keys, values = torch.randn(slots, kv_heads, max_len, dim), torch.randn(slots, kv_heads, max_len, dim)
    # Ragged rows, each token one past the previous one; row 1 starts at position 0 (a short prompt).
    starts = torch.tensor([40, 0, 70, 11])[:, None]
    positions = starts + torch.arange(steps)[None, :]
    for spread in (1.0, 30.0):  # 30: scores far apart, exponentials that underflow
        q = (torch.randn(batch, steps, heads + 2, dim) * spread)[:, :, :heads]  # a strided view, as in the model
        fused = native.decode_attention(q, keys, values, first_row, positions, dim ** -0.5)
        exact = _reference_attention(q.double(), keys.double(), values.double(), first_row, positions)
        # fp32 scores of size ~spread carry ~1e-7 * spread of rounding into the weights: SDPA's own
        # error against fp64 is 1e-7-2e-6 here.
        assert (fused - exact).abs().max() <= 1e-6 * spread


def test_decode_attention_declines_what_it_cannot_run():
    keys = values = torch.randn(2, 1, 8, 16)
    positions = torch.zeros(1, 1, dtype=torch.long)
    assert native.decode_attention(torch.randn(1, 1, 2, 16).double(), keys, values, 0, positions, 0.25) is None
    assert native.decode_attention(torch.randn(1, 1, 2, 12), torch.randn(2, 1, 8, 12), torch.randn(2, 1, 8, 12),
                                   0, positions, 0.25) is None  # head_dim not whole vectors
    assert native.decode_attention(torch.randn(1, 1, 2, 16), keys, values, 0, positions.int(), 0.25) is None
    assert native.decode_attention(torch.randn(1, 1, 2, 16, requires_grad=True), keys, values, 0, positions,
                                   0.25) is None
    limit = native.attention_max_tokens()  # the C source's own limit, read from the library
    assert limit == 64
    long_block = torch.zeros(1, limit + 1, dtype=torch.long)
    assert native.decode_attention(torch.randn(1, limit + 1, 2, 16), keys, values, 0, long_block, 0.25) is None


def test_rope_and_cache_matches_apply_rope_and_writes_only_the_new_positions():
    from respec.models.config import RopeConfig
    from respec.models.rope import apply_rope, rope_table

    torch.manual_seed(5)
    heads, kv_heads, dim, slots, max_len, first_row = 4, 2, 16, 5, 32, 1
    cos_table, sin_table = rope_table(RopeConfig(), dim, max_len)
    positions = torch.tensor([[3, 4, 5], [0, 1, 2], [29, 30, 31]])
    cos, sin = cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)
    qkv = torch.randn(3, 3, heads + 2 * kv_heads, dim)  # the model's qkv view: strided q/k and v
    qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
    keys, values = torch.randn(slots, kv_heads, max_len, dim), torch.randn(slots, kv_heads, max_len, dim)
    before_keys, before_values = keys.clone(), values.clone()

    assert native.rope_and_cache(qk, v, cos, sin, keys, values, first_row, positions + 1, read_only=False) is None
    assert torch.equal(keys, before_keys) and torch.equal(values, before_values)  # out of the cache: nothing written
    q = native.rope_and_cache(qk, v, cos, sin, keys, values, first_row, positions, read_only=True)
    rotated = apply_rope(qk, cos, sin)
    torch.testing.assert_close(q, rotated[:, :, :heads], atol=1e-6, rtol=1e-6)
    assert torch.equal(keys, before_keys) and torch.equal(values, before_values)

    native.rope_and_cache(qk, v, cos, sin, keys, values, first_row, positions, read_only=False)
    rows = torch.arange(3)[:, None].expand(3, 3) + first_row
    torch.testing.assert_close(keys[rows, :, positions], rotated[:, :, heads:], atol=1e-6, rtol=1e-6)
    assert torch.equal(values[rows, :, positions], v)
    written = torch.zeros(slots, max_len, dtype=torch.bool)
    written[rows, positions] = True
    untouched = ~written[:, None, :, None].expand_as(keys)
    assert torch.equal(keys[untouched], before_keys[untouched])
    assert torch.equal(values[untouched], before_values[untouched])
