"""Which VL rows each data-parallel rank reads at each micro-step, and when it also reads the extra sources.

The VL rows form one endless stream: epoch e is a shuffle of all N rows by (seed, e), epochs back to back.
Micro-step k takes the next `micro_batch * dp_size` stream positions; rank r gets its contiguous block of
`micro_batch`. Resuming needs only the number of stream positions consumed (global VL rows).

Extras follow OFA's per-process counter (OFA_SPEC 4.1): a rank's 8th, 16th, ... row also yields the extra
examples (2 text infilling, 1 image infilling, 1 detection). Counting per rank keeps every rank's v2 presence
the same at every micro-step. Extra cycle c of rank r is the global cycle c * dp_size + r; cycle g reads text
rows 2g and 2g + 1, image row g and detection row g, each modulo its source's length, in file order as OFA.

The shuffle is a Feistel network over the index bits with cycle walking: a bijection of range(N) evaluated
per index, so start-up and memory stay flat in N (no per-epoch permutation array).
"""

from __future__ import annotations

from dataclasses import dataclass

EXTRA_EVERY = 8
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Shuffle:
    """For each epoch, a pseudo-random permutation of range(n) keyed by (seed, epoch)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain 2^(2 * half) is < 4n, so cycle walking takes < 4 steps on average
        self.mask = (1 << self.half) - 1

    def __call__(self, epoch: int, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} outside [0, {self.n})")
        keys = [_mix(_mix(_mix(self.seed & _M64) ^ epoch) ^ r) for r in range(self.ROUNDS)]
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in keys:
                left, right = right, left ^ (_mix(key ^ right) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


@dataclass(frozen=True)
class RowRef:
    epoch: int
    position: int  # position in the epoch's shuffled order: with (seed, epoch) it seeds the sample
    row: int  # VL row index
    extra_cycle: int | None  # global extra cycle this row triggers, if it is a rank's 8th row


class DistributedVLSampler:
    def __init__(self, num_rows: int, *, dp_rank: int, dp_size: int, micro_batch: int, seed: int):
        if num_rows <= 0:
            raise ValueError("the corpus has no VL rows")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        if micro_batch <= 0:
            raise ValueError(f"micro_batch={micro_batch} must be positive")
        self.num_rows, self.dp_rank, self.dp_size, self.micro_batch = num_rows, dp_rank, dp_size, micro_batch
        self.global_micro_batch = micro_batch * dp_size  # VL rows consumed per micro-step over all ranks
        self.shuffle = Shuffle(num_rows, seed)

    def step_of(self, consumed_samples: int) -> int:
        """The micro-step that starts after `consumed_samples` global VL rows."""
        if consumed_samples < 0 or consumed_samples % self.global_micro_batch:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a non-negative multiple of micro_batch x "
                f"dp_size = {self.global_micro_batch}"
            )
        return consumed_samples // self.global_micro_batch

    def micro_batch_rows(self, step: int) -> list[RowRef]:
        refs = []
        for j in range(self.micro_batch):
            s = step * self.global_micro_batch + self.dp_rank * self.micro_batch + j  # global stream position
            epoch, position = divmod(s, self.num_rows)
            local = step * self.micro_batch + j  # this rank's row counter
            cycle = None
            if (local + 1) % EXTRA_EVERY == 0:
                cycle = (local // EXTRA_EVERY) * self.dp_size + self.dp_rank
            refs.append(RowRef(epoch, position, self.shuffle(epoch, position), cycle))
        return refs
