"""Drafters: what proposes speculative tokens (see base.py for the interface)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...models.decoder import DecoderLM
from ...models.eagle_format import is_eagle_dir
from ...models.presets import drafter_preset_path
from .base import Drafter, DraftSampler, DraftState, Proposal, TargetTrace, check_vocab
from .draft_model import DraftModelDrafter
from .eagle import EagleDrafter
from .ngram import NgramDrafter

__all__ = [
    "DraftModelDrafter",
    "DraftSampler",
    "DraftState",
    "Drafter",
    "NgramDrafter",
    "Proposal",
    "TargetTrace",
    "check_vocab",
    "make_drafter",
    "make_drafters",
]


def make_drafter(spec: Drafter | str | os.PathLike, target: DecoderLM, tokenizer: Any = None) -> Drafter:
    """A drafter from a user's description.

    ``"ngram"`` (prompt / sibling / history lookup), ``"self:N"`` (the target's first N layers), a
    Drafter instance, a drafter preset (``"smollm2-135m-eagle3"``: a head shipped with ReSpec), a
    directory holding an EAGLE-3 head (``respec drafter train`` writes one, SpecForge trains them), or a
    path or preset of a draft model with the target's tokenizer.
    """
    if isinstance(spec, Drafter):
        check_vocab(spec.vocab_size, target.config.vocab_size)
        return spec
    text = str(spec)
    if text == "ngram":
        return NgramDrafter(target.config.vocab_size)
    if text.startswith("self:"):
        layers = text.removeprefix("self:")
        if not layers.isdigit():
            raise ValueError(f"drafter: 'self:N' needs a layer count N, got {text!r}")
        drafter = DraftModelDrafter.truncated(target, int(layers))
        drafter.name = text
        return drafter
    preset = drafter_preset_path(text)
    if preset is not None or is_eagle_dir(text):
        return EagleDrafter.from_pretrained(str(preset or text), target)
    drafter_tokenizer = None
    if tokenizer is not None and Path(text).is_dir() and (Path(text) / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        drafter_tokenizer = AutoTokenizer.from_pretrained(text)
    try:
        return DraftModelDrafter.from_pretrained(text, target, tokenizer, drafter_tokenizer)
    except ValueError as err:  # the loader speaks of a model; here the model is the drafter
        message = str(err)
        raise ValueError(f"drafter: {message.removeprefix('model: ')}" if message.startswith("model: ")
                         else message) from None


def make_drafters(specs: Any, target: DecoderLM, tokenizer: Any = None) -> dict[str, Drafter]:
    """Named drafters from one description or a list of them (see ``make_drafter``); names are the
    drafters' own ("eagle", "ngram", "self:8", "draft"), made unique with a suffix when repeated."""
    if specs is None:
        return {}
    if isinstance(specs, (str, os.PathLike, Drafter)):
        specs = [specs]
    named: dict[str, Drafter] = {}
    for spec in specs:
        drafter = make_drafter(spec, target, tokenizer)
        name, suffix = drafter.name, 2
        while name in named:
            name, suffix = f"{drafter.name}{suffix}", suffix + 1
        named[name] = drafter
    if not named:
        raise ValueError("drafter: empty list; give at least one drafter or None")
    return named
