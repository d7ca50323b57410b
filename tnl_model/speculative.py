"""Prompt lookup that backs off while its drafts do not pay for themselves.

transformers' prompt lookup drafts whenever the last n-gram recurs in the text, and keeps drafting
when nothing is accepted. A verification round costs a TNL model a forward over K + 1 tokens plus a
rollback, on a CPU about 1.7 decode steps, so on text whose n-grams recur with other continuations
prompt lookup ran at 0.4-0.5x plain greedy (benchmarks/bench_speculative.py).

:class:`BackoffCandidateGenerator` wraps transformers' generator and keeps score: a round that
drafted and had ``m`` tokens accepted produced ``m + 1`` tokens for the price of ``c`` plain decode
steps, a net gain of ``m + 1 - c`` steps. ``c`` is measured as generation runs (the time between
successive rounds, drafting or not, as moving averages), so it is about 1.7 on a CPU and close to 1
on a GPU, where verifying K tokens costs little more than one step. While the moving average of the
net gain is negative, drafting pauses for 1, 2, 4, ... up to :data:`MAX_BACKOFF` plain decode steps;
once drafting pays again the pauses stop. Drafts are only ever skipped, never changed, so the output
is exactly plain decoding's.

In a round without drafts (a pause, or no n-gram match) the cache's lightning layers do not record
(generate() turns recording on for the whole call): such a round is never rolled back, so keeping
its state and k, v for a ``crop`` would be pure cost, about 2% of a decode step of the demo model.
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache
from transformers.generation.candidate_generator import CandidateGenerator

from .lightning_cache import LightningStateLayer

MAX_BACKOFF = 64  # decode steps without drafting after repeated rounds that did not pay
ASSUMED_ROUND_COST = 1.7  # a drafting round in plain decode steps, until both have been timed
GAIN_SMOOTHING = 0.5  # weight of the newest round in the moving average of the net gain
TIME_SMOOTHING = 0.2  # weight of the newest duration in the moving averages of round times


class BackoffCandidateGenerator(CandidateGenerator):
    def __init__(self, inner: CandidateGenerator, cache: Cache | None = None):
        self.inner = inner
        self.cache = cache  # the target's cache, whose lightning layers record only in drafting rounds
        self.requires_model_outputs = getattr(inner, "requires_model_outputs", False)
        self.skip = 0  # decode steps left without drafting
        self.backoff = 0  # the length of the next pause
        self.drafted = False  # whether the current round proposed tokens
        self.gain = 0.0  # moving average of (accepted + 1 - round cost) over drafting rounds
        self.seconds = {True: None, False: None}  # moving average duration of a drafting / plain round
        self._round_start = None

    def round_cost(self) -> float:
        """A drafting round's duration in plain decode steps (measured once both kinds have run)."""
        drafting, plain = self.seconds[True], self.seconds[False]
        if drafting is None or plain is None or plain <= 0:
            return ASSUMED_ROUND_COST
        return drafting / plain

    def _time_previous_round(self) -> None:
        now = time.perf_counter()
        if self._round_start is not None:
            elapsed, kind = now - self._round_start, self.drafted
            previous = self.seconds[kind]
            self.seconds[kind] = elapsed if previous is None else (1 - TIME_SMOOTHING) * previous + TIME_SMOOTHING * elapsed
        self._round_start = now

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        self._time_previous_round()
        if self.skip > 0:
            self.skip -= 1
            self.drafted = False
            self._record_next_forward(False)
            return input_ids, None
        candidates, logits = self.inner.get_candidates(input_ids, **kwargs)
        self.drafted = candidates.shape[1] > input_ids.shape[1]
        self._record_next_forward(self.drafted)  # no n-gram match: a plain step, never rolled back either
        return candidates, logits

    def _record_next_forward(self, record: bool) -> None:
        """Whether the lightning layers keep what ``crop`` needs of the next forward (its tokens' k, v)."""
        for layer in () if self.cache is None else self.cache.layers:
            if isinstance(layer, LightningStateLayer):
                layer.record_past = record

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        if self.drafted:
            net = num_matches + 1 - self.round_cost()
            self.gain = (1 - GAIN_SMOOTHING) * self.gain + GAIN_SMOOTHING * net
            if self.gain < 0:
                self.backoff = min(MAX_BACKOFF, max(1, 2 * self.backoff))
                self.skip = self.backoff
            else:
                self.backoff = 0
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)

    @property
    def num_drafting_tokens(self):
        return self.inner.num_drafting_tokens

    def __getattr__(self, name):  # anything else generate() reads (model_kwargs_overrides, ...) is the inner one's
        return getattr(self.__dict__["inner"], name)


__all__ = ["BackoffCandidateGenerator", "MAX_BACKOFF"]
