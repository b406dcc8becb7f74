"""``respec bench``: our engine vs transformers ``generate`` on the same prompts, side by side.

Every arm decodes exactly ``new_tokens`` greedy tokens per row (EOS ignored) from the same chat
prompts; arms alternate within each repeat and the median is reported, so the machine's noise hits
both alike. At batch 1 we also report the memory-bandwidth floor: the weight bytes one decode step
must read divided by the measured read bandwidth of this machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.tasks import load_questions, question_source
from ..engine.llm import LLM
from ..engine.params import SamplingParams
from ..models.decoder import DecoderLM
from ..models.loading import resolve_model_path
from .common import run_header, sync


@dataclass
class BenchRow:
    system: str
    batch_size: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    speedup_vs_transformers: float | None = None
    floor_fraction: float | None = None


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes per second for summing a ``gib`` GiB fp32 tensor (median of ``repeats``)."""
    data = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def weight_bytes_per_step(model: DecoderLM) -> int:
    """Bytes of weights one decode step reads: every matrix once; an untied embedding only by rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.numel() * model.embed_tokens.element_size()
    return total


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_transformers_model(model_path: Path, llm: LLM):
    """The same weights through transformers' own implementation, for the baseline arm."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    directory = model_path.parent if kwargs else model_path
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=llm.model.dtype, **kwargs).eval()
    return hf.to(llm.model.device)


def _transformers_runner(hf, llm: LLM, prompts: list[list[int]], new_tokens: int):
    width = max(len(p) for p in prompts)
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=llm.model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=llm.model.device)

    def run() -> None:
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=pad)
        sync(llm)

    return run


def _respec_runner(llm: LLM, prompts: list[list[int]], new_tokens: int):
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)

    def run() -> None:
        llm.generate(prompts, params, progress=False)
        sync(llm)

    return run


def run_bench(model: str = "smollm2-135m", batch_sizes: tuple[int, ...] = (1, 8, 32), new_tokens: int = 128,
              repeats: int = 3, device: str | None = None, dtype: str | None = None,
              prompts_file: Path | None = None, with_transformers: bool = True) -> dict:
    llm = LLM(model, device=device, dtype=dtype, max_num_seqs=max(batch_sizes))
    questions = load_questions(max(batch_sizes), prompts_file)
    encoded = [llm.encode(q, chat=True) for q in questions]
    bandwidth = measure_read_bandwidth() if llm.model.device.type == "cpu" else None
    floor_s = weight_bytes_per_step(llm.model) / bandwidth if bandwidth else None
    hf = load_transformers_model(resolve_model_path(model), llm) if with_transformers else None
    rows: list[BenchRow] = []
    for batch in batch_sizes:
        prompts = encoded[:batch]
        arms = {"respec": _respec_runner(llm, prompts, new_tokens)}
        if hf is not None:
            arms["transformers"] = _transformers_runner(hf, llm, prompts, new_tokens)
        for run in arms.values():
            run()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(repeats):  # alternate arms so drift on a shared machine hits both
            for name, run in arms.items():
                times[name].append(_seconds(run))
        results = {name: statistics.median(ts) for name, ts in times.items()}
        for name, seconds in results.items():
            row = BenchRow(name, batch, new_tokens, seconds, batch * new_tokens / seconds)
            if "transformers" in results:
                row.speedup_vs_transformers = results["transformers"] / seconds
            if batch == 1 and floor_s:
                row.floor_fraction = floor_s / (seconds / new_tokens)
            rows.append(row)
    return {
        "model": model, "device": str(llm.model.device), "dtype": str(llm.model.dtype),
        "threads": torch.get_num_threads(), "prompts": question_source(prompts_file),
        "read_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "weight_bytes_per_step": weight_bytes_per_step(llm.model),
        "floor_ms_per_token": floor_s * 1e3 if floor_s else None,
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    lines = [run_header(result)]
    if result["read_bandwidth_gb_s"]:
        lines.append(f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s; weights read per step "
                     f"{result['weight_bytes_per_step'] / 1e6:.0f} MB; "
                     f"floor {result['floor_ms_per_token']:.1f} ms/token")
    lines.append(f"{'system':<14}{'batch':>6}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'vs HF':>8}{'floor':>8}")
    for r in result["rows"]:
        speed = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        floor = f"{100 * r['floor_fraction']:.0f}%" if r["floor_fraction"] else "-"
        lines.append(f"{r['system']:<14}{r['batch_size']:>6}{r['new_tokens']:>8}{r['seconds']:>10.2f}"
                     f"{r['tokens_per_s']:>10.1f}{speed:>8}{floor:>8}")
    return "\n".join(lines)
