"""Exact chain verification of speculative drafts: pure batched maths, no model.

Row ``b`` proposes drafts ``x_1..x_k`` drawn from the drafter's processed distributions ``q_i`` (or
deterministically: ``q_i`` one-hot on ``x_i``). One target forward gives the processed distributions
``p_1..p_{k+1}`` at those positions (``p_{k+1}`` follows the last draft). Draft ``i`` is accepted with
probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the row emits a token from
``norm(max(0, p_i - q_i))`` and stops; when every draft is accepted it emits a bonus token from
``p_{k+1}``. Every emitted token is then distributed exactly as the target's sampling distribution
(Leviathan et al. 2023, Chen et al. 2023). Greedy rows accept while the draft is the target's argmax.

Deterministic drafts (n-gram, and any drafter without a q) given per-position uniforms use a coupling
with plain decoding instead: the target draws its own token at every position with the uniform plain
decoding would use there, a draft is accepted when it equals that draw (probability p(x), the same as
min(1, p/q) with q one-hot) and the row emits the draw after its accepted drafts. The emitted tokens
are then exactly plain decoding's samples, so a rollout does not depend on which drafts, arms, batch
or worker served it (up to float rounding of the logits).

All probabilities enter as log-probabilities of the *processed* distributions (temperature, top-k,
top-p already applied by ``sampling.processed_logprobs`` to both p and q), so the two sides can never
be processed differently. Any float dtype works; the tests run float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import inverse_cdf


@dataclass
class Verdict:
    """What each row emits after one verify step."""

    num_accepted: torch.Tensor  # [B] int64, accepted drafts (0..k); the row emits num_accepted + 1 tokens
    tokens: torch.Tensor  # [B, k+1]; entries 0..num_accepted are emitted, the rest is padding
    logprobs: torch.Tensor  # [B, k+1] target logprobs of ``tokens`` under the processed p


def verify_drafts(
    target_logprobs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_logprobs: torch.Tensor | None,
    accept_uniforms: torch.Tensor | None,
    resample_uniforms: torch.Tensor | None,
    greedy: torch.Tensor,
    draft_lens: torch.Tensor | None = None,
    *,
    all_greedy: bool = False,
) -> Verdict:
    """Verify ``draft_tokens [B, k]`` against ``target_logprobs [B, k+1, V]``.

    ``draft_logprobs [B, k, V]`` are the drafter's processed logprobs, or None for deterministic
    drafts (q one-hot). ``accept_uniforms [B, k]`` and ``resample_uniforms`` lie in (0, 1) and may be
    None when every row is greedy; ``resample_uniforms`` is ``[B]``, or ``[B, k+1]`` to use the
    uniform of the position where each row's emitted token lands (a counter-based RNG draws per
    position, and which position is known only after acceptance). ``greedy [B]`` bool marks temperature-0 rows.
    ``draft_lens [B]`` (default k) lets a row offer fewer drafts; the rest are never accepted and the
    token after its last accepted draft is then a bonus draw from p, not a residual one.
    ``all_greedy``: the caller knows every row is greedy, so missing uniforms need no check on the
    device (the engine knows it on the host: the check would be a device sync every step).
    """
    batch, k = draft_tokens.shape
    if target_logprobs.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_logprobs: expected [B={batch}, k+1={k + 1}, V], got {list(target_logprobs.shape)}")
    coupled = draft_logprobs is None and resample_uniforms is not None and resample_uniforms.dim() == 2
    missing = [] if coupled else [name for name, value in (("accept_uniforms", accept_uniforms),
                                                           ("resample_uniforms", resample_uniforms)) if value is None]
    if missing and not all_greedy and not bool(greedy.all()):
        raise ValueError(f"{missing[0]}: required when some row samples (temperature > 0)")
    offered = torch.arange(k, device=draft_tokens.device)[None, :] < (
        draft_lens[:, None] if draft_lens is not None else k)
    rows = torch.arange(batch, device=draft_tokens.device)
    if coupled:
        # Deterministic drafts: the target's own draw at every position, with the uniform plain
        # decoding uses there; a draft is accepted when it is that draw (probability p(x), as u < p(x)),
        # and the token after the accepted ones is the draw itself. The tokens are then those plain
        # decoding would sample, whichever drafts were offered.
        chain = _coupled_chain_lazy if target_logprobs.device.type == "cpu" else _coupled_chain
        num_accepted, next_token = chain(target_logprobs, draft_tokens, resample_uniforms, greedy, offered)
        return _verdict(draft_tokens, target_logprobs, num_accepted, next_token)
    accepted = offered & _accept_mask(target_logprobs[:, :k], draft_tokens, draft_logprobs, accept_uniforms, greedy)
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    rejected = num_accepted < (draft_lens if draft_lens is not None else k)
    if resample_uniforms is not None and resample_uniforms.dim() == 2:
        resample_uniforms = resample_uniforms.gather(1, num_accepted[:, None]).squeeze(1)
    next_token = _next_token(target_logprobs[rows, num_accepted], draft_tokens, draft_logprobs, num_accepted,
                             rejected, resample_uniforms, greedy)
    return _verdict(draft_tokens, target_logprobs, num_accepted, next_token)


def _coupled_chain(target_logprobs: torch.Tensor, draft_tokens: torch.Tensor, uniforms: torch.Tensor,
                   greedy: torch.Tensor, offered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafts, next token) per row, the target's draw taken at all k + 1 positions at once:
    no host sync (GPUs)."""
    batch, k = draft_tokens.shape
    own = target_draws(target_logprobs, uniforms)
    accepted = offered & torch.where(greedy[:, None], draft_tokens == target_logprobs[:, :k].argmax(dim=-1),
                                     draft_tokens == own[:, :k])
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(batch, device=draft_tokens.device)
    return num_accepted, torch.where(greedy, target_logprobs[rows, num_accepted].argmax(dim=-1), own[rows, num_accepted])


def _coupled_chain_lazy(target_logprobs: torch.Tensor, draft_tokens: torch.Tensor, uniforms: torch.Tensor,
                        greedy: torch.Tensor, offered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``_coupled_chain``, drawing position i only for the rows whose drafts before it were
    all accepted: on the CPU the float64 inverse CDF over the vocabulary is the cost, and most rows stop
    early (a host sync per position costs nothing there)."""
    batch, k = draft_tokens.shape
    offered = offered.expand(batch, k)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    next_token = torch.zeros(batch, dtype=torch.int64)
    alive = torch.arange(batch)
    for position in range(k + 1):
        logprobs = target_logprobs[alive, position]
        own = torch.where(greedy[alive], logprobs.argmax(dim=-1),
                          target_draws(logprobs[:, None], uniforms[alive, position, None])[:, 0])
        if position < k:
            match = offered[alive, position] & (draft_tokens[alive, position] == own)
        else:
            match = torch.zeros_like(alive, dtype=torch.bool)
        stop = alive[~match]
        num_accepted[stop], next_token[stop] = position, own[~match]
        alive = alive[match]
        if alive.numel() == 0:
            break
    return num_accepted, next_token


def target_draws(target_logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``[B, k+1]``: the token the target samples at each position from ``uniforms [B, k+1]``, exactly as
    plain decoding does (``sampling.sample_tokens``: the inverse CDF of the processed p in float64)."""
    batch, width, vocab = target_logprobs.shape
    flat = target_logprobs.reshape(batch * width, vocab).double().exp()
    return inverse_cdf(flat, uniforms.reshape(-1)).view(batch, width)


def _verdict(draft_tokens: torch.Tensor, target_logprobs: torch.Tensor, num_accepted: torch.Tensor,
             next_token: torch.Tensor) -> Verdict:
    batch = draft_tokens.shape[0]
    rows = torch.arange(batch, device=draft_tokens.device)
    tokens = torch.cat((draft_tokens, draft_tokens.new_zeros(batch, 1)), dim=1)
    tokens[rows, num_accepted] = next_token
    logprobs = target_logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    return Verdict(num_accepted=num_accepted, tokens=tokens, logprobs=logprobs)


def _accept_mask(target_logprobs: torch.Tensor, draft_tokens: torch.Tensor, draft_logprobs: torch.Tensor | None,
                 accept_uniforms: torch.Tensor | None, greedy: torch.Tensor) -> torch.Tensor:
    """[B, k] bool: would draft i be accepted, judged on its own (the chain is cut by the caller)."""
    greedy_ok = draft_tokens == target_logprobs.argmax(dim=-1)
    if accept_uniforms is None:  # every row greedy (checked by verify_drafts)
        return greedy_ok
    log_p = target_logprobs.gather(-1, draft_tokens[..., None]).squeeze(-1)
    log_q = (draft_logprobs.gather(-1, draft_tokens[..., None]).squeeze(-1) if draft_logprobs is not None
             else torch.zeros_like(log_p))
    # u < p/q, compared in log space: no division, and q(x) = 0 (a drafter that proposed a token it
    # gave no mass) reads as ratio +inf, i.e. accept, matching min(1, p/q) with the limit taken.
    # float64: in float32 a uniform just below 1 rounds to 1 and log u = 0 would reject a draft that
    # must always be accepted (p(x) >= q(x)).
    sampled_ok = torch.log(accept_uniforms.double()) < log_p.double() - log_q.double()
    return torch.where(greedy[:, None], greedy_ok, sampled_ok)


def _next_token(p_logprobs: torch.Tensor, draft_tokens: torch.Tensor, draft_logprobs: torch.Tensor | None,
                position: torch.Tensor, rejected: torch.Tensor, uniforms: torch.Tensor | None,
                greedy: torch.Tensor) -> torch.Tensor:
    """The token emitted after the accepted drafts: residual draw if rejected, else a bonus draw."""
    argmax = p_logprobs.argmax(dim=-1)
    if uniforms is None:  # every row greedy (checked by verify_drafts)
        return argmax
    batch, k = draft_tokens.shape
    rows = torch.arange(batch, device=draft_tokens.device)
    p = p_logprobs.double().exp()
    q = torch.zeros_like(p)  # k == 0: nothing was drafted, nothing can be rejected
    if k > 0:
        at = position.clamp(max=k - 1)
        if draft_logprobs is not None:
            q = draft_logprobs[rows, at].double().exp()
        else:
            q[rows, draft_tokens[rows, at]] = 1.0
    residual = (p - q).clamp_(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # Mass 0 only when p == q up to rounding, where rejection has probability 0: fall back to p.
    use_residual = rejected[:, None] & (mass > 0)
    weights = torch.where(use_residual, residual, p)
    return torch.where(greedy, argmax, inverse_cdf(weights, uniforms))

