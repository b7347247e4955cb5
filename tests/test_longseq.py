"""Shared helpers of the Reformer / Longformer notebooks: metrics and baselines, model building,
the activation-memory measurement and the Longformer attention map."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nbzoo import device, longseq, patching
from tests.test_patches_longseq import longformer, reformer


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: evaluation must score exactly these."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0]])


def test_evaluate_mlm_matches_a_hand_computation():
    rt = device.setup("cpu", "fp32", 0)
    labels = torch.tensor([[-100, 2, 3, -100], [3, -100, -100, 3]])
    logits = torch.log_softmax(torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)), -1)
    logits[0, 1] = torch.log(torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1]))  # right
    logits[0, 2] = torch.log(torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]))  # wrong
    logits[1, 0] = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.6, 0.1]))  # right
    logits[1, 3] = torch.log(torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1]))  # wrong
    unigram = longseq.Unigram(np.array([0.0, 1.0, 2.0, 5.0, 0.0]))  # token 3 most frequent
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}]
    got = longseq.evaluate_mlm(FixedLogits(logits), batches, rt, unigram)
    nll = -(math.log(0.6) + math.log(0.1) + math.log(0.6) + math.log(0.1)) / 4
    assert got["masked_token_accuracy"] == pytest.approx(0.5)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["baseline_accuracy"] == pytest.approx(3 / 4)  # labels 2, 3, 3, 3
    smoothed = np.array([1.0, 2.0, 3.0, 6.0, 1.0]) / 13
    expected = math.exp(-(np.log(smoothed[2]) + 3 * np.log(smoothed[3])) / 4)
    assert got["unigram_perplexity"] == pytest.approx(expected)
    assert got["masked_tokens"] == 4


def test_unigram_ignores_special_tokens():
    blocks = torch.tensor([[0, 5, 5, 2], [0, 6, 5, 2]])
    uni = longseq.Unigram.fit(blocks, vocab_size=8, special_ids=[0, 1, 2])
    assert uni.most_frequent == 5 and uni.counts[0] == 0
    assert np.exp(uni.log_probs()).sum() == pytest.approx(1.0)


def test_reformer_config_requires_axial_shape_to_match_the_block():
    class Tok:  # what the config builder reads from a tokenizer
        pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

        def __len__(self):
            return 10

    tok = Tok()
    with pytest.raises(ValueError, match=r"multiplies to 64.*block_size = 128"):
        longseq.reformer_config({"axial_pos_shape": [8, 8]}, tok, 128)
    config = longseq.reformer_config({"axial_pos_shape": [8, 16], "is_decoder": True}, tok, 128)
    assert config.is_decoder is False and config.vocab_size == 10  # masked LM is bidirectional


def test_axial_helpers():
    assert longseq.axial_factors(2048) == [32, 64] and longseq.axial_factors(128) == [8, 16]
    params = longseq.axial_parameters(reformer().config)
    assert params == {"axial": 8 * 16 + 8 * 16, "one per position": 64 * 32}


def test_reformer_keeps_less_for_backward_than_full_attention():
    rt = device.setup("cpu", "fp32", 0)
    config = reformer().config
    ids = torch.randint(5, 60, (1, 256))
    small = longseq.measure_step(longseq.reformer_at_length(config, 256), ids, rt, repeats=1)
    twin = longseq.full_attention_twin(longseq.reformer_at_length(config, 256).config)
    full = longseq.measure_step(twin, ids, rt, repeats=1)
    assert 0 < small["activation_MiB"] < full["activation_MiB"] / 2
    assert small["seconds_per_step"] > 0


def test_step_time_is_the_median_of_its_repeats_with_their_spread(monkeypatch):
    """A busy machine slows some steps: the median and the spread show it, one step does not
    move the figure (steps of 1, 9 and 2 s: median 2, spread 8)."""
    rt = device.setup("cpu", "fp32", 0)
    ticks = iter([0.0, 1.0, 10.0, 19.0, 20.0, 22.0])
    monkeypatch.setattr(longseq.time, "perf_counter", lambda: next(ticks))
    ids = torch.randint(5, 60, (1, 256))
    row = longseq.measure_step(longseq.reformer_at_length(reformer().config, 256), ids, rt, 3)
    assert row["seconds_per_step"] == 2.0 and row["seconds_spread"] == 8.0


def test_saved_activation_bytes_counts_each_storage_once():
    x = torch.randn(256, 256, requires_grad=True)
    _, nbytes = longseq.saved_activation_bytes(lambda: (x * x).sum())
    assert nbytes == 256 * 256 * 4  # x saved twice for x * x, one storage


def test_attention_matrix_same_from_upstream_and_patched_outputs():
    model = longformer(windows=(8, 8), slots=4).eval()
    ids = torch.randint(3, 60, (1, 32), generator=torch.Generator().manual_seed(2))
    global_mask = torch.zeros_like(ids)
    global_mask[0, [0, 5]] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["global_attention_mask"] = global_mask
    maps = []
    for names in [(), ("longformer_sliding_window", "longformer_static_global")]:
        with patching.applied(*names), torch.no_grad():
            out = model(**batch, output_attentions=True)
        index = batch["global_attention_mask"][0].nonzero().flatten().tolist()
        maps.append(
            longseq.longformer_attention_matrix(
                out.attentions[0][0, 0], out.global_attentions[0][0, 0], index, 8
            )
        )
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    np.testing.assert_allclose(maps[0].sum(1), 1.0, atol=1e-5)
    assert maps[0][10, 30] == 0 and maps[0][10, 5] > 0  # outside the window / a global key


def test_global_on_tokens_marks_the_given_ids():
    def collate(examples):
        return {"input_ids": torch.stack([e["input_ids"] for e in examples])}

    wrapped = longseq.GlobalOnTokens(collate, (0,))
    batch = wrapped([{"input_ids": torch.tensor([0, 7, 8, 0, 9])}])
    assert batch["global_attention_mask"].tolist() == [[1, 0, 0, 1, 0]]


def test_set_hash_seed_and_bucket_agreement():
    model = reformer(hash_seed=None)
    assert longseq.set_hash_seed(model, 5) == 2
    ids = torch.randint(3, 60, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[:, ::4] = 7  # a repeated token
    got = longseq.lsh_bucket_agreement(model, ids)
    assert 0 < got["any two tokens, same bucket"] < got["same token, same bucket"] <= 1


def test_bucket_agreement_counts_the_pairs_the_full_comparison_counts():
    model = reformer(hash_seed=None)
    longseq.set_hash_seed(model, 5)
    ids = torch.randint(3, 60, (2, 64), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = 9
    captured = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out.buckets))
        for m in model.modules()
        if type(m).__name__ == "LSHSelfAttention"
    ]
    with torch.no_grad():
        model.eval()(input_ids=ids)
    for h in hooks:
        h.remove()
    # the definition: every ordered pair of distinct positions compared
    same_token = (ids[:, :, None] == ids[:, None, :])[:, None, None]
    off_diagonal = ~torch.eye(ids.shape[1], dtype=torch.bool)
    same, every = [], []
    for buckets in captured:
        same_bucket = buckets[..., :, None] == buckets[..., None, :]
        pairs = (same_token & off_diagonal).expand_as(same_bucket)
        same.append(same_bucket[pairs].float().mean())
        every.append(same_bucket[off_diagonal.expand_as(same_bucket)].float().mean())
    got = longseq.lsh_bucket_agreement(model, ids)
    assert got["same token, same bucket"] == pytest.approx(float(torch.stack(same).mean()))
    assert got["any two tokens, same bucket"] == pytest.approx(float(torch.stack(every).mean()))
