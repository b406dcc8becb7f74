"""An EAGLE-3 draft head: one decoder layer over fused target features (Li et al., 2025).

For a token at position ``t`` the head takes the residual stream of three target layers (low,
middle, high) at ``t``, fuses them to one hidden vector, pairs it with the embedding of the next token
``x_{t+1}`` and predicts ``x_{t+2}`` through its own final norm and LM head. When it drafts further
ahead it has no target features, so it feeds its own output hidden state (taken before the final
norm) back in place of the fused one; training unrolls exactly that (training-time test). A reduced
draft vocabulary maps a smaller output layer onto target token ids.

The embedding and RoPE tables are the target's, read through the target module (so they follow the
actor as it trains); a head without a reduced vocabulary uses the target's LM head too. The layers
the features come from are the inference engines' convention (``standard_fuse_layers``), so a head
trained here drafts in SGLang and vLLM, and theirs here (the checkpoint format: eagle_format.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoder import MLP, DecoderLM, RMSNorm
from .linear import Linear
from .rope import apply_rope


def standard_fuse_layers(num_layers: int) -> tuple[int, int, int]:
    """The layers EAGLE-3 engines fuse, as ``DecoderLM`` capture indices: SGLang and vLLM take the
    residual stream entering layers 2, L // 2 and L - 3 (transformers' ``output_hidden_states[i]``),
    which is the output of layers 1, L // 2 - 1 and L - 4 (clamped into a small model's range)."""
    last = num_layers - 1
    return min(1, last), min(max(num_layers // 2 - 1, 0), last), min(max(num_layers - 4, 0), last)


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
    draft_vocab_size: int = 0  # 0 = the target's full vocabulary through the target's LM head

    @classmethod
    def for_target(cls, target: ModelConfig, fuse_layers: tuple[int, int, int] | None = None,
                   draft_vocab_size: int = 0) -> EagleConfig:
        fuse = tuple(fuse_layers) if fuse_layers is not None else standard_fuse_layers(target.num_layers)
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
        self.norm = RMSNorm(dim, eps, dtype, device)  # before the LM head; the fed-back hidden skips it
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

    @torch.no_grad()
    def init_from_target(self, target: DecoderLM) -> EagleHead:
        """Start the final norm and the draft vocabulary's output rows as the target's own."""
        self.norm.weight.copy_(target.norm.weight)
        if self.draft_head is not None:
            self.draft_head.weight.copy_(target.head_weight[self.draft_to_target.to(target.device)])
        return self

    def head_logits(self, hidden: torch.Tensor, target: DecoderLM) -> torch.Tensor:
        """fp32 logits over the head's own output vocabulary (the reduced one if it has one)."""
        normed = self.norm(hidden)
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
