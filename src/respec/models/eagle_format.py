"""EAGLE-3 draft checkpoints: the layout SpecForge writes and SGLang and vLLM load.

A directory with ``config.json`` (a one-layer Llama config: ``architectures:
["LlamaForCausalLMEagle3"]``, the target's ``vocab_size`` and RoPE settings, ``draft_vocab_size``,
``tie_word_embeddings: false``) and ``model.safetensors`` holding ``fc``, ``midlayer.*``, ``norm``,
``lm_head``, ``d2t`` (int64 offsets: target id = draft id + d2t[draft id]) and ``t2d`` (bool over the
target's vocabulary), without a ``model.`` prefix and without ``embed_tokens`` (the engines use the
target's). ``save_eagle_head`` writes it (staged, renamed into place whole, after checking the
vocabulary map); ``load_eagle_head`` reads it strictly (every missing, extra or mis-shaped tensor is
named) and also reads ReSpec's older layout (``architecture: respec-eagle3``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..utils.atomic import staged_dir
from .decoder import DecoderLM
from .eagle import EagleConfig, EagleHead, standard_fuse_layers

ARCHITECTURE = "LlamaForCausalLMEagle3"
LEGACY_ARCHITECTURE = "respec-eagle3"
# Ours -> the standard layout (q/k/v and gate/up are fused in ours, split there).
RENAMES = {"fc.weight": "fc.weight", "embed_norm.weight": "midlayer.input_layernorm.weight",
           "hidden_norm.weight": "midlayer.hidden_norm.weight", "o_proj.weight": "midlayer.self_attn.o_proj.weight",
           "post_attn_norm.weight": "midlayer.post_attention_layernorm.weight",
           "mlp.down_proj.weight": "midlayer.mlp.down_proj.weight", "norm.weight": "norm.weight"}


def vocab_map(draft_to_target: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d2t`` (offsets) and ``t2d`` (membership) of a draft vocabulary, checked."""
    ids = draft_to_target.detach().cpu().long()
    d2t = ids - torch.arange(len(ids))
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"d2t: draft vocabulary ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    t2d[ids] = True
    check_vocab_map(d2t, t2d)
    return d2t, t2d


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """The engines' invariant: t2d marks exactly the draft vocabulary, listed ascending by d2t."""
    targets = d2t.long() + torch.arange(len(d2t))
    if int(t2d.sum()) != len(d2t) or not torch.equal(torch.nonzero(t2d).flatten(), targets):
        raise ValueError(f"d2t/t2d: inconsistent vocabulary map (t2d marks {int(t2d.sum())} ids, d2t has "
                         f"{len(d2t)}; the draft ids must map to distinct target ids in ascending order)")


def standard_state(head: EagleHead, target: DecoderLM) -> dict[str, torch.Tensor]:
    """The head's tensors under the standard names (a full-vocabulary head carries the target's LM head)."""
    own = {name: t.detach() for name, t in head.state_dict().items()}
    config = head.config
    out = {RENAMES[name]: own[name] for name in RENAMES}
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for name, part in zip("qkv", own["qkv_proj.weight"].split((q, kv, kv))):
        out[f"midlayer.self_attn.{name}_proj.weight"] = part
    gate, up = own["mlp.gate_up_proj.weight"].split(config.intermediate_size)
    out["midlayer.mlp.gate_proj.weight"], out["midlayer.mlp.up_proj.weight"] = gate, up
    if head.draft_head is not None:
        out["lm_head.weight"], ids = own["draft_head.weight"], own["draft_to_target"]
    else:
        out["lm_head.weight"], ids = target.head_weight.detach(), torch.arange(config.vocab_size)
    out["d2t"], out["t2d"] = vocab_map(ids, config.vocab_size)
    return {name: t.cpu().contiguous() for name, t in out.items()}


def eagle3_config(head: EagleHead, target: DecoderLM, dtype: torch.dtype) -> dict:
    config, hf = head.config, target.config.to_hf()
    if tuple(config.fuse_layers) != standard_fuse_layers(target.config.num_layers):
        raise ValueError(f"fuse_layers: {config.fuse_layers} are not the layers engines fuse "
                         f"({standard_fuse_layers(target.config.num_layers)}); retrain the head to export it")
    return {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "hidden_act": "silu",
            "vocab_size": config.vocab_size, "draft_vocab_size": config.draft_vocab_size or config.vocab_size,
            "tie_word_embeddings": False, "rope_theta": hf["rope_theta"], "rope_scaling": hf["rope_scaling"],
            "max_position_embeddings": hf["max_position_embeddings"], "bos_token_id": hf["bos_token_id"],
            "eos_token_id": hf["eos_token_id"], "torch_dtype": str(dtype).removeprefix("torch.")}


def save_eagle_head(head: EagleHead, out_dir: str | os.PathLike, target: DecoderLM, dtype: torch.dtype | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``head`` for ``target`` in the standard layout (``dtype``: the tensors', default the head's);
    ``extra`` goes into config.json under ``respec``. Nothing is written when a check fails."""
    dtype = dtype or next(head.parameters()).dtype
    config = eagle3_config(head, target, dtype)
    # The contract does not name the taps (engines derive them from the target's depth): the depth
    # trained on is kept, so a head is never fed another target's layers without a word.
    config["respec"] = {"target": {"num_layers": target.config.num_layers, "hidden_size": target.config.hidden_size,
                                   "vocab_size": target.config.vocab_size}, **(extra or {})}
    if head.draft_head is None:  # the file carries a copy of the target's LM head; ReSpec reads the live one
        config["respec"]["full_vocabulary"] = True
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in standard_state(head, target).items()}
    out = Path(out_dir)
    with staged_dir(out) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return out


def is_eagle_dir(path: str | os.PathLike) -> bool:
    """A directory holding an EAGLE-3 head, in the standard layout or ReSpec's older one."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and (raw.get("architecture") == LEGACY_ARCHITECTURE
                                      or ARCHITECTURE in (raw.get("architectures") or []))


def load_eagle_head(path: str | os.PathLike, target: DecoderLM) -> EagleHead:
    """A head from ``path`` for ``target``, on its device and in its dtype; every mismatch is named."""
    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"drafter: {path} needs config.json and model.safetensors")
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"drafter: cannot read {config_file}: {err}") from err
    legacy = raw.get("architecture") == LEGACY_ARCHITECTURE
    if not legacy and ARCHITECTURE not in (raw.get("architectures") or []):
        raise ValueError(f"drafter: {config_file} is not an EAGLE-3 head (architectures {raw.get('architectures')})")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"drafter: cannot read {weights}: {err}") from err
    if legacy:
        return _load_legacy(raw, state, target, weights)
    config = _config_from_standard(raw, target)
    head = EagleHead(config, dtype=target.dtype, device=target.device)
    _copy_into(head, _from_standard(state, config, weights), weights)
    return head.eval()


def _config_from_standard(raw: dict, target: DecoderLM) -> EagleConfig:
    def field(name: str):
        if name not in raw:
            raise ValueError(f"drafter: config.json lacks {name!r}")
        return raw[name]

    if raw.get("target_hidden_size") not in (None, target.config.hidden_size):
        raise ValueError(f"drafter: target_hidden_size {raw['target_hidden_size']} differs from the target's "
                         f"{target.config.hidden_size} (a head that projects the embedding is not supported)")
    trained_for = (raw.get("respec") or {}).get("target") or {}
    layers = trained_for.get("num_layers")
    if layers is not None and layers != target.config.num_layers:
        raise ValueError(f"drafter: trained on the features of a {layers}-layer target (layers "
                         f"{standard_fuse_layers(layers)}); this target has {target.config.num_layers} layers "
                         f"(layers {standard_fuse_layers(target.config.num_layers)}): a head drafts for the target "
                         f"it was trained on")
    vocab, draft_vocab = field("vocab_size"), raw.get("draft_vocab_size") or field("vocab_size")
    if (raw.get("respec") or {}).get("full_vocabulary") and draft_vocab == vocab:
        draft_vocab = 0  # drafts through the target's own LM head, which RL keeps updating
    config = EagleConfig(hidden_size=field("hidden_size"), vocab_size=vocab, num_heads=field("num_attention_heads"),
                         num_kv_heads=raw.get("num_key_value_heads") or field("num_attention_heads"),
                         head_dim=raw.get("head_dim") or field("hidden_size") // field("num_attention_heads"),
                         intermediate_size=field("intermediate_size"), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                         fuse_layers=standard_fuse_layers(target.config.num_layers), draft_vocab_size=draft_vocab)
    config.check_target(target.config)
    return config


def _from_standard(state: dict[str, torch.Tensor], config: EagleConfig, source: Path) -> dict[str, torch.Tensor]:
    """Standard names -> ours, strictly: a missing or unexpected tensor is an error naming it."""
    state = {name.removeprefix("model."): t for name, t in state.items()}
    state.pop("embed_tokens.weight", None)  # some trainers ship the target's embedding: the target's own is used
    wanted = {*RENAMES.values(), *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkv"), "midlayer.mlp.gate_proj.weight",
              "midlayer.mlp.up_proj.weight", "lm_head.weight"}
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted - {"d2t", "t2d"})
    if missing or extra:
        raise ValueError(f"drafter: {source} does not hold an EAGLE-3 head: missing {missing[:4]}, unexpected {extra[:4]}")
    ours = {name: state[standard] for name, standard in RENAMES.items()}
    ours["qkv_proj.weight"] = torch.cat([state[f"midlayer.self_attn.{p}_proj.weight"] for p in "qkv"])
    ours["mlp.gate_up_proj.weight"] = torch.cat((state["midlayer.mlp.gate_proj.weight"],
                                                 state["midlayer.mlp.up_proj.weight"]))
    ours["draft_head.weight"] = state["lm_head.weight"]
    d2t = state.get("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long)).long()  # absent: identity
    t2d = state.get("t2d")
    if t2d is None:
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[d2t + torch.arange(len(d2t))] = True
    check_vocab_map(d2t, t2d.bool())
    ours["draft_to_target"] = d2t + torch.arange(len(d2t)) if config.draft_vocab_size else torch.zeros(0, dtype=torch.long)
    return ours


def _load_legacy(raw: dict, state: dict[str, torch.Tensor], target: DecoderLM, weights: Path) -> EagleHead:
    """ReSpec's older layout: our own names, no final norm of its own (the target's then served)."""
    fields = EagleConfig.__dataclass_fields__
    config = EagleConfig(**{k: (tuple(v) if k == "fuse_layers" else v) for k, v in raw.items() if k in fields})
    config.check_target(target.config)
    head = EagleHead(config, dtype=target.dtype, device=target.device)
    state = {**state, "norm.weight": target.norm.weight.detach().cpu()}
    _copy_into(head, state, weights)
    return head.eval()


@torch.no_grad()
def _copy_into(head: EagleHead, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"drafter: {source} lacks {', '.join(missing[:3])}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"drafter: {source}: {name} has shape {list(state[name].shape)}, "
                             f"expected {list(tensor.shape)}")
        tensor.copy_(state[name])
