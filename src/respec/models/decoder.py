"""A Llama-family decoder (Llama/SmolLM2, Qwen2/2.5, Qwen3) in plain PyTorch.

One module serves the engine and the trainer. With a KV cache it runs any number of new tokens per
row at per-row positions (a decode step, a prefill, or a speculative verify of k+1 tokens); without
one it is an ordinary causal LM under autograd. It can hand back the hidden states of chosen layers,
which the EAGLE-3 drafter fuses and the online learner captures during the actor's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import ModelConfig
from .linear import Linear, column_major_empty, fast_linear
from .rope import apply_rope, rope_table

# RoPE rows past the model's context: a speculative verify pass pads a row near the end of its
# budget with draft slots at later positions; they are never emitted but still need a table entry.
ROPE_HEADROOM = 64


class LayerCache(Protocol):
    """What attention needs from a KV cache: per-layer ``[rows, kv_heads, max_len, head_dim]`` tensors."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class ForwardContext:
    """Per-forward tensors shared by every layer, built once instead of once per layer."""

    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor  # signed sin, see rope.rope_table
    mask: torch.Tensor | None  # bool [B, 1, T, S], True = may attend; None = plain causal
    cache: LayerCache | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    kv_len: int = 0
    # Row index into the cache viewed as [rows * kv_heads * max_len, head_dim] for each new
    # (row, head, token), in that order: one index_copy_ per layer writes all new keys.
    write_index: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # int64 [B, T], with a cache: what each new token may attend up to


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # final-norm hidden states [B, T, D]
    captured: dict[int, torch.Tensor]  # layer index -> that layer's output [B, T, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = native.rms_norm(x, self.weight, self.eps)  # one compiled call when decoding on CPU
        if fused is not None:
            return fused
        # Written out rather than F.rms_norm: on CPU the fused op costs ~3x more per call at decode
        # sizes. Reduced precision normalises in fp32 and scales after the cast back, as HF does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype=None, device=None) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias,
                               dtype=dtype, device=device)
        self.o_proj = Linear(self.q_size, config.hidden_size, dtype=dtype, device=device)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device) if config.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, steps, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(batch, steps, heads + 2 * kv_heads, self.head_dim)
        qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads:]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :heads]), self.k_norm(qk[:, :, heads:])), dim=2)
        if ctx.cache is not None:
            out = self._cached_attention(qk, v, ctx)
        else:
            qk = apply_rope(qk, ctx.cos, ctx.sin)  # q and k rotated together: one set of ops
            q, k, v = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                                 enable_gqa=kv_heads != heads).transpose(1, 2)
        return self.o_proj(out.reshape(batch, steps, self.q_size))

    def _cached_attention(self, qk: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Rotate ``qk [B, T, heads + kv_heads, D]``, write the new keys and values ``v`` into the cache
        and attend over each row's cache up to each token's position; ``[B, T, heads, D]``. Decode-sized
        calls run as two compiled calls on CPU (native.py), the rest as PyTorch ops."""
        keys, values = ctx.cache.keys[self.layer_index], ctx.cache.values[self.layer_index]
        first_row = ctx.rows.start or 0
        if ctx.positions is not None and qk.shape[1] <= native.attention_max_tokens():
            q = native.rope_and_cache(qk, v, ctx.cos, ctx.sin, keys, values, first_row, ctx.positions,
                                      read_only=ctx.write_index is None)
            if q is not None:
                fused = native.decode_attention(q, keys, values, first_row, ctx.positions, self.head_dim ** -0.5)
                if fused is not None:
                    return fused
        qk = apply_rope(qk, ctx.cos, ctx.sin)
        k, v = write_and_read_cache(keys, values, qk[:, :, self.num_heads:].transpose(1, 2), v.transpose(1, 2), ctx)
        out = F.scaled_dot_product_attention(qk[:, :, :self.num_heads].transpose(1, 2), k, v, attn_mask=ctx.mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return out.transpose(1, 2)


def write_and_read_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new keys/values ``[B, kv_heads, T, head_dim]`` into one layer's cache at the context's
    rows and positions; return that layer's keys/values of the rows up to ``ctx.kv_len``."""
    head_dim = k.shape[-1]
    if ctx.write_index is not None:  # None: a read-only pass over positions already in the cache
        key_cache.view(-1, head_dim).index_copy_(0, ctx.write_index, k.reshape(-1, head_dim))
        value_cache.view(-1, head_dim).index_copy_(0, ctx.write_index, v.reshape(-1, head_dim))
    return key_cache[ctx.rows, :, : ctx.kv_len], value_cache[ctx.rows, :, : ctx.kv_len]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype=None, device=None) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, dtype=dtype, device=device)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype=None, device=None) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.attn = Attention(config, layer_index, dtype, device)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), ctx)
        return x + self.mlp(self.post_attn_norm(x))


class DecoderLM(nn.Module):
    """The causal LM. ``forward`` returns final hidden states; ``logits`` applies the LM head."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.config = config
        # Column-major so a tied head streams fast; embedding lookups only gather a few rows.
        self.embed_tokens = nn.Parameter(column_major_empty(config.vocab_size, config.hidden_size, dtype, device))
        nn.init.normal_(self.embed_tokens, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, dtype=dtype, device=device)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables on the model's device, e.g. after building on ``meta``."""
        cos, sin = rope_table(self.config.rope, self.config.head_dim,
                              self.config.max_position_embeddings + ROPE_HEADROOM)
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits in fp32 (sampling and logprobs are computed in fp32 whatever the weights)."""
        return fast_linear(hidden, self.head_weight).float()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        rows: slice | None = None,
        kv_len: int | None = None,
        capture_layers: tuple[int, ...] = (),
        read_only: bool = False,
        num_layers: int | None = None,
    ) -> DecoderOutput:
        """Run the decoder.

        Without ``cache``: a causal pass over ``input_ids [B, T]`` (training, reference logits);
        ``attention_mask [B, T]`` marks real tokens when rows are right-padded.
        With ``cache``: ``input_ids [B, T]`` are new tokens of cache rows ``rows`` at ``positions
        [B, T]``; their keys/values are written there and attention spans cache positions
        ``< kv_len`` up to each token's own position.
        ``read_only``: the positions are already in the cache (a drafter catching up on tokens the
        target decoded earlier wants their hidden states): attend to the cached keys, write nothing.
        ``num_layers``: stop after that many layers (``hidden`` is then not final-normed: use
        ``captured``).
        """
        batch, steps = input_ids.shape
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
        if cache is None:
            ctx = self._training_context(positions, attention_mask)
        else:
            ctx = self._cache_context(positions, cache, rows or slice(0, batch), kv_len)
            if read_only:
                ctx.write_index = None
        x = self.embed(input_ids)
        captured: dict[int, torch.Tensor] = {}
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for index, layer in enumerate(layers):
            x = layer(x, ctx)
            if index in capture_layers:
                captured[index] = x
        return DecoderOutput(hidden=x if num_layers is not None else self.norm(x), captured=captured)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Callers keep positions below max_position_embeddings (the engine checks prompt + budget).
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(2)
        return cos, self.rope_sin[positions].to(self.dtype).unsqueeze(2)

    def _training_context(self, positions: torch.Tensor, attention_mask: torch.Tensor | None) -> ForwardContext:
        cos, sin = self._rope(positions)
        if attention_mask is None:
            return ForwardContext(cos=cos, sin=sin, mask=None)
        steps = positions.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=positions.device).tril()
        # Padded query rows still attend to themselves so softmax never sees an all-masked row.
        mask = causal & (attention_mask.bool()[:, None, :] | torch.eye(steps, dtype=torch.bool,
                                                                        device=positions.device))
        return ForwardContext(cos=cos, sin=sin, mask=mask[:, None])

    def _cache_context(self, positions: torch.Tensor, cache: LayerCache, rows: slice,
                       kv_len: int | None) -> ForwardContext:
        batch = positions.shape[0]
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        cos, sin = self._rope(positions)
        device = positions.device
        mask = (torch.arange(kv_len, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        kv_heads, max_len = self.config.num_kv_heads, cache.keys[0].shape[2]
        slot = torch.arange(rows.start, rows.start + batch, device=device)
        row_heads = slot[:, None] * kv_heads + torch.arange(kv_heads, device=device)[None, :]
        write_index = (row_heads[:, :, None] * max_len + positions[:, None, :]).reshape(-1)
        return ForwardContext(cos=cos, sin=sin, mask=mask, cache=cache, rows=rows, kv_len=kv_len,
                              write_index=write_index, positions=positions)
