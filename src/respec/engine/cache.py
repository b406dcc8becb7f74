"""Preallocated KV cache with one length per row.

Layout per layer: ``[rows, kv_heads, max_len, head_dim]``. The engine keeps its active rows in slots
``0..B-1`` so attention reads a plain slice (a view, no gather). A row's length says how many
positions hold committed tokens; anything beyond it is ignored by the attention mask and simply
overwritten later, which is how speculative decoding will roll back rejected drafts for free.
"""

from __future__ import annotations

import torch

from ..models.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (rows, config.num_kv_heads, max_len, config.head_dim)
        # Zeros, not empty: masked-out garbage could be NaN, and 0 * NaN poisons attention.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.rows, self.max_len = rows, max_len

    @staticmethod
    def bytes_needed(config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        return rows * max_len * per_token * torch.tensor([], dtype=dtype).element_size()

    def fits(self, rows: int, max_len: int) -> bool:
        return rows <= self.rows and max_len <= self.max_len

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of rows ``src`` into rows ``dst`` (index tensors)."""
        if length <= 0 or src.numel() == 0:
            return
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]
