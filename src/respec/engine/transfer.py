"""Host arrays onto the device inside the decode loop."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` as a tensor on ``device``, without waiting for the device.

    A blocking host-to-device copy synchronizes the CUDA stream, stalling the host behind every kernel
    already queued; the decode loop makes several such copies a step (counter-based uniforms, draft
    lengths, counts). An asynchronous copy from pageable memory is staged before the call returns, so
    the array may be dropped at once. On the CPU the tensor *is* the array (``from_numpy``): pass an
    array nothing writes afterwards.
    """
    return torch.from_numpy(array).to(device, non_blocking=True)
