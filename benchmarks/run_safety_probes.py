"""Faults and bad inputs a new user meets, run against one revision: what each one gives.

Each probe runs ``respec`` (or a line of Python) at the revision in a fresh temporary directory, with
the real SmolLM2 model and tiny rollout settings, and records the exit code, the last line of stderr,
the seconds until the process ended and whether the model was loaded (a probe that should be refused
before the model loads must not reach it). ``revision_ab.checkout`` provides the revision
(``WORKTREE``: the files as they are).

    python benchmarks/run_safety_probes.py bd0a6eb --out probes-before.json
    python benchmarks/run_safety_probes.py WORKTREE --out probes-after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revision_ab import checkout  # noqa: E402

SETTINGS = ["rollout.speculative=off", "eval_every=0", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "rollout.max_num_seqs=4", "checkpoint_every=1"]
CLI = "import sys; from respec.cli import main; sys.exit(main(sys.argv[1:]))"


class Probe:
    def __init__(self, src: Path, work: Path) -> None:
        self.src, self.work = src, work

    def respec(self, *argv: str, wait: bool = True):
        env = {**os.environ, "PYTHONPATH": str(self.src), "PYTHONWARNINGS": "default"}
        command = [sys.executable, "-c", CLI, *argv]
        if not wait:
            return subprocess.Popen(command, cwd=self.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=self.work, env=env, capture_output=True, text=True)
        return outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)

    def python(self, code: str):
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        done = subprocess.run([sys.executable, "-c", code], cwd=self.work, env=env, capture_output=True, text=True)
        return outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def outcome(code: int, out: str, err: str, seconds: float) -> dict:
    lines = [line for line in err.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line.startswith(("  ", "\r"))), "")
    warned = [line.split("Warning: ", 1)[1][:200] for line in lines if "Warning: " in line]
    return {"exit": code, "seconds": round(seconds, 2), "traceback": "Traceback" in err,
            "stderr_last": last[:240], "stdout_last": (out.strip().splitlines() or [""])[-1][:200],
            "warnings": warned}


def checksums(directory: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under ``directory`` matching ``pattern`` (the lock file aside)."""
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob(pattern)) if f.is_file() and f.name != ".lock"}


def wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)


def probes(p: Probe) -> dict[str, dict]:
    """Each fault and bad input, with the tiny settings on the revision's own arithmetic config."""
    S = ["--config", str(p.src.parent / "configs" / "smollm2-arith.yaml"), *SETTINGS]  # noqa: N806
    results = {}
    p.respec("train", *S, "steps=2", "out_dir=A")
    before = checksums(p.work / "A")
    r = p.respec("train", *S, "steps=1", "keep_last=1", "seed=7", "out_dir=A")
    r["earlier run untouched"] = checksums(p.work / "A") == before
    results["1. fresh run into an existing out_dir"] = r

    first = p.respec("train", *S, "steps=3", "out_dir=B", wait=False)
    wait_for(p.work / "B" / "metrics.jsonl")  # the first run has written its first step and goes on
    second = p.respec("train", *S, "steps=3", "seed=2", "out_dir=B")
    _, first_err = first.communicate()
    second["first run"] = outcome(first.returncode, "", first_err, 0.0)["stderr_last"] or f"exit {first.returncode}"
    metrics = p.work / "B" / "metrics.jsonl"
    second["metrics steps in out_dir"] = [json.loads(line).get("step") for line in metrics.read_text().splitlines()
                                          if line.strip()] if metrics.is_file() else None
    p.respec("train", *S, "steps=3", "out_dir=B-alone")  # the same run with nobody interfering
    weights = checksums(p.work / "B", "*.safetensors")
    second["checkpoint weights as in a run alone (sha256)"] = bool(weights) and weights == checksums(
        p.work / "B-alone", "*.safetensors")
    results["2. two concurrent runs on one out_dir"] = second

    for name, override in (("3a. optim.lr=inf", "optim.lr=inf"), ("3b. rollout.temperature=.inf",
                                                                  "rollout.temperature=.inf"),
                           ("6a. task.levels=[4]", "task.levels=[4]"), ("6b. device=bogus", "device=bogus")):
        r = p.respec("train", *S, "steps=1", override, f"out_dir=C{len(results)}")
        complete = list((p.work / f"C{len(results)}" / "checkpoints").glob("step-*/COMPLETE"))
        r["complete checkpoints"] = len(complete)
        results[name] = r

    p.respec("train", *S, "steps=2", "out_dir=D")
    (p.work / "D" / "checkpoints" / "step-000002" / "trainer_state.pt").write_bytes(b"torn")
    results["4a. newest checkpoint truncated, --resume"] = p.respec("train", *S, "steps=3", "out_dir=D", "--resume")
    p.respec("train", *S, "steps=2", "out_dir=E")
    with open(p.work / "E" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "train/rew')
    results["4b. torn metrics line, report"] = p.respec("report", "E")
    config = (p.work / "E" / "config.yaml").read_text()
    r = p.respec("train", *S, "steps=1", "out_dir=E", "--resume")
    r["config.yaml unchanged"] = (p.work / "E" / "config.yaml").read_text() == config
    results["4c. resume with steps below the checkpoint"] = r

    results["6c. generate --device bogus"] = p.respec("generate", "--device", "bogus", "hi")
    (p.work / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n5\n')
    results["6d. GSM8K line that is 5"] = p.respec("train", *S, "steps=1", "task.name=gsm8k", "task.path=bad.jsonl",
                                                   "out_dir=F")
    (p.work / "null.jsonl").write_text('{"question": null, "answer": "#### 1"}\n' * 300)
    results["6e. GSM8K question null"] = p.respec("train", *S, "steps=1", "task.name=gsm8k", "task.path=null.jsonl",
                                                  "out_dir=G")
    code = ("from respec import LLM, SamplingParams; llm = LLM('smollm2-135m'); "
            "print([len(o.samples[0].token_ids) for o in llm.generate({}, SamplingParams(max_new_tokens=3), "
            "progress=False)])")
    results["6f. generate(('hi',))"] = p.python(code.format("('hi',)"))
    results["6g. generate(numpy ids)"] = p.python("import numpy as np; " + code.format("np.array([[1, 2, 3]])"))
    results["6h. generate(float ids)"] = p.python(code.format("[[1.7, 2.2]]"))
    results["6i. a drafter path that does not exist"] = p.python(
        "from respec import LLM; LLM('smollm2-135m', drafter='no/such/head', speculative=2)")
    results["7a. audit --samples 8"] = p.respec("audit", "--drafter", "ngram", "--samples", "8")
    results["7b. audit --samples 0"] = p.respec("audit", "--drafter", "ngram", "--samples", "0")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with checkout(args.revision) as src, tempfile.TemporaryDirectory() as work:
        results = probes(Probe(src, Path(work)))
    for name, r in results.items():
        said = r["stderr_last"] if r["stderr_last"] and not r["warnings"] else r["stdout_last"]
        print(f"{name}\n    exit {r['exit']} after {r['seconds']} s, traceback {r['traceback']}: {said}"
              + "".join(f"\n    {k}: {v}" for k, v in r.items()
                        if k not in ("exit", "seconds", "traceback", "stderr_last", "stdout_last") and v != []))
    if args.out:
        Path(args.out).write_text(json.dumps({"revision": args.revision, "probes": results}, indent=2))


if __name__ == "__main__":
    main()
