import numpy as np
import torch

from respec.engine.transfer import to_device


def test_to_device_keeps_values_and_dtype():
    array = np.array([[3, -1], [7, 2]], dtype=np.int64)
    tensor = to_device(array, "cpu")
    assert tensor.dtype == torch.int64 and tensor.device.type == "cpu"
    assert tensor.tolist() == array.tolist()
    uniforms = np.random.default_rng(0).random(5)
    assert torch.equal(to_device(uniforms, torch.device("cpu")), torch.from_numpy(uniforms))
