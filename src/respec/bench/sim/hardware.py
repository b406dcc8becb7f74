"""What a decode step costs on a named GPU: a roofline over a named model shape, plus fixed overheads.

A forward over ``tokens`` new positions in each of ``rows`` rows reads every weight once and the KV
cache of every row (``context`` entries in all), writes the new KV entries, and does
2 x params FLOPs per token plus the attention's 4 x context x width per token and layer. Its time is the
larger of the bytes over the achieved bandwidth and the FLOPs over the achieved bf16 rate (the
roofline), plus a launch overhead per forward (kernel launches, sampling, scheduling).

The EAGLE-3 head is one decoder layer of the target's width whose attention reads twice the width (the
token embedding next to the fused features), an input projection from three fused layers and an LM
head over a 32k draft vocabulary. A speculative step runs the head ``depth`` times (the first pass also
takes in the previous step's accepted block), verifies with one target forward and pays the serving
stack's fixed cost per speculative step (tree building, verification sampling, book-keeping).

Pure functions over frozen dataclasses; the fitted constants come from calibrate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

BF16 = 2  # bytes per weight and per cached value
DRAFT_VOCAB = 32_000  # EAGLE-3 heads' reduced vocabulary


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # HBM bytes/s, peak
    flops: float  # dense bf16 FLOP/s, peak


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as its weights and KV cache see it (biases and norms left out)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128

    def layer_params(self, attention_input: int | None = None) -> int:
        width_in = attention_input or self.hidden
        q_and_o = width_in * self.heads * self.head_dim + self.heads * self.head_dim * self.hidden
        k_and_v = 2 * width_in * self.kv_heads * self.head_dim
        return q_and_o + k_and_v + 3 * self.hidden * self.intermediate

    @property
    def forward(self) -> ForwardSpec:
        """The target: every layer and the LM head (read at every step, tied or not)."""
        params = self.layers * self.layer_params() + self.hidden * self.vocab
        return ForwardSpec(params, self.layers * 2 * self.kv_heads * self.head_dim * BF16,
                           self.layers * self.heads * self.head_dim)

    @property
    def eagle3_head(self) -> ForwardSpec:
        """The EAGLE-3 drafter of this target: fused-feature projection, one layer, draft LM head."""
        params = 3 * self.hidden * self.hidden + self.layer_params(2 * self.hidden) + self.hidden * DRAFT_VOCAB
        return ForwardSpec(params, 2 * self.kv_heads * self.head_dim * BF16, self.heads * self.head_dim)


@dataclass(frozen=True)
class ForwardSpec:
    params: int  # weights read per forward
    kv_bytes_per_token: int  # all layers
    attention_width: int  # heads x head_dim, summed over layers


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the GPU's peaks and the fixed cost of one target forward."""

    bandwidth: float = 0.80
    compute: float = 0.5311
    launch_s: float = 0.6899e-3


@dataclass(frozen=True)
class Stack:
    """A serving stack's speculative overheads (calibrate.py fits them to published speedups)."""

    name: str
    head_launch_s: float  # per drafter forward
    step_overhead_s: float  # per speculative step: tree/verify/sampling book-keeping


GPUS = {
    "H100": GPU("H100-SXM", 3.35e12, 989e12),
    "H200": GPU("H200", 4.8e12, 989e12),
    "A100": GPU("A100-80GB", 2.039e12, 312e12),
}

MODELS = {  # Hugging Face configs of the paper's models and Llama-3-8B
    "qwen2.5-3b": ModelShape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064),
    "qwen2.5-14b": ModelShape("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064),
    "llama-3-8b": ModelShape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
}

# Fitted by calibrate.py (``fit_paper_stack``, ``fit_sglang_stack``); the check in calibrate.py and
# tests/bench/test_sim.py reproduce the published points from these values.
H100_EFFICIENCY = Efficiency(bandwidth=0.80, compute=0.5311, launch_s=0.6899e-3)
PAPER_STACK = Stack("respec-paper (verl + SGLang, EAGLE-3 trees)", head_launch_s=0.777e-3, step_overhead_s=7.62e-3)
SGLANG_STACK = Stack("sglang-eagle3 (EAGLE-3 paper's SGLang run)", head_launch_s=0.544e-3, step_overhead_s=0.0)


def forward_seconds(spec: ForwardSpec, gpu: GPU, eff: Efficiency, rows: int, tokens: float,
                    context: float) -> float:
    """One forward's roofline time, no launch: ``tokens`` new positions per row, ``context`` cached
    entries summed over the rows."""
    new = rows * tokens
    memory = BF16 * spec.params + spec.kv_bytes_per_token * (context + new)
    flops = 2.0 * spec.params * new + 4.0 * spec.attention_width * new * (context / max(rows, 1) + tokens)
    return max(memory / (gpu.bandwidth * eff.bandwidth), flops / (gpu.flops * eff.compute))


@dataclass(frozen=True)
class StepCosts:
    """The step costs of one (GPU, model, serving stack): what the simulated clock advances by."""

    gpu: GPU
    model: ModelShape
    stack: Stack
    eff: Efficiency = H100_EFFICIENCY

    def target(self, rows: int, tokens: float, context: float) -> float:
        """A target forward (AR: 1 token per row; a verify: the block)."""
        return self.eff.launch_s + forward_seconds(self.model.forward, self.gpu, self.eff, rows, tokens, context)

    def head(self, rows: int, tokens: float, context: float) -> float:
        """One drafter forward."""
        return self.stack.head_launch_s + forward_seconds(self.model.eagle3_head, self.gpu, self.eff, rows,
                                                          tokens, context)

    def drafting(self, rows: int, depth: int, width: int, context: float) -> float:
        """``depth`` drafter forwards: the first over the accepted block plus the first draft (depth + 1
        positions per row at most), the others over ``width`` candidates per row (1 for a chain)."""
        first = self.head(rows, depth + 1, context)
        return first + (depth - 1) * self.head(rows, width, context)

    def chain_step(self, rows: int, k: int, context: float) -> tuple[float, float]:
        """(seconds of the whole step, of which drafting) with k chained drafts."""
        draft = self.drafting(rows, k, 1, context)
        return self.target(rows, k + 1, context) + draft + self.stack.step_overhead_s, draft

    def tree_step(self, rows: int, depth: int, width: int, nodes: int, context: float) -> float:
        """An EAGLE tree (s = depth, t = width, n = nodes verified per row)."""
        return self.target(rows, nodes, context) + self.drafting(rows, depth, width, context) \
            + self.stack.step_overhead_s

    def catch_up(self, rows: int, pending: float, reread: float, context: float) -> float:
        """A drafter extend over ``pending`` shadowed entries per row, after a read-only target pass over
        ``reread`` entries per row it could not shadow."""
        seconds = self.head(rows, pending, context) if pending > 0 else 0.0
        if reread > 0:
            seconds += self.target(rows, reread, context)
        return seconds

    def with_eff(self, **changes: float) -> StepCosts:
        return replace(self, eff=replace(self.eff, **changes))
