"""The actor's weights as one object-store value: tied tensors once, column-major order kept, bf16 as bits."""

from __future__ import annotations

import pytest
import torch

from respec.distributed.weights import load_packed, pack_weights
from respec.models.loading import load_model


@pytest.mark.parametrize("variant", ["llama", "llama-tied"])
def test_packed_weights_load_back_exactly(tmp_path, variant):
    from tests.conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / variant, variant)
    source, _ = load_model(path)
    target, _ = load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(1.5)
    source = source.to(torch.bfloat16)
    packed = pack_weights(source, 3)
    assert packed.transposed  # column-major linears travel in their own order
    names = set(packed.arrays) | set(packed.aliases)
    assert names == set(source.state_dict())
    if variant == "llama-tied":
        assert packed.aliases or source.lm_head is None  # a tied head is never sent twice
    assert packed.nbytes == sum(t.numel() * 2 for n, t in source.state_dict().items() if n not in packed.aliases)
    load_packed(target, packed)
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name


def test_a_model_of_another_shape_is_refused_by_name(tmp_path):
    from tests.conftest import make_tiny_checkpoint

    a, _ = load_model(make_tiny_checkpoint(tmp_path / "a", "llama"))
    b, _ = load_model(make_tiny_checkpoint(tmp_path / "b", "qwen3"))
    with pytest.raises(ValueError, match=r"weights v1: (missing|.* has shape)"):
        load_packed(b, pack_weights(a, 1))
