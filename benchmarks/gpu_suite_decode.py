"""The suite's correctness and plain-decoding sections: greedy parity with transformers, the exactness
audit per drafter, and AR throughput against transformers ``generate`` with the per-step time split."""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace

import torch
from gpu_suite_setup import Budget, md_table, sync
from gpu_suite_split import StepSplit, decode_kernels

from respec import LLM, SamplingParams
from respec.bench.audit import run_audit
from respec.bench.throughput import _respec_runner, _seconds, _transformers_runner

WARM_UP_TOKENS = 4  # each arm's first run at a batch size: allocations, kernel selection
GRAPH_AGREEMENT: dict[int, float] = {}  # batch -> greedy token agreement, CUDA graphs vs eager


# ------------------------------------------------------------------------------------------ parity
def _trim(tokens: list[int], eos: set[int]) -> list[int]:
    """Up to and including the first EOS (transformers pads after it; ReSpec stops there)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def _hf_greedy(hf, prompt: list[int], new_tokens: int, pad: int, eos: set[int]) -> tuple[list[int], list]:
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    return _trim(out.sequences[0, len(prompt):].tolist(), eos), [s[0].float() for s in out.scores]


def _compare(ours: list[int], theirs: list[int], scores: list) -> dict:
    """Token-level agreement of one prompt's free-running greedy outputs; at the first divergence,
    transformers' margin between its own choice and ReSpec's, and whether that is within the dtype's
    rounding of the logit (a near-tie the dtype can flip)."""
    longest = max(len(ours), len(theirs), 1)
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    row = {"tokens": longest, "same": same, "prefix": prefix, "first_divergence": None, "margin_at_divergence": None,
           "near_tie": None}
    if prefix < min(len(ours), len(theirs)):
        logits = scores[prefix]
        top = float(logits[theirs[prefix]])
        row["first_divergence"] = prefix
        row["margin_at_divergence"] = top - float(logits[ours[prefix]])
        row["near_tie"] = row["margin_at_divergence"] <= 2 * torch.finfo(logits.dtype).eps * max(abs(top), 1.0)
    return row


@torch.inference_mode()
def _forced_agreement(model, prompt: list[int], theirs: list[int]) -> tuple[int, int]:
    """ReSpec's argmax at each position of transformers' greedy sequence (teacher-forced, one full forward):
    (positions that agree, positions), so a flip at a near-tie costs one position, not the rest."""
    if not theirs:
        return 0, 0
    ids = torch.tensor([prompt + theirs], device=model.device)
    hidden = model(ids).hidden[0, len(prompt) - 1: -1]
    picks = model.logits(hidden).argmax(-1).tolist()
    return sum(a == b for a, b in zip(picks, theirs)), len(theirs)


def parity(ctx, sizes, budget: Budget) -> dict:
    """Greedy tokens of ReSpec (all prompts in one batch) and of transformers (one prompt at a time), the
    same weights and dtype; stops at EOS on both sides."""
    hf, llm = ctx.hf(), ctx.llm
    prompts = ctx.prompts[: sizes.parity_prompts]
    params = SamplingParams(temperature=0, max_new_tokens=sizes.parity_tokens)
    ours = [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)]
    eos = set(llm.engine.eos_token_ids)
    rows = []
    for prompt, mine in zip(prompts, ours):
        theirs, scores = _hf_greedy(hf, prompt, sizes.parity_tokens, ctx.pad_id, eos)
        forced = _forced_agreement(llm.model, prompt, theirs)
        rows.append({**_compare(mine, theirs, scores), "forced_same": forced[0], "forced_tokens": forced[1]})
    total = sum(r["tokens"] for r in rows)
    result = {"dtype": str(llm.model.dtype), "prompts": len(rows), "new_tokens": sizes.parity_tokens,
              "agreement": sum(r["same"] for r in rows) / total,
              "prefix_agreement": sum(r["prefix"] for r in rows) / total,
              "forced_agreement": sum(r["forced_same"] for r in rows) / max(sum(r["forced_tokens"] for r in rows), 1),
              "identical_prompts": sum(r["prefix"] == r["tokens"] for r in rows),
              "divergences_at_near_ties": sum(bool(r["near_tie"]) for r in rows), "rows": rows}
    table = md_table(["prompt", "tokens", "same position", "first divergence", "HF margin there", "near-tie",
                      "teacher-forced same"],
                     [[i, r["tokens"], r["same"], r["first_divergence"], r["margin_at_divergence"], r["near_tie"],
                       f"{r['forced_same']}/{r['forced_tokens']}"] for i, r in enumerate(rows)])
    result["markdown"] = (
        f"Greedy, {result['dtype']}: free-running token agreement {result['agreement']:.3f} (common-prefix share "
        f"{result['prefix_agreement']:.3f}, {result['identical_prompts']}/{len(rows)} prompts identical, "
        f"{result['divergences_at_near_ties']} divergences at a near-tie); teacher-forced agreement on "
        f"transformers' tokens {result['forced_agreement']:.3f}.\n\n{table}")
    return result


# ------------------------------------------------------------------------------------------- audit
def audit(ctx, sizes, budget: Budget) -> dict:
    """``respec audit`` (bench.audit.run_audit) at T = 0.7 per drafter."""
    llm, per_drafter = ctx.llm, {}
    params = SamplingParams(temperature=sizes.audit_temperature, seed=0)
    for spec in sorted(ctx.drafters(eagle=False), key=lambda name: name == "ngram"):  # the slow one last
        if not budget.take(spec):
            continue
        # The n-gram drafter searches every sibling's text on the host, so its rows cost ~rows^2: the
        # audit draws its samples in requests of ``audit_rows_ngram`` rows instead.
        rows = sizes.audit_rows_ngram if spec == "ngram" else sizes.audit_rows
        spec_llm = LLM(llm.model, tokenizer=llm.tokenizer, drafter=spec, speculative=sizes.audit_k, max_num_seqs=rows)
        checks = run_audit(spec_llm, ctx.prompts[:3], params, samples=sizes.audit_samples,
                           max_new_tokens=sizes.audit_tokens, negative_control=sizes.audit_control)
        per_drafter[spec] = {"passed": all(c.passed for c in checks), "k": sizes.audit_k,
                             "rows_per_request": rows,
                             "accept_rate": spec_llm.stats.spec.accept_rate, "checks": [asdict(c) for c in checks]}
    rows = [[spec, c["name"], "PASS" if c["passed"] else "FAIL", c["figure"]]
            for spec, r in per_drafter.items() for c in r["checks"]]
    distribution = [c["passed"] for r in per_drafter.values() for c in r["checks"] if c["name"] == "distribution"]
    return {"temperature": sizes.audit_temperature, "samples": sizes.audit_samples, "dtype": str(llm.model.dtype),
            "passed": bool(distribution) and all(distribution),
            "all_checks_passed": bool(per_drafter) and all(r["passed"] for r in per_drafter.values()),
            "drafters": per_drafter, "skipped_sizes": budget.skipped,
            "markdown": _audit_markdown(per_drafter, sizes, str(llm.model.dtype), bool(distribution) and all(distribution),
                                        md_table(["drafter", "check", "verdict", "figure"], rows))}


def _audit_markdown(per_drafter: dict, sizes, dtype: str, passed: bool, table: str) -> str:
    rates = ", ".join(f"{spec} {r['accept_rate']:.2f}" for spec, r in per_drafter.items())
    note = (" In bf16 the greedy check compares SD and AR greedy tokens under different kernel shapes' rounding: a "
            "flip at a near-tie fails it without any fault in the sampler." if "float32" not in dtype else "")
    return (f"Distribution checks at T = {sizes.audit_temperature}, k = {sizes.audit_k}, {sizes.audit_samples} samples, "
            f"{dtype}: {'PASS' if passed else 'FAIL'}; acceptance rate during the audit: {rates}.{note}\n\n{table}")


# -------------------------------------------------------------------------------------- throughput
def _timed_arms(arms: dict, warm: dict, repeats: int) -> dict[str, float]:
    for run in warm.values():
        run()  # a short warm-up at this batch size
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):  # alternating, so drift on a shared machine hits both
        for name, run in arms.items():
            times[name].append(_seconds(run))
    return {name: statistics.median(ts) for name, ts in times.items()}


def step_split(llm, prompts: list[list[int]], new_tokens: int, temperature: float) -> dict:
    """One instrumented generate (see gpu_suite_split); on CUDA a second one under the profiler."""
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
    with StepSplit(llm) as split:
        llm.generate(prompts, params, progress=False)
        sync(llm.model.device)
    out = split.summary()
    if llm.model.device.type == "cuda":
        try:  # the profiler needs CUPTI; without it the host-side split still stands
            out.update(decode_kernels(lambda n: llm.generate(prompts, replace(params, max_new_tokens=n),
                                                             progress=False), new_tokens))
        except Exception as err:  # noqa: BLE001
            out["kernel_profile_error"] = f"{type(err).__name__}: {err}"
    return out


def throughput(ctx, sizes, budget: Budget) -> dict:
    """bench.throughput's two arms (greedy, exactly ``new_tokens`` per row, prefill included) per batch,
    then the step split of ReSpec's AR step at that batch, greedy and at T = 0.7."""
    hf, llm, rows, splits, graph_error = ctx.hf(), ctx.llm, [], [], None
    # On a GPU a third arm: the same engine with its plain decode steps replayed as CUDA graphs.
    graphed = LLM(llm.model, tokenizer=llm.tokenizer, max_num_seqs=llm.engine.max_num_seqs,
                  cuda_graphs=True) if llm.model.device.type == "cuda" else None
    for batch in sizes.batches:
        if not budget.take(f"batch {batch}"):
            continue
        prompts = ctx.batch_prompts(batch)
        arms, warm = ({"respec": _respec_runner(llm, prompts, tokens),
                       "transformers": _transformers_runner(hf, llm, prompts, tokens)}
                      for tokens in (sizes.new_tokens, WARM_UP_TOKENS))
        if graphed is not None and graph_error is None:
            graph_error = _add_graph_arm(llm, graphed, prompts, sizes.new_tokens, arms, warm)
        seconds = _timed_arms(arms, warm, sizes.repeats)
        for name, s in seconds.items():
            rows.append({"system": name, "batch": batch, "seconds": s, "tokens_per_s": batch * sizes.new_tokens / s,
                         "ms_per_step": 1e3 * s / sizes.new_tokens, "vs_transformers": seconds["transformers"] / s})
        for temperature in (0.0, 0.7):
            splits.append({"batch": batch, "temperature": temperature,
                           **step_split(llm, prompts, sizes.split_tokens, temperature)})
    note = f"\n\nCUDA graphs arm dropped: {graph_error}" if graph_error else ""
    return {"new_tokens": sizes.new_tokens, "repeats": sizes.repeats, "rows": rows, "step_split": splits,
            "cuda_graphs_error": graph_error, "cuda_graphs_agreement": dict(GRAPH_AGREEMENT),
            "skipped_sizes": budget.skipped,
            "markdown": _throughput_markdown(rows, splits) + note}


def _add_graph_arm(llm, graphed, prompts: list[list[int]], new_tokens: int, arms: dict, warm: dict) -> str | None:
    """Add the CUDA-graph arm, with its greedy token agreement with the eager engine on these prompts
    (bf16 may flip near-ties: padded context changes the rounding); a failure leaves it out and says
    why (the other arms' figures stand either way)."""
    try:
        params = SamplingParams(temperature=0, max_new_tokens=WARM_UP_TOKENS * 4, ignore_eos=True)
        want = [o.samples[0].token_ids for o in llm.generate(prompts, params, progress=False)]
        got = [o.samples[0].token_ids for o in graphed.generate(prompts, params, progress=False)]
    except Exception as err:  # noqa: BLE001 -- a capture failure must not cost the eager figures
        return f"{type(err).__name__}: {err}"
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    GRAPH_AGREEMENT[len(prompts)] = same / max(sum(len(w) for w in want), 1)
    arms["respec+graphs"] = _respec_runner(graphed, prompts, new_tokens)
    warm["respec+graphs"] = _respec_runner(graphed, prompts, WARM_UP_TOKENS)
    return None


def _throughput_markdown(rows: list[dict], splits: list[dict]) -> str:
    speed = md_table(["system", "batch", "seconds", "tok/s", "ms/step", "vs transformers"],
                     [[r["system"], r["batch"], r["seconds"], r["tokens_per_s"], r["ms_per_step"],
                       f"{r['vs_transformers']:.2f}x"] for r in rows])
    device = any("device_forward_ms" in s for s in splits)
    headers = ["batch", "T", "step ms", "forward", "sampling", "commit", "host sync", "other"]
    headers += ["device: forward", "sampling", "host sync", "kernel busy ms", "kernels/step"] if device else []
    table = []
    for s in splits:
        row = [s["batch"], s["temperature"], s.get("step_ms")] + [s.get(f"{p}_ms") for p in
                                                                  ("forward", "sampling", "commit", "host_sync", "other")]
        if device:
            row += [s.get("device_forward_ms"), s.get("device_sampling_ms"), s.get("device_host_sync_ms"),
                    s.get("kernel_busy_ms"), s.get("kernels_per_step")]
        table.append(row)
    note = (" Device columns: the CUDA events' timeline between the same boundaries; kernel busy: the kernels' own "
            "time per decode step (torch.profiler). Step ms minus kernel busy is time the GPU sat idle, waiting on "
            "the host (launches, Python, syncs)." if device else "")
    return (f"{speed}\n\nAR decode step split (ms per step, host clock; see gpu_suite_split.py for what each "
            f"phase holds).{note}\n\n{md_table(headers, table)}")
