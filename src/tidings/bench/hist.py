"""A small HDR-style latency histogram: log buckets with ~1.6% precision, no numpy.

Values are integers (the bench records microseconds). Values below 128 get one bucket
each; above that every power of two is split into 64 linear sub-buckets, so a bucket's
width is under 1/64 of its value. Histograms merge by adding counts, which is how the
load-generator processes' results are combined.
"""

from __future__ import annotations

SUB_BITS = 6
SUB = 1 << SUB_BITS  # 64 sub-buckets per power of two
LINEAR = 2 * SUB  # values below this have a bucket each
MAX_VALUE = (1 << 40) - 1  # ~12.7 days in microseconds: clamp above


def bucket_of(value: int) -> int:
    if value < LINEAR:
        return value if value > 0 else 0
    if value > MAX_VALUE:
        value = MAX_VALUE
    e = value.bit_length() - (SUB_BITS + 1)
    return e * SUB + (value >> e)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value that land in bucket ``index``."""
    if index < LINEAR:
        return index, index
    e = index // SUB - 1
    m = index - e * SUB
    return m << e, ((m + 1) << e) - 1


class Histogram:
    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        b = bucket_of(value)
        counts = self.counts
        counts[b] = counts.get(b, 0) + 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        if other.count:
            if self.count == 0 or other.min < self.min:
                self.min = other.min
            self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, p: float) -> int:
        """The value at percentile ``p`` (0-100): the top of its bucket, capped at the max."""
        if self.count == 0:
            return 0
        rank = max(1, -(-self.count * p // 100))  # ceil, at least the first sample
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(bucket_bounds(b)[1], self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "buckets": {str(b): n for b, n in sorted(self.counts.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Histogram:
        h = cls()
        buckets = data.get("buckets", {})
        assert isinstance(buckets, dict)
        h.counts = {int(b): int(n) for b, n in buckets.items()}
        h.count = int(str(data.get("count", 0)))
        h.total = int(str(data.get("total", 0)))
        h.min = int(str(data.get("min", 0)))
        h.max = int(str(data.get("max", 0)))
        return h
