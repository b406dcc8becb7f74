"""An EAGLE-3-style draft head: one decoder layer over fused target features (Li et al., 2025).

For a token at position ``t`` the head takes the target's outputs of three layers (low, middle,
high) at ``t``, fuses them to one hidden vector, pairs it with the embedding of the next token
``x_{t+1}`` and predicts ``x_{t+2}`` through the target's own final norm and LM head. When it drafts
further ahead it has no target features, so it feeds its own output hidden state back in place of
the fused one; training unrolls exactly that (training-time test) so the head learns from its own
inputs. An optional reduced draft vocabulary maps a smaller output layer onto target token ids.

The head owns only its own weights; the embedding, final norm, LM head and RoPE tables are the
target's, read through the target module (so they follow the actor as it trains).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.atomic import staged_dir
from .config import ModelConfig
from .decoder import MLP, DecoderLM, RMSNorm
from .linear import Linear
from .rope import apply_rope

EAGLE_ARCHITECTURE = "respec-eagle3"


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    vocab_size: int  # the target's
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    fuse_layers: tuple[int, int, int]  # target layers whose outputs are fused (low, middle, high)
    draft_vocab_size: int = 0  # 0 = the target's full vocabulary through its own LM head

    @classmethod
    def for_target(cls, target: ModelConfig, fuse_layers: tuple[int, int, int] | None = None,
                   draft_vocab_size: int = 0) -> EagleConfig:
        layers = target.num_layers
        # EAGLE-3's choice: an early, a middle and a late layer (0-based: 2nd, middle, 3rd from last).
        fuse = tuple(fuse_layers) if fuse_layers is not None else (
            min(1, layers - 1), layers // 2 - 1 if layers > 2 else 0, max(0, layers - 3))
        config = cls(hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=target.num_heads,
                     num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                     intermediate_size=target.intermediate_size, rms_norm_eps=target.rms_norm_eps,
                     fuse_layers=fuse, draft_vocab_size=draft_vocab_size)
        config.check_target(target)
        return config

    def check_target(self, target: ModelConfig) -> None:
        if self.vocab_size != target.vocab_size:
            raise ValueError(f"drafter: vocabulary size {self.vocab_size} does not match the target's "
                             f"{target.vocab_size}")
        for name, mine, theirs in (("hidden_size", self.hidden_size, target.hidden_size),
                                   ("num_kv_heads", self.num_kv_heads, target.num_kv_heads),
                                   ("head_dim", self.head_dim, target.head_dim)):
            if mine != theirs:
                raise ValueError(f"drafter: {name} {mine} does not match the target's {theirs}")
        if len(self.fuse_layers) != 3 or not all(0 <= i < target.num_layers for i in self.fuse_layers):
            raise ValueError(f"fuse_layers: need three layer indices in [0, {target.num_layers}), "
                             f"got {self.fuse_layers}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size: must be in [0, {self.vocab_size}], got {self.draft_vocab_size}")

    def as_model_config(self) -> ModelConfig:
        """The dimensions as a one-layer ModelConfig (for the KV cache and the MLP)."""
        return ModelConfig(architecture="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps)


class EagleHead(nn.Module):
    def __init__(self, config: EagleConfig, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.q_size, self.kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.fc = Linear(3 * dim, dim, dtype=dtype, device=device)
        self.embed_norm = RMSNorm(dim, eps, dtype, device)
        self.hidden_norm = RMSNorm(dim, eps, dtype, device)
        self.qkv_proj = Linear(2 * dim, self.q_size + 2 * self.kv_size, dtype=dtype, device=device)
        self.o_proj = Linear(self.q_size, dim, dtype=dtype, device=device)
        self.post_attn_norm = RMSNorm(dim, eps, dtype, device)
        self.mlp = MLP(config.as_model_config(), dtype, device)
        self.draft_head = Linear(dim, config.draft_vocab_size, dtype=dtype, device=device) \
            if config.draft_vocab_size else None
        # Target token id of each draft-vocabulary entry (empty when the full vocabulary is used).
        self.register_buffer("draft_to_target", torch.arange(config.draft_vocab_size, device=device))

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., 3 * D]`` concatenated target layer outputs -> ``[..., D]``."""
        return self.fc(features)

    def project(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries ``[B, H, T, hd]`` and keys/values ``[B, kvH, T, hd]`` of entries (x_{t+1}, h_t)."""
        batch, steps, _ = embeds.shape
        config = self.config
        x = torch.cat((self.embed_norm(embeds), self.hidden_norm(hidden)), dim=-1)
        qkv = self.qkv_proj(x).view(batch, steps, config.num_heads + 2 * config.num_kv_heads, config.head_dim)
        qk = apply_rope(qkv[:, :, : config.num_heads + config.num_kv_heads], cos, sin)
        q, k = qk[:, :, : config.num_heads], qk[:, :, config.num_heads:]
        v = qkv[:, :, config.num_heads + config.num_kv_heads:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               hidden: torch.Tensor) -> torch.Tensor:
        """Attention over ``keys/values`` then the residual MLP: the head's output hidden ``[B, T, D]``."""
        batch, _, steps, _ = q.shape
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=self.config.num_kv_heads != self.config.num_heads)
        h = hidden + self.o_proj(out.transpose(1, 2).reshape(batch, steps, self.q_size))
        return h + self.mlp(self.post_attn_norm(h))

    def head_logits(self, hidden: torch.Tensor, target: DecoderLM) -> torch.Tensor:
        """fp32 logits over the head's own output vocabulary (the reduced one if it has one)."""
        normed = target.norm(hidden)
        if self.draft_head is None:
            return target.logits(normed)
        return self.draft_head(normed).float()

    def logits(self, hidden: torch.Tensor, target: DecoderLM) -> torch.Tensor:
        """fp32 logits over the target's vocabulary (-inf outside a reduced draft vocabulary)."""
        logits = self.head_logits(hidden, target)
        if self.draft_head is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target, logits)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """config.json + model.safetensors, written to a staging directory and renamed into place."""
        out = Path(out_dir)
        with staged_dir(out) as staging:
            config = {"architecture": EAGLE_ARCHITECTURE, **asdict(self.config), **(extra or {})}
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, target: DecoderLM) -> EagleHead:
        path = Path(path)
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise ValueError(f"drafter: {path} needs config.json and model.safetensors")
        raw = json.loads(config_file.read_text())
        if raw.get("architecture") != EAGLE_ARCHITECTURE:
            raise ValueError(f"drafter: {config_file} is not an EAGLE head (architecture "
                             f"{raw.get('architecture')!r}, expected {EAGLE_ARCHITECTURE!r})")
        fields = EagleConfig.__dataclass_fields__
        config = EagleConfig(**{k: (tuple(v) if k == "fuse_layers" else v) for k, v in raw.items() if k in fields})
        config.check_target(target.config)
        head = cls(config, dtype=target.dtype, device=target.device)
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"drafter: cannot read {weights}: {err}") from err
        expected = head.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"drafter: {weights} lacks {', '.join(missing[:3])}")
        with torch.no_grad():
            for name, tensor in expected.items():
                if tuple(state[name].shape) != tuple(tensor.shape):
                    raise ValueError(f"drafter: {weights}: {name} has shape {list(state[name].shape)}, "
                                     f"expected {list(tensor.shape)}")
                tensor.copy_(state[name])
        return head.eval()
