"""The ``respec`` command line: generate, bench, drafter train, audit, train, report, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .data.tasks import TASK_NAMES
from .models.presets import DEFAULT_MODEL


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="preset name, HF directory or .gguf file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on CUDA)")


def _speculative(text: str | None) -> int | str | None:
    """``--speculative``: K (an integer) or "adaptive"/"off"; None when not given."""
    if text is None or not text.strip().lstrip("-").isdigit():
        return text
    return int(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import LLM, SamplingParams

    drafters = args.drafter.split(",") if args.drafter else None
    llm = LLM(args.model, device=args.device, dtype=args.dtype, drafter=drafters,
              speculative=_speculative(args.speculative))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    outputs = llm.generate(args.prompts, params, chat=not args.no_chat, progress=not args.no_progress)
    for output in outputs:
        for i, sample in enumerate(output.samples):
            print(f"--- {output.prompt!r} [sample {i}, {len(sample.token_ids)} tokens, {sample.finish_reason}]")
            print(sample.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.spec:
        return _spec_bench(args)
    if args.adaptive:
        return _adaptive_bench(args)
    if args.online:
        return _online_bench(args)
    if args.distributed:
        from .bench.distributed import format_distributed, run_distributed_bench

        result = run_distributed_bench(args.model, args.prompts, tokens=args.new_tokens if args.new_tokens != 128 else 48)
        return _report(format_distributed(result), result, args.out)
    from .bench.throughput import format_table, run_bench

    result = run_bench(args.model, args.batch_sizes, args.new_tokens, args.repeats, args.device, args.dtype,
                       args.prompts, with_transformers=not args.no_transformers)
    return _report(format_table(result), result, args.out)


def _report(table: str, result: dict, out: str | None) -> int:
    from .bench.common import write_json

    print(table)
    if out:
        write_json(result, out)
        print(f"wrote {out}")
    return 0


def _drafter_list(args: argparse.Namespace, flag: str, example: str) -> list[str]:
    if not args.drafters:
        raise ValueError(f"drafters: {flag} needs --drafters (e.g. {example})")
    return args.drafters.split(",")


def _spec_bench(args: argparse.Namespace) -> int:
    from .bench.spec import format_spec_table, run_spec_bench

    drafters = _drafter_list(args, "--spec", "drafters/smollm2-eagle,ngram,self:8")
    batch_sizes = args.batch_sizes if args.batch_sizes_given else (1, 4, 16, 64)
    result = run_spec_bench(args.model, drafters, batch_sizes, args.k, args.temperatures,
                            args.new_tokens, args.repeats, args.device, args.dtype, args.prompts)
    return _report(format_spec_table(result), result, args.out)


def _adaptive_bench(args: argparse.Namespace) -> int:
    from .bench.adaptive import format_adaptive_table, run_adaptive_bench

    drafters = _drafter_list(args, "--adaptive", "drafters/smollm2-eagle,ngram")
    batch_sizes = args.batch_sizes if args.batch_sizes_given else (1, 2, 4, 8, 16, 32, 64)
    temperature = args.temperatures[-1] if args.temperatures else 0.7
    result = run_adaptive_bench(args.model, drafters, batch_sizes, args.ks, temperature,
                                args.new_tokens, args.repeats, args.device, args.dtype, args.prompts,
                                long_tail_rows=args.long_tail_rows, long_tail_max=args.long_tail_max,
                                trace_dir=Path(args.out).parent if args.out else Path("."))
    return _report(format_adaptive_table(result), result, args.out)


def _online_bench(args: argparse.Namespace) -> int:
    from .bench.online import (
        format_online_table,
        run_online_bench,
        write_online_results,
    )

    drafter = _drafter_list(args, "--online", "drafters/smollm2-eagle")[0]
    out = Path(args.out or "runs/online-bench/online_learner.json")
    result = run_online_bench(args.config, drafter, args.arms.split(","), args.steps, out.parent, args.set)
    write_online_results(result, out)
    print(format_online_table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .bench.audit import format_audit, run_audit
    from .data.tasks import load_questions
    from .engine import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, dtype=args.dtype, drafter=args.drafter, speculative=args.k,
              max_num_seqs=args.max_num_seqs)
    questions = args.prompt or load_questions(3)
    prompts = [llm.encode(q, chat=True) for q in questions]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    checks = run_audit(llm, prompts, params, samples=args.samples, negative_control=args.negative_control)
    print(format_audit(checks))
    return 0 if all(c.passed for c in checks) else 1


def cmd_train(args: argparse.Namespace) -> int:
    print(f"respec train: checking the config{f' {args.config}' if args.config else ''}, the data and the "
          f"run directory", flush=True)
    from .rl.config import load_config
    from .rl.rundir import RunDirectory

    config = load_config(args.config, args.overrides)  # checked whole before torch is imported (bar a device check)
    directory = RunDirectory(config.out_dir).open(  # a second writer fails here, before torch too
        config.to_dict(), resume=args.resume or args.resume_from is not None, overwrite=args.overwrite,
        allow_config_change=args.allow_config_change)
    if directory.moved_aside is not None:
        print(f"respec train: the run that was in {config.out_dir} is now in {directory.moved_aside}")
    print(f"respec train: {config.out_dir}: loading {config.model} (speculative: {config.rollout.speculative})",
          flush=True)
    d = config.distributed
    if d.enabled:
        print(f"respec train: rollouts on {d.rollout_workers} Ray worker(s) ({d.num_cpus:g} CPU, {d.num_gpus:g} GPU "
              f"each) at {d.address}: starting them loads the model in each", flush=True)
    from .rl.trainer import Trainer

    trainer = Trainer(config, resume=args.resume, resume_from=args.resume_from, directory=directory)
    summary = trainer.train()
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")
    print(f"run directory: {config.out_dir} (plots: respec report {config.out_dir})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .rl.report import make_report

    out = make_report(args.run_dir)
    print((out / "summary.md").read_text())
    print(f"plots in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A short GRPO run with speculative rollouts on the default model (see rl/demo.py)."""
    from .rl.demo import run_demo

    return run_demo(args.model, args.overrides)


def cmd_drafter_train(args: argparse.Namespace) -> int:
    from .learner.config import OfflineConfig
    from .learner.offline import run_offline

    config = OfflineConfig(model=args.model, prompts=args.prompts, task=args.task, levels=args.levels,
                           out=args.out, num_prompts=args.num_prompts,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, depths=args.k,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           draft_vocab_size=args.draft_vocab_size, seed=args.seed, examples=args.examples,
                           init_from=args.init_from, held_out=args.held_out)
    run_offline(config)
    return 0


def cmd_drafter_export(args: argparse.Namespace) -> int:
    """An EAGLE head (ReSpec's older layout or the standard one) in the layout SGLang and vLLM load."""
    from .engine.device import parse_dtype
    from .models.eagle_format import load_eagle_head, save_eagle_head
    from .models.loading import load_model

    target, _ = load_model(args.model)
    head = load_eagle_head(args.head, target)
    out = save_eagle_head(head, args.out, target, dtype=parse_dtype(args.dtype, target.device))
    print(f"wrote {out} ({args.dtype}): load it with SGLang --speculative-algorithm EAGLE3 "
          f"--speculative-draft-model-path {out}, or vLLM speculative_config={{'method': 'eagle3', 'model': '{out}'}}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="respec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_bench, _add_drafter, _add_audit, _add_train, _add_report, _add_demo):
        add(sub)
    return parser


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate completions for prompts")
    _add_model_args(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--drafter", default=None,
                     help="drafter(s), comma-separated: an EAGLE head directory, 'ngram', 'self:N' or a draft model")
    gen.add_argument("--speculative", default=None,
                     help="K (drafts per step, one drafter; default 4 with one drafter), 'adaptive' or 'off'")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=cmd_generate)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="throughput of our engine vs transformers generate")
    _add_model_args(bench)
    bench.add_argument("--batch-sizes", type=_int_list, default=None,
                       help="default 1,8,32 (AR vs transformers) or 1,4,16,64 (--spec)")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--prompts", type=Path, default=None, help="JSONL with a 'question' field")
    bench.add_argument("--no-transformers", action="store_true", help="only time our engine")
    bench.add_argument("--out", default=None, help="write the results as JSON here")
    bench.add_argument("--spec", action="store_true", help="AR vs speculative decoding per drafter")
    bench.add_argument("--drafters", default="", help="comma-separated drafters for --spec")
    bench.add_argument("--k", type=int, default=4, help="draft tokens per step for --spec")
    bench.add_argument("--temperatures", type=_float_list, default=(0.0, 0.7))
    bench.add_argument("--adaptive", action="store_true",
                       help="adaptive controller vs AR and every static (drafter, k), fixed batches and a long tail")
    bench.add_argument("--ks", type=_int_list, default=(1, 2, 3, 4), help="k values for --adaptive")
    bench.add_argument("--long-tail-rows", type=int, default=64, help="rows of the long-tail workload (0: skip it)")
    bench.add_argument("--long-tail-max", type=int, default=256, help="longest budget of the long-tail workload")
    bench.add_argument("--distributed", action="store_true",
                       help="rollouts on 1 vs 2 Ray workers, queue vs static shards on a long tail, weight-sync "
                            "seconds and MB, a projection to GPU workers")
    bench.add_argument("--online", action="store_true",
                       help="the same GRPO run without SD, with a frozen drafter and with the online learner")
    bench.add_argument("--config", default="configs/smollm2-arith.yaml", help="base training config for --online")
    bench.add_argument("--arms", default="a,a2,b,c,d,e,f,g", help="arms for --online (see bench/online.py)")
    bench.add_argument("--steps", type=int, default=12, help="RL steps per arm for --online")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every --online arm (repeatable)")
    bench.set_defaults(func=cmd_bench)


def _add_drafter(sub: argparse._SubParsersAction) -> None:
    drafter = sub.add_parser("drafter", help="drafter tools")
    drafter_sub = drafter.add_subparsers(dest="drafter_command", required=True)
    train = drafter_sub.add_parser("train", help="train an EAGLE head offline on the target's own answers")
    _add_model_args(train)
    train.add_argument("--prompts", default=None,
                       help="JSONL with a 'question' field, or 'arithmetic' (default: $RESPEC_GSM8K, else arithmetic)")
    train.add_argument("--task", choices=TASK_NAMES, default=None,
                       help="train on this RL task's problems as the trainer phrases them (gsm8k reads --prompts)")
    train.add_argument("--levels", type=_int_list, default=(1, 2, 3), help="arithmetic levels for --task arithmetic")
    train.add_argument("--out", default="drafters/smollm2-eagle")
    train.add_argument("--num-prompts", type=int, default=256)
    train.add_argument("--max-new-tokens", type=int, default=128)
    train.add_argument("--temperature", type=float, default=0.7)
    train.add_argument("--k", type=int, default=4, help="training-time-test unroll depth (the k it drafts)")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--draft-vocab-size", type=int, default=4096, help="0 = the full vocabulary")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--examples", default=None,
                       help="answers file (JSONL): read when it exists, else written after generating; "
                            "several, comma-separated, are read whole and merged (each gives the same held-out share)")
    train.add_argument("--init-from", default=None,
                       help="continue training this saved head (keeps its draft vocabulary)")
    train.add_argument("--held-out", type=float, default=0.1,
                       help="fraction of the answers (the first ones) kept out of training to report on")
    train.set_defaults(func=cmd_drafter_train)
    export = drafter_sub.add_parser("export", help="write an EAGLE head in the EAGLE-3 layout SGLang and vLLM load")
    export.add_argument("head", help="the head's directory")
    export.add_argument("out", help="the directory to write (replaced whole, or left as it was on an error)")
    export.add_argument("--model", default=DEFAULT_MODEL, help="the target the head drafts for")
    export.add_argument("--dtype", default="bfloat16", help="of the written tensors (bfloat16, float16 or float32)")
    export.set_defaults(func=cmd_drafter_export)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="check speculative rollouts are exact for a model, drafter and settings")
    _add_model_args(audit)
    audit.add_argument("--drafter", required=True, help="EAGLE head directory, 'ngram', 'self:N' or a model")
    audit.add_argument("--k", type=int, default=4)
    audit.add_argument("--temperature", type=float, default=0.7)
    audit.add_argument("--top-p", type=float, default=1.0)
    audit.add_argument("--top-k", type=int, default=0)
    audit.add_argument("--samples", type=int, default=4000, help="samples for the distribution check")
    audit.add_argument("--prompt", action="append", default=None, help="prompt(s) to audit on (repeatable)")
    audit.add_argument("--max-num-seqs", type=int, default=256)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--negative-control", action=argparse.BooleanOptionalAction, default=True,
                       help="also run with an always-accept verifier, which must fail (on by default: it shows "
                            "the samples suffice to catch a biased sampler)")
    audit.set_defaults(func=cmd_audit)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="GRPO training with speculative rollouts")
    train.add_argument("--config", default=None, help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.6 steps=40")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in out_dir from its newest sound checkpoint")
    train.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                       help="continue the run in out_dir from the checkpoint of STEP")
    train.add_argument("--overwrite", action="store_true",
                       help="out_dir holds another run: move it aside (OUT_DIR.replaced-N) and start anew")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume although the config differs from the run's (beyond steps and logging)")
    train.set_defaults(func=cmd_train)


def _add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="plots and a summary of a training run")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the `make demo` job: a short GRPO run with speculative rollouts")
    _add_model_args(demo)
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. steps=4")
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "bench":
        args.batch_sizes_given = args.batch_sizes is not None
        args.batch_sizes = args.batch_sizes or (1, 8, 32)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input, a missing or unreadable file: one line, no traceback
        if os.environ.get("RESPEC_DEBUG"):
            raise
        print(f"respec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("respec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
