"""fairseq's --max-tokens batching (data_utils.batch_by_size and the sentence_prediction order)."""

import numpy as np
import pytest

from nbzoo.data.fairseq_batching import EpochBatches, batch_by_size


def as_lists(batches):
    return [b.tolist() for b in batches]


def test_a_batch_closes_when_sentences_times_its_longest_would_pass_max_tokens():
    assert as_lists(batch_by_size(range(4), [5, 5, 5, 5], max_tokens=10)) == [[0, 1], [2, 3]]
    # 2 x 8 = 16 fits; a third sentence makes 3 x 8 = 24: padding counts
    assert as_lists(batch_by_size(range(3), [2, 8, 3], max_tokens=16)) == [[0, 1], [2]]
    # one long sentence after three short ones: 4 x 10 > 20
    assert as_lists(batch_by_size(range(4), [3, 3, 3, 10], max_tokens=20)) == [[0, 1, 2], [3]]


def test_max_sentences_caps_a_batch_and_the_given_order_is_kept():
    order = [4, 2, 0, 3, 1]
    batches = batch_by_size(order, [1, 1, 1, 1, 1], max_sentences=2)
    assert as_lists(batches) == [[4, 2], [0, 3], [1]]
    mixed = batch_by_size(range(6), [4, 4, 4, 4, 4, 4], max_tokens=100, max_sentences=4)
    assert as_lists(mixed) == [[0, 1, 2, 3], [4, 5]]


def test_with_a_batch_size_multiple_batches_keep_multiples_and_a_ragged_last_one_is_dropped():
    assert [len(b) for b in batch_by_size(range(10), [1] * 10, max_sentences=5, **MULT2)] == [
        4,
        4,
        2,
    ]
    assert [len(b) for b in batch_by_size(range(9), [1] * 9, max_sentences=5, **MULT2)] == [4, 4]


MULT2 = {"required_batch_size_multiple": 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_lengths_make_batches_that_respect_both_limits_and_cover_every_index(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 120, size=500)
    order = rng.permutation(500)
    batches = batch_by_size(order, sizes[order], max_tokens=600, max_sentences=32)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 32 and len(b) * sizes[b].max() <= 600
    # greedy: each batch would break a limit with the next sentence added
    flat = np.concatenate(batches)
    start = 0
    for b in batches[:-1]:
        grown = flat[start : start + len(b) + 1]
        assert len(grown) > 32 or len(grown) * sizes[grown].max() > 600
        start += len(b)


def test_a_sentence_longer_than_max_tokens_is_named():
    with pytest.raises(ValueError, match="sentence 7 has 50 tokens, more than max_tokens=40"):
        batch_by_size([3, 7], [10, 50], max_tokens=40)


def test_sentence_prediction_batches_follow_fairseqs_seeded_order_and_are_fixed_across_epochs():
    sizes = np.arange(1, 41)
    plan = EpochBatches(sizes, max_tokens=60, max_sentences=8, seed=1)
    shuffle = np.random.RandomState(1).permutation(40)  # numpy_seed(seed) in load_dataset
    order = np.lexsort([shuffle])  # SortDataset(sort_order=[shuffle]).ordered_indices()
    assert np.concatenate(plan.batches).tolist() == order.tolist()
    one, two = plan.epoch(0), plan.epoch(1)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two)) and one != two
    expected = [b.tolist() for b in plan.batches]
    np.random.RandomState(1 + 1).shuffle(expected)  # EpochBatchIterator: numpy_seed(seed + epoch)
    assert one == expected


def test_ranks_take_every_other_batch_and_step_equally_often():
    plan = EpochBatches(np.full(50, 10), max_tokens=100, max_sentences=32, seed=0)
    assert len(plan) == 5  # 10 sentences of 10 tokens per batch
    b = plan.epoch(0)
    # rank r takes batches r, r + 2, ...; the shorter rank repeats the first batch
    assert plan.epoch(0, 0, 2) == [b[0], b[2], b[4]]
    assert plan.epoch(0, 1, 2) == [b[1], b[3], b[0]]
