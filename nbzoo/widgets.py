"""Interactive views for the notebooks (ipywidgets), each with a static twin.

Every view shows two things when it is the last expression of a cell (or passed to
``display``): a *static* output computed for its default input — an HTML table or a PNG
figure, which papermill stores, GitHub renders and a reader without a kernel sees — and
below it the live widget, which JupyterLab renders and updates as the reader plays.

Sentiment (notebooks 01 and 02)::

    from nbzoo import widgets
    widgets.sentiment_box(model, tokenizer)                       # PyTorch only
    widgets.sentiment_box(model, tokenizer, onnx_session=sess)    # PyTorch | ONNX side by side
    widgets.sentiment_box(model, tokenizer, onnx_session={"fp32": s32, "int8": s8})  # pick the ONNX
    widgets.predict_sentiment("a moving film .", model, tokenizer)  # the same numbers, a DataFrame

``model`` is any ``*ForSequenceClassification`` with ``len(labels)`` outputs (default labels
negative / positive), ``tokenizer`` its (fast) tokenizer, ``onnx_session`` an
``onnxruntime.InferenceSession`` of the exported model: its input names pick the encodings it
is fed, and a static sequence length / batch size in its input shape is honoured by padding
(and repeating the row). A dict of sessions (name → session, e.g. fp32 and int8) puts buttons
over the box that choose the ONNX model answering beside PyTorch (rows ``ONNX Runtime (name)``);
the static view shows every one. Type a sentence, press Enter: each backend's label and
probabilities.

Attention (notebooks 04 Reformer and 05 Longformer)::

    maps = widgets.longformer_attention(model, input_ids, global_attention_mask=g, tokens=toks)
    maps = widgets.reformer_attention(model, input_ids, tokens=toks)
    maps = widgets.dense_attention(outputs.attentions, tokens=toks)   # any (eager) full attention
    widgets.attention_explorer(maps, layer=0, head=0)   # sliders: layer, head (+ hash round)
    widgets.plot_attention(maps, layer, head)           # the static figure alone
    maps.matrix(layer, head)                            # the (L, L) numbers

Each ``*_attention`` runs the model once (eval mode, no grad) on ONE sequence (a 1-D tensor or
a batch of one) and returns :class:`AttentionMaps`; the dense (query x key) matrix of a
(layer, head) is built only when asked for, so a 4096-token input does not cost
layers x heads x 4096² floats. Longformer: the sliding window and the global tokens' rows and
columns, from ``attentions`` + ``global_attentions`` (through
``nbzoo.longseq.longformer_attention_matrix``). Reformer: ``local`` layers show their
chunked window; ``lsh`` layers show one hash round (``maps.num_rounds`` of them, a third
slider) — the weights inside the chunks of the bucket-sorted sequence, each round's rows
summing to one; the layer mixes the rounds per query — and a strip of every token's LSH bucket
in each round, captured from the layer itself, so they are the buckets of this very forward
pass. The input length must be a multiple of the Reformer's chunk lengths (the model would
pad it).
"""

from __future__ import annotations

import html
import inspect
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_LABELS = ("negative", "positive")
DEFAULT_SENTENCE = "this film feels quite moving ."

# --------------------------------------------------------------------------------- sentiment


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _static_shape(session) -> tuple[int | None, int | None]:
    """(batch, sequence length) fixed by the ONNX model's first input, None where dynamic."""
    shape = list(session.get_inputs()[0].shape) + [None, None]
    batch, seq = shape[0], shape[1]
    return (batch if isinstance(batch, int) else None), (seq if isinstance(seq, int) else None)


def _encode(text: str, tokenizer, max_length: int, pad_to: int | None) -> dict[str, np.ndarray]:
    kwargs: dict[str, Any] = {"truncation": True, "max_length": pad_to or max_length}
    if pad_to:
        kwargs["padding"] = "max_length"
    enc = tokenizer(text, return_tensors="np", **kwargs)
    return {k: np.asarray(v) for k, v in enc.items()}


def _torch_logits(model: torch.nn.Module, enc: dict[str, np.ndarray]) -> np.ndarray:
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    feed = {k: torch.from_numpy(v).to(device) for k, v in enc.items() if k in accepted}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**feed)
    finally:
        model.train(was_training)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    return logits.float().cpu().numpy()[0]


def _onnx_logits(session, enc: dict[str, np.ndarray]) -> np.ndarray:
    batch, _ = _static_shape(session)
    feed = {}
    for inp in session.get_inputs():
        if inp.name == "token_type_ids" and inp.name not in enc:
            enc = {
                **enc,
                inp.name: np.zeros_like(enc["input_ids"]),
            }  # one segment: PyTorch's default
        if inp.name not in enc:
            raise ValueError(
                f"the ONNX model wants input {inp.name!r}; the tokenizer gives only "
                f"{', '.join(enc)}"
            )
        dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        value = enc[inp.name].astype(dtype)
        if batch and batch > 1:
            value = np.repeat(value, batch, axis=0)
        feed[inp.name] = value
    return np.asarray(session.run(None, feed)[0], dtype=np.float32)[0]


def predict_sentiment(
    text: str,
    model: torch.nn.Module,
    tokenizer,
    *,
    onnx_session=None,
    labels: Sequence[str] = DEFAULT_LABELS,
    max_length: int = 128,
):
    """Label and class probabilities of ``text``, one row per backend (PyTorch, ONNX Runtime).

    ``onnx_session`` may be a dict (name → session): one row ``ONNX Runtime (name)`` each.
    All backends get the same encoding (padded to an ONNX model's fixed length if one has it).
    The tokens the model saw are in ``table.attrs["tokens"]``."""
    import pandas as pd

    sessions = _onnx_rows(onnx_session)
    fixed = {_static_shape(sess)[1] for sess in sessions.values()} - {None}
    if len(fixed) > 1:
        raise ValueError(f"the ONNX models have different fixed sequence lengths {sorted(fixed)}")
    enc = _encode(text, tokenizer, max_length, fixed.pop() if fixed else None)
    backends: dict[str, np.ndarray] = {"PyTorch": _torch_logits(model, enc)}
    for row, sess in sessions.items():
        backends[row] = _onnx_logits(sess, enc)
    rows = {}
    for name, logits in backends.items():
        if logits.shape != (len(labels),):
            raise ValueError(
                f"{name}: the model gives {logits.shape[-1]} outputs, but the sentiment box needs "
                f"one per label ({', '.join(labels)}): pass a classifier, or labels=..."
            )
        probs = _softmax(logits.astype(np.float64))
        rows[name] = {
            "prediction": labels[int(probs.argmax())],
            **{f"p({label})": float(p) for label, p in zip(labels, probs, strict=True)},
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "backend"
    mask = enc.get("attention_mask", np.ones_like(enc["input_ids"]))[0].astype(bool)
    table.attrs["tokens"] = tokenizer.convert_ids_to_tokens(enc["input_ids"][0][mask].tolist())
    table.attrs["text"] = text
    return table


def _onnx_rows(onnx_session) -> dict[str, Any]:
    """Row label → session: ``ONNX Runtime`` for one session, ``ONNX Runtime (name)`` per entry
    of a dict."""
    if onnx_session is None:
        return {}
    if isinstance(onnx_session, dict):
        return {f"ONNX Runtime ({name})": sess for name, sess in onnx_session.items()}
    return {"ONNX Runtime": onnx_session}


def sentiment_html(table, labels: Sequence[str] = DEFAULT_LABELS) -> str:
    """The prediction table as HTML: one row per backend, a bar per class probability."""
    head = "".join(f"<th>p({html.escape(label)})</th>" for label in labels)
    rows = []
    for backend, row in table.iterrows():
        cells = []
        for label in labels:
            p = row[f"p({label})"]
            cells.append(
                f'<td class="nbzoo-p" data-label="{html.escape(label)}">'
                f'<div style="display:flex;align-items:center;gap:6px">'
                f'<div style="background:#4a90d9;height:10px;width:{100 * p:.1f}px"></div>'
                f"{p:.4f}</div></td>"
            )
        rows.append(
            f'<tr data-backend="{html.escape(str(backend))}"><td>{html.escape(str(backend))}</td>'
            f'<td class="nbzoo-prediction"><b>{html.escape(row["prediction"])}</b></td>'
            + "".join(cells)
            + "</tr>"
        )
    tokens = " ".join(html.escape(t) for t in table.attrs.get("tokens", []))
    return (
        f'<table class="nbzoo-sentiment-result"><thead><tr><th>backend</th><th>prediction</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f'<div class="nbzoo-tokens" style="color:#666;font-size:90%">tokens: {tokens}</div>'
    )


class SentimentBox:
    """Type a sentence, see the sentiment; ``.widget`` is the ipywidgets view, ``.static`` the
    prediction table for the default sentence."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        onnx_session=None,
        labels: Sequence[str] = DEFAULT_LABELS,
        text: str = DEFAULT_SENTENCE,
        max_length: int = 128,
        title: str = "Sentiment",
    ) -> None:
        import ipywidgets as w

        self.model, self.tokenizer, self.onnx_session = model, tokenizer, onnx_session
        self.labels, self.max_length, self.title = tuple(labels), max_length, title
        # several ONNX models: the static view shows them all, the live box the chosen one
        self.choices = list(onnx_session) if isinstance(onnx_session, dict) else []
        self.choice = self.choices[0] if self.choices else None
        self.static = predict_sentiment(
            text,
            model,
            tokenizer,
            onnx_session=onnx_session,
            labels=self.labels,
            max_length=max_length,
        )
        self.text = w.Text(
            value=text,
            placeholder="type a sentence and press Enter",
            continuous_update=False,
            layout=w.Layout(width="95%"),
        )
        self.result = w.HTML()
        hint = "type a sentence and press Enter"
        if onnx_session is not None:
            hint += " — PyTorch and the ONNX model side by side"
        parts = [w.HTML(f"<b>{html.escape(title)}</b>: {hint}")]
        if len(self.choices) > 1:
            self.chooser = w.ToggleButtons(
                options=self.choices, value=self.choice, description="ONNX model:"
            )
            self.chooser.add_class("nbzoo-onnx-choice")
            self.chooser.observe(lambda change: self.select(change["new"]), names="value")
            parts.append(self.chooser)
        self.widget = w.VBox([*parts, self.text, self.result])
        self.widget.add_class("nbzoo-sentiment")
        self.text.observe(lambda change: self.update(change["new"]), names="value")
        self.result.value = sentiment_html(self.predict(text), self.labels)

    def select(self, choice: str) -> None:
        """Answer with the ONNX model ``choice`` (a key of the dict of sessions) from now on."""
        if choice not in self.choices:
            raise ValueError(f"no ONNX model {choice!r}; the box has {self.choices}")
        self.choice = choice
        self.update(self.text.value)

    def predict(self, text: str):
        """PyTorch and the chosen ONNX model (the only one when a single session was given)."""
        session = self.onnx_session
        if self.choice is not None:
            session = {self.choice: self.onnx_session[self.choice]}
        return predict_sentiment(
            text,
            self.model,
            self.tokenizer,
            onnx_session=session,
            labels=self.labels,
            max_length=self.max_length,
        )

    def update(self, text: str) -> None:
        """What the widget does on Enter; errors are shown in the box (a widget callback's
        exception would otherwise vanish into the kernel's log)."""
        if not text.strip():
            self.result.value = "<i>type a sentence</i>"
            return
        try:
            self.result.value = sentiment_html(self.predict(text), self.labels)
        except Exception as exc:  # shown to the reader, not swallowed
            self.result.value = (
                f'<pre class="nbzoo-error" style="color:#b00">'
                f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</pre>"
            )

    def static_bundle(self) -> dict[str, str]:
        text = self.static.attrs["text"]
        caption = (
            f"{self.title} of the default sentence {text!r} (static view; the live box follows)"
        )
        return {
            "text/html": f"<p><i>{html.escape(caption)}</i></p>"
            + sentiment_html(self.static, self.labels),
            "text/plain": caption
            + "\n"
            + self.static.to_string(float_format=lambda v: f"{v:.4f}")
            + "\ntokens: "
            + " ".join(self.static.attrs["tokens"]),
        }

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.static_bundle(), raw=True)
        display(self.widget)


def sentiment_box(model: torch.nn.Module, tokenizer, **kwargs: Any) -> SentimentBox:
    """See :class:`SentimentBox` (keyword arguments: onnx_session — one session or a dict
    name → session, chosen by buttons —, labels, text, max_length, title). Make it the last
    expression of a cell to show it."""
    return SentimentBox(model, tokenizer, **kwargs)


# --------------------------------------------------------------------------------- attention


@dataclass
class AttentionMaps:
    """Attention of one input sequence, per (layer, head), built on demand.

    ``matrix(layer, head, hash_round=0)`` → (L, L) float array, rows = queries, columns = keys
    (``hash_round`` < ``num_rounds``: only Reformer's LSH layers have several);
    ``buckets(layer, head)`` → (hash rounds, L) int array of LSH buckets, or None;
    ``layer_label(layer, hash_round=0)`` → a short description of the layer's attention pattern.
    """

    tokens: list[str]
    num_layers: int
    num_heads: int
    matrix_fn: Callable[[int, int, int], np.ndarray]
    title: str = "attention"
    label_fn: Callable[[int, int], str] = lambda layer, hash_round: f"layer {layer}"
    num_rounds: int = 1
    buckets_fn: Callable[[int, int], np.ndarray | None] | None = None
    global_positions: list[int] = field(default_factory=list)
    chunk_lengths: list[int | None] = field(default_factory=list)  # per layer, where it chunks
    _cache: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def _check(self, layer: int, head: int, hash_round: int = 0) -> None:
        if not (
            0 <= layer < self.num_layers
            and 0 <= head < self.num_heads
            and 0 <= hash_round < self.num_rounds
        ):
            raise IndexError(
                f"layer {layer}, head {head}, hash round {hash_round}: the model has layers "
                f"0..{self.num_layers - 1}, heads 0..{self.num_heads - 1} and hash rounds "
                f"0..{self.num_rounds - 1}"
            )

    def matrix(self, layer: int, head: int, hash_round: int = 0) -> np.ndarray:
        self._check(layer, head, hash_round)
        key = (layer, head, hash_round)
        if key not in self._cache:
            self._cache[key] = np.asarray(self.matrix_fn(*key), np.float32)
        return self._cache[key]

    def layer_label(self, layer: int, hash_round: int = 0) -> str:
        return self.label_fn(layer, hash_round)

    def buckets(self, layer: int, head: int) -> np.ndarray | None:
        self._check(layer, head)
        return None if self.buckets_fn is None else self.buckets_fn(layer, head)


def _one_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected one sequence (L,) or (1, L); got shape {tuple(ids.shape)}")
    return ids


def _batch_of_one(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else _one_sequence(value)


def _tokens(tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens given for a sequence of {n}")
    return [str(t) for t in tokens]


def _run(model: torch.nn.Module, **inputs: Any):
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            return model(
                **{k: v.to(device) for k, v in inputs.items() if v is not None},
                output_attentions=True,
            )
    finally:
        model.train(was_training)


def dense_attention(
    attentions: Sequence[torch.Tensor],
    tokens: Sequence[str] | None = None,
    title: str = "attention",
) -> AttentionMaps:
    """Maps of a full-attention model: ``outputs.attentions`` (per layer (1, H, L, L))."""
    if not attentions:
        raise ValueError(
            "no attention weights: run the model with output_attentions=True, loaded with "
            "attn_implementation='eager' (fused SDPA kernels do not return them)"
        )
    layers = [a[0].float().cpu().numpy() for a in attentions]
    return AttentionMaps(
        tokens=_tokens(tokens, layers[0].shape[-1]),
        num_layers=len(layers),
        num_heads=layers[0].shape[0],
        matrix_fn=lambda layer, head, _round: layers[layer][head],
        title=title,
    )


def longformer_attention(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    global_attention_mask: torch.Tensor | None = None,
    tokens: Sequence[str] | None = None,
) -> AttentionMaps:
    """Run a Longformer (``LongformerModel`` or a ``LongformerFor*``) on one sequence and return
    its attention: each token's sliding window plus the rows and columns of the global tokens."""
    from nbzoo.longseq import longformer_attention_matrix

    ids = _one_sequence(input_ids)
    glob = _batch_of_one(global_attention_mask)
    out = _run(
        model,
        input_ids=ids,
        attention_mask=_batch_of_one(attention_mask),
        global_attention_mask=glob,
    )
    seq_len = ids.shape[1]
    local = [a[0] for a in out.attentions]  # (H, L, G + window + 1) each
    global_ = [a[0] for a in out.global_attentions] if out.global_attentions else None
    global_index = (
        torch.nonzero(glob[0]).flatten() if glob is not None else torch.zeros(0, dtype=torch.long)
    )
    windows = model.config.attention_window
    windows = list(windows) if isinstance(windows, list | tuple) else [windows] * len(local)

    n_global = len(global_index)

    def matrix(layer: int, head: int, _round: int) -> np.ndarray:
        # Upstream gives as many global columns as global tokens; the longformer_sliding_window
        # patch gives a fixed number of slots, the used ones first: keep the used columns only.
        band = local[layer][head]
        slots = band.shape[-1] - (windows[layer] + 1)
        band = torch.cat([band[:, :n_global], band[:, slots:]], dim=-1)
        g = None
        if global_ is not None:
            g = global_[layer][head, :seq_len, :n_global]  # drop padding and unused slots
        return longformer_attention_matrix(band, g, global_index, windows[layer])

    return AttentionMaps(
        tokens=_tokens(tokens, seq_len),
        num_layers=len(local),
        num_heads=local[0].shape[0],
        matrix_fn=matrix,
        title="Longformer attention",
        label_fn=lambda layer, _round: (
            f"layer {layer}: sliding window ±{windows[layer] // 2}"
            + (f" + {n_global} global token{'s' * (n_global != 1)}" if n_global else "")
        ),
        global_positions=global_index.tolist(),
    )


def _look_adjacent(chunks: np.ndarray, before: int, after: int) -> np.ndarray:
    """numpy twin of Reformer's ``_look_adjacent``: each chunk followed by its neighbours'
    entries, wrapping around the chunk axis (0) as the model does."""
    if before == 0 and after == 0:
        return chunks
    return np.concatenate([np.roll(chunks, -i, axis=0) for i in range(-before, after + 1)], -1)


def _scatter(probs: np.ndarray, query_idx: np.ndarray, key_idx: np.ndarray, n: int) -> np.ndarray:
    """Chunked attention (C, Q, K) with the positions of its queries (C, Q) and keys (C, K) →
    dense (n, n); a key present twice in a window adds up, as in the weighted sum."""
    dense = np.zeros((n, n), dtype=np.float64)
    rows = np.broadcast_to(query_idx[:, :, None], probs.shape)
    cols = np.broadcast_to(key_idx[:, None, :], probs.shape)
    np.add.at(dense, (rows, cols), probs)
    return dense


def reformer_attention(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    tokens: Sequence[str] | None = None,
) -> AttentionMaps:
    """Run a Reformer (``ReformerModel`` or a ``ReformerFor*``) on one sequence and return its
    attention: local layers' chunk windows, LSH layers' weights per hash round and the buckets
    of every round — all from this one forward pass (the LSH rotations are random per pass
    unless the model's hash seed is fixed)."""
    ids = _one_sequence(input_ids)
    mask = _batch_of_one(attention_mask)
    seq_len = ids.shape[1]
    config = model.config
    modules = [
        m for m in model.modules() if type(m).__name__ in ("LSHSelfAttention", "LocalSelfAttention")
    ]
    for m in modules:
        if seq_len % m.chunk_length and seq_len > m.chunk_length:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of the chunk length "
                f"{m.chunk_length} ({type(m).__name__}); the model would pad it — pass a "
                f"multiple of every chunk length"
            )
    captured: dict[int, torch.Tensor | None] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out.buckets))
        for i, m in enumerate(modules)
        if type(m).__name__ == "LSHSelfAttention"
    ]
    try:
        out = _run(model, input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    probs = [a[0].float().cpu().numpy() for a in out.attentions]
    padded = mask is not None and bool((mask == 0).any())

    def n_buckets(m) -> int:
        nb = m.num_buckets if isinstance(m.num_buckets, int) else math.prod(m.num_buckets)
        return nb + 1 if padded else nb  # the model adds a bucket for padding tokens

    def matrix(layer: int, head: int, hash_round: int) -> np.ndarray:
        m, p = modules[layer], probs[layer][head]
        if p.ndim == 2:  # short input: the layer fell back to full attention
            return p
        if type(m).__name__ == "LocalSelfAttention":
            query_idx = np.arange(seq_len).reshape(-1, m.chunk_length)
            key_idx = _look_adjacent(query_idx, m.num_chunks_before, m.num_chunks_after)
            return _scatter(p, query_idx, key_idx, seq_len)
        buckets = captured[layer][0, head].cpu().numpy().reshape(-1)  # rounds * L, offset
        order = np.argsort(buckets, kind="stable") % seq_len  # = the model's _stable_argsort
        query_idx = order.reshape(-1, m.chunk_length)
        key_idx = _look_adjacent(query_idx, m.num_chunks_before, m.num_chunks_after)
        per_round = query_idx.shape[0] // config.num_hashes
        rows = slice(hash_round * per_round, (hash_round + 1) * per_round)
        return _scatter(p[rows], query_idx[rows], key_idx[rows], seq_len)

    def buckets(layer: int, head: int) -> np.ndarray | None:
        b = captured.get(layer)
        if b is None:
            return None
        b = b[0, head].cpu().numpy()  # (rounds, L), round r offset by r * n_buckets
        return b - np.arange(b.shape[0])[:, None] * n_buckets(modules[layer])

    def label(layer: int, hash_round: int) -> str:
        m = modules[layer]
        if probs[layer][0].ndim == 2:
            return f"layer {layer}: full attention (input not longer than one chunk)"
        if type(m).__name__ == "LocalSelfAttention":
            return (
                f"layer {layer}: local, chunks of {m.chunk_length}, "
                f"{m.num_chunks_before} before / {m.num_chunks_after} after"
            )
        return (
            f"layer {layer}: LSH, {n_buckets(m)} buckets, hash round {hash_round} of "
            f"{config.num_hashes}, chunks of {m.chunk_length}"
        )

    return AttentionMaps(
        tokens=_tokens(tokens, seq_len),
        num_layers=len(modules),
        num_heads=config.num_attention_heads,
        matrix_fn=matrix,
        title="Reformer attention",
        label_fn=label,
        buckets_fn=buckets,
        num_rounds=config.num_hashes,
        chunk_lengths=[m.chunk_length for m in modules],
    )


# weights below this share of the largest one are drawn at the bottom of the log colour scale
LOG_RANGE = 1e-5
NOT_COMPUTED = "#d9d9d9"  # the colour of query-key pairs the attention never computes


def attention_norm(weights: np.ndarray):
    """A logarithmic colour scale for attention weights: a softmax spreads its mass over orders of
    magnitude, and on a linear scale a weight of 0.01 beside a peak of 0.6 is invisible -- such as
    every row's weight on Longformer's global tokens. Zeros (pairs never computed) fall outside
    the scale and are drawn in :data:`NOT_COMPUTED`."""
    from matplotlib.colors import LogNorm

    top = max(float(weights.max()), 1e-9)
    positive = weights[weights > 0]
    # a decade below the smallest weights (1st percentile), so that they still show in colour
    low = float(np.percentile(positive, 1)) / 10 if positive.size else top * LOG_RANGE
    return LogNorm(vmin=max(low, top * LOG_RANGE), vmax=top, clip=True)


# up to this many buckets each gets a colour named in a legend; more (a checkpoint's thousands of
# buckets) are coloured along a colour map, with a colour bar
NAMED_BUCKETS = 20


def _bucket_colours(count: int) -> list:
    from matplotlib import colormaps

    if count > NAMED_BUCKETS:
        cmap = colormaps["turbo"].resampled(count)
        return [cmap(i) for i in range(count)]
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _bucket_runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, length) of each run of equal values."""
    edges = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(values)]])
    return [(int(values[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def plot_attention(
    maps: AttentionMaps,
    layer: int = 0,
    head: int = 0,
    hash_round: int = 0,
    max_ticks: int = 40,
    sort_by_bucket: bool = True,
):
    """The (layer, head[, hash round]) attention matrix as a figure, on a logarithmic colour
    scale (:func:`attention_norm`; pairs never computed in grey); global tokens marked.

    An LSH layer is drawn in the order the layer itself works in (``sort_by_bucket``): the
    positions sorted by their bucket in this hash round, so its chunks show as blocks along the
    diagonal, with the buckets as a coloured strip over the matrix; under it, every token's bucket
    in each hash round, in text order. Returns a matplotlib ``Figure`` (not registered with
    pyplot, so it is shown only where you display it)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    weights = maps.matrix(layer, head, hash_round)
    buckets = maps.buckets(layer, head)
    n = weights.shape[0]
    order = np.arange(n)
    if buckets is not None and sort_by_bucket:
        order = np.argsort(buckets[hash_round], kind="stable")  # the layer's own order
    sorted_view = buckets is not None and sort_by_bucket
    weights = weights[np.ix_(order, order)]
    tokens = [maps.tokens[i] for i in order]
    fig = Figure(figsize=(6.6, 7.4 if buckets is not None else 5.8), layout="constrained")
    if buckets is not None:
        ratios = [0.035 * n, n, max(2.0, 1.2 * buckets.shape[0], 0.16 * n)]
        ax_top, ax, ax_b = fig.subplots(3, 1, gridspec_kw={"height_ratios": ratios}, sharex=False)
    else:
        ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad=NOT_COMPUTED)
    image = ax.imshow(
        np.ma.masked_equal(weights, 0.0),
        cmap=cmap,
        norm=attention_norm(weights),
        aspect="auto" if buckets is not None else "equal",  # the bucket strip over it aligns
    )
    fig.colorbar(
        image,
        ax=[ax_top, ax] if buckets is not None else ax,
        shrink=0.8,
        label="attention weight (log scale)",
    )
    where = "sorted by LSH bucket, hash round " + str(hash_round) if sorted_view else "position"
    ax.set(xlabel=f"key ({where})", ylabel=f"query ({where})")
    title = f"{maps.title}, head {head}\n{maps.layer_label(layer, hash_round)}"
    pad = 14 if maps.global_positions else 8  # room for the marks over the matrix
    (ax_top if buckets is not None else ax).set_title(title, fontsize=10, pad=pad)
    chunk = maps.chunk_lengths[layer] if layer < len(maps.chunk_lengths) else None
    if chunk and chunk < n:  # the chunks the layer attends within (and their neighbours')
        for edge in np.arange(chunk, n, chunk) - 0.5:
            ax.axhline(edge, color="white", lw=0.6, ls=":")
            ax.axvline(edge, color="white", lw=0.6, ls=":")
    if n <= max_ticks:
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tokens, fontsize=7)
    handles = [Patch(color=NOT_COMPUTED, label="not computed")]
    if maps.global_positions:  # red marks on the edges point at the global rows and columns
        pos = [int(np.flatnonzero(order == p)[0]) for p in maps.global_positions]
        edge = -0.5 - n / 60
        marks = {"color": "red", "ms": 5, "clip_on": False, "ls": "none"}
        handles += ax.plot(pos, [edge] * len(pos), "v", label="global token", **marks)
        ax.plot([edge] * len(pos), pos, ">", **marks)
        ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -0.5))  # the marks sit outside the matrix
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    if buckets is not None:
        _bucket_strips(fig, ax_top, ax_b, buckets, order if sorted_view else None, hash_round)
    return fig


def _bucket_strips(fig, ax_top, ax_b, buckets: np.ndarray, order, hash_round: int) -> None:
    """Over the matrix, the bucket of each position in the matrix's order (the chunks of a
    bucket-sorted round are runs of one colour); under it, each token's bucket per hash round in
    text order. The colours are named in a legend."""
    from matplotlib.patches import Patch

    count = int(buckets.max()) + 1
    colours = _bucket_colours(count)
    shown = buckets[hash_round] if order is None else buckets[hash_round][order]
    for value, start, length in _bucket_runs(shown):
        ax_top.broken_barh([(start - 0.5, length)], (0, 1), color=colours[value])
    ax_top.set(xlim=(-0.5, len(shown) - 0.5), ylim=(0, 1))
    ax_top.set_axis_off()
    for r, row in enumerate(buckets):
        for value, start, length in _bucket_runs(row):
            ax_b.broken_barh([(start - 0.5, length)], (r - 0.45, 0.9), color=colours[value])
    ax_b.set(
        xlim=(-0.5, buckets.shape[1] - 0.5),
        ylim=(buckets.shape[0] - 0.5, -0.5),
        xlabel="token position (text order)",
        ylabel="hash round",
        title="the LSH bucket of each token",
    )
    ax_b.title.set_fontsize(9)
    ax_b.set_yticks(range(buckets.shape[0]))
    if count > NAMED_BUCKETS:  # too many to name: a colour bar along the buckets' numbers
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        scale = ScalarMappable(Normalize(0, count - 1), colormaps["turbo"].resampled(count))
        fig.colorbar(scale, ax=ax_b, orientation="horizontal", label="LSH bucket", aspect=40)
        return
    legend = [Patch(color=colours[b], label=f"bucket {b}") for b in range(count)]
    fig.legend(
        handles=legend,
        loc="outside lower center",
        ncol=min(count, 10),
        fontsize=7,
        title="colour = LSH bucket",
        title_fontsize=7,
    )


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


class AttentionExplorer:
    """Layer / head (/ hash round) sliders over :class:`AttentionMaps`; ``.static`` is the PNG
    of the default view, ``.widget`` the live view."""

    def __init__(
        self, maps: AttentionMaps, layer: int = 0, head: int = 0, hash_round: int = 0
    ) -> None:
        import ipywidgets as w

        self.maps = maps
        self.static = figure_png(plot_attention(maps, layer, head, hash_round))

        def slider(name: str, value: int, count: int):
            return w.IntSlider(
                value=value, min=0, max=count - 1, description=name, continuous_update=False
            )

        self.layer = slider("layer", layer, maps.num_layers)
        self.head = slider("head", head, maps.num_heads)
        self.hash_round = slider("hash round", hash_round, maps.num_rounds)
        sliders = [self.layer, self.head] + ([self.hash_round] if maps.num_rounds > 1 else [])
        self.image = w.Image(value=self.static, format="png")
        self.status = w.HTML()
        self.widget = w.VBox([w.HBox(sliders), self.status, self.image])
        self.widget.add_class("nbzoo-attention")
        for s in sliders:
            s.observe(lambda _: self.update(), names="value")

    def update(self) -> None:
        try:
            fig = plot_attention(
                self.maps, self.layer.value, self.head.value, self.hash_round.value
            )
            self.image.value = figure_png(fig)
            self.status.value = ""
        except Exception as exc:  # shown to the reader, not swallowed
            self.status.value = (
                f'<pre style="color:#b00">{html.escape(type(exc).__name__)}: '
                f"{html.escape(str(exc))}</pre>"
            )

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display

        display(Image(data=self.static, format="png"))
        display(self.widget)


def attention_explorer(
    maps: AttentionMaps, layer: int = 0, head: int = 0, hash_round: int = 0
) -> AttentionExplorer:
    """See :class:`AttentionExplorer`. Make it the last expression of a cell to show it."""
    return AttentionExplorer(maps, layer, head, hash_round)
