"""fairseq's ``--max-tokens`` batching, as its ``sentence_prediction`` task and trainer use it.

fairseq (at the seed's commit d871f616) builds the batches of a split once and reuses them every
epoch:

1. order: ``sentence_prediction`` wraps the split in ``SortDataset(sort_order=[shuffle])`` with
   ``shuffle = np.random.permutation(n)`` drawn under ``numpy_seed(seed)``, so
   ``ordered_indices()`` is ``np.lexsort([shuffle])``: a fixed random order, *not* sorted by
   length (other fairseq tasks sort by size here; this one does not);
2. ``data_utils.batch_by_size`` walks that order and closes a batch when adding the next sentence
   would make it exceed ``max_sentences`` sentences or ``max_tokens`` tokens, a batch's tokens
   being its sentence count times its longest sentence (padding included); with
   ``required_batch_size_multiple`` N > 1, batches keep a size below N or a multiple of N, and a
   last batch of another size is dropped;
3. every epoch (numbered from 1) ``EpochBatchIterator`` shuffles the list of batches under
   ``numpy_seed(seed + epoch)``, and rank r of w takes batches r, r + w, ...

fairseq's own code is Cython (``data_utils_fast.pyx``) and fairseq does not install on current
Python, so this is our implementation of the same rules, with numpy's legacy seeded generator so
that the order and the batches are fairseq's for the same seed. One difference: where fairseq
gives a rank with fewer batches an empty dummy batch, we give it the first batches of the
shuffled list again (as DistributedSampler pads), so every rank steps the same number of times.

Not fairseq's (nbzoo's ``packing = "length"``): with ``length_window`` the fixed order is sorted
by length, longest first, within windows of that many sentences before step 2 -- fairseq's own
way for the tasks that sort by size, within windows as transformers' ``group_by_length`` -- so
that each batch holds sentences of about one length. The batches are still fixed and shuffled
per epoch; each sentence is in exactly one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def batch_by_size(
    indices: Sequence[int],
    num_tokens: Sequence[int],
    max_tokens: int | None = None,
    max_sentences: int | None = None,
    required_batch_size_multiple: int = 1,
) -> list[np.ndarray]:
    """Cut ``indices`` (in their order) into batches; ``num_tokens[k]`` is the length of
    ``indices[k]``. None or a value <= 0 means no limit."""
    indices = np.asarray(indices, dtype=np.int64)
    sizes = np.asarray(num_tokens, dtype=np.int64)
    if len(indices) != len(sizes):
        raise ValueError(f"{len(indices)} indices but {len(sizes)} lengths")
    max_tokens = int(max_tokens or 0)
    max_sentences = int(max_sentences or 0)
    mult = int(required_batch_size_multiple)
    if mult < 1:
        raise ValueError(f"required_batch_size_multiple must be >= 1; got {mult}")
    if not len(indices):
        return []
    if max_tokens > 0 and int(sizes.max()) > max_tokens:
        k = int(np.argmax(sizes > max_tokens))
        raise ValueError(
            f"sentence {int(indices[k])} has {int(sizes[k])} tokens, more than max_tokens="
            f"{max_tokens}: raise max_tokens (or lower max_positions)"
        )

    def too_big(count: int, longest: int) -> bool:
        return (max_sentences > 0 and count > max_sentences) or (
            max_tokens > 0 and count * longest > max_tokens
        )

    ends: list[int] = []  # ends of the closed batches
    start = 0  # first position of the open batch
    kept_end = 0  # the open batch's part of an allowed size: [start, kept_end)
    kept_longest = 0
    tail_longest = 0  # the longest sentence in [kept_end, pos]
    for pos, length in enumerate(sizes.tolist()):
        tail_longest = max(tail_longest, length)
        count = pos + 1 - start
        if too_big(count, max(kept_longest, tail_longest)):
            # Close the allowed part; the tail opens the next batch. A tail too big on its own
            # (possible with a multiple > 1) is closed without the current sentence.
            if max_tokens > 0 and tail_longest * (pos + 1 - kept_end) > max_tokens:
                ends += [kept_end, pos]
                tail_longest = length
            else:
                ends.append(kept_end)
            start = ends[-1]
            kept_end, kept_longest, tail_longest = pos + 1, tail_longest, 0
        elif count < mult or count % mult == 0:
            kept_end, kept_longest, tail_longest = pos + 1, max(kept_longest, tail_longest), 0
    ends.append(kept_end)
    if kept_end != len(indices):
        ends.append(len(indices))
    bounds = [0, *ends]
    batches = [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if mult > 1 and len(batches[-1]) % mult != 0:
        batches = batches[:-1]
    return batches


class EpochBatches:
    """A sentence-prediction split's fixed batches, shuffled per epoch and sharded per rank."""

    def __init__(
        self,
        num_tokens: Sequence[int],
        max_tokens: int | None,
        max_sentences: int | None,
        seed: int,
        required_batch_size_multiple: int = 1,
        length_window: int | None = None,
    ):
        n = len(num_tokens)
        shuffle = np.random.RandomState(seed).permutation(n)
        order = np.lexsort([shuffle])
        sizes = np.asarray(num_tokens, dtype=np.int64)[order]
        if length_window is not None:
            if length_window < 1:
                raise ValueError(f"length_window must be at least 1, got {length_window}")
            windows = range(0, n, length_window)
            # longest first within each window, ties in the fixed order (a stable sort)
            order = np.concatenate(
                [order[w:][:length_window][np.argsort(-sizes[w:][:length_window], kind="stable")]
                 for w in windows] or [order]
            )  # fmt: skip
            sizes = np.asarray(num_tokens, dtype=np.int64)[order]
        self.seed = seed
        self.batches = batch_by_size(
            order, sizes, max_tokens, max_sentences, required_batch_size_multiple
        )
        if not self.batches:
            raise ValueError("no batch: the split is empty")

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Rank ``rank``'s batches of ``epoch`` (counted from 0 here, from 1 in fairseq)."""
        batches = list(self.batches)
        np.random.RandomState(self.seed + epoch + 1).shuffle(batches)
        per_rank = -(-len(batches) // world_size)
        padded = (batches * world_size)[: per_rank * world_size]
        return [b.tolist() for b in padded[rank::world_size]]
