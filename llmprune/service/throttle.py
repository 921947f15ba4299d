"""Wrong tokens counted per client, so the service token cannot be guessed at network speed.

A client (its address, as the server sees it: behind a trusted proxy, the address the proxy
forwards) that sent ``limit`` wrong tokens within ``window_s`` seconds is refused, whatever it
sends, until the oldest of those has aged out. Refusing the right token too is the point: a
blocked guesser must not learn which guess was right from a different answer.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW_S = 60.0
CLIENTS = 10_000  # clients remembered at most; the least recently failed are forgotten first


class Throttle:
    def __init__(self, limit: int, window_s: float = WINDOW_S, clients: int = CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clients, self.clock = limit, window_s, clients, clock
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.lock = threading.Lock()  # the API's checks run on the event loop, the pages' in threads

    def wait(self, client: str) -> int:
        """Whole seconds until ``client`` may try again; 0 when it may now (or no limit is set)."""
        if self.limit <= 0:
            return 0
        with self.lock:
            times = self._recent(client)
            if times is None or len(times) < self.limit:
                return 0
            return max(1, math.ceil(times[0] + self.window_s - self.clock()))

    def failed(self, client: str) -> None:
        """Count one wrong token from ``client``."""
        if self.limit <= 0:
            return
        with self.lock:
            times = self._recent(client)
            if times is None:
                times = self.failures[client] = deque(maxlen=self.limit)
            times.append(self.clock())
            self.failures.move_to_end(client)
            while len(self.failures) > self.clients:
                self.failures.popitem(last=False)

    def _recent(self, client: str) -> deque[float] | None:
        times = self.failures.get(client)
        if times is None:
            return None
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        if not times:
            del self.failures[client]
            return None
        return times
