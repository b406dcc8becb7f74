"""What one rollout did, as metrics: tokens per second, the speculative acceptance, the arms used."""

from __future__ import annotations

from ..engine.llm import LLM


def spec_snapshot(llm: LLM) -> tuple:
    s = llm.stats
    return (s.generated_tokens, s.spec.verify_steps, s.spec.emitted, s.spec.drafted, s.spec.accepted,
            list(s.spec.accepted_at), list(s.spec.offered_at), dict(s.arm_steps), s.decode_steps)


def spec_delta(llm: LLM, before: tuple, seconds: float, rows: int) -> dict[str, float]:
    s = llm.stats
    tokens = s.generated_tokens - before[0]
    out = {"rollout/tokens_per_s": tokens / seconds if seconds else 0.0, "rollout/time_s": seconds,
           "rollout/batch_size": float(rows)}
    steps, emitted = s.spec.verify_steps - before[1], s.spec.emitted - before[2]
    drafted, accepted = s.spec.drafted - before[3], s.spec.accepted - before[4]
    decode_steps = s.decode_steps - before[8]
    arms = {a: n - before[7].get(a, 0) for a, n in s.arm_steps.items()}
    sd_steps = {a: n for a, n in arms.items() if n and a != "off"}
    out["sd/enabled_frac"] = sum(sd_steps.values()) / decode_steps if decode_steps else 0.0
    for arm, n in arms.items():
        if n and decode_steps:
            out[f"sd/arm_frac/{arm}"] = n / decode_steps  # the decode steps the controller gave this arm
    if steps:
        out["sd/accept_len"] = emitted / steps
        out["sd/accept_rate"] = accepted / drafted if drafted else 0.0
        out["sd/k_mean"] = sum(int(a.rsplit(":", 1)[1]) * n for a, n in sd_steps.items()) / max(sum(sd_steps.values()), 1)
        for i, (acc, off) in enumerate(zip(s.spec.accepted_at, s.spec.offered_at)):
            got = acc - (before[5][i] if i < len(before[5]) else 0)
            offered = off - (before[6][i] if i < len(before[6]) else 0)
            if offered:
                out[f"sd/accept_rate_pos_{i}"] = got / offered
    return out
