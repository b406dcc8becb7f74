"""The decoder against transformers' own implementation, loading/saving, and training mode."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from respec.engine.cache import KVCache
from respec.models import ModelConfig, load_model, save_pretrained
from respec.models.linear import fast_linear


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_logits_match_transformers(tiny_checkpoint):
    variant, directory = tiny_checkpoint
    model, _ = load_model(directory)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(ids).hidden)
    diff = (ours - hf_logits(directory, ids)).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs diff {diff}"


def test_cached_decode_matches_full_forward(tiny_checkpoint):
    """Prefill + token-by-token decode through the KV cache, ragged rows, == one causal pass."""
    variant, directory = tiny_checkpoint
    model, _ = load_model(directory)
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    reference = hf_logits(directory, ids)
    cache = KVCache(model.config, rows=2, max_len=32, dtype=torch.float32, device="cpu")
    prompt_lens = [7, 12]
    with torch.no_grad():
        width = max(prompt_lens)
        positions = torch.arange(width).expand(2, width)
        model(ids[:, :width], positions, cache=cache, rows=slice(0, 2), kv_len=width)
        lengths = torch.tensor(prompt_lens)
        for _ in range(15):
            step_ids = ids[torch.arange(2), lengths][:, None]
            out = model(step_ids, lengths[:, None], cache=cache, rows=slice(0, 2), kv_len=int(lengths.max()) + 1)
            logits = model.logits(out.hidden[:, -1])
            expected = reference[torch.arange(2), lengths]
            assert (logits - expected).abs().max().item() <= 1e-4, variant
            lengths = lengths + 1


def test_save_reload_with_transformers(tiny_checkpoint, tmp_path):
    _, directory = tiny_checkpoint
    model, _ = load_model(directory)
    out = save_pretrained(model, tmp_path / "saved")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.logits(model(ids).hidden)
    assert (hf_logits(out, ids) - ours).abs().max().item() <= 1e-5
    reloaded, _ = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".saved.*")), "staging directory left behind"


def test_sharded_checkpoint_loads(tmp_path, tiny_llama):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = load_model(tmp_path / "sharded")
    reference, _ = load_model(tiny_llama)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_capture_layers_returns_hidden_states(tiny_llama):
    model, _ = load_model(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, capture_layers=(0, 1))
        hf_hidden = hf(ids, output_hidden_states=True).hidden_states
    assert set(out.captured) == {0, 1}
    # HF's hidden_states[i + 1] is layer i's output (the last one after the final norm).
    assert (out.captured[0] - hf_hidden[1]).abs().max().item() <= 1e-4


def test_training_mode_gradients_and_padding(tiny_llama):
    model, _ = load_model(tiny_llama)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # row 1 right-padded
    logits = model.logits(model(ids, attention_mask=mask).hidden)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad():
        alone = model.logits(model(ids[1:, :8]).hidden)
    assert (logits[1, :8].detach() - alone[0]).abs().max().item() <= 1e-5


def test_fast_linear_matches_f_linear():
    torch.manual_seed(0)
    weight = torch.randn(64, 48).t().contiguous().t()  # column-major like our parameters
    bias = torch.randn(64)
    for rows in (1, 3, 8, 47, 200):
        x = torch.randn(rows, 48)
        expected = torch.nn.functional.linear(x, weight, bias)
        assert torch.allclose(fast_linear(x, weight, bias), expected, atol=1e-5)


@pytest.mark.parametrize("field,value,expected", [
    ("model_type", "gpt2", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type"),
])
def test_unsupported_config_names_field(tiny_llama, tmp_path, field, value, expected):
    target = shutil.copytree(tiny_llama, tmp_path / "m")
    config = json.loads((target / "config.json").read_text())
    config[field] = value
    config.pop("rope_parameters", None) if field == "rope_scaling" else None
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=expected):
        load_model(target)


def test_missing_and_mismatched_weights(tiny_llama, tmp_path):
    missing = shutil.copytree(tiny_llama, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="weights: no model.safetensors"):
        load_model(missing)
    mismatched = shutil.copytree(tiny_llama, tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 96
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gate_up_proj.weight.*shape"):
        load_model(mismatched)
    corrupt = shutil.copytree(tiny_llama, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(corrupt)


def test_unknown_preset():
    with pytest.raises(ValueError, match="model: 'no-such-model' is neither"):
        load_model("no-such-model")


def test_config_round_trip():
    config = ModelConfig(architecture="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, qkv_bias=True)
    assert ModelConfig.from_hf(config.to_hf()) == config
