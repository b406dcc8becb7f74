"""GRPO with TRL, rolling out with ReSpec: SmolLM2-135M-Instruct on the arithmetic task, on the CPU.

    pip install 'respec[trl]'            # or: make setup (the test extras include trl)
    python examples/trl_grpo.py --steps 4

TRL's ``GRPOTrainer`` trains; ``RespecRollout`` generates each step's completions with ReSpec's engine
(exact speculative decoding, adaptive over the drafters given) and copies the policy into the engine
whenever the trainer steps. The script prints one line per step: reward, rollout seconds, acceptance
length and the largest gap between the engine's logprobs and the policy's own recompute of the same
tokens (TRL's importance-sampling correction reads those logprobs).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a ReSpec preset or an HF directory")
    parser.add_argument("--drafter", default="ngram", help="comma-separated ReSpec drafters ('' for none)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", default="runs/trl-grpo")
    return parser.parse_args()


def arithmetic_dataset(count: int):
    from datasets import Dataset

    from respec.data.tasks import arithmetic_problems, chat_prompt

    problems = arithmetic_problems(count, seed=0, levels=(1, 2))
    return Dataset.from_dict({"prompt": [chat_prompt(p) for p in problems], "answer": [p.answer for p in problems]})


def correctness(completions, answer, **kwargs) -> list[float]:
    from respec.rl.rewards import correctness_reward

    return correctness_reward([c[-1]["content"] if isinstance(c, list) else c for c in completions], list(answer))


class TimedRollout:
    """RespecRollout plus what this example prints: rollout seconds and the logprob gap to the policy."""

    def __init__(self, rollout) -> None:
        self.rollout, self.seconds, self.logprob_gap = rollout, 0.0, 0.0

    def __call__(self, prompts: list, trainer) -> dict:
        start = time.perf_counter()
        out = self.rollout(prompts, trainer)
        self.seconds = time.perf_counter() - start
        self.logprob_gap = logprob_gap(trainer.accelerator.unwrap_model(trainer.model), out, float(trainer.temperature))
        return out


@torch.no_grad()
def logprob_gap(policy, out: dict, temperature: float, rows: int = 4) -> float:
    """max |engine logprob - policy logprob(token | prefix) at logits / T| over the first rows."""
    worst = 0.0
    for prompt, completion, logprobs in list(zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]))[:rows]:
        if not completion:
            continue
        logits = policy(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1: -1].float() / temperature
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        worst = max(worst, float((want - torch.tensor(logprobs)).abs().max()))
    return worst


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    from respec.integrations.trl import RespecRollout
    from respec.models.loading import resolve_model_path

    path = resolve_model_path(args.model)  # a preset's weights, converted once into an HF directory
    drafters = [d for d in args.drafter.split(",") if d]
    speculative = "adaptive" if len(drafters) > 1 else (4 if drafters else "off")
    rollout = TimedRollout(RespecRollout(str(path), drafter=drafters or None, speculative=speculative, seed=0))
    config = trl.GRPOConfig(output_dir=args.out, per_device_train_batch_size=args.prompts_per_step * args.num_generations,
                            num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                            max_steps=args.steps, learning_rate=args.lr, temperature=1.0, beta=0.0, report_to=[],
                            use_cpu=True, logging_steps=1, save_strategy="no", seed=0, bf16=False,
                            dataloader_num_workers=0, disable_tqdm=True)

    class StepLine(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs and "reward" in logs:
                stats = rollout.rollout.last_stats
                print(f"step {state.global_step}/{args.steps}  reward {logs['reward']:.3f}  "
                      f"rollout {rollout.seconds:.1f}s  accept_len {stats.get('respec/accept_len', 0.0):.2f}  "
                      f"max|dlogprob| {rollout.logprob_gap:.1e}", flush=True)

    trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                              reward_funcs=correctness, args=config, processing_class=AutoTokenizer.from_pretrained(path),
                              train_dataset=arithmetic_dataset(args.steps * args.prompts_per_step * 4),
                              rollout_func=rollout, callbacks=[StepLine()])
    trainer.remove_callback(PrinterCallback)  # the step line above replaces TRL's dict of every metric
    start = time.perf_counter()
    trainer.train()
    print(f"{args.steps} GRPO steps in {time.perf_counter() - start:.0f} s; engine weight syncs: "
          f"{rollout.rollout.weight_version}")


if __name__ == "__main__":
    main()
