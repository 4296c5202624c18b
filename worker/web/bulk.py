"""When a read of a film's picture goes into the audit log.

Every picture request (``image.png``, ``heatmap.png``, thumbnails included) is a read of patient
data and is audited, but a worklist page shows fifty thumbnails and refreshes: the same user
fetching the same picture of the same film again within :data:`REPEAT_WINDOW_S` is one audit row,
not one per refresh. A script that walks every film still leaves one row per film. The memory of
what was audited is bounded (oldest first out).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

REPEAT_WINDOW_S = 600.0


class BulkReadAudit:
    def __init__(
        self, window_s: float = REPEAT_WINDOW_S, max_entries: int = 50_000, clock=time.monotonic
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def due(self, username: str, sha256: str, picture: str) -> bool:
        """True when this read must be audited now (and remembers that it was)."""
        now = self._clock()
        key = (username, sha256, picture)
        with self._lock:
            while self._seen:
                oldest_key, at = next(iter(self._seen.items()))
                if len(self._seen) < self.max_entries and now - at <= self.window_s:
                    break
                del self._seen[oldest_key]
            at = self._seen.get(key)
            if at is not None and now - at <= self.window_s:
                return False
            self._seen.pop(key, None)
            self._seen[key] = now
            return True
