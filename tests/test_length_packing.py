"""``packing = "length"``: steps grouped by length (nbzoo.length_grouping), each laid end to end
in one row (packing.one_row) and attended per sequence (nbzoo.varlen_attention), and the knob.

The equivalence tests pack the length-grouped steps of 16 sentences into one row each and
require the loss and every gradient (and each sentence's logits) to equal those of the same
sentences padded, to 1e-5, for every model packing serves: ALBERT and RoBERTa classification,
BERT pre-training (transformers' batch and 06's MLPerf batch). They run in float64: a gradient
that sums to about zero (a classifier's bias over balanced labels) is then compared with its
exact value, not with float32's rounding of the sum (tests/test_packing.py checks float32). On
a CPU varlen attention pads each sequence to the step's longest for SDPA; torch's varlen
FlashAttention kernel runs on CUDA only (bench/gpu_check.sh). The epoch tests require every
sentence once per epoch: one process, every rank of several, and through the training loop
with gradient accumulation.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForPreTraining,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from nbzoo import (
    device,
    length_grouping,
    packing,
    pretraining,
    sentence_prediction,
    varlen_attention,
)
from nbzoo.data import mlperf
from nbzoo.data.fairseq_batching import EpochBatches
from nbzoo.presets import Config
from nbzoo.train import TrainConfig, epoch_batches, fit
from tests.test_packing import (
    TOL,
    albert,
    grad_error,
    make_items,
    mlperf_samples,
    run,
    tiny_pretraining_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# two steps of 8 when grouped: [30 26 22 19 17 14 12 11] and [9 8 7 6 5 4 3 2]
LENGTHS = [17, 5, 30, 9, 12, 3, 22, 8, 4, 26, 6, 11, 19, 7, 2, 14]
WIDTH = 32


def grouped_steps(lengths=LENGTHS, batch_size=8, mult=None):
    return list(length_grouping.GroupedBatches(range(len(lengths)), lengths, batch_size, mult=mult))


# ----------------------------------------------------------------------------- one row


def test_a_step_in_one_row_is_a_multiple_of_eight_long_its_sentences_end_to_end():
    items = make_items([5, 3, 4], 8, 50, 0)
    for i, item in enumerate(items):
        item["labels"] = torch.tensor(i)
        del item["token_type_ids"]  # fairseq's items (03) carry none
    batch = packing.PackedCollator(8, one_row=True)(items)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["sequence_ids"].tolist() == [[1] * 5 + [2] * 3 + [3] * 4 + [0] * 4]
    assert batch["position_ids"][0, :12].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert batch["cls_positions"].tolist() == [0, 5, 8]
    # zeros, explicitly: a model's own token types stop at its position table (8 here)
    assert batch["token_type_ids"].tolist() == [[0] * 16]


def test_one_row_refuses_a_sentence_longer_than_the_maximum():
    with pytest.raises(ValueError, match="sequence 1 has length 40"):
        packing.one_row([3, 40], 32)


# ----------------------------------------------------------------------------- grouping


def test_grouped_steps_hold_sentences_of_about_one_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 128, 800).tolist()
    steps = grouped_steps(lengths, 8)
    spread = [max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps]
    assert np.median(spread) <= 4  # 800 sentences in 4 mega-batches of 200
    assert max(spread) < 20


@pytest.mark.parametrize(("n", "batch_size"), [(100, 8), (7, 3), (64, 32), (1, 4)])
def test_an_epoch_visits_every_sentence_once(n, batch_size):
    lengths = np.random.default_rng(n).integers(1, 64, n).tolist()
    plan = length_grouping.batch_plan(lengths, n, batch_size, seed=3)
    for epoch in range(2):
        steps = plan(epoch, 0, 1)
        assert len(steps) == len(epoch_batches(n, batch_size, 3, epoch))
        assert sorted(i for s in steps for i in s) == list(range(n))
    assert list(plan(0, 0, 1)) == list(plan(0, 0, 1))  # a resumed epoch sees the same steps
    if n > batch_size:
        assert list(plan(0, 0, 1)) != list(plan(1, 0, 1))


@pytest.mark.parametrize(("n", "world_size"), [(96, 4), (50, 2), (13, 4)])
def test_ranks_share_an_epoch_each_sentence_once_in_as_many_steps(n, world_size):
    lengths = np.random.default_rng(0).integers(1, 512, n).tolist()
    plan = length_grouping.batch_plan(lengths, n, 4, seed=0)
    ranks = [plan(0, r, world_size) for r in range(world_size)]
    assert len({len(steps) for steps in ranks}) == 1  # every rank steps as often
    seen = Counter(i for steps in ranks for s in steps for i in s)
    assert set(seen) == set(range(n))
    padded = -(-n // world_size) * world_size  # DistributedSampler's padding, as the plain order
    assert sum(seen.values()) == padded and sum(c - 1 for c in seen.values()) == padded - n
    for step in zip(*ranks, strict=True):  # the ranks' micro-batches of a step: one length range
        every = sorted(lengths[i] for s in step for i in s)
        assert all(every[-1] - lengths[i] <= every[-1] - every[0] for s in step for i in s)


def test_the_training_loop_with_accumulation_sees_every_sentence_once_per_epoch():
    n, seen = 37, []

    def collate(items):
        seen.extend(int(x["i"]) for x in items)
        return {"x": torch.stack([x["x"] for x in items])}

    data = [{"i": torch.tensor(i), "x": torch.randn(3)} for i in range(n)]
    model = torch.nn.Linear(3, 1)
    plan = length_grouping.batch_plan([i % 9 + 1 for i in range(n)], n, 4, seed=0)
    result = fit(
        model, data, torch.optim.SGD(model.parameters(), lr=0.1), device.Runtime("cpu", "fp32"),
        TrainConfig(epochs=2, batch_size=4, grad_accum=3), collate_fn=collate,
        loss_fn=lambda m, b: m(b["x"]).pow(2).mean(), batch_plan=plan,
    )  # fmt: skip
    assert sorted(seen[:n]) == sorted(seen[n:]) == list(range(n))
    assert result.steps == 2 * 4  # 10 micro-batches an epoch, 3 per optimizer step
    assert result.samples == 2 * n


def test_fairseq_batches_grouped_by_length_keep_every_sentence_and_the_token_limit():
    sizes = np.random.default_rng(0).integers(3, 60, 300)
    plain = EpochBatches(sizes, 400, 32, seed=0)
    grouped = EpochBatches(sizes, 400, 32, seed=0, length_window=96)
    assert sorted(np.concatenate(grouped.batches).tolist()) == list(range(300))
    assert all(len(b) * sizes[b].max() <= 400 and len(b) <= 32 for b in grouped.batches)
    spread = [sizes[b].max() - sizes[b].min() for b in grouped.batches]
    assert np.median(spread) < np.median([sizes[b].max() - sizes[b].min() for b in plain.batches])
    assert sorted(i for b in grouped.epoch(2) for i in b) == list(range(300))


# ----------------------------------------------------------------------------- the knob


def test_the_packing_knob_names_a_mode_and_refuses_true_and_false():
    assert packing.mode({"packing": "length"}) == "length"
    assert packing.mode({}) == "off"  # notebook 02 calls 01's training without the knob
    with pytest.raises(ValueError, match="true was plain, false off"):
        packing.mode({"packing": True})
    with pytest.raises(ValueError, match="one of off, plain, length; got 'yes'"):
        packing.mode({"packing": "yes"})


def test_notebook_03_groups_its_steps_only_in_length_mode():
    class Split:
        item_tokens = np.random.default_rng(0).integers(3, 60, 200)

        def __len__(self):
            return 200

    cfg = Config(max_tokens=0, batch_size=8, seed=0, packing="plain")
    assert sentence_prediction.batch_plan(cfg, Split()) is None
    steps = sentence_prediction.batch_plan(Config(cfg, packing="length"), Split())(0, 0, 1)
    assert len(steps) == 25 and sorted(i for s in steps for i in s) == list(range(200))
    fairseq = sentence_prediction.batch_plan(Config(cfg, max_tokens=400, packing="length"), Split())
    assert sorted(i for s in fairseq(0, 0, 1) for i in s) == list(range(200))


def test_notebook_06_packs_adamw_and_sgd_but_never_thor():
    cfg = Config(packing="length", batch_size=4, seed=0)
    samples = [{"input_mask": np.ones(n)} for n in (5, 9, 2, 7)]
    assert pretraining.batch_plan_for("thor", cfg, samples) is None
    assert pretraining.collate_for("thor", cfg) is mlperf.collate
    assert pretraining.collate_for("adamw", cfg).one_row
    assert list(pretraining.batch_plan_for("sgd", cfg, samples)(0, 0, 1)) == [[1, 3, 0, 2]]


# ----------------------------------------------------------------------------- equivalence


def length_step_items(vocab, pad_id, pairs, labels):
    """The 16 sentences of LENGTHS as padded items, and their two length-grouped steps."""
    items = make_items(LENGTHS, WIDTH, vocab, pad_id, pairs=pairs)
    for item, y in zip(items, labels, strict=True):
        item["labels"] = y
    return items, grouped_steps(mult=2)  # one mega-batch of both steps


def check_length_step(model, patch, items, steps, pad_id, **collate_keys):
    """Each step padded (the model's SDPA) and in one row (the patch, varlen attention): the
    same loss and gradients; yields the outputs."""
    model.double().set_attn_implementation("sdpa")
    collate = packing.PackedCollator(WIDTH, pad_token_id=pad_id, one_row=True, **collate_keys)
    for step in steps:
        chosen = [items[i] for i in step]
        padded = torch.utils.data.default_collate(chosen)
        packed = collate(chosen)
        order = packed.pop("packed_order")
        assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] % 8 == 0
        ref, ref_grads = run(model, padded)
        with packing.attention_set(model, varlen_attention.NAME):
            got, got_grads = run(model, packed, patch)
        assert model.config._attn_implementation == "sdpa"  # the model's own, after the block
        assert abs(got.loss.item() - ref.loss.item()) <= TOL * abs(ref.loss.item())
        assert grad_error(ref_grads, got_grads) <= TOL
        yield ref, got, order


def test_a_length_grouped_albert_step_in_one_row_matches_it_padded():
    labels = torch.tensor([i % 2 for i in range(len(LENGTHS))])
    items, steps = length_step_items(100, 0, True, labels)
    checked = check_length_step(albert(2), "albert_packed_sequences", items, steps, 0)
    for ref, got, order in checked:
        assert torch.allclose(got.logits, ref.logits[order], atol=TOL, rtol=0)


def test_a_length_grouped_roberta_step_in_one_row_matches_it_padded():
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    model = RobertaForSequenceClassification(config).train()
    model.set_attn_implementation("sdpa")
    labels = torch.tensor([(i // 3) % 2 for i in range(len(LENGTHS))])
    items, steps = length_step_items(100, 1, False, labels)
    for ref, got, order in check_length_step(model, "roberta_packed_sequences", items, steps, 1):
        assert torch.allclose(got.logits, ref.logits[order], atol=TOL, rtol=0)


def test_a_length_grouped_bert_pretraining_step_in_one_row_matches_it_padded():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.1,
    )  # fmt: skip
    model = BertForPreTraining(config).train()
    model.set_attn_implementation("sdpa")
    items = make_items(LENGTHS, WIDTH, config.vocab_size, 0, pairs=True)
    g = torch.Generator().manual_seed(3)
    for i, item in enumerate(items):
        n = LENGTHS[i]
        mlm = torch.full((WIDTH,), -100, dtype=torch.long)
        pos = torch.randperm(n, generator=g)[: max(1, n // 6)]
        mlm[pos] = item["input_ids"][pos]
        item["input_ids"][pos] = 103
        item["labels"], item["next_sentence_label"] = mlm, torch.tensor(i % 2)
    keys = dict(token_labels=("labels",), sequence_labels=("next_sentence_label",))
    steps = grouped_steps(mult=2)
    for ref, got, order in check_length_step(
        model, "bert_pretraining_packed", items, steps, 0, **keys
    ):
        assert torch.allclose(
            got.seq_relationship_logits, ref.seq_relationship_logits[order], atol=TOL, rtol=0
        )


def test_a_length_grouped_mlperf_step_in_one_row_gives_notebook_06s_loss_and_gradients():
    bert, model = tiny_pretraining_model()
    model = model.double()
    samples = mlperf_samples(LENGTHS * 2, WIDTH)
    cfg = Config(packing="length", batch_size=4, seed=0)  # 2 mega-batches of 4 steps of 4
    steps = list(pretraining.batch_plan_for("adamw", cfg, samples)(0, 0, 1))
    collate = pretraining.collate_for("adamw", cfg)
    for step in steps:
        chosen = [samples[i] for i in step]
        packed = collate(chosen)
        assert packed["input_ids"].shape[0] == 1
        ref, ref_grads = run(model, mlperf.collate(chosen))
        with packing.attention_set(bert, packing.LENGTH_ATTENTION["length"]):
            got, got_grads = run(model, packed)
        assert abs(got["loss"].item() - ref["loss"].item()) <= TOL * abs(ref["loss"].item())
        assert grad_error(ref_grads, got_grads) <= TOL


# ----------------------------------------------------------------------------- varlen attention


def test_varlen_boundaries_split_rows_into_sequences_and_their_padding():
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 0, 0]])
    cu, longest = varlen_attention.boundaries(ids)
    assert cu.dtype == torch.int32 and longest == 6
    assert cu.tolist() == [0, 2, 5, 6, 12, 15, 16, 18]  # row 2's sequence 1 follows row 1's


def test_varlen_attention_of_rows_of_max_length_matches_the_block_diagonal_mask():
    """Plain rows (several sentences each) attended per sequence: as SDPA under the mask."""
    model = albert(2).double()
    items = make_items(LENGTHS[:8], WIDTH, 100, 0, pairs=True)
    for i, item in enumerate(items):
        item["labels"] = torch.tensor(i % 2)
    packed = packing.PackedCollator(WIDTH)(items)
    packed.pop("packed_order")
    assert packed["input_ids"].shape[0] < 8
    ref, ref_grads = run(model, packed, "albert_packed_sequences")
    with packing.attention_set(model, varlen_attention.NAME):
        got, got_grads = run(model, packed, "albert_packed_sequences")
    assert torch.allclose(got.logits, ref.logits, atol=TOL, rtol=0)
    assert grad_error(ref_grads, got_grads) <= TOL


def test_a_model_set_to_varlen_runs_ordinary_batches_as_sdpa():
    model = albert(2).eval()
    batch = torch.utils.data.default_collate(make_items([4, 6, 9], 12, 100, 0))
    with torch.no_grad():
        ref = model(**batch).logits
        with packing.attention_set(model, varlen_attention.NAME):
            got = model(**batch).logits
    assert torch.equal(ref, got)


def test_full_length_sequences_need_no_padding_for_varlen_attention():
    q, k, v = (torch.randn(2 * 6, 3, 4, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    got = varlen_attention._padded_per_sequence(q, k, v, cu, 6, 0.0, None)
    rows = [t.view(2, 6, 3, 4).transpose(1, 2) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*rows).transpose(1, 2).reshape(12, 3, 4)
    assert torch.allclose(got, ref)
    ragged = torch.tensor([0, 5, 12], dtype=torch.int32)  # padded to 7, keys masked
    got = varlen_attention._padded_per_sequence(q, k, v, ragged, 7, 0.0, None)
    first = [t[:5].transpose(0, 1) for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*first).transpose(0, 1)
    assert torch.allclose(got[:5], ref)


def test_length_packing_attends_with_varlen_and_plain_rows_with_a_mask():
    assert packing.attention_implementation("cpu", mode="length") == varlen_attention.NAME
    assert packing.attention_implementation("cuda", mode="length") == varlen_attention.NAME
    assert packing.attention_implementation("cpu") == "sdpa"
    assert packing.attention_implementation("cuda") == "flex_attention"
    assert packing.attention_implementation("cuda", compiled=False) == "sdpa"
    with pytest.raises(ValueError, match="packing attention must be auto or one of"):
        packing.attention_implementation("cpu", "varlen")


def test_flex_attention_asked_for_on_a_cpu_is_refused_in_favour_of_sdpa():
    with pytest.raises(ValueError, match="flex_attention is not used on a CPU.*take sdpa"):
        packing.attention_implementation("cpu", "flex_attention")
    assert packing.attention_implementation("cuda", "flex_attention") == "flex_attention"
