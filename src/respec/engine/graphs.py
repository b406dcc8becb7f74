"""The decode step's target forward as one replayed CUDA graph per (rows bucket, tokens per row, context
bucket): a plain step (1 token per row) and a speculative verify (k + 1).

At small and mid batch a GPU decode step is bound by kernel launches (per layer: norms, projections,
RoPE, cache writes, attention), not by the weights; a CUDA graph replays them as one launch. A graph
holds static shapes, so a step runs at the next bucket of rows (1, 2, 4, 8, 16, 32, then multiples of
32: the buckets vLLM and SGLang capture) and of attended context (powers of two from 64, up to the
cache's length), on static input buffers. Padding rows are free cache slots (the active rows are
always slots 0..B-1): they decode token 0 at positions 0..T-1 there, which admission overwrites
before the slot is used, and their outputs are dropped. Padding context is masked. Each graph is captured
on the first step that needs it and kept while the cache is the same (a new cache drops them all).

``capture(fn) -> replay`` is injectable: on a GPU it records ``fn`` into a ``torch.cuda.CUDAGraph``
(``cuda_capture``); a CPU test passes a fake that runs ``fn`` eagerly, so the bucketing, padding and
book-keeping are tested where no GPU is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.decoder import DecoderLM, DecoderOutput
from .cache import KVCache

MIN_CONTEXT = 64
Capture = Callable[[Callable[[], tuple]], Callable[[], tuple]]


def rows_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 64, 96, ... up to ``max_rows`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_rows] + list(range(32, max_rows, 32))
    return sizes + [max_rows]


def bucket_of(size: int, buckets: list[int]) -> int:
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"graphs: {size} exceeds the largest bucket {buckets[-1]}")


def context_bucket(kv_len: int, max_len: int) -> int:
    """The next power of two >= ``kv_len`` (at least ``MIN_CONTEXT``), capped at the cache's length."""
    return min(max(MIN_CONTEXT, 1 << (max(kv_len, 1) - 1).bit_length()), max_len)


def target_forward(model: DecoderLM, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                   capture_layers: tuple[int, ...], graphs: DecodeGraphs | None = None) -> tuple[DecoderOutput, torch.Tensor]:
    """The target over ``tokens [B, T]`` of cache rows 0..B-1 and the logits ``[B, T, V]``: through
    ``graphs`` when given, else eagerly (a decode step, T = 1, and a verify, T = k + 1, alike)."""
    if graphs is not None:
        return graphs.run(tokens, positions, kv_len, capture_layers)
    out = model(tokens, positions, cache=cache, rows=slice(0, tokens.shape[0]), kv_len=kv_len,
                capture_layers=capture_layers)
    return out, model.logits(out.hidden)


def cuda_capture(fn: Callable[[], tuple], device: torch.device, pool=None) -> Callable[[], tuple]:
    """Warm ``fn`` up on a side stream, record it into a CUDA graph on ``device`` (from the memory pool
    ``pool``: every graph of an engine shares one), return its replay. Capture errors are local to
    this thread, so an online learner working on the GPU in another thread cannot void a capture."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn()

    def replay() -> tuple:
        with torch.cuda.device(device):
            graph.replay()
        return outputs

    return replay


@dataclass
class _Graph:
    tokens: torch.Tensor  # [rows, T] static inputs
    positions: torch.Tensor
    first_positions: torch.Tensor  # a padding row's positions: 0 .. T-1
    replay: Callable[[], tuple] | None = None
    filled: int = 0  # rows the last replay used: padding past a smaller batch is reset to token 0 at 0


class DecodeGraphs:
    """Decode and verify forwards through captured graphs (the LM head after them); ``captures`` counts
    graphs made."""

    def __init__(self, model: DecoderLM, cache: KVCache, capture: Capture | None = None) -> None:
        self.model, self.cache = model, cache
        self.capture = capture or self._cuda_capture
        self.pool = None  # one memory pool for all of this engine's graphs (made at the first capture)
        self.buckets = rows_buckets(cache.rows)
        self.graphs: dict[tuple[int, int, int, tuple[int, ...]], _Graph] = {}  # (rows, T, context, layers)
        self.captures = 0

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
            capture_layers: tuple[int, ...] = ()) -> tuple[DecoderOutput, torch.Tensor]:
        """``tokens [B, T]`` at ``positions [B, T]`` of cache rows 0..B-1 (T = 1: a plain step, k + 1: a
        verify): the forward's output and the logits ``[B, T, V]``, rows 0..B-1."""
        batch, width = tokens.shape
        key = (bucket_of(batch, self.buckets), width, context_bucket(kv_len, self.cache.max_len),
               tuple(capture_layers))
        graph = self.graphs.get(key) or self._buffers(*key)
        graph.tokens[:batch].copy_(tokens)
        graph.positions[:batch].copy_(positions)
        if batch < graph.filled:
            graph.tokens[batch:graph.filled].zero_()
            graph.positions[batch:graph.filled] = graph.first_positions[batch:graph.filled]
        graph.filled = batch
        if graph.replay is None:
            # Captured with this step's own inputs in place: the warm-up runs write the very keys and
            # values the step writes (a capture on dummy inputs would overwrite live rows' entries).
            graph.replay = self.capture(self._step(*key, graph))
            self.captures += 1
        hidden, captured = graph.replay()
        out = DecoderOutput(hidden=hidden[:batch], captured={layer: x[:batch] for layer, x in captured.items()})
        # The LM head runs outside the graph, on the real rows only: one large kernel, and a graph that
        # kept [rows, T, vocab] logits as its output would hold them for every bucket it was made for.
        return out, self.model.logits(out.hidden)

    def _cuda_capture(self, fn: Callable[[], tuple]) -> Callable[[], tuple]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return cuda_capture(fn, self.model.device, self.pool)

    def _buffers(self, rows: int, width: int, context: int, layers: tuple[int, ...]) -> _Graph:
        device = self.model.device
        tokens = torch.zeros(rows, width, dtype=torch.int64, device=device)
        # Padding rows hold token 0 at positions 0..width-1 of their free slot (see the module doc).
        first = torch.arange(width, device=device).expand(rows, width).contiguous()
        graph = self.graphs[(rows, width, context, layers)] = _Graph(tokens, first.clone(), first)
        return graph

    def _step(self, rows: int, width: int, context: int, layers: tuple[int, ...], graph: _Graph) -> Callable[[], tuple]:
        def step() -> tuple:
            out = self.model(graph.tokens, graph.positions, cache=self.cache, rows=slice(0, rows), kv_len=context,
                             capture_layers=layers)
            return out.hidden, out.captured

        return step
