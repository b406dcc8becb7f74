"""What the suite's sections share: the device, the model (one ReSpec engine on it, the transformers copy
on first use), the prompts and the drafters."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gpu_suite_setup import ModelChoice, choose_model

from respec import LLM
from respec.data.tasks import load_questions, question_source
from respec.engine.device import parse_device, parse_dtype
from respec.models.presets import DRAFTER_PRESETS, drafter_preset_path

RANDOM_NOTE = ("Random weights: the step costs are this model's, the acceptance (tau) and so the SD speed-ups "
               "are not those of a trained model.")


@dataclass
class Context:
    choice: ModelChoice
    device: torch.device
    dtype_name: str
    out: Path
    llm: LLM  # AR engine on the model; every other engine shares its weights
    prompts: list[list[int]]  # chat-formatted questions, as token ids
    prompt_source: str
    workdir: tempfile.TemporaryDirectory
    _hf: object = None
    _eagle: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        pad = self.llm.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def hf(self):
        """The same weights through transformers, in the same dtype and device (loaded once)."""
        if self._hf is None:
            from respec.bench.throughput import load_transformers_model

            self._hf = load_transformers_model(self.choice.path, self.llm)
        return self._hf

    def batch_prompts(self, batch: int) -> list[list[int]]:
        return [self.prompts[i % len(self.prompts)] for i in range(batch)]

    def self_draft(self) -> str:
        """The self-drafter: the target's first quarter of layers (at least one)."""
        return f"self:{max(1, self.llm.model.config.num_layers // 4)}"

    def eagle_preset(self) -> str | None:
        """A shipped EAGLE-3 head for this model, when the model is the preset and the head is installed."""
        for name, preset in DRAFTER_PRESETS.items():
            if preset.target == self.choice.name and not self.choice.random:
                try:
                    return name if drafter_preset_path(name) is not None else None
                except ValueError:
                    return None
        return None

    def drafters(self, eagle: bool) -> list[str]:
        """n-gram and self-draft; with ``eagle`` also the shipped head (none for random weights)."""
        found = self.eagle_preset() if eagle else None
        return ["ngram", self.self_draft()] + ([found] if found else [])

    def eagle_head_dir(self) -> str:
        """The online learner's head: the shipped one, else an untrained head saved for this model."""
        found = self.eagle_preset()
        if found:
            return str(drafter_preset_path(found))
        if "dir" not in self._eagle:
            from respec.models.eagle import EagleConfig, EagleHead
            from respec.models.eagle_format import save_eagle_head

            target = self.llm.model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                head = EagleHead(EagleConfig.for_target(target.config)).init_from_target(target)
            self._eagle["dir"] = save_eagle_head(head, Path(self.workdir.name) / "eagle-head", target)
        return str(self._eagle["dir"])

    def acceptance_note(self) -> str:
        return RANDOM_NOTE if self.choice.random else ""

    def model_record(self) -> dict:
        config = self.llm.model.config
        from gpu_suite_setup import SHAPES

        return {"name": self.choice.name, "random_weights": self.choice.random, "source": self.choice.source,
                "shape": SHAPES.get(self.choice.name),
                "layers": config.num_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                "parameters": sum(p.numel() for p in self.llm.model.parameters()), "prompts": self.prompt_source,
                "eagle_head": self.eagle_preset() or "untrained (only the GRPO section's online learner uses it)"}


def build_context(sizes, out: Path, device: str | None, dtype: str | None) -> Context:
    try:
        parsed = parse_device(device)
        torch_dtype = parse_dtype(dtype, parsed)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "profiles", ignore_errors=True)  # the controllers' cost profiles are timed in this run
    torch.manual_seed(0)
    workdir = tempfile.TemporaryDirectory(prefix="gpu-suite-")
    choice = choose_model(sizes.model, Path(workdir.name))
    rows = max(*sizes.batches, sizes.long_tail_rows, sizes.audit_rows, sizes.parity_prompts,
               sizes.grpo_prompts * sizes.grpo_group)
    llm = LLM(str(choice.path), device=parsed, dtype=torch_dtype, max_num_seqs=rows)
    llm.model.requires_grad_(False)
    questions = load_questions(rows)
    prompts = [llm.encode(q, chat=True) for q in questions]
    return Context(choice, parsed, str(torch_dtype).removeprefix("torch."), out, llm, prompts, question_source(),
                   workdir)
