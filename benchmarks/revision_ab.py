"""Two revisions of ReSpec side by side on one command: the same ``respec`` run at each, interleaved.

A refactor must change no behaviour: this runs a ``respec`` command (``bench --spec``, ``bench
--adaptive``, ``generate``, or ``greedy``: greedy outputs through the Python API of both revisions) at
revision A and at revision B in turn, ``--repeats`` times each, in alternating order, with the same
virtual environment and cache. For ``generate`` and ``greedy`` the printed outputs must be identical; for a benchmark every row's tokens/s is paired by repeat and the median ratio B / A
is printed, next to the spread of A against itself (repeat-to-repeat), so a difference can be told from
the noise. Each revision is checked out into a temporary git worktree (``WORKTREE`` = the files as they
are now) and imported through ``PYTHONPATH``.

    python benchmarks/revision_ab.py HEAD~3 WORKTREE --repeats 3 -- bench --spec --drafters ngram \\
        --batch-sizes 1,4 --temperatures 0,0.7 --new-tokens 64 --repeats 1 --prompts "$RESPEC_GSM8K"
    python benchmarks/revision_ab.py HEAD~3 WORKTREE --repeats 1 -- greedy "$RESPEC_GSM8K" 8 64 ngram self:8
    # greedy QUESTIONS_JSONL N NEW_TOKENS DRAFTER...: token ids of N chat prompts, AR, each drafter at
    # k = 1 and 4, and adaptive over all the drafters
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from respec.cli import main; sys.exit(main(sys.argv[1:]))"
GREEDY = """
import json, sys
from respec import LLM, SamplingParams
path, count, new_tokens, drafters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
questions = [json.loads(line)["question"] for line in open(path).read().splitlines()[:count]]
base = LLM("smollm2-135m", max_num_seqs=count)
prompts = [base.encode(q, chat=True) for q in questions]
params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
systems = {"ar": base}
for d in drafters:
    for k in (1, 4):
        systems[f"{d}:{k}"] = LLM(base.model, tokenizer=base.tokenizer, drafter=d, speculative=k, max_num_seqs=count)
systems["adaptive"] = LLM(base.model, tokenizer=base.tokenizer, drafter=drafters, speculative="adaptive",
                          max_num_seqs=count)
print(json.dumps({name: [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)]
                  for name, llm in systems.items()}))
"""


@contextmanager
def checkout(revision: str):
    """The ``src`` directory of ``revision`` (a temporary worktree; ``WORKTREE``: this checkout's)."""
    if revision == "WORKTREE":
        yield ROOT / "src"
        return
    with tempfile.TemporaryDirectory(prefix="respec-ab-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), revision], check=True)
        try:
            yield tree / "src"
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def run(src: Path, argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    program, argv = (GREEDY, argv[1:]) if argv[0] == "greedy" else (RUN, argv)
    done = subprocess.run([sys.executable, "-c", program, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{src}: respec {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def row_key(row: dict) -> str:
    """What identifies a benchmark row across runs (bench --spec and --adaptive rows)."""
    parts = [row.get("workload"), row.get("system"), row.get("drafter") or row.get("config"),
             f"T={row['temperature']}" if "temperature" in row else None, f"b{row['batch_size']}"]
    return " ".join(str(p) for p in parts if p is not None)


def rates(result: dict) -> dict[str, float]:
    return {row_key(r): r["tokens_per_s"] for r in result["rows"]}


def compare_bench(runs: dict[str, list[dict]]) -> list[dict]:
    """Per row: median over repeats of B / A (paired by repeat) and of A_i / A_{i-1} (A's own noise)."""
    a, b = [rates(r) for r in runs["A"]], [rates(r) for r in runs["B"]]
    table = []
    for key in a[0]:
        paired = [rb[key] / ra[key] for ra, rb in zip(a, b)]
        own = [a[i][key] / a[i - 1][key] for i in range(1, len(a))]
        table.append({"row": key, "a_tokens_per_s": statistics.median(r[key] for r in a),
                      "b_tokens_per_s": statistics.median(r[key] for r in b), "b_over_a": statistics.median(paired),
                      "a_repeat_spread": max((abs(x - 1) for x in own), default=None)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("give the respec command after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    with checkout(args.a) as src_a, checkout(args.b) as src_b, tempfile.TemporaryDirectory() as tmp:
        sources = {"A": src_a, "B": src_b}
        outputs: dict[str, list] = {"A": [], "B": []}
        for repeat in range(args.repeats):
            for side in ("A", "B") if repeat % 2 == 0 else ("B", "A"):
                if command[0] in ("generate", "greedy"):
                    outputs[side].append(run(sources[side], command))
                else:
                    out = Path(tmp) / f"{side}-{repeat}.json"
                    run(sources[side], [*command, "--out", str(out)])
                    outputs[side].append(json.loads(out.read_text()))
                print(f"repeat {repeat + 1}/{args.repeats}: {side} done", flush=True)
    if command[0] in ("generate", "greedy"):
        same = all(x == outputs["A"][0] for x in outputs["A"] + outputs["B"])
        result = {"identical_outputs": same, "output": outputs["A"][0]}
        if command[0] == "greedy":
            systems = json.loads(outputs["A"][0])
            tokens = sum(len(ids) for ids in systems["ar"])
            print(f"greedy token ids of {', '.join(systems)}: {tokens} tokens per system; every system equals AR: "
                  f"{all(ids == systems['ar'] for ids in systems.values())}")
        else:
            print(outputs["A"][0])
        print(f"outputs of {args.a} and {args.b} identical in every repeat: {same}")
    else:
        result = {"rows": compare_bench(outputs),
                  "per_repeat": {side: [rates(run) for run in runs] for side, runs in outputs.items()}}
        print(f"{'row':<44}{'A tok/s':>9}{'B tok/s':>9}{'B/A':>7}{'A spread':>10}")
        for row in result["rows"]:
            spread = f"{row['a_repeat_spread']:.1%}" if row["a_repeat_spread"] is not None else "-"
            print(f"{row['row'][:43]:<44}{row['a_tokens_per_s']:>9.1f}{row['b_tokens_per_s']:>9.1f}"
                  f"{row['b_over_a']:>7.3f}{spread:>10}")
    result.update(a=args.a, b=args.b, command=command, repeats=args.repeats)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
