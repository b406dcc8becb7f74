"""Stop strings: find the rows whose newest tokens complete one of their request's ``stop`` strings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .slots import SlotTable


def stop_string_hits(slots: SlotTable, decode_text: Callable[[list[int]], str] | None, lo: int, hi: int,
                     already: list[int], before: np.ndarray | None = None) -> list[int]:
    """Rows ``lo..hi-1`` (not in ``already``) that a stop string ends; each hit row's count is cut to the
    token completing it. ``before``: per row, the tokens it had before a speculative step (the step
    may emit several tokens: the row ends at the first one completing a stop string)."""
    if slots.stop_string_rows == 0:  # the common case: no text to look at, no loop over rows
        return []
    # Rows that end anyway are checked too: a stop string completed earlier in the block wins.
    rows = [r for r in range(lo, hi) if slots.sequences[r].params.stop]
    if not rows:
        return []
    if decode_text is None:
        raise ValueError("stop: stop strings need a tokenizer; use LLM or pass decode_text to Engine")
    hits = []
    for slot in rows:
        seq = slots.sequences[slot]
        count = int(slots.host_generated[slot])
        longest = max(len(s) for s in seq.params.stop)
        # A character spans at most 4 byte-level tokens: this tail holds any completed stop string.
        first = count if before is None else int(before[slot - lo]) + 1
        for end in range(first, count + 1):
            text = decode_text(slots.out_tokens[slot, max(0, end - 4 * longest - 4): end].tolist())
            hit = next((s for s in seq.params.stop if s in text), None)
            if hit is not None:
                seq.stop_text_hit = hit
                slots.host_generated[slot] = end
                if slot not in already:
                    hits.append(slot)
                break
    return hits
