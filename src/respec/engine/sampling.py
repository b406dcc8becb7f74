"""Pure batched sampling maths: logits -> the sampling distribution -> tokens and their logprobs.

Every function here takes tensors and returns tensors; nothing holds a model or a global RNG, so
the speculative verifier of a later stage can apply exactly the same processing to the target's p
and the drafter's q, and the tests check the maths without a model.

The sampling distribution of a row is softmax(logits / T) restricted by top-k, then by top-p (the
smallest set of most likely tokens whose mass reaches top_p), renormalised. Greedy rows (T == 0)
take the argmax and report logprobs under the unscaled distribution softmax(logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowParams:
    """Per-row sampling settings as tensors, plus host-side flags that let the hot path skip work."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    any_filter: bool  # some row has top-k or top-p on
    any_greedy: bool
    any_random: bool


def uniform_row_params(rows: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       device: torch.device | str = "cpu") -> RowParams:
    """The same settings for ``rows`` rows (the trainer's and the audit's recomputes)."""
    return RowParams(temperature=torch.full((rows,), float(temperature), device=device),
                     top_k=torch.full((rows,), int(top_k), device=device),
                     top_p=torch.full((rows,), float(top_p), device=device),
                     any_filter=top_k > 0 or top_p < 1, any_greedy=temperature == 0, any_random=temperature > 0)


def processed_logprobs(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Log-probabilities of the sampling distribution per row, ``-inf`` outside its support."""
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits.float() / temperature[:, None]
    if params.any_filter:
        # Greedy rows keep the unfiltered distribution, as documented above.
        sampled = params.temperature > 0
        top_k = torch.where(sampled, params.top_k, torch.zeros_like(params.top_k))
        top_p = torch.where(sampled, params.top_p, torch.ones_like(params.top_p))
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    return torch.log_softmax(scaled, dim=-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the row's top-k, then outside its top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    remove = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 are left alone: rounding could otherwise push mass_before to 1.0 and
    # drop tail tokens that must stay possible.
    remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_tokens(logprobs: torch.Tensor, uniforms: torch.Tensor | None, params: RowParams) -> torch.Tensor:
    """One token per row: argmax for greedy rows, inverse-CDF with ``uniforms`` (0, 1) otherwise.

    ``uniforms`` may be None when every row is greedy.
    """
    if not params.any_random:
        return logprobs.argmax(dim=-1)
    tokens = inverse_cdf(logprobs.double().exp(), uniforms)
    if params.any_greedy:
        tokens = torch.where(params.temperature > 0, tokens, logprobs.argmax(dim=-1))
    return tokens


def sample(logits: torch.Tensor, uniforms: torch.Tensor | None,
           params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their logprobs under each row's sampling distribution (NaN logprob = bad logits)."""
    logprobs = processed_logprobs(logits, params)
    tokens = sample_tokens(logprobs, uniforms, params)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn per row with probability proportional to non-negative ``weights [B, V]``.

    The CDF is built in float64 so tokens with tiny probability are drawn at their true rate.
    """
    cdf = weights.double().cumsum(dim=-1)
    targets = uniforms.to(cdf.dtype) * cdf[:, -1]
    # The first index whose CDF reaches the target: a zero-weight index (a flat CDF step) never is
    # first, and a uniform of exactly 1 lands on the last token with mass, not past the end.
    tokens = torch.searchsorted(cdf, targets[:, None]).squeeze(-1)
    return tokens.clamp_(max=weights.shape[-1] - 1)


def expand_params(params: RowParams, steps: int) -> RowParams:
    """Each row's settings repeated ``steps`` times, for logits flattened to ``[B * steps, V]``."""
    if steps == 1:
        return params
    return RowParams(
        temperature=params.temperature.repeat_interleave(steps),
        top_k=params.top_k.repeat_interleave(steps),
        top_p=params.top_p.repeat_interleave(steps),
        any_filter=params.any_filter, any_greedy=params.any_greedy, any_random=params.any_random)


def processed_logprobs_steps(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """``processed_logprobs`` for ``logits [B, T, V]``: every step of a row gets the row's settings."""
    batch, steps, vocab = logits.shape
    return processed_logprobs(logits.reshape(batch * steps, vocab), expand_params(params, steps)).view(
        batch, steps, vocab)
