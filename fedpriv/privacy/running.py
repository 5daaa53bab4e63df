"""Running figures over a population: the exact max and mean of one value per member.

The local-DP monitor (:mod:`fedpriv.privacy.local_monitor`) publishes, every round, the largest
and the mean epsilon over every client seen so far; recomputing them costs time in the clients
seen (100,000 and more), while only the round's clients change. These figures are privacy
statements, so they are exact, not approximate: the mean equals ``math.fsum(values) / len(values)``
and the max equals ``max(values)`` (NaN if any value is NaN), whatever the order of the updates.
"""

from __future__ import annotations

import heapq
import math

_SCALE = 1 << 1074  # every finite double is an integer multiple of 2**-1074


class RunningFigures:
    """The exact max and mean of one figure per client, in O(log clients) per changed figure.

    Written by hand: no library keeps an exact sum under removals (``math.fsum`` is O(n) a call).
    The finite figures are summed as integers in units of 2**-1074 (exact), and the mean is that
    sum divided by the count, correctly rounded: the same as ``math.fsum(figures) / len(figures)``.
    The max is the top of a heap whose stale entries are dropped when they reach the top. A NaN
    figure makes both NaN, an infinite one makes them infinite (as a plain sum and max would);
    non-finite figures (not expected: a DP-SGD ledger's epsilon is finite when it adds noise) cost
    O(their number) a call.
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self._sum = 0  # the finite figures' exact sum, in units of 2**-1074
        self._heap: list[tuple[float, str]] = []  # (-figure, client); an entry is stale once its figure changed
        self._nonfinite: dict[str, float] = {}

    def set(self, key: str, value: float) -> None:
        """``key``'s figure is now ``value`` (O(log n); the figures of other keys are untouched)."""
        old = self.values.get(key)
        if old is not None:
            if old == value:
                return
            if math.isfinite(old):
                self._sum -= _scaled(old)
            else:
                del self._nonfinite[key]
        self.values[key] = value
        if not math.isfinite(value):
            self._nonfinite[key] = value
            return
        self._sum += _scaled(value)
        heapq.heappush(self._heap, (-value, key))
        if len(self._heap) > 2 * len(self.values) + 64:  # drop stale entries: amortised O(1) a change
            self._heap = [(-v, k) for k, v in self.values.items() if math.isfinite(v)]
            heapq.heapify(self._heap)

    def max(self) -> float:
        if not self.values:
            return 0.0
        odd = list(self._nonfinite.values())
        if any(math.isnan(v) for v in odd):
            return math.nan
        if math.inf in odd:
            return math.inf
        heap = self._heap
        while heap and self.values.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)
        return -heap[0][0] if heap else -math.inf

    def mean(self) -> float:
        if not self.values:
            return 0.0
        if self._nonfinite:
            return sum(self._nonfinite.values()) / len(self.values)
        return (self._sum / _SCALE) / len(self.values)  # int / int is correctly rounded in Python


def _scaled(x: float) -> int:
    """``x`` (finite) as an exact integer count of 2**-1074."""
    num, den = x.as_integer_ratio()  # den is a power of two <= 2**1074
    return num * (_SCALE // den)
