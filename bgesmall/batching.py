"""Grouping sequences into forward passes by a token budget, not a count."""

from __future__ import annotations

from typing import Iterator, Sequence


def token_budget_batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices of consecutive sequences whose lengths add up to at most `budget` (a longer one goes alone).

    Sequences are packed without padding, so a batch costs exactly its real tokens and the grouping needs
    no sorting; input order is kept.
    """
    batch: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch
