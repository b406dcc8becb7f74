"""Which device and dtype an engine runs on, checked before anything loads (torch is imported only to
look at this machine's GPUs, so a plainly bad name is refused at once)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEVICE_NAME = re.compile(r"^(cpu|cuda)(:\d+)?$")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None``: cuda when a GPU is present, else cpu. "cpu", "cuda" and "cuda:N" are checked against
    this machine; anything else is refused naming ``device``."""
    if isinstance(device, str) and not DEVICE_NAME.match(device):
        raise ValueError(f"device: {device!r} is not a device this engine runs on (use 'cpu', 'cuda' or 'cuda:N')")
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but this machine has no usable GPU (use 'cpu')")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} GPU(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device: {device!r} is not a device this engine runs on (use 'cpu', 'cuda' or 'cuda:N')")
    return parsed


def check_dtype_name(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of {', '.join(DTYPES)}")


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None``: bf16 on a GPU, fp32 on the CPU; names as in ``DTYPES``."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype_name(dtype)
    return getattr(torch, DTYPES[dtype])
