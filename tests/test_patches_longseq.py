"""The Longformer and Reformer runtime patches: same outputs and gradients as upstream (fp32,
1e-5), refusal outside the checked versions, upstream untouched when not applied, and what each
patch is for (compile without graph breaks, no reseeding, no custom autograd in inference)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LongformerConfig,
    LongformerForMaskedLM,
    ReformerConfig,
    ReformerForMaskedLM,
)
from transformers.models.longformer import modeling_longformer
from transformers.models.reformer import modeling_reformer

from nbzoo import patching

LONGFORMER = ("longformer_sliding_window", "longformer_static_global")
REFORMER = ("reformer_lsh_seeded", "reformer_inference_path")
TOL = 1e-5


@pytest.fixture(autouse=True)
def no_patch_left_on():
    yield
    for name in list(patching.active()):
        patching.undo(name)


def longformer(windows=(8, 16), layers=2, slots=4, seed=0) -> LongformerForMaskedLM:
    torch.manual_seed(seed)
    config = LongformerConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        attention_window=list(windows[:layers]),
        max_position_embeddings=140,
        pad_token_id=1,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_global_tokens=slots,
    )
    return LongformerForMaskedLM(config)


def longformer_batch(seq_len=64, with_global=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, seq_len), generator=g)
    mask = torch.ones_like(ids)
    ids[1, seq_len - 13 :], mask[1, seq_len - 13 :] = 1, 0  # padding in one row
    global_mask = torch.zeros_like(ids)
    if with_global:
        global_mask[0, [0, 5, 33]] = 1  # three global tokens, one inside another's window
        global_mask[2, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "global_attention_mask": global_mask}


def forward_backward(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"], **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_close(a, b, what):
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max |patched - upstream| = {diff:.3g} > {TOL}"


def assert_same_grads(ref, new):
    """Equal gradients; a parameter upstream leaves out of the graph (the global projections
    when no token is global) may only get an all-zero gradient from the patch."""
    assert ref.keys() <= new.keys()
    for name in new:
        expected = ref[name] if name in ref else torch.zeros_like(new[name])
        assert_close(expected, new[name], f"gradient of {name}")


# ----------------------------------------------------------------------------- longformer


@pytest.mark.parametrize("with_global", [False, True])
def test_longformer_patches_match_upstream(with_global):
    model = longformer()
    batch = longformer_batch(with_global=with_global)
    ref, ref_grads = forward_backward(model, batch, output_attentions=True)
    with patching.applied(*LONGFORMER):
        new, new_grads = forward_backward(model, batch, output_attentions=True)
    assert_close(ref.logits, new.logits, "logits")
    assert_close(ref.loss, new.loss, "loss")
    assert_same_grads(ref_grads, new_grads)
    assert_same_attentions(ref, new)


def assert_same_attentions(ref, new):
    """Upstream's layout: the global columns of each example in front of the window, as many as
    the most global tokens in the batch; ``global_attentions`` None when no token is global."""
    assert len(ref.attentions) == len(new.attentions)
    for a, b in zip(ref.attentions, new.attentions, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, "attention probabilities")
    if ref.global_attentions is None:
        assert new.global_attentions is None
        return
    for a, b in zip(ref.global_attentions, new.global_attentions, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, "global attention probabilities")


def test_longformer_attention_patch_alone_matches_upstream_in_training_mode():
    model = longformer().train()  # dropout is 0: training mode must not change the numbers
    batch = longformer_batch()
    ref, ref_grads = forward_backward(model, batch)
    with patching.applied("longformer_sliding_window"):
        new, new_grads = forward_backward(model, batch)
    assert_close(ref.logits, new.logits, "logits")
    assert_same_grads(ref_grads, new_grads)


def test_band_helpers_against_dense_attention():
    sw = pytest.importorskip("nbzoo_patches.longformer_sliding_window")
    torch.manual_seed(0)
    w, length = 4, 24
    q, k, v = torch.randn(3, 2, length, 5).unbind(0)
    band = sw.band_scores(q, k, w)
    dense = q @ k.transpose(-1, -2)
    for i in range(length):
        for j in range(2 * w + 1):
            key = i - w + j
            expected = dense[:, i, key] if 0 <= key < length else torch.zeros(2)
            assert torch.allclose(band[:, i, j], expected, atol=1e-6)
    probs = torch.rand(2, length, 2 * w + 1)
    context = sw.band_context(probs, v, w)
    full = torch.zeros(2, length, length)
    for i in range(length):
        for j in range(2 * w + 1):
            if 0 <= i - w + j < length:
                full[:, i, i - w + j] = probs[:, i, j]
    assert torch.allclose(context, full @ v, atol=1e-6)


def test_longformer_takes_more_global_tokens_than_slots_as_upstream_does():
    """Question answering makes every question token global: 20 of them, with 2 export slots."""
    model = longformer(slots=2).eval()
    batch = longformer_batch()
    batch["global_attention_mask"][0, :20] = 1
    batch["global_attention_mask"][2, 40:47] = 1
    with torch.no_grad():
        ref = model(**batch, output_attentions=True)
        with patching.applied(*LONGFORMER):
            new = model(**batch, output_attentions=True)
    assert ref.attentions[0].shape[-1] == 21 + 9  # row 0: 20 + the one at 33; window 8: 9
    assert_close(ref.logits, new.logits, "logits")
    assert_same_attentions(ref, new)


def test_while_tracing_the_global_slots_are_fixed_for_export(monkeypatch):
    sw = pytest.importorskip("nbzoo_patches.longformer_sliding_window")
    model = longformer(slots=4).eval()
    batch = longformer_batch()
    with torch.no_grad():
        ref = model(**batch, output_attentions=True)
        monkeypatch.setattr(sw, "_tracing", lambda: True)
        with patching.applied(*LONGFORMER):
            traced = model(**batch, output_attentions=True)
    assert_close(ref.logits, traced.logits, "logits")
    # 4 slots whatever the batch (here at most 3 global tokens), the unused one weightless
    assert traced.attentions[0].shape[-1] == 4 + 9
    assert_close(ref.attentions[0][..., :3], traced.attentions[0][..., :3], "global columns")
    assert traced.attentions[0][..., 3].abs().max() == 0


@pytest.mark.slow
def test_patched_longformer_compiles_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    model = longformer(windows=(8,), layers=1, slots=2).eval()
    batch = longformer_batch()
    batch["global_attention_mask"][0, 33] = 0  # two global tokens in row 0
    with patching.applied(*LONGFORMER):
        eager = model(**batch).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(**batch).logits
    assert_close(eager, out, "compiled logits")
    torch._dynamo.reset()
    # upstream: the .item() on "any global token?" and the Python branch on it stop fullgraph
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(model, fullgraph=True, backend="eager")(**batch)


def test_upstream_longformer_untouched_without_the_patches():
    attention = modeling_longformer.LongformerSelfAttention.forward
    encoder = modeling_longformer.LongformerEncoder.forward
    model = longformer()
    batch = longformer_batch(with_global=False)
    before = model(**batch, output_attentions=True)
    with patching.applied(*LONGFORMER):
        assert modeling_longformer.LongformerSelfAttention.forward is not attention
    assert modeling_longformer.LongformerSelfAttention.forward is attention
    assert modeling_longformer.LongformerEncoder.forward is encoder
    after = model(**batch, output_attentions=True)
    assert torch.equal(before.logits, after.logits)
    # upstream's own layout: no global columns when no token is global (window 8 -> 9 columns)
    assert after.attentions[0].shape[-1] == 9 and after.global_attentions is None


# ----------------------------------------------------------------------------- reformer


def reformer(hash_seed=7, dropout=0.0, seed=0) -> ReformerForMaskedLM:
    torch.manual_seed(seed)
    config = ReformerConfig(
        vocab_size=60,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        attn_layers=["local", "lsh", "lsh"],
        axial_pos_shape=[8, 8],
        axial_pos_embds_dim=[16, 16],
        max_position_embeddings=64,
        lsh_attn_chunk_length=16,
        local_attn_chunk_length=16,
        local_num_chunks_after=1,
        lsh_num_chunks_after=1,
        num_buckets=4,
        num_hashes=2,
        hash_seed=hash_seed,
        is_decoder=False,
        pad_token_id=1,
        hidden_dropout_prob=dropout,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
    )
    return ReformerForMaskedLM(config)


def reformer_ids(seed=1):
    return torch.randint(3, 60, (2, 64), generator=torch.Generator().manual_seed(seed))


# Unseeded hashing in training mode is not compared: upstream's ReformerLayer reseeds torch's
# global generator with torch.seed() (entropy from the OS) before each attention block, so two
# upstream runs already differ. A hash_seed is what makes Reformer training reproducible.
@pytest.mark.parametrize(("hash_seed", "train"), [(7, True), (7, False), (None, False)])
def test_reformer_patches_match_upstream(hash_seed, train):
    model = reformer(hash_seed=hash_seed).train(train)
    ids = reformer_ids()

    def run():
        torch.manual_seed(3)  # unseeded hashing draws from the global generator: same state
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        if train:
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    ref, ref_grads = run()
    with patching.applied(*REFORMER):
        new, new_grads = run()
    assert_close(ref, new, "logits")
    assert_same_grads(ref_grads, new_grads)
    assert bool(ref_grads) == train


def test_seeded_hashing_leaves_the_global_generator_alone():
    # eval mode: in training upstream's layers also reseed from the OS (torch.seed()) for dropout
    model = reformer(hash_seed=7).eval()
    ids = reformer_ids()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model(input_ids=ids)
    upstream_next = torch.rand(3)  # upstream reseeded the global generator with hash_seed
    assert not torch.equal(upstream_next, expected_next)
    with patching.applied("reformer_lsh_seeded"):
        torch.manual_seed(123)
        model(input_ids=ids)
        patched_next = torch.rand(3)
    assert torch.equal(patched_next, expected_next)


def test_seeded_hashing_is_deterministic_and_unseeded_is_not():
    model = reformer(hash_seed=None).eval()
    ids = reformer_ids()
    with patching.applied("reformer_lsh_seeded"), torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert not torch.equal(a, b)  # fresh rotations each call, as upstream
        for m in model.modules():
            if isinstance(m, modeling_reformer.LSHSelfAttention):
                m.hash_seed = 11
        c, d = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert torch.equal(c, d)


def _graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def test_inference_path_avoids_the_reversible_function_only_in_inference():
    model = reformer()
    ids = reformer_ids()
    with patching.applied("reformer_inference_path"):
        train_out = model.train()(input_ids=ids).logits
        assert "_ReversibleFunctionBackward" in _graph_nodes(train_out)
        eval_out = model.eval()(input_ids=ids).logits
        assert "_ReversibleFunctionBackward" not in _graph_nodes(eval_out)
    upstream_eval = model.eval()(input_ids=ids).logits
    assert "_ReversibleFunctionBackward" in _graph_nodes(upstream_eval)
    assert_close(upstream_eval, eval_out, "eval logits")


def test_upstream_reformer_untouched_without_the_patches():
    hash_vectors = modeling_reformer.LSHSelfAttention._hash_vectors
    function = modeling_reformer._ReversibleFunction
    with patching.applied(*REFORMER):
        assert modeling_reformer._ReversibleFunction is not function
    assert modeling_reformer.LSHSelfAttention._hash_vectors is hash_vectors
    assert modeling_reformer._ReversibleFunction is function


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize("name", LONGFORMER + REFORMER)
@pytest.mark.parametrize("installed", ["4.28.1", "6.0.0"])
def test_refused_outside_the_checked_versions(monkeypatch, name, installed):
    patch = patching.get(name)
    owner, attr = patch._owner_and_attr()
    before = owner.__dict__.get(attr, getattr(owner, attr))
    real_version = patching.metadata.version
    monkeypatch.setattr(
        patching.metadata,
        "version",
        lambda dist: installed if dist == "transformers" else real_version(dist),
    )
    with pytest.raises(patching.PatchError, match=f"installed is {installed}"):
        patching.apply(name)
    assert owner.__dict__.get(attr, getattr(owner, attr)) is before
    assert name not in patching.active()


@pytest.mark.parametrize("name", LONGFORMER + REFORMER)
def test_patches_are_registered_with_a_reason(name):
    patch = patching.get(name)
    assert name in patching.available() and len(patch.reason) > 20
