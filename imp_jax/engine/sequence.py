"""One request's state as it moves through the scheduler.

A `Sequence` is plain bookkeeping: token ids, how many of them already have KV in the paged
cache (`num_computed_tokens`), and which pages hold that KV (`page_ids`, the block table). The
block manager owns the pages; the scheduler owns the status transitions; the engine appends
nothing itself (the scheduler's `update` does) but decides when a sequence is finished.

Invariant between engine steps for a RUNNING sequence: `num_computed_tokens < num_tokens`, i.e.
at least the last token (the prompt's last token, or the last sampled one) still needs its KV
computed, and computing it yields the logits for the next token.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

# Monotonic admission order across all sequences of the process; ties are impossible, so
# "newest" (the preemption victim) and "oldest" are always well defined.
_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no pages; queued for (re)admission
    RUNNING = "running"  # holds pages; prefilling (possibly in chunks) or decoding
    FINISHED = "finished"  # pages freed; finish_reason set


class Sequence:
    """State of one request (one sample: n>1 samples are separate, forked Sequences)."""

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "status",
        "num_computed_tokens",
        "page_ids",
        "block_hashes",
        "num_cached_tokens",
        "sampling_params",
        "arrival",
        "finish_reason",
        "num_preemptions",
        "max_cached_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any = None,
        arrival: int | None = None,
    ) -> None:
        if len(prompt_token_ids) == 0:
            # An empty prompt has no last token to produce logits from.
            raise ValueError(f"request {request_id!r}: prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # Prefix-cache hits may cover at most this many tokens (None: no limit). Prompt logprobs
        # and scoring need logits at positions a cache hit would skip.
        self.max_cached_tokens: int | None = None
        self.status = SequenceStatus.WAITING
        # Tokens (prefix of all_token_ids) whose K/V is written in this sequence's pages.
        self.num_computed_tokens = 0
        # Block table: page i holds positions [i*page_size, (i+1)*page_size).
        self.page_ids: list[int] = []
        # Prefix-cache hash of each leading *full, committed* page (block manager bookkeeping;
        # kept here so the hash chain survives without a per-sequence dict in the manager).
        self.block_hashes: list[int] = []
        # Tokens served from the prefix cache at the last admission (metrics only).
        self.num_cached_tokens = 0
        self.sampling_params = sampling_params  # opaque here; .max_tokens is read if present
        self.arrival = next(_arrival_counter) if arrival is None else arrival
        self.finish_reason: str | None = None
        self.num_preemptions = 0

    # ---- token views
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def block_table(self) -> list[int]:
        return self.page_ids

    @property
    def max_tokens(self) -> int | None:
        return getattr(self.sampling_params, "max_tokens", None)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without concatenating the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    def fork(self, request_id: str) -> Sequence:
        """A new sequence with the same tokens and sampling params (for n>1 samples).

        It has no pages yet: `BlockManager.fork(parent, child)` shares the parent's pages.
        The caller typically overwrites the child's last output token with its own sample
        (safe: the last token's KV is never computed yet).
        """
        child = Sequence(request_id, self.prompt_token_ids, self.sampling_params)
        child.output_token_ids = list(self.output_token_ids)
        return child

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop cache state, keep generated tokens.

        The next prefill processes prompt + output so far, so sampling resumes exactly where
        it stopped. Pages must already have been released by the block manager.
        """
        assert not self.page_ids, "free the pages before resetting"
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_hashes = []
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"pages={self.page_ids})"
        )
