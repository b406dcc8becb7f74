"""Helpers the test modules share: prompts, random drafter heads and checkpoints, chi-square tests,
the SD-vs-AR sampling harness and the tiny training config (fixtures live in conftest.py)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from respec.bench.audit import chi_square_p_value as pooled_chi_square
from respec.bench.audit import p_value as chi_square_survival
from respec.engine import Engine, Request, SamplingParams
from respec.engine.drafters import make_drafter
from respec.models.eagle import EagleConfig, EagleHead
from respec.rl.config import load_config


def ragged_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 2..19 random tokens above the three special ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 20, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]


def random_head(target, draft_vocab_size: int = 0, seed: int = 0, scale: float = 0.2) -> EagleHead:
    """An EAGLE head for ``target`` with weights of std ``scale`` (larger than the default init, so drafts
    are not all alike) and the target's final norm; a reduced draft vocabulary maps onto ids 0..Vd-1."""
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.for_target(target.config, draft_vocab_size=draft_vocab_size))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, scale)
        head.norm.weight.copy_(target.norm.weight)  # the final norm as a trained head starts it
        if draft_vocab_size:
            head.draft_to_target.copy_(torch.arange(draft_vocab_size))
    return head


def save_random_checkpoint(directory: Path, *, vocab: int, hidden: int, layers: int, init: float,
                           seed: int) -> Path:
    """A random Llama checkpoint without tokenizer (make_tiny_checkpoint fixes the vocabulary at 259)."""
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init, tie_word_embeddings=False)
    with torch.random.fork_rng():  # leave the global RNG as other tests expect it
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------- chi-square tests

def goodness_of_fit(counts, expected) -> float:
    """P-value of observed ``counts`` against ``expected`` counts (the audit's pooling: rare cells pooled
    until the pool expects >= 5; a sample where nothing was expected gives p = 0)."""
    chi2, dof = pooled_chi_square(torch.as_tensor(np.asarray(counts, dtype=np.float64)),
                                  torch.as_tensor(np.asarray(expected, dtype=np.float64)))
    return chi_square_survival(chi2, dof)


def two_sample_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square test that two samples of cell ids come from one distribution; cells whose expected
    count is below 5 in either sample are pooled into one. P-value = Q(df/2, chi2/2)."""
    _, inverse = torch.unique(torch.cat((a, b)), return_inverse=True)
    counts = torch.stack((torch.bincount(inverse[: len(a)], minlength=int(inverse.max()) + 1),
                          torch.bincount(inverse[len(a):], minlength=int(inverse.max()) + 1))).double()
    sizes = counts.sum(dim=1, keepdim=True)
    share = sizes / sizes.sum()
    rare = (counts.sum(dim=0) * share.min() < 5)
    table = counts[:, ~rare]
    if rare.any():
        table = torch.cat((table, counts[:, rare].sum(dim=1, keepdim=True)), dim=1)
    expected = table.sum(dim=0, keepdim=True) * share
    chi2 = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


# ------------------------------------------------------------- SD vs AR samples of a small peaky model

N_SAMPLES = 100_000  # per side (SD and AR)
CHUNK = 10_000  # rows per engine batch (and samples per generate call)
SMALL_VOCAB = 32
DISTRIBUTION_P_LIMIT = 1e-3  # below it, two samples (or a sample and its law) differ


def generate_samples(model, prompts: list[list[int]], temperature: float, max_new_tokens: int, label: str,
                     drafter: str | None = None, k: int | None = None) -> tuple[torch.Tensor, Engine]:
    """N_SAMPLES rows ``[prompt index, token 1, ...]``, split evenly over the prompts. Each generate call
    holds one wave of CHUNK rows from every prompt at once (ragged lengths in one batch); every request has
    its own seed, derived from ``label`` so that SD and AR samples are independent."""
    engine = Engine(model, max_num_seqs=CHUNK, drafter=make_drafter(drafter, model) if drafter else None,
                    speculative=k)
    per_request, base = CHUNK // len(prompts), zlib.crc32(label.encode()) % 2**30
    rows = []
    for wave in range(N_SAMPLES // CHUNK):
        requests = [Request(prompt, SamplingParams(n=per_request, temperature=temperature, ignore_eos=True,
                                                   max_new_tokens=max_new_tokens, seed=base + wave * len(prompts) + i))
                    for i, prompt in enumerate(prompts)]
        for i, seqs in enumerate(engine.generate(requests)):
            tokens = np.array([seq.token_ids for seq in seqs], dtype=np.int64)
            rows.append(np.concatenate((np.full((len(seqs), 1), i), tokens), axis=1))
    return torch.from_numpy(np.concatenate(rows)), engine


def cells(samples: torch.Tensor, columns: slice) -> torch.Tensor:
    """One integer per sample: (prompt index, tokens in ``columns``) in mixed radix."""
    ids = samples[:, 0].clone()
    for column in samples[:, columns].T:
        ids = ids * SMALL_VOCAB + column
    return ids


_AR_SAMPLES: dict[tuple[float, int], torch.Tensor] = {}


def prompts_for(batch: int) -> list[list[int]]:
    return ragged_prompts(batch, SMALL_VOCAB, seed=19) if batch > 1 else [[5, 17, 9, 23, 11]]


def ar_samples(model, temperature: float, batch: int) -> torch.Tensor:
    """AR reference, 6 tokens (its first 3 serve the k = 1 runs); shared by the k values."""
    key = (temperature, batch)
    if key not in _AR_SAMPLES:
        _AR_SAMPLES[key] = generate_samples(model, prompts_for(batch), temperature, 6, f"ar-{temperature}-{batch}")[0]
    return _AR_SAMPLES[key]


# ----------------------------------------------------------------------------------------- training

def char_class_reward(texts: list[str], gold: list[str]) -> list[float]:
    """Toy task: the share of characters whose code point is a multiple of 4 (about 0.25 for the random
    tiny model; a policy can push it towards 1)."""
    return [sum(1 for c in t if ord(c) % 4 == 0) / len(t) if t else 0.0 for t in texts]


def tiny_config(model, out_dir, *overrides: str):
    """A two-step GRPO run of the tiny model with AR rollouts; ``overrides`` change any of it."""
    return load_config(None, [
        f"model={model}", f"out_dir={out_dir}", "device=cpu", "steps=2", "eval_every=0", "checkpoint_every=0",
        "task.levels=[1]", "task.num_train=64", "task.num_eval=4", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=8", "rollout.temperature=1.0", "rollout.speculative=off",
        "optim.lr=1e-2", "optim.micro_batch_size=3", "optim.warmup_steps=0", *overrides])
