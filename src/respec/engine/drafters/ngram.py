"""Model-free drafts: continue the row's latest n-gram from text it has already seen.

RL rollouts repeat themselves: a row quotes its prompt, the ``n`` samples of one prompt (GRPO's group)
share phrasing, and the same prompt comes back every epoch. For each row the drafter takes the longest
suffix of its context (``max_ngram`` down to ``min_ngram`` tokens) that occurs earlier in, by
preference, its own context, a sibling sample's, or an earlier rollout of the same prompt, and
proposes the tokens that followed the most recent occurrence. Drafts are deterministic (q one-hot):
the verifier accepts a draft when it is the token the target itself draws there (see ``verify``), so
the samples are plain decoding's, whatever the drafts.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..slots import Sequence
from ..transfer import to_device
from .base import Drafter, DraftSampler, DraftState, Proposal


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, vocab_size: int, max_ngram: int = 4, min_ngram: int = 2, history_per_prompt: int = 16,
                 max_prompts: int = 4096) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram/max_ngram: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size = vocab_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.history_per_prompt, self.max_prompts = history_per_prompt, max_prompts
        # prompt tokens -> recent finished responses to it (bounded, least recently used prompt evicted)
        self.history: OrderedDict[tuple[int, ...], deque[np.ndarray]] = OrderedDict()

    def finish(self, sequence: Sequence) -> None:
        key = tuple(sequence.prompt_ids)
        responses = self.history.pop(key, None) or deque(maxlen=self.history_per_prompt)
        responses.append(np.asarray(sequence.token_ids, dtype=np.int64))
        self.history[key] = responses
        while len(self.history) > self.max_prompts:
            self.history.popitem(last=False)

    def reset(self) -> None:
        self.history.clear()

    def get_state(self) -> dict:
        return {"history": OrderedDict((key, deque(list(v), maxlen=v.maxlen)) for key, v in self.history.items())}

    def set_state(self, state: dict | None) -> None:
        if state is not None:
            self.history = OrderedDict((key, deque(list(v), maxlen=v.maxlen)) for key, v in state["history"].items())

    def propose(self, state: DraftState, k: int, sampler: DraftSampler | None = None) -> Proposal:
        batch = len(state.sequences)
        # Only the columns any row has filled cross to the host (a GPU copies this every step).
        generated = state.out_tokens[:batch, : int(state.host_generated[:batch].max(initial=0))].cpu().numpy()
        responses = [generated[row, : state.host_generated[row]] for row in range(batch)]
        groups: dict[int, list[int]] = defaultdict(list)  # request -> its active rows (the siblings)
        for row, seq in enumerate(state.sequences):
            groups[seq.request_index].append(row)
        tokens = np.zeros((batch, k), dtype=np.int64)
        lens = np.zeros(batch, dtype=np.int64)
        for row, seq in enumerate(state.sequences):
            context = np.concatenate((np.asarray(seq.prompt_ids, dtype=np.int64), responses[row]))
            siblings = [responses[r] for r in groups[seq.request_index] if r != row]
            earlier = list(self.history.get(tuple(seq.prompt_ids), ()))
            draft = self._lookup(context, [context, *siblings, *earlier], k)
            tokens[row, : len(draft)] = draft
            lens[row] = len(draft)
        device = state.last_token.device
        return Proposal(tokens=to_device(tokens, device), lens=to_device(lens, device))

    def _lookup(self, context: np.ndarray, corpora: list[np.ndarray], k: int) -> np.ndarray:
        """Continuation of the longest suffix of ``context`` found in ``corpora`` (first corpus wins ties)."""
        for size in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            suffix = context[-size:]
            for index, corpus in enumerate(corpora):
                # In the row's own context the suffix itself is the last window: search before it.
                searchable = corpus[:-1] if index == 0 else corpus
                start = _last_match(searchable, suffix)
                if start >= 0 and start + size < len(corpus):
                    return corpus[start + size: start + size + k]
        return np.zeros(0, dtype=np.int64)


def _last_match(corpus: np.ndarray, pattern: np.ndarray) -> int:
    """Start of the last occurrence of ``pattern`` in ``corpus``, or -1."""
    if len(corpus) < len(pattern):
        return -1
    hits = np.flatnonzero((sliding_window_view(corpus, len(pattern)) == pattern).all(axis=1))
    return int(hits[-1]) if len(hits) else -1
