"""Length-grouped batches for ``packing = "length"``: each step's sentences of about one length.

Transformers' ``Trainer(group_by_length=True)`` (its ``LengthGroupedSampler``) permutes the data,
cuts the permutation into mega-batches of ``mega_batch_mult`` batches and sorts each mega-batch
by length, longest first, so that consecutive batches hold sentences of about the same length:
padded to their longest, they hold little padding. :class:`GroupedBatches` mirrors that logic
(``transformers.trainer_pt_utils.get_length_grouped_indices``) instead of calling it, for two
reasons: transformers' function needs every length before the first step (06's MLPerf shards
would be read whole first) and moves the longest sentence into the first batch (so that an
out-of-memory error comes early), which needs them all too. Here a mega-batch is sorted when the
loop first reaches it, and the permutation is :func:`nbzoo.train.epoch_order`'s, so an epoch
holds the same sentences as the plain order's, each once (the padding DistributedSampler adds
for several ranks aside), and a resumed run sees the same batches.

Under torchrun the grouping is over global batches (``batch_size`` x ranks sentences) and rank
r takes every world_size-th sentence of a global batch from the r-th: the ranks' micro-batches
of a step have about the same length, so no rank waits for another's long rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nbzoo.train import epoch_order

MEGA_BATCHES = 50  # transformers' default mega_batch_mult (at most)

Lengths = Sequence[int] | Callable[[int], int]


def mega_batch_mult(n: int, batch_size: int) -> int:
    """Batches per mega-batch as transformers chooses it: 50, or fewer so that the data holds at
    least 4 mega-batches, and at least 1."""
    return max(1, min(n // (batch_size * 4), MEGA_BATCHES))


class GroupedBatches(Sequence[list[int]]):
    """One rank's micro-batches of one epoch (lists of sample indices), length-grouped."""

    def __init__(
        self,
        order: Sequence[int],
        lengths: Lengths,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        mult: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        if len(order) % world_size:
            raise ValueError(f"{len(order)} samples do not split over {world_size} ranks")
        self.order = list(order)
        self.length_of = lengths if callable(lengths) else lengths.__getitem__
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.mult = mult or mega_batch_mult(len(self.order), self.global_batch)
        self._sorted: dict[int, list[int]] = {}  # mega-batch number -> its samples, sorted

    def __len__(self) -> int:
        return -(-len(self.order) // self.global_batch)

    def mega_batch(self, m: int) -> list[int]:
        """Mega-batch ``m``'s samples, longest first (ties in permutation order)."""
        if m not in self._sorted:
            size = self.mult * self.global_batch
            chunk = self.order[m * size : (m + 1) * size]
            self._sorted[m] = sorted(chunk, key=lambda i: -int(self.length_of(i)))
        return self._sorted[m]

    def __getitem__(self, i):  # Sequence's int and slice protocol
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        mega = self.mega_batch(i // self.mult)
        start = (i % self.mult) * self.global_batch
        return mega[start : start + self.global_batch][self.rank :: self.world_size]


def batch_plan(
    lengths: Lengths, n: int, batch_size: int, seed: int, mult: int | None = None
) -> Callable[[int, int, int], GroupedBatches]:
    """A ``batch_plan(epoch, rank, world_size)`` for :func:`nbzoo.train.fit`: the epoch's
    permutation of ``n`` samples (``lengths[i]`` or ``lengths(i)`` tokens each), grouped."""

    def plan(epoch: int, rank: int = 0, world_size: int = 1) -> GroupedBatches:
        order = epoch_order(n, seed, epoch, world_size)
        return GroupedBatches(order, lengths, batch_size, rank, world_size, mult)

    return plan
