"""nbzoo.export.onnx (export, parity, simplify, optimize, graph statistics), the ORT attention
patch, and the ALBERT pipeline helpers, on a tiny randomly initialised ALBERT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AlbertConfig, AlbertForSequenceClassification

from nbzoo import patching
from nbzoo.export import albert
from nbzoo.export import onnx as onnx_export

NAMES = list(albert.INPUT_NAMES)


def tiny_albert(
    seed: int = 0, vocab_size: int = 50, max_positions: int = 64
) -> AlbertForSequenceClassification:
    torch.manual_seed(seed)
    config = AlbertConfig(
        vocab_size=vocab_size,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=2,
    )
    model = AlbertForSequenceClassification(config)
    with torch.no_grad():  # fresh biases are zero; make them count, as trained ones do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def features(n: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Token ids with right padding of varying length, as the tokenizer produces them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=n)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(5, 50, size=(n, seq)) * mask
    types = ((np.arange(seq)[None] >= lengths[:, None] // 2) * mask).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def model():
    return tiny_albert()


@pytest.fixture(scope="module")
def stages(model, tmp_path_factory):
    return albert.build_stages(model, features(16, 12), tmp_path_factory.mktemp("onnx"))


def test_pipeline_stages_match_pytorch_and_fuse_the_transformer(model, stages):
    assert [p.name for p in stages.paths.values()] == [
        "albert_dynamic.onnx",
        "albert_dynamic_sim.onnx",
        "albert_dynamic_opt.onnx",
        "albert_dynamic_int8.onnx",
    ]
    assert max(stages.parity[name] for name in albert.FP32_STAGES) < 1e-5
    # every layer's attention, both GELUs, all LayerNorms (with their residual adds)
    assert stages.fused["Attention"] == model.config.num_hidden_layers
    assert stages.fused["FastGelu"] == model.config.num_hidden_layers
    assert stages.fused["SkipLayerNormalization"] == 2 * model.config.num_hidden_layers
    opt = stages.paths["onnx_opt"]
    hist = onnx_export.op_histogram(opt)
    assert hist["com.microsoft::Attention"] == 2 and "Softmax" not in hist
    assert onnx_export.node_count(opt) < onnx_export.node_count(stages.paths["onnx_sim"])
    # a different batch size and sequence length than at export time (dynamic axes)
    other = features(5, 20, seed=7)
    for name in albert.FP32_STAGES:
        assert onnx_export.parity_check(model, stages.paths[name], other) < 1e-5


def test_simplification_keeps_albert_s_shared_layer_weights_in_one_copy(stages):
    """ALBERT uses one layer's weights in every layer; the folded graph must not copy them."""
    from onnx import numpy_helper

    sim = onnx.load(str(stages.paths["onnx_sim"]))
    arrays = [numpy_helper.to_array(t) for t in sim.graph.initializer]
    contents = [(a.dtype, a.shape, a.tobytes()) for a in arrays]
    assert len(contents) == len(set(contents))
    assert stages.paths["onnx_sim"].stat().st_size < 1.2 * stages.paths["onnx"].stat().st_size


def test_merging_equal_initializers_renames_their_users_and_keeps_the_result():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("MatMul", ["x", "w2"], ["b"]),
            helper.make_node("Sub", ["a", "w3"], ["c"]),
            helper.make_node("Add", ["b", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w1"), (w.copy(), "w2"), (w[:1], "w3"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.array([[1.0, 2.0]], dtype=np.float32)

    def run(p):
        return ort.InferenceSession(p.SerializeToString()).run(None, {"x": x})[0]

    before = run(proto)
    assert onnx_export.dedupe_initializers(proto) == 1
    assert [t.name for t in proto.graph.initializer] == ["w1", "w3"]
    assert list(proto.graph.node[1].input) == ["x", "w1"]
    onnx.checker.check_model(proto)
    np.testing.assert_array_equal(run(proto), before)


def test_a_static_model_from_the_dynamic_export_is_the_static_trace_once_simplified(
    model, stages, tmp_path
):
    feats = features(6, 12, seed=4)
    traced = albert.export_static(model, feats, tmp_path / "traced", 4)
    fixed = albert.export_static(model, feats, tmp_path / "fixed", 4, source=stages.paths["onnx"])
    assert fixed["onnx"].name == "albert_seq12_bs4.onnx"
    for stage in ("onnx_sim", "onnx_opt"):
        assert onnx_export.op_histogram(fixed[stage]) == onnx_export.op_histogram(traced[stage])
    graph = onnx.load(str(fixed["onnx_opt"])).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert shapes == dict.fromkeys(NAMES, [4, 12])
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [4, 2]
    sample = albert.dummy_inputs(feats, 4)
    assert onnx_export.parity_check(model, fixed["onnx_opt"], sample) < 1e-5


def test_one_pytorch_reference_serves_the_parity_of_every_stage(model, stages):
    feats = features(6, 12, seed=5)
    ref = onnx_export.torch_outputs(model, feats, NAMES, ["logits"])
    for name in albert.FP32_STAGES:
        path = stages.paths[name]
        shared = onnx_export.parity_check(None, path, feats, ["logits"], reference=ref)
        assert shared == onnx_export.parity_check(model, path, feats, ["logits"])


def test_int8_stage_quantizes_the_optimized_graph_and_stays_close(model, stages):
    hist = onnx_export.op_histogram(stages.paths["onnx_int8"])
    assert hist["com.microsoft::QAttention"] == model.config.num_hidden_layers
    assert hist["MatMul"] == 0 and hist["com.microsoft::Attention"] == 0
    assert hist["MatMulInteger"] + hist["com.microsoft::DynamicQuantizeMatMul"] > 0
    # int8 rounding moves the logits, but by a small fraction of their spread
    feats = features(32, 12, seed=3)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feats.items()}).logits.numpy()
    diff = onnx_export.parity_check(model, stages.paths["onnx_int8"], feats)
    assert 0 < diff < 0.1 * np.ptp(ref)


def _quantized_and_float_weights(path) -> tuple[set[str], set[str]]:
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    quantized = {n.removesuffix("_quantized") for n in names if n.endswith("_quantized")}
    return quantized, names


def test_the_int8_file_is_smaller_than_the_fp32_one_each_shared_weight_quantized_once(stages):
    int8, opt, plain = (stages.paths[k] for k in ("onnx_int8", "onnx_opt", "onnx"))
    assert int8.stat().st_size < opt.stat().st_size < plain.stat().st_size
    # int8 weights are a quarter of fp32's bytes; biases and LayerNorm scales stay fp32
    assert onnx_export.weight_bytes(int8) < 0.5 * onnx_export.weight_bytes(opt)
    quantized, names = _quantized_and_float_weights(int8)
    assert quantized and not quantized & names, "an fp32 weight kept beside its int8 copy"


def test_quantizing_the_plain_export_quantizes_every_use_of_albert_s_shared_layer(
    model, stages, tmp_path
):
    """The plain export hands ALBERT's shared weights to the second layer through Identity
    nodes; ORT's quantizer alone quantizes the first layer only and keeps both copies."""
    from nbzoo.export import quantize

    plain = stages.paths["onnx"]
    graph = onnx.load(str(plain)).graph
    weights = {t.name for t in graph.initializer}
    weights |= {
        n.output[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in weights
    }
    uses = sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    # the embedding projection, and Q, K, V, the output projection and the FFN's two per layer
    assert uses == 1 + 6 * model.config.num_hidden_layers
    uses += sum(1 for n in graph.node if n.op_type == "Gemm")  # the pooler and the classifier

    int8 = quantize.quantize_dynamic(plain, tmp_path / "plain_int8.onnx")
    hist = onnx_export.op_histogram(int8)
    assert hist["MatMulInteger"] == uses and hist["Identity"] == 0
    quantized, names = _quantized_and_float_weights(int8)
    assert not quantized & names
    # the weights shrink (on a model this small the file is mostly the graph's description,
    # which the quantization nodes lengthen)
    assert onnx_export.weight_bytes(int8) < 0.5 * onnx_export.weight_bytes(plain)
    assert not list(tmp_path.glob(".*")), "a temporary file left behind"


def test_optimizing_a_tiny_vocabulary_does_not_warn_about_the_embedding_sizes(
    stages, tmp_path, caplog
):
    """ORT's embedding fusion warns when the vocabulary (here 50) is not larger than the position
    table (64): a check written for real vocabularies, dropped by optimize()."""
    import logging

    with caplog.at_level(logging.INFO):
        done = onnx_export.optimize(
            stages.paths["onnx_sim"], tmp_path / "opt.onnx", num_heads=4, hidden_size=32
        )
    assert done.fused["EmbedLayerNormalization"] == 1
    assert not [r for r in caplog.records if "position_embedding_table" in r.getMessage()]
    for name in onnx_export._EMBED_LOGGERS:
        assert logging.getLogger(name).filters == []  # the filter goes with the call


def test_ort_int8_kernels_are_named_in_mlas_order():
    from nbzoo.export import quantize

    assert quantize.ort_int8_kernel({"avx2", "fma"}).startswith("AVX2")
    assert quantize.ort_int8_kernel({"avx2", "avx_vnni"}).startswith("AVX-VNNI")
    assert quantize.ort_int8_kernel({"avx2", "avx512bw"}).startswith("AVX-512 core")
    assert quantize.ort_int8_kernel({"avx2", "avx512bw", "avx512_vnni"}).startswith("AVX-512 VNNI")
    sapphire = {"avx2", "avx_vnni", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}
    assert quantize.ort_int8_kernel(sapphire).startswith("AMX")
    assert "generic" in quantize.ort_int8_kernel({"sse4_2"})
    assert quantize.ort_int8_kernel({"asimd", "asimddp"}).startswith("ARM dotprod")


@pytest.mark.parametrize("reduce_range", [True, False], ids=["avx2-only", "vnni"])
def test_int8_stays_close_with_the_weights_either_kind_of_cpu_quantizes_to(
    model, stages, tmp_path, reduce_range
):
    """quantize_dynamic picks 7-bit weights on a CPU without an int8 dot product (AVX2, AVX-512
    without VNNI: vpmaddubsw would saturate 8-bit ones) and 8-bit ones with VNNI / AMX. ONNX
    Runtime has no switch to run another CPU's kernels, but without saturation either kernel
    sums the same int8 products exactly in int32: the model each kind of CPU quantizes is the
    model it runs. Both are tried here, so that this test passes on every CPU of the fleet."""
    from nbzoo.export import quantize

    int8 = quantize.quantize_dynamic(
        stages.paths["onnx"], tmp_path / "int8.onnx", reduce_range=reduce_range
    )
    feats = features(32, 12, seed=3)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feats.items()}).logits.numpy()
    diff = onnx_export.parity_check(model, int8, feats)
    assert 0 < diff < 0.1 * np.ptp(ref)


def test_int8_instruction_sets_are_read_from_cpuinfo(tmp_path):
    from nbzoo.export import quantize

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512bw avx512_vnni\n")
    flags = quantize.cpu_flags(cpuinfo)
    isa = quantize.int8_instruction_sets(flags)
    assert isa["int8_instruction_sets"] == ["avx2", "avx512bw", "avx512_vnni"]
    assert isa["int8_dot_product"] and "VNNI" in isa["described"]
    avx2_only = quantize.int8_instruction_sets({"avx2", "fma"})
    assert avx2_only["int8_instruction_sets"] == ["avx2"] and not avx2_only["int8_dot_product"]
    assert quantize.cpu_flags(tmp_path / "absent") == set()


def test_graph_tables_count_what_the_files_hold(stages):
    table = onnx_export.compare_graphs(stages.paths)
    for name, path in stages.paths.items():
        proto = onnx.load(str(path))
        assert table.loc["nodes (total)", name] == len(proto.graph.node)
        ops = table.drop(["nodes (total)", "file size (KiB)"])[name]
        assert ops.sum() == len(proto.graph.node)
    assert onnx_export.non_standard_ops(stages.paths["onnx_sim"]) == []
    assert "com.microsoft::Attention" in onnx_export.non_standard_ops(stages.paths["onnx_opt"])


def test_static_export_has_the_seeds_name_and_fixed_shapes(model, tmp_path):
    feats = features(3, 16)
    path = albert.export(model, feats, tmp_path, batch_size=4)
    assert path.name == "albert_seq16_bs4.onnx"
    graph = onnx.load(str(path)).graph
    for tensor in graph.input:
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_value for d in tensor.type.tensor_type.shape.dim] == [4, 16]
    assert [o.name for o in graph.output] == ["logits"]
    sim = onnx_export.simplify(path)
    assert sim.name == "albert_seq16_bs4_sim.onnx"
    sample = {k: v.numpy() for k, v in albert.dummy_inputs(feats, 4).items()}
    assert onnx_export.parity_check(model, sim, sample) < 1e-5
    assert onnx_export.node_count(sim) < onnx_export.node_count(path)


def test_patch_fuses_albert_first_layer_and_computes_the_same(model, stages, tmp_path):
    """Equivalence test of patches/ort_attention_residual_order.py: upstream alone fuses one of the
    two attention blocks; with the patch both are fused, and both graphs match PyTorch."""
    from onnxruntime.transformers import optimizer

    assert onnx_export.ORT_ATTENTION_PATCH not in patching.active()
    sim = stages.paths["onnx_sim"]
    upstream = optimizer.optimize_model(
        str(sim), model_type="bert", num_heads=4, hidden_size=32, opt_level=0
    )
    plain = tmp_path / "upstream_opt.onnx"
    upstream.save_model_to_file(str(plain))
    assert upstream.get_fused_operator_statistics()["Attention"] == 1
    assert stages.fused["Attention"] == 2
    feats = features(8, 12, seed=3)
    assert onnx_export.parity_check(model, plain, feats) < 1e-5
    assert onnx_export.parity_check(model, stages.paths["onnx_opt"], feats) < 1e-5
    assert onnx_export.ORT_ATTENTION_PATCH not in patching.active()  # optimize() undid it


def test_export_is_generic_and_checks_its_inputs(tmp_path):
    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, ids, weights):
            return {"score": (self.emb(ids) * weights[..., None]).sum(1), "unused": ids}

    model = Scorer().eval()
    inputs = {"ids": torch.tensor([[1, 2, 3]]), "weights": torch.ones(1, 3)}
    path = onnx_export.export_onnx(
        model, inputs, tmp_path / "scorer.onnx", ["ids", "weights"], ["score"]
    )
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["score"]
    assert onnx_export.parity_check(model, path, inputs) < 1e-6
    with pytest.raises(onnx_export.ExportError, match="dummy_inputs lacks weights"):
        onnx_export.export_onnx(
            model, {"ids": inputs["ids"]}, tmp_path / "x.onnx", ["ids", "weights"], ["score"]
        )


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    target = tmp_path / "broken.onnx"
    with pytest.raises(RuntimeError, match="boom"):
        onnx_export.export_onnx(Broken(), {"x": torch.ones(2)}, target, ["x"], ["y"])
    assert list(tmp_path.iterdir()) == []


def test_stage_names():
    assert onnx_export.stage_path("out/albert_seq128_bs32.onnx", "sim").name == (
        "albert_seq128_bs32_sim.onnx"
    )
    assert onnx_export.stage_path("out/albert_seq128_bs32_sim.onnx", "opt").name == (
        "albert_seq128_bs32_opt.onnx"
    )


def test_torch_batches_pad_like_the_runner_and_speedup_reports(model, stages):
    feats = features(10, 12)
    batches = albert.batches(feats, 4)
    assert len(batches) == 3
    last = batches[-1]["input_ids"]
    np.testing.assert_array_equal(last[:2], feats["input_ids"][8:10])
    np.testing.assert_array_equal(last[2:], feats["input_ids"][[8, 8]])
    logits, stats = albert.torch_predict(model, feats, 4)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feats.items()}).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    assert stats["count"] == 3 and stats["throughput"] > 0
    result = albert.speedup(model, stages.paths["onnx_opt"], feats, 4, n_batches=2, rounds=1)
    assert result["onnx_speedup"] == pytest.approx(
        result["onnx_samples_per_second"] / result["torch_samples_per_second"]
    )
    assert result["seq_len"] == 12 and result["batches_per_round"] == 2


def test_the_benchmark_times_every_model_in_every_round_and_records_the_load(model, stages):
    feats = features(8, 12)
    paths = {k: stages.paths[k] for k in ("onnx", "onnx_opt", "onnx_int8")}
    bench = albert.benchmark(model, paths, feats, 4, n_batches=2, rounds=4)
    assert list(bench.samples_per_second) == [albert.TORCH, *paths]
    assert all(len(v) == 4 and min(v) > 0 for v in bench.samples_per_second.values())
    assert bench.rounds == 4 and bench.batches_per_round == 2 and bench.seq_len == 12
    ratios = bench.ratios("onnx_opt")
    expected = [
        a / b
        for a, b in zip(
            bench.samples_per_second["onnx_opt"],
            bench.samples_per_second[albert.TORCH],
            strict=True,
        )
    ]
    assert ratios == pytest.approx(expected)
    assert len(bench.load_before) == 3 and len(bench.load_after) == 3
    record = bench.to_dict()
    assert record["rounds"] == 4 and record["load_average_after"] == list(bench.load_after)


def test_speedup_times_several_models_in_alternating_rounds_with_their_spread(model, stages):
    feats = features(8, 12)
    paths = {"onnx_opt": stages.paths["onnx_opt"], "onnx_int8": stages.paths["onnx_int8"]}
    result = albert.speedup(model, paths, feats, 4, n_batches=2, rounds=3)
    for name in ("onnx_opt", "onnx_int8"):
        q1, q3 = result[f"{name}_speedup_iqr"]
        assert q1 <= result[f"{name}_speedup"] <= q3
        lo, hi = result[f"{name}_samples_per_second_iqr"]
        assert lo <= result[f"{name}_samples_per_second"] <= hi
    assert result["onnx_speedup"] == result["onnx_opt_speedup"] and result["rounds"] == 3
