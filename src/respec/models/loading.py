"""Load a decoder from an HF directory, a GGUF file or a preset name; save it back in HF format."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..utils.atomic import staged_dir
from .config import ModelConfig, read_hf_config
from .decoder import DecoderLM
from .presets import PRESETS, converted_dir, preset_gguf_path, preset_key
from .weights import hf_to_respec, load_into, respec_to_hf

SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A directory or .gguf path; preset names resolve to their cached HF directory."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    key = preset_key(str(model))
    if key is None:
        raise ValueError(f"model: {str(model)!r} is neither an existing path nor a known preset "
                         f"(presets: {', '.join(sorted(PRESETS))})")
    target = converted_dir(key)
    if not ((target / "model.safetensors").is_file() and (target / "config.json").is_file()):
        gguf = preset_gguf_path(key)
        print(f"converting the preset {key} from {gguf.name} into {target}, once (about 20 s)",
              file=sys.stderr, flush=True)
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """A preset's GGUF dequantized once into an HF directory (~15 s); later loads read that."""
    from transformers import AutoTokenizer

    model, _ = load_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_pretrained(model, target, tokenizer=tokenizer)


def load_model(model: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, Path]:
    """Return the model and the directory (or .gguf file) its tokenizer lives in."""
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        config, state = _read_gguf(path)
        source = path
    elif path.is_dir():
        config = read_hf_config(path)
        state = hf_to_respec(config, _read_hf_state(path), str(path))
        source = path
    else:
        raise ValueError(f"model: {path} is not a model directory or a .gguf file")
    with torch.device("meta"):  # no random init of weights we are about to overwrite
        decoder = DecoderLM(config, dtype=dtype)
    decoder = decoder.to_empty(device=device)
    decoder.init_rope()
    load_into(decoder, state, str(path))
    return decoder.eval(), source


@torch.no_grad()
def load_weights(model: DecoderLM, path: str | os.PathLike) -> None:
    """Overwrite ``model``'s weights in place (same tensors, so an engine sharing them sees the change)
    with those of a saved HF directory of the same architecture."""
    path = Path(path)
    load_into(model, hf_to_respec(model.config, _read_hf_state(path), str(path)), str(path))


def _read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    single, index, legacy = path / "model.safetensors", path / SAFETENSORS_INDEX, path / "pytorch_model.bin"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        return _read_sharded(path, index)
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(f"weights: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin in {path}")


def _read_sharded(path: Path, index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"weights: {index} has no valid weight_map ({err})") from err
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path / shard
        if not shard_path.is_file():
            raise ValueError(f"weights: shard {shard} listed in {index.name} is missing from {path}")
        state.update(_load_safetensors(shard_path))
    return state


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"weights: cannot read {file}: {err}") from err


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize through transformers' GGUF support (it also undoes llama.cpp's q/k permutation)."""
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        dtype=torch.float32)
    except Exception as err:  # transformers raises many types for bad files
        raise ValueError(f"model: cannot read GGUF file {path}: {err}") from err
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    state = hf_to_respec(config, hf_model.state_dict(), str(path))
    return config, state


def save_pretrained(model: DecoderLM, out_dir: str | os.PathLike, tokenizer: Any | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) atomically: the directory appears whole."""
    out = Path(out_dir)
    with staged_dir(out) as staging:
        config = {**model.config.to_hf(), "torch_dtype": str(model.dtype).removeprefix("torch."),
                  **(extra_config or {})}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.cpu() for k, v in respec_to_hf(model).items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return out
