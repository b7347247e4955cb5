"""``packing = "length"``: steps grouped by length (nbzoo.length_grouping), rows fitted to each
step (packing.fitted_rows), and the knob that picks it.

The equivalence tests pack the length-grouped steps of 16 sentences into fitted rows and require
the loss and every gradient (and each sentence's logits) to equal those of the same sentences
padded, to 1e-5, for every model packing serves: ALBERT and RoBERTa classification, BERT
pre-training (transformers' batch and 06's MLPerf batch). They run in float64: a gradient that
sums to about zero (a classifier's bias over balanced labels) is then compared with its exact
value, not with float32's rounding of the sum (tests/test_packing.py checks float32). The epoch
tests require every sentence once per epoch: one process, every rank of several, and through
the training loop with gradient accumulation.
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
from tests.test_packing import TOL, albert, grad_error, make_items, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# two steps of 8 when grouped: [30 26 22 19 17 14 12 11] and [9 8 7 6 5 4 3 2]
LENGTHS = [17, 5, 30, 9, 12, 3, 22, 8, 4, 26, 6, 11, 19, 7, 2, 14]
WIDTH = 32


def grouped_steps(lengths=LENGTHS, batch_size=8, mult=None):
    return list(length_grouping.GroupedBatches(range(len(lengths)), lengths, batch_size, mult=mult))


# ----------------------------------------------------------------------------- fitted rows


def test_fitted_rows_hold_long_sentences_one_a_row_and_short_ones_several():
    width, packs = packing.fitted_rows([120, 118, 117, 115], 128, hidden_size=768)
    assert width == 120 and sorted(map(len, packs)) == [1, 1, 1, 1]  # dynamic padding
    width, packs = packing.fitted_rows([30, 29, 29, 28, 27, 26, 26, 25], 128, hidden_size=768)
    assert width == 56 and sorted(map(len, packs)) == [2, 2, 2, 2]  # 224 tokens, not 8 x 32


def test_fitted_rows_are_a_multiple_of_eight_within_the_maximum():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 101, rng.integers(1, 20)).tolist()
        width, packs = packing.fitted_rows(lengths, 100, hidden_size=64)
        assert width <= 100 and (width % 8 == 0 or width == 100)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in p) <= width for p in packs)


def test_a_narrow_model_prefers_short_rows_to_long_shared_ones():
    lengths = [30, 29, 29, 28]
    assert packing.fitted_rows(lengths, 128)[0] == 120  # tokens only: one row of 4
    assert packing.fitted_rows(lengths, 128, hidden_size=8)[0] == 32  # attention dominates


def test_fitted_rows_refuse_a_sentence_longer_than_the_maximum():
    with pytest.raises(ValueError, match="sequence 1 has length 40"):
        packing.fitted_rows([3, 40], 32)


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
    assert pretraining.collate_for("adamw", cfg).fit_rows
    assert list(pretraining.batch_plan_for("sgd", cfg, samples)(0, 0, 1)) == [[1, 3, 0, 2]]


# ----------------------------------------------------------------------------- equivalence


def length_step_items(vocab, pad_id, pairs, labels):
    """Both length-grouped steps of LENGTHS as padded items, each step packed into fitted rows
    (the short step's rows shorter than WIDTH and holding several sentences)."""
    items = make_items(LENGTHS, WIDTH, vocab, pad_id, pairs=pairs)
    for item, y in zip(items, labels, strict=True):
        item["labels"] = y
    return items, grouped_steps(mult=2)  # one mega-batch of both steps


def check_length_step(model, patch, items, steps, pad_id, packed_attention=None, **collate_keys):
    """Each step padded (the model's own attention) and packed into fitted rows (the patch, and
    ``packed_attention`` where given): the same loss and gradients; yields the outputs."""
    model.double()
    padded_attention = model.config._attn_implementation
    collate = packing.PackedCollator(
        WIDTH, pad_token_id=pad_id, fit_rows=True, hidden_size=768, **collate_keys
    )
    shapes = []
    for step in steps:
        chosen = [items[i] for i in step]
        padded = torch.utils.data.default_collate(chosen)
        packed = collate(chosen)
        order = packed.pop("packed_order")
        shapes.append(tuple(packed["input_ids"].shape))
        model.set_attn_implementation(padded_attention)
        ref, ref_grads = run(model, padded)
        model.set_attn_implementation(packed_attention or padded_attention)
        got, got_grads = run(model, packed, patch)
        assert abs(got.loss.item() - ref.loss.item()) <= TOL * abs(ref.loss.item())
        assert grad_error(ref_grads, got_grads) <= TOL
        yield ref, got, order
    assert shapes[1][0] < len(steps[1]) and shapes[1][1] < WIDTH  # the short step: fitted rows


def test_a_length_grouped_albert_step_in_fitted_rows_matches_it_padded():
    labels = torch.tensor([i % 2 for i in range(len(LENGTHS))])
    items, steps = length_step_items(100, 0, True, labels)
    for ref, got, order in check_length_step(albert(2), "albert_packed_sequences", items, steps, 0):
        assert torch.allclose(got.logits, ref.logits[order], atol=TOL, rtol=0)


def test_a_length_grouped_roberta_step_in_fitted_rows_matches_it_padded():
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


def test_a_length_grouped_bert_pretraining_step_in_fitted_rows_matches_it_padded():
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


def test_a_length_grouped_mlperf_step_in_fitted_rows_gives_notebook_06s_loss_and_gradients():
    torch.manual_seed(0)
    bert = pretraining.build_model(
        dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0),
        seed=0,
    )  # fmt: skip
    bert.set_attn_implementation("sdpa")
    model = pretraining.PretrainingModel(bert).train().double()
    rng = np.random.default_rng(0)
    samples = []
    for n in LENGTHS * 2:
        ids = np.zeros(WIDTH, dtype=np.int64)
        ids[:n] = rng.integers(5, 120, n)
        k = max(1, n // 6)
        positions = np.zeros(5, dtype=np.int64)
        positions[:k] = np.sort(rng.choice(n, k, replace=False))
        weights = np.zeros(5, dtype=np.float32)
        weights[:k] = 1
        samples.append({
            "input_ids": ids, "input_mask": (np.arange(WIDTH) < n).astype(np.int64),
            "segment_ids": ((np.arange(WIDTH) >= n // 2) & (np.arange(WIDTH) < n)).astype(np.int64),
            "masked_lm_positions": positions, "masked_lm_ids": ids[positions] * (weights > 0),
            "masked_lm_weights": weights, "next_sentence_labels": np.array([n % 2]),
        })  # fmt: skip
    cfg = Config(packing="length", batch_size=4, seed=0)  # 2 mega-batches of 4 steps of 4
    steps = list(pretraining.batch_plan_for("adamw", cfg, samples)(0, 0, 1))
    collate = pretraining.collate_for("adamw", cfg, hidden_size=768)
    for step in steps:
        chosen = [samples[i] for i in step]
        packed = collate(chosen)
        assert packed["input_ids"].shape[1] <= WIDTH
        ref, ref_grads = run(model, mlperf.collate(chosen))
        got, got_grads = run(model, packed)
        assert abs(got["loss"].item() - ref["loss"].item()) <= TOL * abs(ref["loss"].item())
        assert grad_error(ref_grads, got_grads) <= TOL
    assert min(collate([samples[i] for i in s])["input_ids"].shape[1] for s in steps) < WIDTH


# ----------------------------------------------------------------------------- varlen attention


def test_varlen_boundaries_split_rows_into_sequences_and_their_padding():
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 0, 0]])
    cu, longest = varlen_attention.boundaries(ids)
    assert cu.dtype == torch.int32 and longest == 6
    assert cu.tolist() == [0, 2, 5, 6, 12, 15, 16, 18]  # row 2's sequence 1 follows row 1's


@pytest.mark.parametrize("patch", ["albert_packed_sequences", "bert_pretraining_packed"])
def test_varlen_attention_of_a_length_grouped_step_matches_it_padded(patch):
    """The CPU stand-in of torch's varlen kernel (one SDPA per sequence) checks the boundaries,
    the token stream's layout and the patches' plumbing; the kernel itself runs on the GPU check."""
    varlen_attention.register()
    if patch == "albert_packed_sequences":
        model, keys = albert(2), {}
        items, steps = length_step_items(100, 0, True, torch.tensor([i % 2 for i in LENGTHS]))
    else:
        torch.manual_seed(0)
        model = BertForPreTraining(
            BertConfig(
                vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        ).train()  # fmt: skip
        keys = dict(token_labels=("labels",), sequence_labels=("next_sentence_label",))
        items, steps = length_step_items(120, 0, True, [None] * len(LENGTHS))
        for i, item in enumerate(items):
            mlm = torch.full((WIDTH,), -100, dtype=torch.long)
            mlm[: LENGTHS[i] : 3] = item["input_ids"][: LENGTHS[i] : 3]
            item["labels"], item["next_sentence_label"] = mlm, torch.tensor(i % 2)
    model.set_attn_implementation("sdpa")
    steps_checked = check_length_step(
        model, patch, items, steps, 0, packed_attention=varlen_attention.NAME, **keys
    )
    assert len(list(steps_checked)) == 2


def test_varlen_attention_refuses_dropout_and_batches_without_boundaries():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="packed batches only"):
        varlen_attention.attention_forward(None, q, q, q, None)
    with pytest.raises(ValueError, match="no dropout"):
        cu = torch.tensor([0, 4], dtype=torch.int32)
        varlen_attention.attention_forward(None, q, q, q, None, dropout=0.1, cu_seq_lens=cu)


def test_cuda_packs_with_varlen_where_no_attention_dropout_forbids_it(monkeypatch):
    monkeypatch.setattr(varlen_attention, "available", lambda: True)
    assert packing.attention_implementation("cuda") == varlen_attention.NAME
    assert packing.attention_implementation("cuda", attention_dropout=0.1) == "flex_attention"
    assert packing.attention_implementation("cuda", attention_dropout=0.1, compiled=False) == "sdpa"
    assert packing.attention_implementation("cpu") == "sdpa"
