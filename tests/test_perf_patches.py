"""Equivalence of nbzoo's perf patches with upstream transformers.

Each test builds a small model from a config, computes the loss and every parameter's gradient
with the upstream code and again with the patch applied, from the same weights and batch, in
fp32 with dropout off (dropout masks cannot match between two implementations), and requires
them to agree within a stated tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForPreTraining,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerModel,
    ReformerConfig,
    ReformerModelWithLMHead,
)

from nbzoo import patching, perf
from nbzoo.device import setup

CPU = setup("cpu", "fp32")


def loss_and_grads(model, batch, patches=(), budget=None):
    model._nbzoo_mlm_budget = budget
    model.zero_grad(set_to_none=True)
    with patching.applied(*patches):
        out = model(**batch)
        loss = out.loss
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, out


def grad_error(ref, got):
    """The worst, over parameters, of max |difference| / max |reference gradient|. Gradients
    that are zero in exact arithmetic (a key bias under softmax) hold rounding noise only, so the
    denominator is at least 1e-3 of the largest gradient of the model."""
    assert ref.keys() == got.keys() and ref
    floor = 1e-3 * max(g.abs().max() for g in ref.values())
    return max(
        ((got[n] - ref[n]).abs().max() / torch.maximum(ref[n].abs().max(), floor)).item()
        for n in ref
    )


def assert_grads_close(ref, got, tol):
    worst = grad_error(ref, got)
    assert worst <= tol, f"gradients differ: worst max-normalised error {worst:.2e} > {tol:.0e}"


def mlm_batch(vocab, batch, seq, n_masked, mask_id, seed=0, low=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    for row in range(batch):
        pos = torch.randperm(seq, generator=g)[:n_masked]
        labels[row, pos] = ids[row, pos]
        ids[row, pos] = mask_id
    return ids, labels


# ----------------------------------------------------------------------------- BERT MLM + NSP


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    model = BertForPreTraining(cfg).train()
    ids, labels = mlm_batch(300, 3, 32, 5, mask_id=4)
    batch = {
        "input_ids": ids,
        "token_type_ids": (torch.arange(32) >= 16).long().expand(3, -1),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "next_sentence_label": torch.tensor([0, 1, 1]),
    }
    return model, batch


@pytest.mark.parametrize("budget", [None, 16, 96])
def test_bert_sparse_mlm_matches_upstream(bert, budget):
    model, batch = bert
    ref_loss, ref_grads, ref_out = loss_and_grads(model, batch)
    loss, grads, out = loss_and_grads(model, batch, ["bert_pretraining_sparse_mlm_perf"], budget)
    assert ref_out.prediction_logits.shape == (3, 32, 300)
    assert out.prediction_logits is None  # the sparse path computes no full logits
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(ref_grads, grads, 1e-5)


def test_bert_sparse_mlm_refuses_a_budget_too_small(bert):
    model, batch = bert
    with pytest.raises(RuntimeError, match="mlm_budget"):
        loss_and_grads(model, batch, ["bert_pretraining_sparse_mlm_perf"], budget=8)


def test_bert_sparse_mlm_leaves_evaluation_to_upstream(bert):
    model, batch = bert
    with patching.applied("bert_pretraining_sparse_mlm_perf"), torch.no_grad():
        out = model(**batch)
    assert out.prediction_logits.shape == (3, 32, 300)  # full logits for accuracy


def upstream_and_patched(model, batch, patch):
    with torch.no_grad():
        ref = model(**batch)
    with patching.applied(patch):
        with torch.no_grad():
            new = model(**batch)
        new_grad = model(**batch)  # gradients on, as transformers' own tests call it
    return ref, new, new_grad


@pytest.mark.parametrize(
    ("training", "on_perf_path"), [(False, True), (True, False)], ids=["eval", "not_on_perf_path"]
)
def test_bert_sparse_mlm_returns_upstreams_logits_outside_perf_training(
    bert, training, on_perf_path
):
    model, batch = bert
    model = copy.deepcopy(model).train(training)
    model.__dict__.pop("_nbzoo_mlm_budget", None)  # left by the tests above
    if on_perf_path:
        model._nbzoo_mlm_budget = None
    ref, new, new_grad = upstream_and_patched(model, batch, "bert_pretraining_sparse_mlm_perf")
    for out in (new, new_grad):
        torch.testing.assert_close(out.prediction_logits, ref.prediction_logits)
        torch.testing.assert_close(out.loss, ref.loss)


# ----------------------------------------------------------------------------- Longformer


def longformer_config(**kw):
    base = dict(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=8,
        max_position_embeddings=80,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )
    base.update(kw)
    return LongformerConfig(**base)


def test_longformer_sparse_mlm_matches_upstream():
    torch.manual_seed(0)
    model = LongformerForMaskedLM(longformer_config()).train()
    ids, labels = mlm_batch(200, 2, 32, 5, mask_id=3)
    batch = {"input_ids": ids, "labels": labels}
    ref_loss, ref_grads, _ = loss_and_grads(model, batch)
    for budget in (None, 16):
        loss, grads, out = loss_and_grads(model, batch, ["longformer_sparse_mlm_perf"], budget)
        assert out.logits is None
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(ref_grads, grads, 1e-5)


@pytest.mark.parametrize(
    ("training", "on_perf_path"), [(False, True), (True, False)], ids=["eval", "not_on_perf_path"]
)
def test_longformer_sparse_mlm_returns_upstreams_logits_outside_perf_training(
    training, on_perf_path
):
    torch.manual_seed(0)
    model = LongformerForMaskedLM(longformer_config()).train(training)
    if on_perf_path:
        model._nbzoo_mlm_budget = 16
    ids, labels = mlm_batch(200, 2, 32, 5, mask_id=3)
    batch = {"input_ids": ids, "labels": labels}
    ref, new, new_grad = upstream_and_patched(model, batch, "longformer_sparse_mlm_perf")
    for out in (new, new_grad):
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss)


@pytest.mark.parametrize(
    "case",
    ["local only", "padding", "global tokens", "padding and uneven global tokens", "odd length"],
)
def test_longformer_chunked_sdpa_matches_upstream(case):
    torch.manual_seed(0)
    model = LongformerModel(longformer_config(), add_pooling_layer=False).train()
    batch_size, seq = 3, 40 if case == "odd length" else 48
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (batch_size, seq), generator=g)
    mask = torch.ones_like(ids)
    glob = torch.zeros_like(ids)
    if "padding" in case:
        mask[1, 30:] = 0
        mask[2, 41:] = 0
        ids[mask == 0] = 1
    if "global" in case:
        glob[:, 0] = 1
        glob[0, [5, 17]] = 1
        if "uneven" in case:
            glob[2, 0] = 0  # one row with no global token at all
    batch = {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob}
    weight = torch.randn(batch_size, seq, 32, generator=g)  # a loss that touches every output

    def run(patches):
        model.zero_grad(set_to_none=True)
        with patching.applied(*patches):
            hidden = model(**batch).last_hidden_state
            loss = (hidden * weight * mask[..., None]).sum()
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads

    ref_h, ref_g = run([])
    got_h, got_g = run(["longformer_chunked_sdpa_perf"])
    keep = mask.bool()
    torch.testing.assert_close(got_h[keep], ref_h[keep], rtol=1e-4, atol=1e-5)
    # Different summation order (one fused softmax vs chunked matmuls): about 2e-5 of rounding
    # in fp32 here; a window off by one position gives errors above 1e-1.
    assert_grads_close(ref_g, got_g, 1e-4)


# ----------------------------------------------------------------------------- Reformer


def tiny_reformer_config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        attn_layers=["local", "lsh", "local", "lsh"],
        axial_pos_shape=[8, 8],
        axial_pos_embds_dim=[8, 24],
        local_attn_chunk_length=16,
        lsh_attn_chunk_length=16,
        num_buckets=[2, 4],
        num_hashes=1,
        is_decoder=True,
        hash_seed=7,  # the same random rotations in both runs
        use_cache=False,
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        axial_pos_embds=True,
        pad_token_id=0,
        eos_token_id=2,
        initializer_range=0.2,
    )
    base.update(kw)
    return ReformerConfig(**base)


def test_reformer_plain_residual_matches_reversible_upstream():
    torch.manual_seed(0)
    model = ReformerModelWithLMHead(tiny_reformer_config()).train()
    ids = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    ref_loss, ref_grads, _ = loss_and_grads(model, batch)
    loss, grads, _ = loss_and_grads(model, batch, ["reformer_plain_residual_perf"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # the reversible backward reconstructs layer inputs by subtraction: rounding-level drift
    assert_grads_close(ref_grads, grads, 1e-5)


# ----------------------------------------------------------------------------- nbzoo.perf


def test_labelled_positions_static_and_dynamic_agree():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    labels = torch.tensor([[-100, 7, -100, 9, -100], [1, -100, -100, -100, 2]])
    h_dyn, y_dyn = perf.labelled_positions(hidden, labels, None)
    h_st, y_st = perf.labelled_positions(hidden, labels, 6)
    assert y_dyn.tolist() == [7, 9, 1, 2]
    assert y_st[:4].tolist() == [7, 9, 1, 2] and y_st[4:].tolist() == [-100, -100]
    torch.testing.assert_close(h_st[:4], h_dyn)


def test_mlm_budget_and_prepare_batch():
    assert perf.mlm_budget(64, 128) == 64 * 19
    assert perf.mlm_budget(3, 32) == 16  # 3 * 5 = 15, rounded up to a multiple of 8
    full = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    assert "attention_mask" not in perf.prepare_batch(full, CPU)
    padded = {**full, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    assert "attention_mask" in perf.prepare_batch(padded, CPU)


def test_enable_applies_and_disable_undoes_the_model_patches(bert):
    model = copy.deepcopy(bert[0])
    handle = perf.enable(model, CPU, perf.PerfConfig(compile=False, mlm_budget=16))
    try:
        assert handle.patches == ("bert_pretraining_sparse_mlm_perf",)
        assert "bert_pretraining_sparse_mlm_perf" in patching.active()
        assert handle.attention == "sdpa"
    finally:
        perf.disable(handle)
    assert "bert_pretraining_sparse_mlm_perf" not in patching.active()


def test_run_perf_preset_reports_throughput_and_undoes_its_patches(bert):
    model = copy.deepcopy(bert[0])
    batch = dict(bert[1])
    cfg = perf.PerfConfig(compile=False, mlm_budget=perf.mlm_budget(3, 32))
    report = perf.run_perf_preset(model, batch, CPU, cfg, steps=2, warmup=1)
    assert report["samples_per_second"] == pytest.approx(3 / report["step_seconds"])
    assert report["flops_per_step"] > 0 and report["mfu"] is None  # no known peak for a CPU
    assert report["patches"] == ["bert_pretraining_sparse_mlm_perf"]
    assert math.isfinite(report["first_loss"]) and report["finite"]
    assert "bert_pretraining_sparse_mlm_perf" not in patching.active()


def test_reformer_perf_path_compiles_to_one_graph():
    """Upstream breaks the graph at each layer's RNG re-seeding, in its reversible backward, at a
    NumPy branch and at a logging call; with the perf path dynamo sees one graph."""
    torch.manual_seed(0)
    model = ReformerModelWithLMHead(tiny_reformer_config(hash_seed=None)).train()
    ids = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    handle = perf.enable(model, CPU, perf.PerfConfig(compile=False))
    try:
        explained = torch._dynamo.explain(lambda b: model(**b).loss)(
            {"input_ids": ids, "labels": ids}
        )
    finally:
        perf.disable(handle)
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_sdpa_gets_no_mask_on_the_perf_path():
    """Under torch.compile transformers always materialises an all-ones padding mask (it cannot
    look inside it), which keeps SDPA off its flash kernel; prepare_batch drops such a mask."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    cfg = AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = AlbertForSequenceClassification(cfg).train()
    perf.set_attention(model, "sdpa")
    ids = torch.randint(5, 100, (2, 16))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1]),
    }
    masks = []

    def record_sdpa_mask(gm, example_inputs):
        for node in gm.graph.nodes:
            if "scaled_dot_product" in str(node.target):
                masks.append(node.kwargs.get("attn_mask"))
        return gm.forward

    for b in (batch, perf.prepare_batch(batch, CPU)):
        torch._dynamo.reset()
        torch.compile(model, backend=record_sdpa_mask)(**b)
    torch._dynamo.reset()
    assert len(masks) == 2
    assert masks[0] is not None  # stock: a materialised mask
    assert masks[1] is None  # perf path: none, so SDPA may pick flash attention
