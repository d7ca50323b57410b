"""Prompt lookup that backs off when its drafts keep failing.

transformers' prompt lookup drafts whenever the last n-gram recurs in the text, and keeps drafting
when nothing is accepted. A rejected round costs a TNL model a verification forward over K + 1
tokens plus a rollback, about two decode steps for one token, so on text whose n-grams recur with
other continuations prompt lookup ran at 0.4-0.5x plain greedy (benchmarks/bench_speculative.py).
:class:`BackoffCandidateGenerator` wraps transformers' generator: after a round in which no draft
token was accepted it skips drafting for 1, 2, 4, ... up to :data:`MAX_BACKOFF` steps (plain decode
steps), and a round with any accepted token resets it. Drafts are only ever skipped, never changed,
so the output is exactly plain decoding's.
"""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import CandidateGenerator

MAX_BACKOFF = 32  # decode steps without drafting after repeated rejected rounds


class BackoffCandidateGenerator(CandidateGenerator):
    def __init__(self, inner: CandidateGenerator):
        self.inner = inner
        self.requires_model_outputs = getattr(inner, "requires_model_outputs", False)
        self.skip = 0  # decode steps left without drafting
        self.backoff = 0  # the length of the next pause after a rejected round
        self.drafted = False  # whether the current round proposed tokens

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        if self.skip > 0:
            self.skip -= 1
            self.drafted = False
            return input_ids, None
        candidates, logits = self.inner.get_candidates(input_ids, **kwargs)
        self.drafted = candidates.shape[1] > input_ids.shape[1]
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        if self.drafted:
            if num_matches == 0:
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
