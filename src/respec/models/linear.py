"""Linear layers whose weights are laid out for fast decoding and still train as ordinary parameters.

Decoding multiplies a few rows by every weight matrix, so it is bound by how fast the weights stream
from memory. On CPU, MKL's kernels for ``x @ W.T`` with a handful of rows run on one core and reach
12-13 GB/s here, while splitting the output columns into a batched matmul over strided views of a
column-major weight keeps both cores streaming (21-31 GB/s; see docs/benchmarks.md). The parameter
keeps the usual ``[out_features, in_features]`` shape, only its memory is column-major, so the
trainer's optimizer updates exactly the tensor the engine reads: one set of weights, no copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the split matmul beats MKL's plain GEMM on CPU (measured at 1, 8 and 32 rows);
# beyond it, the work is compute bound and one large GEMM is best.
SPLIT_MAX_ROWS = 48
# Up to this many rows, splitting the reduction (each core streams one contiguous half of the
# weight) beats splitting the output columns for the layer matrices (measured at 1 row).
K_SPLIT_MAX_ROWS = 4


def column_major_empty(out_features: int, in_features: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised ``[out, in]`` tensor whose transpose is contiguous."""
    return torch.empty(in_features, out_features, dtype=dtype, device=device).t()


def _num_splits(out_features: int) -> int:
    # Wide matrices (the LM head) stream best in 8 slices, the layer matrices in 2 (measured).
    if out_features >= 16384 and out_features % 8 == 0:
        return 8
    return 2 if out_features % 2 == 0 else 1


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a multi-core path for few rows on CPU; same result up to float rounding."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > SPLIT_MAX_ROWS or not weight.t().is_contiguous():
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    if rows <= K_SPLIT_MAX_ROWS and out_features < 16384 and in_features % 2 == 0:
        out = _k_split(x.reshape(rows, in_features), weight.t())
    else:
        splits = _num_splits(out_features)
        if splits == 1:
            return F.linear(x, weight, bias)
        out = _n_split(x.reshape(rows, in_features), weight.t(), splits)
    out = out.reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias


def _n_split(x: torch.Tensor, weight_t: torch.Tensor, splits: int) -> torch.Tensor:
    """Each core computes a slice of the output columns (strided views of ``weight_t [in, out]``)."""
    in_features, out_features = weight_t.shape
    slices = weight_t.view(in_features, splits, out_features // splits).transpose(0, 1)
    out = torch.bmm(x.expand(splits, *x.shape), slices)
    return out.transpose(0, 1).reshape(x.shape[0], out_features)


def _k_split(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """Each core reduces over one contiguous half of ``weight_t [in, out]``; the halves are summed."""
    in_features, out_features = weight_t.shape
    halves = weight_t.view(2, in_features // 2, out_features)
    partial = torch.bmm(x.view(x.shape[0], 2, in_features // 2).transpose(0, 1), halves)
    return partial[0] + partial[1]


class Linear(nn.Module):
    """A bias-optional linear layer with a column-major weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(column_major_empty(out_features, in_features, dtype, device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
