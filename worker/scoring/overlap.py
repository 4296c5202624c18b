"""Overlap decoding and scoring: start batch k+1 before batch k is scored.

The model and the decode pool need different resources at different times; with a strict
decode-then-score loop the pool idles while the model scores and the model waits for the
slowest film of each batch. :func:`prefetched` turns a lazy sequence of *started* batches
(claimed and handed to :meth:`worker.scoring.decode_pool.DecodePool.submit`, which returns at once)
into one whose next element is always already started when the current one is consumed, so
the pool decodes batch k+1 while the caller scores and stores batch k.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetched(items: Iterable[T], ahead: int = 1) -> Iterator[T]:
    """Yield ``items`` in order, having already produced the next ``ahead`` of them."""
    pending: deque[T] = deque()
    for item in items:
        pending.append(item)
        if len(pending) > ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
