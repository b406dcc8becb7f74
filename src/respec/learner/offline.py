"""``respec drafter train``: fit an EAGLE head to a target offline, from the target's own outputs.

1. The target answers a prompt set (built-in arithmetic, or a JSONL file with a ``question`` field).
2. One target pass per batch of sequences captures the fused-layer features and the logits.
3. The head is distilled with a TTT unroll over ``depths`` steps; per-depth top-1 agreement and the
   simulated acceptance length are reported after every epoch on a held-out slice; the head is saved.
A reduced draft vocabulary (the most frequent tokens of the responses) keeps the head's output
layer, the main cost of a draft step, small. ``examples`` keeps the answers of step 1 in a file
(answers.py) so later runs skip generating them; ``init_from`` continues training a saved head.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.tasks import arithmetic_questions, chat_prompt, load_questions, load_task
from ..engine.llm import LLM, Prompt
from ..engine.params import SamplingParams
from ..models.decoder import DecoderLM
from ..models.eagle import EagleConfig, EagleHead
from ..models.eagle_format import load_eagle_head, save_eagle_head
from .answers import Example, load_answer_files, load_answers, save_answers
from .config import OfflineConfig
from .distill import DistillBatch, DistillResult, ttt_forward


def collect_examples(llm: LLM, questions: list[Prompt], config: OfflineConfig) -> list[Example]:
    params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                            seed=config.seed)
    outputs = llm.generate(questions, params, chat=True, progress=True)
    return [Example(torch.tensor(o.prompt_token_ids + o.samples[0].token_ids), len(o.prompt_token_ids))
            for o in outputs]


def choose_draft_vocab(examples: list[Example], size: int, vocab_size: int, always: tuple[int, ...]) -> torch.Tensor:
    """The ``size`` most frequent response tokens (plus ``always``), sorted; empty = full vocabulary."""
    if size == 0 or size >= vocab_size:
        return torch.arange(0)
    counts = Counter()
    for ex in examples:
        counts.update(ex.tokens[ex.prompt_len:].tolist())
    chosen = list(dict.fromkeys([*always, *(t for t, _ in counts.most_common())]))[:size]
    if len(chosen) < size:  # pad with the lowest unused ids so the size is what was asked
        used = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in used][: size - len(chosen)]
    return torch.tensor(sorted(chosen))


@torch.no_grad()
def extract_targets(target: DecoderLM, examples: list[Example], fuse_layers: tuple[int, ...],
                    draft_vocab: torch.Tensor, batch_size: int = 8) -> None:
    """Fill each example's fused features and logits (over the draft vocabulary) from the target.

    Both are kept in bf16 and the logits only from ``prompt_len - 1`` on (the entries the loss
    trains), so thousands of answers fit in memory: ~2 MB per 250-token answer instead of ~4."""
    for start in tqdm(range(0, len(examples), batch_size), desc="target features", leave=False):
        chunk = examples[start: start + batch_size]
        ids, lengths = _pad([ex.tokens for ex in chunk])
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        out = target(ids.to(target.device), attention_mask=mask.to(target.device), capture_layers=fuse_layers)
        features = torch.cat([out.captured[layer] for layer in fuse_layers], dim=-1).cpu()
        if draft_vocab.numel():  # only the draft vocabulary's rows of the LM head: 1/12 of its work
            logits = torch.nn.functional.linear(out.hidden, target.head_weight[draft_vocab.to(target.device)])
        else:
            logits = target.logits(out.hidden)
        logits = logits.float().cpu()
        for row, ex in enumerate(chunk):
            n = int(lengths[row])
            first = ex.prompt_len - 1
            ex.features = features[row, :n].to(torch.bfloat16)
            ex.logits = logits[row, first:n].to(torch.bfloat16)


def _pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences])
    out = torch.zeros(len(sequences), int(lengths.max()), dtype=sequences[0].dtype)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out, lengths


def make_batch(examples: list[Example], device: torch.device) -> DistillBatch:
    tokens, lengths = _pad([ex.tokens for ex in examples])
    width = tokens.shape[1]
    features = torch.zeros(len(examples), width, examples[0].features.shape[-1])
    logits = torch.zeros(len(examples), width, examples[0].logits.shape[-1])
    for row, ex in enumerate(examples):
        features[row, : len(ex.tokens)] = ex.features.float()
        logits[row, ex.prompt_len - 1: len(ex.tokens)] = ex.logits.float()
    return DistillBatch(features=features.to(device), tokens=tokens.to(device), target_logits=logits.to(device),
                        prompt_lens=torch.tensor([ex.prompt_len for ex in examples], device=device),
                        lengths=lengths.to(device))


def evaluate(head: EagleHead, target: DecoderLM, examples: list[Example], config: OfflineConfig) -> dict:
    """Per-depth statistics averaged over ``examples`` (no gradient)."""
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(examples), config.batch_size):
            batch = make_batch(examples[start: start + config.batch_size], target.device)
            result = ttt_forward(head, target, batch, config.depths, config.temperature)
            for name in ("kl", "top1", "alpha"):
                totals.setdefault(name, []).append(getattr(result, name))
    summary = {name: [sum(v[d] for v in values) / len(values) for d in range(config.depths)]
               for name, values in totals.items()}
    summary["tau_sim"] = DistillResult(loss=torch.zeros(()), **summary).tau_sim
    return summary


def train_head(head: EagleHead, target: DecoderLM, train: list[Example], held_out: list[Example],
               config: OfflineConfig) -> list[dict]:
    """Adam with cosine decay over all epochs; the target stays frozen."""
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(config.seed)
    history = []
    for epoch in range(config.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        started, losses = time.perf_counter(), []
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}", leave=False)
        for start in bar:
            batch = make_batch([train[i] for i in order[start: start + config.batch_size]], target.device)
            result = ttt_forward(head, target, batch, config.depths, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(result.loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tau=f"{result.tau_sim:.2f}")
        report = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                  "seconds": time.perf_counter() - started, **evaluate(head, target, held_out or train[:8], config)}
        history.append(report)
        print(format_report(report))
    return history


def format_report(report: dict) -> str:
    top1 = " ".join(f"{a:.2f}" for a in report["top1"])
    alpha = " ".join(f"{a:.2f}" for a in report["alpha"])
    return (f"epoch {report['epoch']}: loss {report['train_loss']:.3f}  top-1 per step [{top1}]  "
            f"alpha per step [{alpha}]  simulated acceptance length {report['tau_sim']:.2f}  "
            f"({report['seconds']:.0f} s)")


def run_offline(config: OfflineConfig, llm: LLM | None = None) -> Path:
    torch.manual_seed(config.seed)
    llm = llm or LLM(config.model, device="cpu")
    target = llm.model
    for p in target.parameters():
        p.requires_grad_(False)
    examples = target_answers(llm, config)
    head, vocab = initial_head(target, examples, config, tuple(llm.engine.eos_token_ids))
    extract_targets(target, examples, head.config.fuse_layers, vocab)
    held = max(1, int(len(examples) * config.held_out)) if config.held_out and len(examples) > 1 else 0
    train, held_out = examples[held:], examples[:held]
    config.history = train_head(head, target, train, held_out, config)
    covered = _coverage(examples, vocab)
    out = save_eagle_head(head, config.out, target, extra={"training": {**asdict(config), "response_coverage": covered}})
    (out / "training.json").write_text(json.dumps({**asdict(config), "response_coverage": covered}, indent=2))
    print(f"draft vocabulary covers {covered:.1%} of response tokens; saved to {out}")
    return out


def target_answers(llm: LLM, config: OfflineConfig) -> list[Example]:
    """The target's answers to the training prompts: read from ``config.examples`` when that file
    exists, else generated (and written there when it is set)."""
    vocab_size = llm.model.config.vocab_size
    paths = [Path(p.strip()) for p in (config.examples or "").split(",") if p.strip()]
    if len(paths) > 1:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"examples: {', '.join(missing)} not found; several answers files are read, never "
                             f"written (write each with its own --examples run first)")
        examples = load_answer_files(paths, vocab_size)
        print(f"read {len(examples)} answers from {len(paths)} files, merged (num_prompts is not used)")
        return examples
    path = paths[0] if paths else None
    if path is not None and path.is_file():
        examples, header = load_answers(path, config.num_prompts, vocab_size)
        print(f"read {len(examples)} answers from {path} (generated by {header.get('model')!r} "
              f"at T = {header.get('temperature')})")
        return examples
    examples = collect_examples(llm, training_prompts(config), config)
    if path is not None:
        save_answers(path, examples, {"model": config.model, "vocab_size": vocab_size, "task": config.task,
                                      "prompts": config.prompts, "temperature": config.temperature,
                                      "max_new_tokens": config.max_new_tokens, "seed": config.seed})
        print(f"wrote {len(examples)} answers to {path}")
    return examples


def initial_head(target: DecoderLM, examples: list[Example], config: OfflineConfig,
                 eos: tuple[int, ...]) -> tuple[EagleHead, torch.Tensor]:
    """The head to train and its draft vocabulary (empty = the full one): a saved head to continue
    (``init_from``), or a new one whose output rows start as the target's for the answers' most
    frequent tokens."""
    if config.init_from:
        head = load_eagle_head(config.init_from, target).train()
        vocab = head.draft_to_target.clone() if head.config.draft_vocab_size else torch.arange(0)
        return head, vocab
    vocab = choose_draft_vocab(examples, config.draft_vocab_size, target.config.vocab_size, eos)
    eagle_config = EagleConfig.for_target(target.config, draft_vocab_size=int(vocab.numel()))
    head = EagleHead(eagle_config, dtype=target.dtype, device=target.device)
    if vocab.numel():
        head.draft_to_target.copy_(vocab)
    return head.init_from_target(target), vocab  # the target's final norm and output rows to start from


def training_prompts(config: OfflineConfig) -> list[Prompt]:
    """The prompts whose answers the head is trained on (see ``OfflineConfig.prompts`` and ``task``)."""
    if config.task is not None:
        problems, _ = load_task(config.task, config.num_prompts, 1, config.seed, config.prompts, tuple(config.levels))
        return [chat_prompt(problem) for problem in problems]
    if config.prompts == "arithmetic":
        return arithmetic_questions(config.num_prompts, config.seed)
    return load_questions(config.num_prompts, Path(config.prompts) if config.prompts else None, config.seed)


def _coverage(examples: list[Example], vocab: torch.Tensor) -> float:
    if not vocab.numel():
        return 1.0
    response = torch.cat([ex.tokens[ex.prompt_len:] for ex in examples])
    return float(torch.isin(response, vocab).float().mean())
