"""One GRPO optimizer step over a rollout batch, in micro-batches with gradient accumulation.

The trainer's logprobs are the rollout's sampling distribution recomputed teacher-forced (the same
temperature / top-k / top-p processing as the engine, ``sampling.processed_logprobs``), so the ratio
is exactly 1 before the update and the rollout logprobs can serve as the old policy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine.sampling import processed_logprobs_steps, uniform_row_params
from ..models.decoder import DecoderLM
from .config import TrainConfig
from .grpo import policy_loss, response_logprobs


@dataclass
class UpdateBatch:
    prompt_ids: list[list[int]]
    token_ids: list[list[int]]  # responses
    logprobs: list[list[float]]  # rollout logprobs of the responses
    advantages: torch.Tensor  # [N]


@dataclass
class MicroBatch:
    ids: torch.Tensor  # [M, W] prompt + response, right-padded
    attention: torch.Tensor  # [M, W] bool
    predict_at: torch.Tensor  # [M, T] positions whose output predicts response token t
    tokens: torch.Tensor  # [M, T] response tokens (0 past the end)
    mask: torch.Tensor  # [M, T] bool
    old_logprobs: torch.Tensor  # [M, T]
    advantages: torch.Tensor  # [M]
    rows: list[int]  # indices into the UpdateBatch
    prompt_lens: list[int]
    lengths: list[int]  # prompt + response


@dataclass
class Capture:
    """What the online learner takes from the actor's training forward (no extra pass): the outputs of
    ``layers`` and the logits at the response positions, handed to ``fn(micro, captured, logits)``.
    ``extra_rows`` (indices) are rows the update skips (zero advantage) that the learner still wants:
    they get a forward without gradient."""

    layers: tuple[int, ...]
    fn: Callable[[MicroBatch, dict, torch.Tensor], None]
    extra_rows: Callable[[list[int]], list[int]] | None = None


def make_micro_batch(batch: UpdateBatch, rows: list[int], device: torch.device) -> MicroBatch:
    prompts = [batch.prompt_ids[r] for r in rows]
    responses = [batch.token_ids[r] for r in rows]
    width = max(len(p) + len(t) for p, t in zip(prompts, responses))
    steps = max(1, max(len(t) for t in responses))
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    attention = torch.zeros(len(rows), width, dtype=torch.bool)
    tokens = torch.zeros(len(rows), steps, dtype=torch.int64)
    old = torch.zeros(len(rows), steps)
    mask = torch.zeros(len(rows), steps, dtype=torch.bool)
    predict_at = torch.zeros(len(rows), steps, dtype=torch.int64)
    for i, (prompt, response, row) in enumerate(zip(prompts, responses, rows)):
        n, t = len(prompt), len(response)
        ids[i, : n + t] = torch.tensor(prompt + response)
        attention[i, : n + t] = True
        tokens[i, :t] = torch.tensor(response, dtype=torch.int64)
        old[i, :t] = torch.tensor(batch.logprobs[row])
        mask[i, :t] = True
        predict_at[i] = (n - 1 + torch.arange(steps)).clamp(max=width - 1)
    return MicroBatch(ids.to(device), attention.to(device), predict_at.to(device), tokens.to(device),
                      mask.to(device), old.to(device), batch.advantages[rows].to(device), list(rows),
                      [len(p) for p in prompts], [len(p) + len(t) for p, t in zip(prompts, responses)])


def sequence_logprobs(model: DecoderLM, micro: MicroBatch, config: TrainConfig, with_entropy: bool = False,
                      capture: Capture | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced logprobs ``[M, T]`` of the response tokens under the sampling distribution."""
    out = model(micro.ids, attention_mask=micro.attention, capture_layers=capture.layers if capture else ())
    rows = torch.arange(micro.ids.shape[0], device=micro.ids.device)[:, None]
    logits = model.logits(out.hidden[rows, micro.predict_at])
    if capture is not None:
        capture.fn(micro, out.captured, logits)
    r = config.rollout
    params = uniform_row_params(logits.shape[0], r.temperature, r.top_k, r.top_p, device=logits.device)
    logprobs_all = processed_logprobs_steps(logits, params)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = logprobs_all.exp()
            entropy = -(probs * torch.where(probs > 0, logprobs_all, torch.zeros_like(logprobs_all))).sum(-1)
    return response_logprobs(logprobs_all, micro.tokens), entropy


def grpo_update(model: DecoderLM, optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
                batch: UpdateBatch, reference: DecoderLM | None = None,
                capture: Capture | None = None, progress: bool = False) -> dict[str, float]:
    """Accumulate the loss over micro-batches, clip, step. Rows with zero advantage carry no policy
    gradient and are skipped unless a KL term needs them; the token normaliser still counts them.
    ``capture`` hands the forward's features and logits to the online learner; ``progress`` shows a
    bar over the micro-batches."""
    o = config.optim
    device = model.device
    total_tokens = float(sum(len(t) for t in batch.token_ids))
    wanted = [i for i in range(len(batch.token_ids))
              if batch.token_ids[i] and (reference is not None or float(batch.advantages[i]) != 0.0)]
    sums = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0}
    diffs: list[torch.Tensor] = []
    optimizer.zero_grad(set_to_none=True)
    starts = range(0, len(wanted), o.micro_batch_size)
    for start in tqdm(starts, desc="update", unit="micro-batch", leave=False, disable=not progress or len(starts) < 2):
        micro = make_micro_batch(batch, wanted[start: start + o.micro_batch_size], device)
        logprobs, entropy = sequence_logprobs(model, micro, config, with_entropy=True, capture=capture)
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref, _ = sequence_logprobs(reference, micro, config)
        parts = policy_loss(logprobs, micro.old_logprobs, micro.advantages, micro.mask, clip_low=o.clip_low,
                            clip_high=o.clip_high, ref_logprobs=ref, kl_coef=o.kl_coef, num_tokens=total_tokens)
        parts.loss.backward()
        sums["loss"] += float(parts.loss.detach())
        sums["clip"] += float(parts.clip_ratio)
        sums["kl"] += float(parts.kl)
        sums["entropy"] += float((entropy * micro.mask).sum())
        sums["tokens"] += float(micro.mask.sum())
        diffs.append((logprobs.detach() - micro.old_logprobs)[micro.mask].abs())
    if capture is not None and capture.extra_rows is not None:
        forwarded = set(wanted)
        _capture_skipped(model, config, batch, capture, [i for i in range(len(batch.token_ids)) if i not in forwarded])
    grad_norm = _finite_step(model, optimizer, o.grad_clip, sums["loss"], bool(wanted))
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    diff = torch.cat(diffs) if diffs else torch.zeros(0)
    scale = total_tokens / max(sums["tokens"], 1.0)  # clip ratio and KL were normalised by every token
    return {"train/loss": sums["loss"], "train/clip_ratio": sums["clip"] * scale, "train/kl": sums["kl"] * scale,
            "train/entropy": sums["entropy"] / max(sums["tokens"], 1.0), "train/lr": lr,
            "train/grad_norm": grad_norm, "train/rows_updated": float(len(wanted)),
            "train/logprob_diff_mean": float(diff.mean()) if diff.numel() else 0.0,
            "train/logprob_diff_max": float(diff.max()) if diff.numel() else 0.0}


def _finite_step(model: DecoderLM, optimizer: torch.optim.Optimizer, grad_clip: float, loss: float,
                 has_gradients: bool) -> float:
    """Clip and step; raise ``FloatingPointError`` instead of applying a non-finite update, and after a
    step that left a weight non-finite (the caller must not save those weights). Returns the gradient
    norm before clipping."""
    grad_norm = 0.0
    if has_gradients:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; "
                                 f"the update was not applied")
    optimizer.step()  # without gradients (no row to learn from) AdamW leaves every parameter as it is
    with torch.no_grad():  # one device sync for every parameter together
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    if not bool(finite.all()):
        names = [name for name, _ in model.named_parameters()]
        raise FloatingPointError(f"the update left {names[int((~finite).nonzero()[0])]} with NaN or inf")
    return grad_norm


@torch.no_grad()
def _capture_skipped(model: DecoderLM, config: TrainConfig, batch: UpdateBatch, capture: Capture,
                     skipped: list[int]) -> None:
    rows = [i for i in capture.extra_rows(skipped) if batch.token_ids[i]]
    for start in range(0, len(rows), config.optim.micro_batch_size):
        micro = make_micro_batch(batch, rows[start: start + config.optim.micro_batch_size], model.device)
        sequence_logprobs(model, micro, config, capture=capture)
