"""How LSH groups vectors (nbzoo.lsh, notebook 04): the first-principles expectation (random
directions share a bucket one time in num_buckets), the pair counts against the plain definition,
and the hashing with fresh rotations leaving the model and torch's random state as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ReformerConfig, ReformerForMaskedLM

from nbzoo import lsh, patching, verdicts
from tests import figure_check
from tests.test_patches_longseq import reformer


@pytest.fixture(autouse=True)
def seeded_rotations():
    with patching.applied("reformer_lsh_seeded", "reformer_inference_path"):
        yield


def _lsh_module(num_buckets: int):
    model = reformer()
    for m in lsh.lsh_layers(model):
        m.num_buckets = num_buckets
    model.config.num_buckets = num_buckets
    return model, lsh.lsh_layers(model)[0]


def _one_lsh_layer(head_size: int = 16, num_buckets: int = 4) -> ReformerForMaskedLM:
    """One LSH layer right after the embeddings, no position information: a token's vector
    depends on the token alone."""
    torch.manual_seed(0)
    config = ReformerConfig(
        vocab_size=60,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=head_size,
        feed_forward_size=64,
        attn_layers=["lsh"],
        axial_pos_embds=False,
        max_position_embeddings=64,
        lsh_attn_chunk_length=16,
        num_buckets=num_buckets,
        num_hashes=2,
        hash_seed=7,
        is_decoder=False,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
    )
    model = ReformerForMaskedLM(config)
    with torch.no_grad():
        model.reformer.embeddings.position_embeddings.embedding.weight.zero_()
    return model


def _floor(num_buckets: int) -> verdicts.Estimate:
    return verdicts.Estimate("1/num_buckets", 1 / num_buckets, "proportion", 1, 0.0)


def test_with_two_buckets_random_directions_share_one_half_the_time():
    """Two buckets are one cut through the origin: equal halves for any rotation."""
    _, module = _lsh_module(2)
    share = lsh.random_directions_share(module, pairs=20_000, seed=1)
    verdict = verdicts.compare(share, _floor(2))
    assert not verdict.significant, verdict.text  # within two of its standard errors
    assert share.n == 20_000 * module.num_attention_heads * module.num_hashes


@pytest.mark.parametrize("num_buckets", [4, 8])
def test_random_directions_share_one_in_num_buckets_the_closer_the_larger_the_head(num_buckets):
    """Gaussian rotations cut the sphere into parts equal only on average: the share lies above
    1/num_buckets by a term that shrinks with the head size; at 128 dimensions it is within the
    standard error of 20 rotation draws x 4 x 2,000 pairs."""
    excess = {}
    for head_size in (16, 128):
        module = lsh.lsh_layers(_one_lsh_layer(head_size, num_buckets))[0]
        share = lsh.random_directions_share(module, pairs=2_000, seed=3, draws=range(100, 120))
        excess[head_size] = verdicts.compare(share, _floor(num_buckets))
    assert not excess[128].significant, excess[128].text
    assert excess[16].significant and excess[16].z > 3 * abs(excess[128].z), excess[16].text


def test_the_hashs_curve_runs_from_never_to_always_through_one_in_num_buckets():
    _, module = _lsh_module(4)
    cosines, share = lsh.collision_curve(module, draws=range(8))
    assert share[0] == 0.0  # opposite vectors take opposite buckets
    assert share[-1] == 1.0  # a vector shares its bucket with itself
    at_right_angles = share[np.argmin(np.abs(cosines))]
    assert abs(at_right_angles - 0.25) < 0.05
    assert np.all(np.diff(share) > -0.03)  # rising with the cosine, up to sampling noise


def test_the_captured_buckets_are_those_the_layer_hashed():
    model, _ = _lsh_module(4)
    ids = torch.randint(3, 60, (2, 64), generator=torch.Generator().manual_seed(0))
    for c in lsh.capture(model, ids):
        again = lsh.hash_with_fresh_rotations(c.module, c.vectors, c.buckets.shape[2], 7)
        assert torch.equal(again, c.buckets)  # hash_seed 7 is the model's own
        assert int(c.buckets.min()) >= 0 and int(c.buckets.max()) < 4


def test_fresh_rotations_leave_the_hash_seed_and_torchs_random_state_alone():
    model, module = _lsh_module(4)
    vectors = torch.randn(1, 2, 32, 16)
    state = torch.random.get_rng_state()
    other = lsh.hash_with_fresh_rotations(module, vectors, 2, 123)
    assert module.hash_seed == 7 and torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(other, lsh.hash_with_fresh_rotations(module, vectors, 2, 7))


def test_pair_shares_count_what_comparing_every_pair_counts():
    ids = torch.randint(3, 9, (3, 40), generator=torch.Generator().manual_seed(1))
    buckets = [torch.randint(0, 4, (3, 2, 2, 40), generator=torch.Generator().manual_seed(s))
               for s in (2, 3)]  # fmt: skip
    together, token_share = lsh._pair_shares(buckets, ids)
    off = ~torch.eye(40, dtype=torch.bool)
    same_token = (ids[:, :, None] == ids[:, None, :]) & off  # (B, L, L)
    for b in range(3):
        every, alike, pairs = [], 0.0, 0.0
        for layer in buckets:
            same = layer[b][..., :, None] == layer[b][..., None, :]  # (H, R, L, L)
            every.append(same[..., off].float().mean())
            alike += float((same & same_token[b]).sum())
            pairs += float(same_token[b].sum()) * same.shape[0] * same.shape[1]
        assert together[b] == pytest.approx(float(torch.stack(every).mean()))
        assert token_share[b] == pytest.approx(alike / pairs)


def test_pair_index_samples_distinct_positions_beyond_the_limit():
    g = torch.Generator().manual_seed(0)
    i, j = lsh.pair_index(16, g)
    assert len(i) == 16 * 15 and bool((i != j).all())
    i, j = lsh.pair_index(1024, g)
    assert len(i) == lsh.MAX_PAIRS and bool((i != j).all())
    assert int(i.max()) < 1024 and int(j.max()) < 1024


def test_positions_holding_the_same_token_share_a_bucket_every_time_without_positions():
    """With no position information a token's vector is the token's own: its positions hash
    alike in every round, and LSH's job -- similar vectors together -- is done perfectly."""
    ids = torch.randint(3, 60, (4, 64), generator=torch.Generator().manual_seed(0))
    ids[:, ::4] = 7  # a repeated token
    sharing = lsh.bucket_sharing(_one_lsh_layer(), ids, draws=4)
    assert sharing.num_buckets == 4
    assert sharing.same_token.value == pytest.approx(1.0)
    assert sharing.same_token.value > sharing.any_pair.value
    assert np.all(sharing.fresh["this model: positions holding the same token"] == 1.0)
    assert sharing.any_pair.n == 4 and sharing.any_pair.items is not None  # blocks: the units
    assert list(sharing.table().index) == list(sharing.fresh)
    assert len(sharing.summary()) == 3 and all(s.endswith(".") for s in sharing.summary())
    assert figure_check.problems(sharing.plot()) == []


def test_bucket_sharing_refuses_a_single_block_and_a_model_without_lsh():
    model, _ = _lsh_module(4)
    with pytest.raises(ValueError, match="at least two blocks"):
        lsh.bucket_sharing(model, torch.randint(3, 60, (1, 64)))
    with pytest.raises(ValueError, match="no LSH attention layer"):
        lsh.lsh_layers(torch.nn.Linear(2, 2))
