"""Mapping between Hugging Face parameter names and ours (fused qkv and gate/up projections)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import ModelConfig
from .decoder import DecoderLM

# Buffers some checkpoints carry that we recompute.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_respec(config: ModelConfig, hf: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename and fuse an HF state dict; raise ValueError naming the source and tensor on any mismatch."""
    remaining = {k: v for k, v in hf.items() if not k.endswith(IGNORED_SUFFIXES)}

    def take(name: str) -> torch.Tensor:
        if name not in remaining:
            raise ValueError(f"weights: tensor {name!r} missing from {source}")
        return remaining.pop(name)

    out: dict[str, torch.Tensor] = {"embed_tokens": take("model.embed_tokens.weight"),
                                    "norm.weight": take("model.norm.weight")}
    if config.tie_word_embeddings:
        remaining.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_layers):
        hf_prefix, prefix = f"model.layers.{i}.", f"layers.{i}."
        attn = hf_prefix + "self_attn."
        out[prefix + "attn.qkv_proj.weight"] = torch.cat(
            [take(attn + f"{p}_proj.weight") for p in "qkv"], dim=0)
        if config.qkv_bias:
            out[prefix + "attn.qkv_proj.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"])
        out[prefix + "attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if config.qk_norm:
            out[prefix + "attn.q_norm.weight"] = take(attn + "q_norm.weight")
            out[prefix + "attn.k_norm.weight"] = take(attn + "k_norm.weight")
        mlp = hf_prefix + "mlp."
        out[prefix + "mlp.gate_up_proj.weight"] = torch.cat(
            [take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")], dim=0)
        out[prefix + "mlp.down_proj.weight"] = take(mlp + "down_proj.weight")
        out[prefix + "input_norm.weight"] = take(hf_prefix + "input_layernorm.weight")
        out[prefix + "post_attn_norm.weight"] = take(hf_prefix + "post_attention_layernorm.weight")
    if remaining:
        names = ", ".join(sorted(remaining)[:5])
        raise ValueError(f"weights: {len(remaining)} unexpected tensors in {source} (e.g. {names}); "
                         f"the checkpoint does not match config.json")
    return out


def respec_to_hf(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our parameters under HF names, split and contiguous, ready for safetensors."""
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["embed_tokens"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    split_qkv = (config.q_size, config.kv_size, config.kv_size)
    for i in range(config.num_layers):
        prefix, attn, mlp = f"layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for name, part in zip("qkv", state[prefix + "attn.qkv_proj.weight"].split(split_qkv)):
            out[attn + f"{name}_proj.weight"] = part
        if config.qkv_bias:
            for name, part in zip("qkv", state[prefix + "attn.qkv_proj.bias"].split(split_qkv)):
                out[attn + f"{name}_proj.bias"] = part
        out[attn + "o_proj.weight"] = state[prefix + "attn.o_proj.weight"]
        if config.qk_norm:
            out[attn + "q_norm.weight"] = state[prefix + "attn.q_norm.weight"]
            out[attn + "k_norm.weight"] = state[prefix + "attn.k_norm.weight"]
        gate, up = state[prefix + "mlp.gate_up_proj.weight"].split(config.intermediate_size)
        out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = gate, up
        out[mlp + "down_proj.weight"] = state[prefix + "mlp.down_proj.weight"]
        out[f"model.layers.{i}.input_layernorm.weight"] = state[prefix + "input_norm.weight"]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = state[prefix + "post_attn_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_into(model: DecoderLM, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into the model's (column-major) parameters, checking every shape."""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        target = params.get(name)
        if target is None:
            raise ValueError(f"weights: {source} has tensor {name!r} that the model does not have")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"weights: {name!r} in {source} has shape {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
    missing = set(params) - set(state)
    if missing:
        raise ValueError(f"weights: {source} lacks {', '.join(sorted(missing)[:5])}")
