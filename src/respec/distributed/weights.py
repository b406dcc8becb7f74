"""The actor's weights as one object-store value: numpy buffers every worker maps without a copy.

``pack_weights`` turns a module's state into ``PackedWeights``: each distinct tensor once (tied
weights travel once and are re-tied on arrival), as a numpy array (bf16 as its 16-bit pattern), so a
worker's ``ray.get`` maps the object store's shared memory instead of unpickling a copy.
``load_packed`` copies them into a model of the same shape, naming any tensor that does not fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

_AS_NUMPY = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass
class PackedWeights:
    version: int
    arrays: dict[str, np.ndarray]  # distinct tensors
    dtypes: dict[str, str]  # their torch dtypes ("torch.bfloat16")
    aliases: dict[str, str] = field(default_factory=dict)  # a tied name -> the name it shares storage with
    transposed: set[str] = field(default_factory=set)  # sent as stored (column-major): the array is its .t()

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


def pack_weights(module: torch.nn.Module, version: int) -> PackedWeights:
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    aliases: dict[str, str] = {}
    transposed: set[str] = set()
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        host = tensor.detach().to("cpu")
        if host.dim() == 2 and not host.is_contiguous() and host.t().is_contiguous():
            host = host.t()  # column-major weights travel in their own order: no transposing copies
            transposed.add(name)
        host = host.contiguous()
        if host.dtype in _AS_NUMPY:
            host = host.view(_AS_NUMPY[host.dtype])
        arrays[name] = host.numpy()  # shares the model's memory: ray.put copies it into the store at once
        dtypes[name] = str(tensor.dtype)
    return PackedWeights(version, arrays, dtypes, aliases, transposed)


def _tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(array))  # read-only object-store memory: copied into the model below
    wanted = getattr(torch, dtype.removeprefix("torch."))
    return tensor.view(wanted) if wanted in _AS_NUMPY else tensor


def load_packed(module: torch.nn.Module, packed: PackedWeights) -> None:
    """Copy ``packed`` into ``module`` in place; a missing, extra or mis-shaped tensor is named."""
    state = module.state_dict()
    names = set(packed.arrays) | set(packed.aliases)
    missing, extra = sorted(set(state) - names), sorted(names - set(state))
    if missing or extra:
        raise ValueError(f"weights v{packed.version}: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, target in state.items():
            source = packed.aliases.get(name, name)
            tensor = _tensor(packed.arrays[source], packed.dtypes[source])
            if source in packed.transposed:
                tensor = tensor.t()
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"weights v{packed.version}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model {tuple(target.shape)}")
            with warnings.catch_warnings():  # numpy buffers from the object store are read-only
                warnings.simplefilter("ignore", UserWarning)
                if source in packed.transposed and target.t().is_contiguous():  # the same order: a plain copy
                    target.t().copy_(tensor.t().to(target.dtype))
                else:
                    target.copy_(tensor.to(target.dtype))
