"""PyTorch → ONNX export, parity check, simplification, transformer-graph optimization, and
graph statistics. Generic over models: ALBERT, Reformer and Longformer use the same functions.

The seed's chain is ``torch.onnx.export`` → ``onnxsim`` → an Ascend graph optimizer; the open
counterparts here are onnxslim (or onnxsim when installed) and ONNX Runtime's transformer
optimizer, which fuses attention, GELU and LayerNorm into single kernels. Every file is written
to a temporary name and renamed, so a crash never leaves a half-written model under the real name.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from nbzoo import patching
from nbzoo.infer import ort_session as session

# Opset 13 exports LayerNorm as primitive ops (the LayerNormalization op needs opset 17), which
# older converters such as the seed-era ATC accept; ORT's optimizer fuses it back either way.
DEFAULT_OPSET = 13

# onnxslim rewrites that hide the patterns ORT's transformer fusions look for: FusionGemm turns
# MatMul + Add into Gemm between Reshapes, EliminationReshape merges the two Reshapes of the
# attention-mask path. Skipping them keeps the simplified graph fusable.
SLIM_SKIP_FOR_TRANSFORMERS = ("FusionGemm", "EliminationReshape")

ORT_ATTENTION_PATCH = "ort_attention_residual_order"


class ExportError(RuntimeError):
    pass


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class _NamedOutputs(torch.nn.Module):
    """Calls ``model(**inputs)`` and returns the named outputs as a tuple, so that a model that
    returns a dict / ``ModelOutput`` exports with exactly the outputs asked for."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names):
        super().__init__()
        self.model, self.input_names, self.output_names = model, list(input_names), output_names

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        return tuple(_pick(out, name) for name in self.output_names)


def _pick(out: Any, name: str) -> torch.Tensor:
    if isinstance(out, Mapping) and name in out:
        return out[name]
    if hasattr(out, name):
        return getattr(out, name)
    raise ExportError(f"the model's output has no field {name!r}")


def export_onnx(
    model: torch.nn.Module,
    dummy_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (called as ``model(**inputs)``) to ``path`` and check the file.

    Static shapes unless ``dynamic_axes`` is given (``{"input_ids": {0: "batch", 1: "seq"}}``).
    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based one needs onnxscript
    and produces graphs that ORT's transformer fusions do not recognise.
    """
    path = Path(path)
    missing = [n for n in input_names if n not in dummy_inputs]
    if missing:
        raise ExportError(f"dummy_inputs lacks {', '.join(missing)} (input_names: {input_names})")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _NamedOutputs(model, input_names, list(output_names)).eval()
    args = tuple(dummy_inputs[n] for n in input_names)
    tmp = _tmp_path(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer notes
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        got = [i.name for i in proto.graph.input]
        if got != list(input_names):
            raise ExportError(
                f"{path.name}: the exported graph's inputs are {got}, expected {list(input_names)} "
                "(an input the model does not use is dropped by the exporter)"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fix_shapes(
    path: str | os.PathLike, out: str | os.PathLike, dims: Mapping[str, Mapping[int, int]]
) -> Path:
    """A dynamic-shape model with some axes fixed (``{"input_ids": {0: 32, 1: 128}}``, inputs
    and outputs by name): the graph a static export traces at that shape, before simplification
    folds its shape computations away -- one export serves every static shape."""
    proto = onnx.load(str(path))
    values = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output)}
    unknown = sorted(set(dims) - set(values))
    if unknown:
        raise ExportError(f"{Path(path).name} has no input or output {', '.join(unknown)}")
    for name, axes in dims.items():
        shape = values[name].type.tensor_type.shape.dim
        for axis, size in axes.items():
            shape[axis].ClearField("dim_param")
            shape[axis].dim_value = int(size)
    onnx.checker.check_model(proto)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(out)
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def torch_outputs(
    torch_model: torch.nn.Module,
    inputs: Mapping[str, Any],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """PyTorch's named outputs on ``inputs`` (arrays / tensors keyed by ``input_names``): the
    reference :func:`parity_check` compares with, computed once for several ONNX files."""
    device = next(torch_model.parameters()).device
    with torch.no_grad():
        out = _NamedOutputs(torch_model.eval(), list(input_names), list(output_names))(
            *(torch.as_tensor(_as_numpy(inputs[n]), device=device) for n in input_names)
        )
    out = (out,) if isinstance(out, torch.Tensor) else out
    return {name: _as_numpy(ref) for name, ref in zip(output_names, out, strict=True)}


def parity_check(
    torch_model: torch.nn.Module | None,
    onnx_path: str | os.PathLike,
    inputs: Mapping[str, Any],
    output_names: Sequence[str] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's outputs on ``inputs``
    (a dict of arrays / tensors keyed by the ONNX input names), over the named outputs (default:
    all outputs of the ONNX graph). ``reference``: PyTorch's outputs from :func:`torch_outputs`
    on the same inputs, so that several files are checked against one PyTorch run."""
    sess = session(onnx_path)
    names = list(output_names or [o.name for o in sess.get_outputs()])
    feeds = {i.name: _as_numpy(inputs[i.name]) for i in sess.get_inputs()}
    got = dict(zip(names, sess.run(names, feeds), strict=True))
    if reference is None:
        reference = torch_outputs(torch_model, feeds, list(feeds), names)
    diff = 0.0
    for name in names:
        ref = np.asarray(reference[name]).astype(np.float64)
        if ref.shape != got[name].shape:
            raise ExportError(
                f"{Path(onnx_path).name}: output {name!r} has shape {got[name].shape}, "
                f"PyTorch gives {ref.shape}"
            )
        diff = max(diff, float(np.abs(ref - got[name].astype(np.float64)).max()))
    return diff


def stage_path(path: str | os.PathLike, suffix: str) -> Path:
    """``albert_seq128_bs32.onnx`` → ``albert_seq128_bs32_sim.onnx`` (``suffix="sim"``)."""
    path = Path(path)
    stem = path.stem
    for known in ("_sim", "_opt"):
        if stem.endswith(known):
            stem = stem[: -len(known)]
    return path.with_name(f"{stem}_{suffix}{path.suffix}")


def dedupe_initializers(proto: onnx.ModelProto) -> int:
    """Merge initializers of equal type, shape and bytes into one (their users renamed); returns
    how many went. Constant folding turns a weight the exporter shares through ``Identity``
    nodes -- ALBERT's one layer, used 12 times -- into one copy per use: 358 MB instead of 47 MB
    for albert-base, which every later stage would read, write and load again."""
    import hashlib

    from onnx import numpy_helper

    protected = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for tensor in proto.graph.initializer:
        data = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data.tobytes()).digest())
        if key in first and tensor.name not in protected:
            rename[tensor.name] = first[key]
        else:
            first.setdefault(key, tensor.name)
            keep.append(tensor)
    if not rename:
        return 0

    def relink(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    relink(sub)

    relink(proto.graph)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return len(rename)


def bypass_weight_identities(proto: onnx.ModelProto) -> int:
    """Drop the ``Identity`` nodes through which the exporter hands a weight to each of its users
    (ALBERT's shared layer: 12 per weight), the users reading the weight itself; returns how many
    went. Folded by the simplifier instead, each would become a copy of the weight, half of
    onnxslim's time on albert-base."""
    if any(a.HasField("g") or len(a.graphs) for n in proto.graph.node for a in n.attribute):
        return 0  # a subgraph may read an Identity's output too: left to the simplifier
    weights = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in proto.graph.node
        if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs
    }
    if not alias:
        return 0
    kept = [n for n in proto.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return len(alias)


def simplify(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    backend: str = "onnxslim",
    skip_fusion_patterns: Sequence[str] = SLIM_SKIP_FOR_TRANSFORMERS,
) -> Path:
    """Constant-fold and clean the graph (``<stem>_sim.onnx``): onnxslim, or the seed's onnxsim
    (``backend="onnxsim"``, when the onnxsim package is installed). A weight shared by several
    nodes stays one tensor (:func:`bypass_weight_identities` before, :func:`dedupe_initializers`
    after)."""
    path = Path(path)
    out = Path(out) if out is not None else stage_path(path, "sim")
    tmp = _tmp_path(out)
    try:
        if backend not in ("onnxslim", "onnxsim"):
            raise ValueError(f"backend must be onnxslim or onnxsim; got {backend!r}")
        source = onnx.load(str(path))
        bypass_weight_identities(source)
        if backend == "onnxslim":
            import onnxslim

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # without an output path slim returns the model and prints no summary table
                proto = onnxslim.slim(
                    source, skip_fusion_patterns=list(skip_fusion_patterns) or None
                )
            if proto is None:
                raise ExportError(f"{path.name}: onnxslim could not simplify the model")
            dedupe_initializers(proto)
            onnx.save(proto, str(tmp))
        elif backend == "onnxsim":
            try:
                import onnxsim
            except ImportError:
                raise ExportError(
                    "backend='onnxsim' needs the onnxsim package (pip install onnxsim)"
                ) from None
            proto, ok = onnxsim.simplify(source)
            if not ok:
                raise ExportError(f"{path.name}: onnxsim could not validate the simplified model")
            dedupe_initializers(proto)
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(onnx.load(str(tmp)))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class _DropLogRecords:
    """A logging filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


# ORT's EmbedLayerNormalization fusion tells the word-embedding table from the position one by
# their roles in the graph, then warns when the vocabulary is not the larger ("word_embedding_table
# size 67 <= position_embedding_table size 128"): a check for a swapped pair, written for real
# vocabularies. A tiny demo vocabulary trips it although the fusion is right; parity_check is what
# verifies the fused graph, so the warning is dropped rather than shown as a problem.
# ORT's transformers package puts its own folder on sys.path and imports its modules by their bare
# names: the logger is "fusion_embedlayer" (the package-qualified name is filtered too).
_EMBED_LOGGERS = ("fusion_embedlayer", "onnxruntime.transformers.fusion_embedlayer")
_EMBED_SIZE_WARNING = "<= position_embedding_table"


@dataclass
class Optimized:
    path: Path
    fused: dict[str, int]  # fused operator → count, as reported by ORT's optimizer


def optimize(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    model_type: str = "bert",
    num_heads: int = 0,
    hidden_size: int = 0,
    opt_level: int = 0,
    use_gpu: bool = False,
) -> Optimized:
    """ONNX Runtime's transformer optimizer (``<stem>_opt.onnx``): fuses attention, GELU,
    LayerNorm (and embedding + LayerNorm) into ORT's contrib operators. ``num_heads`` and
    ``hidden_size`` are needed when the graph's reshapes have dynamic shapes. ``opt_level=0``
    keeps the saved graph free of provider-specific rewrites, so it runs on any EP."""
    from onnxruntime.transformers import optimizer

    path = Path(path)
    out = Path(out) if out is not None else stage_path(path, "opt")
    tmp = _tmp_path(out)
    drop = _DropLogRecords(_EMBED_SIZE_WARNING)
    for name in _EMBED_LOGGERS:
        logging.getLogger(name).addFilter(drop)
    try:
        with patching.applied(ORT_ATTENTION_PATCH):
            model = optimizer.optimize_model(
                str(path),
                model_type=model_type,
                num_heads=num_heads,
                hidden_size=hidden_size,
                opt_level=opt_level,
                use_gpu=use_gpu,
            )
        fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        dedupe_initializers(model.model)  # the fused QKV weights: one per layer, shared in ALBERT
        model.save_model_to_file(str(tmp))
        onnx.checker.check_model(onnx.load(str(tmp)))
        os.replace(tmp, out)
    finally:
        for name in _EMBED_LOGGERS:
            logging.getLogger(name).removeFilter(drop)
        tmp.unlink(missing_ok=True)
    return Optimized(out, fused)


def optimize_standard(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``<stem>_opt.onnx`` in standard ONNX operators only, for converters (ATC) that know no ORT
    contrib operator: ONNX Runtime's *basic* graph optimizations (constant folding, redundant
    node elimination, MatMul + Add → Gemm), saved offline. The seed's own ``opt_onnx.py`` runs
    magiconnx's BertBigKernelOptimizer (Ascend's fused-attention pattern), which has no open
    counterpart."""
    import onnxruntime as ort

    path = Path(path)
    out = Path(out) if out is not None else stage_path(path, "opt")
    tmp = _tmp_path(out)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        foreign = non_standard_ops(tmp)
        if foreign:
            raise ExportError(f"{out.name}: basic optimization left non-standard ops {foreign}")
        onnx.checker.check_model(onnx.load(str(tmp)))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _proto(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def op_histogram(model: str | os.PathLike | onnx.ModelProto) -> Counter:
    """How many nodes of each operator type the graph has (``domain::Op`` outside ONNX's own)."""
    return Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in _proto(model).graph.node
    )


def weight_bytes(model: str | os.PathLike | onnx.ModelProto) -> int:
    """Bytes of the graph's initializers (its weights), without the graph's own description."""
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in _proto(model).graph.initializer)


def node_count(model: str | os.PathLike | onnx.ModelProto) -> int:
    return len(_proto(model).graph.node)


def non_standard_ops(model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Operators outside the standard ONNX domain (e.g. ORT's com.microsoft fused kernels),
    which converters such as Ascend's ATC do not accept."""
    return sorted(k for k in op_histogram(model) if "::" in k)


def compare_graphs(stages: Mapping[str, str | os.PathLike]):
    """A DataFrame: operator types as rows, stages as columns, with node totals and file sizes."""
    import pandas as pd

    hist = {name: op_histogram(p) for name, p in stages.items()}
    table = pd.DataFrame(hist).fillna(0).astype(int)
    table = table.loc[table.max(axis=1).sort_values(ascending=False).index]
    totals = pd.DataFrame(
        {
            name: {
                "nodes (total)": node_count(p),
                "file size (KiB)": round(Path(p).stat().st_size / 1024),
            }
            for name, p in stages.items()
        }
    )
    return pd.concat([totals, table])
