"""EAGLE-3 checkpoints in the layout SpecForge writes and SGLang and vLLM load, both directions.

The contract (INTEROP facts): config.json with architectures ["LlamaForCausalLMEagle3"], one layer,
the target's vocab_size, draft_vocab_size, tie_word_embeddings false; model.safetensors with fc,
midlayer.*, norm, lm_head, d2t (int64 offsets) and t2d (bool), no "model." prefix, no embed_tokens.
Features: the residual stream entering target layers 2, L // 2 and L - 3.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from respec.models.eagle import EagleHead, standard_fuse_layers
from respec.models.eagle_format import (
    check_vocab_map,
    is_eagle_dir,
    load_eagle_head,
    save_eagle_head,
)
from respec.models.loading import load_model
from tests.helpers import random_head, save_random_checkpoint

DRAFT_VOCAB = 40


@pytest.fixture(scope="module")
def target(tiny_llama):
    model, _ = load_model(tiny_llama)
    return model.requires_grad_(False)


def reduced_head(target, seed: int = 0) -> EagleHead:
    head = random_head(target, draft_vocab_size=DRAFT_VOCAB, seed=seed)
    head.draft_to_target.copy_(torch.arange(0, 3 * DRAFT_VOCAB, 3))  # spread over the target's ids
    return head


def first_draft_logits(head: EagleHead, target, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Our head over one sequence (next tokens ``[T]``, fused-layer features ``[T, 3H]``), causal: the
    logits over the target's vocabulary at every position."""
    steps = tokens.shape[0]
    cos, sin = target._rope(torch.arange(steps)[None])
    hidden = head.fuse(features[None])
    q, k, v = head.project(target.embed(tokens[None]), hidden, cos, sin)
    out = head.attend(q, k, v, torch.ones(steps, steps, dtype=torch.bool).tril(), hidden)
    return head.logits(out[0], target)


def contract_logits(state: dict, config: dict, target, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The EAGLE-3 layer written from the contract alone, on a standard state dict: RMSNorm of the
    target's embedding and of the fused hidden, attention over their concatenation (RoPE as in
    transformers' rotate_half), o_proj residual, MLP residual, final norm, reduced head, d2t map."""
    eps, heads, kv, dim = config["rms_norm_eps"], config["num_attention_heads"], config["num_key_value_heads"], \
        config["head_dim"]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    steps = tokens.shape[0]
    hidden = features @ state["fc.weight"].T
    x = torch.cat((rms(F.embedding(tokens, target.embed_tokens), state["midlayer.input_layernorm.weight"]),
                   rms(hidden, state["midlayer.hidden_norm.weight"])), dim=-1)
    q, k, v = (x @ state[f"midlayer.self_attn.{p}_proj.weight"].T for p in "qkv")
    q, k, v = q.view(steps, heads, dim), k.view(steps, kv, dim), v.view(steps, kv, dim)
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.arange(steps).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]

    def rotate(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(heads // kv, dim=1), v.repeat_interleave(heads // kv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / dim ** 0.5
    scores = scores.masked_fill(~torch.ones(steps, steps, dtype=torch.bool).tril(), float("-inf"))
    attended = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(steps, heads * dim)
    h = hidden + attended @ state["midlayer.self_attn.o_proj.weight"].T
    mlp_in = rms(h, state["midlayer.post_attention_layernorm.weight"])
    h = h + (F.silu(mlp_in @ state["midlayer.mlp.gate_proj.weight"].T) * (mlp_in @ state["midlayer.mlp.up_proj.weight"].T)) \
        @ state["midlayer.mlp.down_proj.weight"].T
    draft = rms(h, state["norm.weight"]) @ state["lm_head.weight"].T
    full = torch.full((steps, config["vocab_size"]), float("-inf"))
    ids = torch.arange(len(state["d2t"])) + state["d2t"]
    full[:, ids] = draft
    return full


def inputs(target, steps: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, target.config.vocab_size, (steps,), generator=gen)
    features = torch.randn(steps, 3 * target.config.hidden_size, generator=gen)
    return tokens, features


def test_export_then_load_gives_the_same_drafts(target, tmp_path):
    head = reduced_head(target)
    save_eagle_head(head, tmp_path / "eagle", target)
    loaded = load_eagle_head(tmp_path / "eagle", target)
    tokens, features = inputs(target)
    assert torch.equal(first_draft_logits(head, target, tokens, features),
                       first_draft_logits(loaded, target, tokens, features))
    config = json.loads((tmp_path / "eagle" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["tie_word_embeddings"] is False and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["vocab_size"] == target.config.vocab_size and "rope_theta" in config


def test_a_full_vocabulary_head_comes_back_drafting_through_the_targets_live_head(target, tmp_path):
    head = random_head(target)  # draft_vocab_size 0: the target's own LM head
    save_eagle_head(head, tmp_path / "full", target)
    state = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(state["lm_head.weight"], target.head_weight)  # engines read a copy from the file
    loaded = load_eagle_head(tmp_path / "full", target)
    assert loaded.config.draft_vocab_size == 0 and loaded.draft_head is None  # ReSpec reads the target's
    tokens, features = inputs(target)
    assert torch.equal(first_draft_logits(head, target, tokens, features),
                       first_draft_logits(loaded, target, tokens, features))


def test_the_exported_file_follows_the_contract(target, tmp_path):
    save_eagle_head(reduced_head(target), tmp_path / "eagle", target, dtype=torch.bfloat16)
    state = load_file(str(tmp_path / "eagle" / "model.safetensors"))
    assert not any(name.startswith("model.") for name in state) and "embed_tokens.weight" not in state
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert state["t2d"].shape == (target.config.vocab_size,) and int(state["t2d"].sum()) == DRAFT_VOCAB
    assert state["fc.weight"].dtype == torch.bfloat16 and state["lm_head.weight"].shape[0] == DRAFT_VOCAB
    check_vocab_map(state["d2t"], state["t2d"])


VLLM_RENAMES = (("midlayer.", "layers.0."),)


def vllm_view(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM's loading of an EAGLE-3 draft: midlayer -> layers.0, a model. prefix on all but lm_head,
    d2t -> draft_id_to_target_id, t2d dropped, q/k/v and gate/up stacked into its fused parameters."""
    out = {}
    for name, tensor in state.items():
        if name == "t2d":
            continue
        for old, new in VLLM_RENAMES:
            name = name.replace(old, new)
        name = "draft_id_to_target_id" if name == "d2t" else name
        out[name if name.startswith(("lm_head", "draft_id")) else f"model.{name}"] = tensor
    for stacked, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                           ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
        prefix, family = "model.layers.0.", stacked.split(".")[0]
        names = [f"{prefix}{family}.{p}.weight" for p in parts]
        if all(n in out for n in names):
            out[f"{prefix}{stacked}.weight"] = torch.cat([out.pop(n) for n in names])
    return out


def vllm_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of vLLM's EAGLE-3 Llama draft model for ``config``."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["draft_vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    layer = "model.layers.0."
    return {"model.fc.weight": (hidden, 3 * hidden), f"{layer}input_layernorm.weight": (hidden,),
            f"{layer}hidden_norm.weight": (hidden,), f"{layer}self_attn.qkv_proj.weight": (q + 2 * kv, 2 * hidden),
            f"{layer}self_attn.o_proj.weight": (hidden, q), f"{layer}post_attention_layernorm.weight": (hidden,),
            f"{layer}mlp.gate_up_proj.weight": (2 * inter, hidden), f"{layer}mlp.down_proj.weight": (hidden, inter),
            "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden), "draft_id_to_target_id": (vocab,)}


def strict_load(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(state) & set(expected) if tuple(state[n].shape) != expected[n])
    if missing or extra or wrong:
        raise ValueError(f"missing {missing}, extra {extra}, mis-shaped {wrong}")


def sglang_view(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SGLang's loading: names with or without model., q/k/v and gate/up fused, d2t kept, t2d ignored."""
    out = {name.removeprefix("model."): t for name, t in state.items() if name != "t2d"}
    for stacked, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                           ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
        names = [f"midlayer.{stacked.split('.')[0]}.{p}.weight" for p in parts]
        if all(n in out for n in names):
            out[f"midlayer.{stacked}.weight"] = torch.cat([out.pop(n) for n in names])
    return out


def sglang_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    return {("d2t" if name == "draft_id_to_target_id" else
             name.removeprefix("model.").replace("layers.0.", "midlayer.")): shape
            for name, shape in vllm_parameters(config).items()}


def test_the_export_loads_strictly_as_vllm_and_sglang_read_it(target, tmp_path):
    save_eagle_head(reduced_head(target), tmp_path / "eagle", target)
    state = load_file(str(tmp_path / "eagle" / "model.safetensors"))
    config = json.loads((tmp_path / "eagle" / "config.json").read_text())
    strict_load(vllm_view(state), vllm_parameters(config))
    strict_load(sglang_view(state), sglang_parameters(config))
    # Negative controls: the emulation fails on a missing, an extra, a misnamed and a mis-shaped tensor.
    broken = [{k: v for k, v in state.items() if k != "d2t"}, {**state, "embed_tokens.weight": torch.zeros(3)},
              {("midlayer.attn.q_proj.weight" if k == "midlayer.self_attn.q_proj.weight" else k): v
               for k, v in state.items()}, {**state, "norm.weight": torch.zeros(5)}]
    for bad in broken:
        with pytest.raises(ValueError):
            strict_load(vllm_view(bad), vllm_parameters(config))


def contract_checkpoint(target, path, seed: int = 1) -> tuple[dict, dict]:
    """A SpecForge-layout checkpoint built from the contract alone (no ReSpec code), for ``target``."""
    c = target.config
    gen = torch.Generator().manual_seed(seed)
    hidden, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    ids = torch.arange(1, 2 * DRAFT_VOCAB + 1, 2)
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    state = {"fc.weight": w(hidden, 3 * hidden), "midlayer.input_layernorm.weight": 1 + w(hidden),
             "midlayer.hidden_norm.weight": 1 + w(hidden), "midlayer.self_attn.q_proj.weight": w(q, 2 * hidden),
             "midlayer.self_attn.k_proj.weight": w(kv, 2 * hidden), "midlayer.self_attn.v_proj.weight": w(kv, 2 * hidden),
             "midlayer.self_attn.o_proj.weight": w(hidden, q), "midlayer.post_attention_layernorm.weight": 1 + w(hidden),
             "midlayer.mlp.gate_proj.weight": w(c.intermediate_size, hidden),
             "midlayer.mlp.up_proj.weight": w(c.intermediate_size, hidden),
             "midlayer.mlp.down_proj.weight": w(hidden, c.intermediate_size), "norm.weight": 1 + w(hidden),
             "lm_head.weight": w(DRAFT_VOCAB, hidden), "d2t": ids - torch.arange(DRAFT_VOCAB), "t2d": t2d}
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": hidden, "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
              "hidden_act": "silu", "vocab_size": c.vocab_size, "draft_vocab_size": DRAFT_VOCAB,
              "tie_word_embeddings": False, "rope_theta": c.rope.theta, "max_position_embeddings": 256}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return state, config


def test_a_specforge_layout_checkpoint_drafts_as_the_contract_says(target, tmp_path):
    state, config = contract_checkpoint(target, tmp_path / "specforge")
    assert is_eagle_dir(tmp_path / "specforge")
    head = load_eagle_head(tmp_path / "specforge", target)
    assert head.config.fuse_layers == standard_fuse_layers(target.config.num_layers)
    tokens, features = inputs(target, seed=3)
    ours = first_draft_logits(head, target, tokens, features)
    want = contract_logits(state, config, target, tokens, features)
    allowed = torch.isfinite(want)
    assert torch.equal(torch.isfinite(ours), allowed)
    torch.testing.assert_close(ours[allowed], want[allowed], rtol=1e-4, atol=1e-4)


def test_an_inconsistent_vocabulary_map_is_refused_and_nothing_is_written(target, tmp_path):
    head = reduced_head(target)
    head.draft_to_target[3] = head.draft_to_target[2]  # two draft ids for one target id
    with pytest.raises(ValueError, match="d2t/t2d: inconsistent vocabulary map"):
        save_eagle_head(head, tmp_path / "eagle", target)
    assert not (tmp_path / "eagle").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("midlayer.hidden_norm.weight"), r"missing \['midlayer.hidden_norm.weight'\]"),
    (lambda s: s.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
    (lambda s: s.update({"norm.weight": torch.zeros(5)}), "norm.weight has shape"),
    (lambda s: s.update(t2d=torch.zeros_like(s["t2d"])), "inconsistent vocabulary map"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_problem(target, tmp_path, damage, message):
    state, _config = contract_checkpoint(target, tmp_path / "head")
    damage(state)
    save_file(state, str(tmp_path / "head" / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_eagle_head(tmp_path / "head", target)


def test_a_head_for_another_target_is_refused(target, tmp_path):
    contract_checkpoint(target, tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    for key, value, message in (("vocab_size", 1000, "vocabulary size 1000"), ("hidden_size", 128, "hidden_size 128"),
                                ("target_hidden_size", 999, "target_hidden_size 999")):
        (tmp_path / "head" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            load_eagle_head(tmp_path / "head", target)
    # Same width and vocabulary, another depth: the taps would be other layers of another model.
    save_eagle_head(reduced_head(target), tmp_path / "ours", target)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["respec"]["target"]["num_layers"] == target.config.num_layers
    config["respec"]["target"]["num_layers"] += 4
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^drafter: trained on the features of a {target.config.num_layers + 4}-layer"):
        load_eagle_head(tmp_path / "ours", target)


def test_an_older_respec_head_still_loads(target, tmp_path):
    """The former layout: ReSpec's names, no final norm of its own (the target's served)."""
    head = reduced_head(target, seed=4)
    own = {k: v for k, v in head.state_dict().items() if k != "norm.weight"}
    (tmp_path / "old").mkdir()
    config = {"architecture": "respec-eagle3", **{k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in head.config.__dict__.items()}}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in own.items()}, str(tmp_path / "old" / "model.safetensors"))
    loaded = load_eagle_head(tmp_path / "old", target)
    assert torch.equal(loaded.norm.weight, target.norm.weight)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in own.items())


def test_the_features_are_the_residual_stream_the_engines_tap(tmp_path):
    """Captured layer outputs at ``standard_fuse_layers`` equal transformers' output_hidden_states at
    2, L // 2 and L - 3 (the engines' convention), on an 8-layer model."""
    path = save_random_checkpoint(tmp_path / "deep", vocab=64, hidden=32, layers=8, init=0.2, seed=0)
    model, _ = load_model(path)
    taps = standard_fuse_layers(8)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, capture_layers=taps).captured
        hf = AutoModelForCausalLM.from_pretrained(path).eval()(ids, output_hidden_states=True).hidden_states
    for tap, hf_index in zip(taps, (2, 8 // 2, 8 - 3)):
        torch.testing.assert_close(ours[tap], hf[hf_index], rtol=1e-4, atol=1e-5)


def test_a_drafter_preset_loads_by_name_and_an_incomplete_one_is_named(target, tmp_path, monkeypatch):
    from respec.engine.drafters import make_drafter
    from respec.models import presets

    save_eagle_head(reduced_head(target), tmp_path / "heads" / "tiny-eagle3", target)
    monkeypatch.setattr(presets, "HEADS_DIR", tmp_path / "heads")
    monkeypatch.setitem(presets.DRAFTER_PRESETS, "tiny-eagle3", presets.DrafterPreset("tiny-eagle3", "tiny"))
    drafter = make_drafter("tiny-eagle3", target)
    assert drafter.name == "eagle" and drafter.head.config.draft_vocab_size == reduced_head(target).config.draft_vocab_size
    (tmp_path / "heads" / "tiny-eagle3" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="^drafter: preset 'tiny-eagle3': .* is incomplete; reinstall respec"):
        make_drafter("tiny-eagle3", target)
