"""nbzoo.widgets: the sentiment box and the attention explorer, against the models themselves.

The attention maps are checked end to end: the dense (query x key) matrix of every layer and
head, multiplied by that head's value vectors, must give the attention layer's own output.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    LongformerConfig,
    LongformerModel,
    ReformerConfig,
    ReformerModel,
)

from nbzoo import patching, widgets
from nbzoo.text import word_tokenizer
from tests import figure_check

SENTENCES = [
    "this film feels quite moving .",
    "the acting is tiresome , but the pacing remains quite weak .",
    "the soundtrack was not rather clumsy .",
]


@pytest.fixture(scope="module")
def classifier():
    tokenizer = word_tokenizer(SENTENCES)
    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=len(tokenizer),
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return AlbertForSequenceClassification(config).eval(), tokenizer


@pytest.fixture(scope="module")
def onnx_session(classifier, tmp_path_factory):
    """The classifier exported with a static shape (batch 2, length 16), like the seed's
    albert_seq{S}_bs{B}.onnx files."""
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer = classifier
    enc = tokenizer(["x", "y"], return_tensors="pt", padding="max_length", max_length=16)
    path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    torch.onnx.export(
        model,
        (enc["input_ids"], enc["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
    )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference_probs(model, tokenizer, text, max_length):
    enc = tokenizer(text, return_tensors="pt", padding="max_length", max_length=max_length)
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return torch.softmax(logits, -1).numpy()


def test_predict_sentiment_gives_the_models_probabilities(classifier):
    model, tokenizer = classifier
    table = widgets.predict_sentiment(SENTENCES[1], model, tokenizer, max_length=32)
    assert list(table.index) == ["PyTorch"]
    enc = tokenizer(SENTENCES[1], return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits[0], -1).numpy()
    got = table.loc["PyTorch", ["p(negative)", "p(positive)"]].to_numpy(float)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert table.loc["PyTorch", "prediction"] == ("negative", "positive")[int(expected.argmax())]
    assert table.attrs["tokens"][0] == "[CLS]" and table.attrs["tokens"][-1] == "[SEP]"


def test_onnx_side_by_side_matches_pytorch_with_static_shapes(classifier, onnx_session):
    model, tokenizer = classifier
    text = "this film feels quite weird ."  # "weird" is not in the vocabulary
    table = widgets.predict_sentiment(text, model, tokenizer, onnx_session=onnx_session)
    assert list(table.index) == ["PyTorch", "ONNX Runtime"]
    probs = table[["p(negative)", "p(positive)"]].to_numpy(float)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)
    np.testing.assert_allclose(probs[0], reference_probs(model, tokenizer, text, 16), atol=1e-6)
    assert "[UNK]" in table.attrs["tokens"]


def test_a_regressor_is_refused_with_a_clear_message(classifier):
    _, tokenizer = classifier
    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=len(tokenizer),
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=1,
    )
    regressor = AlbertForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="1 outputs.*one per label"):
        widgets.predict_sentiment("a film .", regressor, tokenizer)


def _probabilities(html_text: str) -> dict[str, list[float]]:
    rows = re.findall(r'<tr data-backend="([^"]+)">(.*?)</tr>', html_text)
    return {
        backend: [float(p) for p in re.findall(r"</div>([0-9.]+)</div></td>", row)]
        for backend, row in rows
    }


def test_sentiment_box_answers_and_leaves_a_static_view(classifier, onnx_session):
    model, tokenizer = classifier
    box = widgets.sentiment_box(model, tokenizer, onnx_session=onnx_session, text=SENTENCES[0])
    bundle = box.static_bundle()
    assert SENTENCES[0] in bundle["text/html"] and SENTENCES[0] in bundle["text/plain"]
    static = _probabilities(bundle["text/html"])
    assert set(static) == {"PyTorch", "ONNX Runtime"}
    np.testing.assert_allclose(
        static["PyTorch"], reference_probs(model, tokenizer, SENTENCES[0], 16), atol=1e-4
    )

    box.text.value = SENTENCES[1]  # what typing + Enter does in the browser
    live = _probabilities(box.result.value)
    np.testing.assert_allclose(
        live["PyTorch"], reference_probs(model, tokenizer, SENTENCES[1], 16), atol=1e-4
    )
    assert "tiresome" in box.result.value and "tiresome" not in bundle["text/html"]

    box.text.value = "   "
    assert "type a sentence" in box.result.value
    box.onnx_session = object()  # a broken backend: the error is shown in the box
    box.text.value = SENTENCES[2]
    assert "nbzoo-error" in box.result.value


def test_the_onnx_side_chooses_between_fp32_and_int8(classifier, onnx_session, tmp_path):
    import onnxruntime as ort

    from nbzoo.export import quantize

    model, tokenizer = classifier
    int8 = quantize.quantize_dynamic(onnx_session._model_path, tmp_path / "classifier_int8.onnx")
    sessions = {
        "fp32": onnx_session,
        "int8": ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]),
    }
    box = widgets.sentiment_box(model, tokenizer, onnx_session=sessions, text=SENTENCES[0])
    static = _probabilities(box.static_bundle()["text/html"])
    assert list(static) == ["PyTorch", "ONNX Runtime (fp32)", "ONNX Runtime (int8)"]
    assert "nbzoo-onnx-choice" in box.chooser._dom_classes
    assert box.chooser.options == ("fp32", "int8") and box.chooser.value == "fp32"

    box.text.value = SENTENCES[1]
    live = _probabilities(box.result.value)
    assert list(live) == ["PyTorch", "ONNX Runtime (fp32)"]
    np.testing.assert_allclose(live["ONNX Runtime (fp32)"], live["PyTorch"], atol=1e-5)
    box.chooser.value = "int8"  # what a click on the int8 button does
    live8 = _probabilities(box.result.value)
    assert list(live8) == ["PyTorch", "ONNX Runtime (int8)"]
    direct = widgets.predict_sentiment(
        SENTENCES[1], model, tokenizer, onnx_session={"int8": sessions["int8"]}
    )
    expected = direct.loc["ONNX Runtime (int8)", ["p(negative)", "p(positive)"]].to_numpy(float)
    np.testing.assert_allclose(live8["ONNX Runtime (int8)"], expected, atol=1e-4)
    with pytest.raises(ValueError, match="no ONNX model 'fp16'"):
        box.select("fp16")


def test_an_onnx_model_with_token_types_gets_zeros_from_a_tokenizer_without_them():
    class Input:
        def __init__(self, name):
            self.name, self.type, self.shape = name, "tensor(int64)", ["batch", "seq"]

    class Session:  # records what it is fed
        def get_inputs(self):
            return [Input("input_ids"), Input("attention_mask"), Input("token_type_ids")]

        def run(self, _, feed):
            self.feed = feed
            return [np.zeros((1, 2), np.float32)]

    session = Session()
    enc = {"input_ids": np.array([[2, 7, 3]]), "attention_mask": np.ones((1, 3), np.int64)}
    widgets._onnx_logits(session, enc)
    np.testing.assert_array_equal(session.feed["token_type_ids"], np.zeros((1, 3), np.int64))
    del enc["attention_mask"]
    with pytest.raises(ValueError, match="wants input 'attention_mask'"):
        widgets._onnx_logits(session, enc)


# ------------------------------------------------------------------------------ attention


def _capture_attention_io(modules):
    """Input hidden states and output of each attention module, by forward hooks."""
    seen = {}

    def hook(i):
        def fn(module, args, kwargs, out):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen[i] = (hidden, out[0] if isinstance(out, tuple) else out.hidden_states)

        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    return seen, handles


@pytest.mark.parametrize("patched", [False, True], ids=["upstream", "sliding_window_patch"])
def test_longformer_maps_reproduce_the_layer_output(patched):
    """Upstream gives one global column per global token; the longformer_sliding_window patch
    (notebook 05) gives ``max_global_tokens`` slots: both must come out the same."""
    torch.manual_seed(0)
    config = LongformerConfig(
        max_global_tokens=4,
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        attention_window=[4, 8],
        max_position_embeddings=40,
        pad_token_id=1,
    )
    model = LongformerModel(config).eval()
    seq_len, heads, dim = 18, 2, 16  # 18 is padded to 24 inside the model
    ids = torch.randint(5, 50, (1, seq_len))
    glob = torch.zeros_like(ids)
    glob[0, [0, 9]] = 1
    attn = [layer.attention.self for layer in model.encoder.layer]
    seen, handles = _capture_attention_io(attn)
    with patching.applied(*(["longformer_sliding_window"] if patched else [])):
        maps = widgets.longformer_attention(model, ids, global_attention_mask=glob)
    for h in handles:
        h.remove()
    assert (maps.num_layers, maps.num_heads) == (2, 2)
    assert maps.global_positions == [0, 9]
    assert "±4" in maps.layer_label(1) and "2 global tokens" in maps.layer_label(1)
    is_global = glob[0].bool()
    for layer in range(2):
        hidden, out = seen[layer]
        values = attn[layer].value(hidden)[0, :seq_len].view(seq_len, heads, dim)
        values_global = attn[layer].value_global(hidden)[0, :seq_len].view(seq_len, heads, dim)
        out = out[0, :seq_len].view(seq_len, heads, dim)
        half = config.attention_window[layer] // 2
        for head in range(heads):
            a = torch.tensor(maps.matrix(layer, head))
            np.testing.assert_allclose(a.sum(1).numpy(), 1.0, atol=1e-5)
            local_rows = (a @ values[:, head])[~is_global]
            global_rows = (a @ values_global[:, head])[is_global]
            torch.testing.assert_close(local_rows, out[~is_global, head], atol=1e-5, rtol=0)
            torch.testing.assert_close(global_rows, out[is_global, head], atol=1e-5, rtol=0)
            # outside the window only the global columns carry weight
            i, j = np.meshgrid(range(seq_len), range(seq_len), indexing="ij")
            outside = (np.abs(i - j) > half) & ~is_global.numpy()[None, :]
            outside &= ~is_global.numpy()[:, None]
            assert np.all(a.numpy()[outside] == 0)


def _reformer(num_hashes: int) -> ReformerModel:
    torch.manual_seed(0)
    config = ReformerConfig(
        vocab_size=50,
        hidden_size=32,
        attention_head_size=16,
        num_attention_heads=2,
        attn_layers=["local", "lsh"],
        num_hashes=num_hashes,
        num_buckets=4,
        lsh_attn_chunk_length=4,
        local_attn_chunk_length=4,
        axial_pos_embds=False,
        max_position_embeddings=32,
        feed_forward_size=64,
        is_decoder=False,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
    )
    return ReformerModel(config).eval()


def _reformer_run(model):
    attn = [layer.attention.self_attention for layer in model.encoder.layers]
    seen, handles = _capture_attention_io(attn)
    ids = torch.randint(5, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    maps = widgets.reformer_attention(model, ids)
    for h in handles:
        h.remove()
    per_head = {}
    for layer, module in enumerate(attn):
        hidden, out = seen[layer]
        per_head[layer] = (
            module.value(hidden)[0].view(16, 2, 16),
            out[0].view(16, 2, 16),
        )
    return maps, per_head


def test_reformer_maps_reproduce_local_and_lsh_layers():
    maps, per_head = _reformer_run(_reformer(num_hashes=1))
    assert "local" in maps.layer_label(0) and "LSH" in maps.layer_label(1)
    assert maps.buckets(0, 0) is None
    buckets = maps.buckets(1, 0)
    assert buckets.shape == (1, 16) and buckets.min() >= 0 and buckets.max() < 4
    for layer in range(2):
        values, out = per_head[layer]
        for head in range(2):
            a = torch.tensor(maps.matrix(layer, head), dtype=torch.float32)
            np.testing.assert_allclose(a.sum(1).numpy(), 1.0, atol=1e-5)
            torch.testing.assert_close(a @ values[:, head], out[:, head], atol=1e-5, rtol=0)


def test_reformer_two_hash_rounds_combine_into_the_layer_output():
    """With two hash rounds the layer mixes the rounds' outputs per query with weights that
    sum to one: out = w o_0 + (1 - w) o_1, 0 <= w <= 1. Solve for w and check the residual."""
    maps, per_head = _reformer_run(_reformer(num_hashes=2))
    assert maps.num_rounds == 2 and maps.buckets(1, 0).shape == (2, 16)
    assert "hash round 1 of 2" in maps.layer_label(1, 1)
    values, out = per_head[1]
    for head in range(2):
        o0 = torch.tensor(maps.matrix(1, head, 0), dtype=torch.float32) @ values[:, head]
        o1 = torch.tensor(maps.matrix(1, head, 1), dtype=torch.float32) @ values[:, head]
        np.testing.assert_allclose(maps.matrix(1, head, 1).sum(1), 1.0, atol=1e-5)
        d, target = o0 - o1, out[:, head] - o1
        w = (d * target).sum(1) / (d * d).sum(1).clamp_min(1e-12)
        assert torch.all((w > -1e-4) & (w < 1 + 1e-4))
        torch.testing.assert_close(o1 + w[:, None] * d, out[:, head], atol=1e-4, rtol=0)


def test_reformer_refuses_a_length_it_would_pad():
    with pytest.raises(ValueError, match="not a multiple of the chunk length 4"):
        widgets.reformer_attention(_reformer(1), torch.arange(5, 23)[None])


def test_explorer_static_figure_and_sliders():
    torch.manual_seed(0)
    maps, _ = _reformer_run(_reformer(num_hashes=2))
    explorer = widgets.attention_explorer(maps, layer=1, head=0)
    assert explorer.static.startswith(b"\x89PNG")
    assert bytes(explorer.image.value) == explorer.static  # live view starts at the static one
    assert explorer.hash_round in explorer.widget.children[0].children  # two rounds: 3 sliders
    explorer.head.value = 1
    live = bytes(explorer.image.value)
    assert live.startswith(b"\x89PNG") and live != explorer.static
    explorer.hash_round.value = 1
    assert bytes(explorer.image.value) != live and explorer.status.value == ""
    with pytest.raises(IndexError, match="layers 0..1, heads 0..1 and hash rounds 0..1"):
        maps.matrix(2, 0)
    fig = widgets.plot_attention(maps, 1, 1, hash_round=1)
    assert len(fig.axes) == 4  # the sorted buckets over the matrix, the matrix, the strip, colours
    FigureCanvasAgg(fig)
    assert figure_check.problems(fig) == []


def _image(fig):
    return next(ax for ax in fig.axes if ax.images).images[0]


def test_an_lsh_layer_is_drawn_sorted_by_bucket_as_the_layer_works():
    torch.manual_seed(0)
    maps, _ = _reformer_run(_reformer(num_hashes=2))
    for hash_round in range(2):
        order = np.argsort(maps.buckets(1, 0)[hash_round], kind="stable")
        shown = _image(widgets.plot_attention(maps, 1, 0, hash_round)).get_array()
        expected = maps.matrix(1, 0, hash_round)[np.ix_(order, order)]
        np.testing.assert_array_equal(shown.filled(0.0), expected)
        in_text_order = widgets.plot_attention(maps, 1, 0, hash_round, sort_by_bucket=False)
        np.testing.assert_array_equal(
            _image(in_text_order).get_array().filled(0.0), maps.matrix(1, 0, hash_round)
        )
    fig = widgets.plot_attention(maps, 1, 0)
    named = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert named == [f"bucket {b}" for b in range(int(maps.buckets(1, 0).max()) + 1)]
    local = widgets.plot_attention(maps, 0, 0)  # a local layer stays in text order
    np.testing.assert_array_equal(_image(local).get_array().filled(0.0), maps.matrix(0, 0))


def test_small_weights_on_global_tokens_show_on_the_colour_scale():
    """A trained window peaks near 0.6; every row's weight on a global token may be 0.01: on a
    linear scale it would be 2% of the colour range, on the logarithmic one a third of it."""
    n = 32
    weights = np.zeros((n, n), np.float32)
    for i in range(n):
        weights[i, max(0, i - 2) : i + 3] = 0.05
        weights[i, i] = 0.6
    weights[:, 0] = 0.01  # every row attends a little to the global token at 0
    maps = widgets.AttentionMaps(
        tokens=[str(i) for i in range(n)],
        num_layers=1,
        num_heads=1,
        matrix_fn=lambda *_: weights,
        global_positions=[0],
    )
    fig = widgets.plot_attention(maps)
    image = _image(fig)
    assert image.norm(0.01) > 0.3  # on a linear 0..0.6 scale: 0.017
    assert image.get_array().mask[5, 20]  # never computed: drawn in the "not computed" colour
    FigureCanvasAgg(fig)
    assert figure_check.problems(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["not computed", "global token"]


def test_dense_attention_of_a_full_attention_model(classifier):
    sdpa, tokenizer = classifier
    enc = tokenizer(SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        fused = sdpa(**enc, output_attentions=True).attentions
    if not fused:  # SDPA returns no weights: the error says what to do
        with pytest.raises(ValueError, match="attn_implementation='eager'"):
            widgets.dense_attention(fused)
    config = copy.deepcopy(sdpa.config)
    config._attn_implementation = "eager"
    model = AlbertForSequenceClassification(config).eval()
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    maps = widgets.dense_attention(out.attentions, tokens=tokens)
    np.testing.assert_allclose(maps.matrix(0, 1), out.attentions[0][0, 1].numpy())
    fig = widgets.plot_attention(maps, 0, 1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == tokens


def test_in_a_kernel_each_view_leaves_a_static_output_then_the_widget(tmp_path):
    """What papermill stores (and GitHub renders): a static HTML table / PNG for the default
    input, followed by the widget's own output."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    setup = f"""
import torch
from transformers import AlbertConfig, AlbertForSequenceClassification
from nbzoo import patching, widgets
from nbzoo.text import word_tokenizer
tok = word_tokenizer({SENTENCES!r})
torch.manual_seed(0)
config = AlbertConfig(vocab_size=len(tok), embedding_size=8, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=16, num_labels=2)
config._attn_implementation = "eager"
model = AlbertForSequenceClassification(config).eval()
"""
    explorer = """
enc = tok("this film feels quite moving .", return_tensors="pt")
with torch.no_grad():
    att = model(**enc, output_attentions=True).attentions
widgets.attention_explorer(widgets.dense_attention(att), head=1)
"""
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(setup),
            nbformat.v4.new_code_cell("widgets.sentiment_box(model, tok)"),
            nbformat.v4.new_code_cell(explorer),
        ]
    )
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute(cwd=str(tmp_path))
    # the views' outputs; what the kernel logs to stderr (matplotlib's "findfont: ... not found"
    # where its font cache lists fonts of a Python since removed) is not a view
    sentiment, attention = (
        [o for o in c.outputs if o.output_type != "stream"] for c in nb.cells[1:]
    )
    widget = "application/vnd.jupyter.widget-view+json"
    assert [o.output_type for o in sentiment] == ["display_data", "display_data"]
    assert "nbzoo-sentiment-result" in sentiment[0].data["text/html"]
    assert widgets.DEFAULT_SENTENCE in sentiment[0].data["text/plain"]
    assert widget in sentiment[1].data
    assert "image/png" in attention[0].data and widget in attention[1].data


def test_jupyterlab_in_this_environment_saves_widget_state_with_the_notebook():
    # `make install` puts nbzoo/jupyterlab/overrides.json among the environment's lab settings; without
    # it a notebook saved in JupyterLab and reopened shows "Error displaying widget: model not found"
    import os
    import sys

    from jupyter_core.paths import jupyter_path
    from jupyterlab_server.settings_utils import _get_overrides, get_settings

    app_settings = os.path.join(sys.prefix, "share", "jupyter", "lab", "settings")
    plugin = "@jupyter-widgets/jupyterlab-manager:plugin"
    found, _ = get_settings(
        app_settings,
        os.path.join(sys.prefix, "share", "jupyter", "lab", "schemas"),
        os.devnull,  # no user settings: the environment's own defaults
        schema_name=plugin,
        overrides=_get_overrides(app_settings)[0],
        labextensions_path=jupyter_path("labextensions"),
    )
    assert found["schema"]["properties"]["saveState"]["default"] is True


def test_thousands_of_buckets_are_coloured_along_a_colour_bar():
    """A checkpoint's factorised hash (64 x 128 buckets) cannot name each bucket in a legend."""
    n = 64
    buckets = np.random.default_rng(0).integers(0, 8192, (1, n))
    maps = widgets.AttentionMaps(
        tokens=[str(i) for i in range(n)],
        num_layers=1,
        num_heads=1,
        matrix_fn=lambda *_: np.full((n, n), 1 / n, np.float32),
        buckets_fn=lambda *_: buckets,
    )
    fig = widgets.plot_attention(maps)
    assert not fig.legends
    bars = [a.get_ylabel() or a.get_xlabel() for a in fig.axes if getattr(a, "_colorbar", None)]
    assert bars == ["attention weight (log scale)", "LSH bucket"]
    FigureCanvasAgg(fig)
    assert figure_check.problems(fig) == []
