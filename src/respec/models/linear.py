"""Linear layers whose weights are laid out for fast decoding and still train as ordinary parameters.

Decoding multiplies a few rows by every weight matrix, so it is bound by how fast the weights stream
from memory. Which kernel streams fastest depends on the CPU: on one machine MKL's GEMM with a
handful of rows ran on one core (12-13 GB/s) while splitting the output columns or the reduction
into a batched matmul kept both cores streaming (21-31 GB/s); on another the plain GEMM over the
column-major weight was the fastest, except at 2-8 rows where compiled kernels (native.py) that
stream the weight once beat MKL's GEMM. So ``fast_linear`` picks per weight shape and row count from a
table the engine fills by timing the candidates on the model's own weights (kernel_tuning.py), with
a fixed rule for shapes not timed. The parameter
keeps the usual ``[out_features, in_features]`` shape, only its memory is column-major, so the
trainer's optimizer updates exactly the tensor the engine reads: one set of weights, no copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# Up to this many rows the split matmuls can beat MKL's plain GEMM on CPU; beyond it, the work is
# compute bound and one large GEMM is best.
SPLIT_MAX_ROWS = 48
# Up to this many rows, splitting the reduction (each core streams one contiguous half of the
# weight) beat splitting the output columns for the layer matrices on the first machine measured.
K_SPLIT_MAX_ROWS = 4

KERNELS = ("gemm", "k_split", "n_split", "skinny", "stream")
NATIVE_KERNELS = {"skinny": native.skinny_matmul, "stream": native.stream_matmul}
# Row counts the tuner times; a call with r rows uses the choice made for the largest bucket <= r.
ROW_BUCKETS = (1, 2, 3, 5, 8, 16, 32, 48)
_BUCKET_OF = [max((b for b in ROW_BUCKETS if b <= rows), default=1) for rows in range(SPLIT_MAX_ROWS + 1)]
# (out_features, in_features, row bucket) -> kernel name, filled by kernel_tuning.tune_linear_kernels.
# Shapes it has not seen use the fixed rule in ``default_kernel``.
_chosen: dict[tuple[int, int, int], str] = {}


def column_major_empty(out_features: int, in_features: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised ``[out, in]`` tensor whose transpose is contiguous."""
    return torch.empty(in_features, out_features, dtype=dtype, device=device).t()


def _num_splits(out_features: int) -> int:
    # Wide matrices (the LM head) stream best in 8 slices, the layer matrices in 2 (measured).
    if out_features >= 16384 and out_features % 8 == 0:
        return 8
    return 2 if out_features % 2 == 0 else 1


def eligible_kernels(out_features: int, in_features: int, rows: int | None = None) -> tuple[str, ...]:
    """The kernels that can run a weight of this shape (the splits need even dimensions), for
    ``rows`` rows when given (the compiled kernel takes at most ``native.MAX_ROWS``)."""
    kernels = ["gemm"]
    if in_features % 2 == 0:
        kernels.append("k_split")
    if _num_splits(out_features) > 1:
        kernels.append("n_split")
    if (rows is None or rows <= native.MAX_ROWS) and native.supports(out_features):
        kernels += NATIVE_KERNELS
    return tuple(kernels)


def default_kernel(rows: int, out_features: int, in_features: int) -> str:
    """The fixed rule used before (or without) tuning."""
    if rows <= K_SPLIT_MAX_ROWS and out_features < 16384 and in_features % 2 == 0:
        return "k_split"
    return "n_split" if _num_splits(out_features) > 1 else "gemm"


def row_bucket(rows: int) -> int:
    return _BUCKET_OF[rows]


def set_kernel_choices(choices: dict[tuple[int, int, int], str]) -> None:
    """Install tuned choices ``(out, in, row bucket) -> kernel`` (merged over earlier ones)."""
    for key, kernel in choices.items():
        if kernel not in KERNELS:
            raise ValueError(f"kernel: unknown kernel {kernel!r} for shape {key[:2]}, expected one of {KERNELS}")
        _chosen[tuple(key)] = kernel


def kernel_choices() -> dict[tuple[int, int, int], str]:
    return dict(_chosen)


def clear_kernel_choices() -> None:
    _chosen.clear()


def run_kernel(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for a column-major CPU ``weight`` with the named kernel."""
    out_features, in_features = weight.shape
    if kernel in NATIVE_KERNELS and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        out = NATIVE_KERNELS[kernel](x, weight)
        if out is not None:
            return out if bias is None else out + bias
        kernel = "gemm"  # a call the compiled kernel does not take (dtype, rows); no autograd through it
    if kernel == "gemm":
        return F.linear(x, weight, bias)
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features)
    if kernel == "k_split":
        out = _k_split(flat, weight.t())
    else:
        out = _n_split(flat, weight.t(), _num_splits(out_features))
    out = out.reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the fastest kernel known for few rows on CPU; same result up to float rounding."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > SPLIT_MAX_ROWS or not weight.t().is_contiguous():
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    kernel = _chosen.get((out_features, in_features, _BUCKET_OF[rows]))
    if kernel is None or (kernel in NATIVE_KERNELS and rows > native.MAX_ROWS):
        kernel = default_kernel(rows, out_features, in_features)
    return run_kernel(kernel, x, weight, bias)


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
