"""The seeds' recipe record (nbzoo/seeds.toml) and the fidelity tables built from it."""

from __future__ import annotations

import html
import json
import re

import pytest

from nbzoo import fidelity, presets
from tests.conftest import ROOT

STEMS = [
    "01_albert_glue",
    "02_albert_inference",
    "03_roberta_sst2",
    "04_reformer_mlm",
    "05_longformer_mlm",
    "06_bert_thor",
]

# What each seed states as its recipe, read line by line from /work/shared/seeds (the seeds are
# not in this repository): every one must be an item of the notebook's record.
SEED_STATES = {
    "01_albert_glue": [
        "albert_pytorch",
        "PyTorch 1.5",
        "dataset/SST-2",
        "STS-B",
        "albert_base_v2",
        "--data_dir",
        "--model_type",
        "--task_name",
        "--output_dir",
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "--batch-size",
        "--learning_rate",
        "--fp16",
        "--fp16_opt_level",
        "train_full_1p.sh",
        "train_performance_1p.sh",
        "train_full_8p.sh",
        "train_performance_8p.sh",
        "train_eval_8p.sh",
        "AMP_Type",
        "--data_path",
    ],  # fmt: skip
    "02_albert_inference": [
        "albert.patch",
        "CANN 6.0.RC1",
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "output",
        "SST-2.zip",
        "outputs/SST-2",
        "Albert_preprocess.py",
        "16 / 32 / 64 / 128",
        "Albert_pth2onnx.py",
        "onnxsim",
        "opt_onnx.py",
        "--input_format=ND",
        "--framework=5",
        "--soc_version",
        "--input_shape",
        "--optypelist_for_implmode",
        "--op_select_implmode",
        "--op_precision_mode=precision.ini",
        "npu-smi info",
        "--model",
        "--input",
        "--output",
        "--output_dirname",
        "--outfmt NPY",
        "--batchsize",
        "--device",
        "Albert_postprocess.py",
        "--result_dir",
        "--label_path",
    ],  # fmt: skip
    "03_roberta_sst2": [
        "fairseq",
        "PyTorch 1.5",
        "input0",
        "lable",
        "preprocess.log",
        "dict.txt",
        "preprocess_GLUE_tasks.sh",
        "pre_train_model/RoBERTa.base/model.pt",
        "--data_path",
        "--restore-file",
        "--max-tokens",
        "--num-classes",
        "--max-epoch",
        "--batch-size",
        "--lr",
        "0.01",
        "--use-apex",
        "train_performance_1p.sh",
        "train_full_8p.sh",
        "train_performance_8p.sh",
        "train_eval_8p.sh",
    ],  # fmt: skip
    "04_reformer_mlm": [
        "7378726df60b9cf399aacfe372fea629c1c4c7d3",
        "transformers==4.28.1",
        "training_args.py",
        "trainer.py",
        "trainer_pt_utils.py",
        "modeling_reformer.py",
        "PyTorch 1.11",
        "checkpoint/reformer-crime-and-punishment",
        "spiece.model",
        "tokenizer.json",
        "rust_model.ot",
        "corpus/train_corpus.txt",
        "test_corpus.txt",
        "lf_token/",
        "merges.txt",
        "vocab.json",
        "train_full_1p.sh",
        "train_performance_1p.sh",
        "train_full_8p.sh",
        "train_performance_8p.sh",
        "Acc@1",
    ],  # fmt: skip
    "05_longformer_mlm": [
        "7378726df60b9cf399aacfe372fea629c1c4c7d3",
        "transformers==4.28.1",
        "training_args.py",
        "trainer.py",
        "modeling_longformer.py",
        "PyTorch 1.11",
        "--model_name",
        "corpus/train_corpus.txt",
        "test_corpus.txt",
        "lf_token/",
        "train_full_1p.sh",
        "train_full_8p.sh",
        "train_performance_8p.sh",
        "3 (every row)",
    ],  # fmt: skip
    "06_bert_thor": [
        "MindSpore",
        "BERT-Large",
        "330M",
        "MLPerf v0.7",
        "part-0000N-of-00500.tfrecord",
        "9,600,000",
        "first 10,000",
        "3000",
        "12 (per device)",
        "DEVICE_NUM",
        "THOR",
        "Softmax Cross Entropy",
        "device_target",
        "distribute",
        "epoch_size",
        "enable_save_ckpt",
        "enable_lossscale",
        "do_shuffle",
        "save_checkpoint_path",
        "load_checkpoint_path",
        "train_steps",
        "device_id",
        "enable_data_sink",
        "data_sink_steps",
        "save_checkpoint_steps",
        "save_checkpoint_num",
        "pretrain_eval.py",
        "DATA_FILE",
        "FINETUNE_CKPT",
        "SCHEMA_DIR",
        "RANK_TABLE_FILE",
        "run_standalone_pretrain.sh",
        "1000, 2000, 3000",
        "dataset.py",
    ],  # fmt: skip
}


def seed_presets(stem: str) -> list[str]:
    return [p for p in presets.names(stem) if p in fidelity.SEED_PRESETS]


def test_every_notebook_has_a_record_with_its_figures_and_items():
    assert fidelity.notebooks() == STEMS
    for stem in STEMS:
        ref = fidelity.reference(stem)
        assert ref["source"].startswith("seeds/") and ref["metrics"]
        assert all(isinstance(v, float) for v in ref["metrics"].values())
        assert len(fidelity.figures(stem)) >= 2
        assert len(fidelity.record(stem)["items"]) >= 10


@pytest.mark.parametrize("stem", STEMS)
def test_every_recipe_item_the_seed_states_is_in_the_record(stem):
    text = " ".join(f"{i['item']} {i['seed']}" for i in fidelity.record(stem)["items"])
    missing = [s for s in SEED_STATES[stem] if s not in text]
    assert not missing, f"{stem}: the record lists no item for {missing}"


@pytest.mark.parametrize("stem", STEMS)
def test_no_row_deviates_without_a_reason(stem):
    for preset in [*seed_presets(stem), "demo"]:
        table = fidelity.table(stem, preset)
        assert len(table) == len(fidelity.record(stem)["items"])
        assert set(table["match"]) <= set(fidelity.MATCHES)
        unexplained = table[(table["match"] != fidelity.EXACT) & (table["why"].str.len() == 0)]
        assert unexplained.empty, f"{stem} [{preset}]: {unexplained['seed item'].tolist()}"


def test_a_keyed_row_shows_the_resolved_preset_value():
    table = fidelity.table("06_bert_thor", "full").set_index("seed item")
    assert table.loc["batch_size", "nbzoo"] == "batch_size = 12"
    assert table.loc["batch_size", "match"] == fidelity.EXACT
    assert table.loc["total steps", "seed's value"] == "3000"


def test_a_parameter_that_moves_off_the_seed_is_named_as_the_reason():
    cfg = fidelity.resolved("06_bert_thor", "full")
    cfg["max_steps"] = 10
    table = fidelity.table("06_bert_thor", cfg).set_index("seed item")
    assert table.loc["total steps", "match"] == fidelity.DEVIATES
    assert "by a parameter (the preset says 3000)" in table.loc["total steps", "why"]


def test_a_knob_the_notebook_lacks_deviates_and_says_so():
    cfg = fidelity.resolved("01_albert_glue", "full")
    cfg.pop("epochs")
    row = fidelity.table("01_albert_glue", cfg).set_index("seed item").loc["--num_train_epochs"]
    assert row["match"] == fidelity.DEVIATES
    assert row["nbzoo"] == "no `epochs` knob in this build"


def test_a_deviating_item_without_a_reason_is_refused():
    with pytest.raises(fidelity.RecordError, match="needs 'why'"):
        fidelity._check_item("x", 1, {"item": "a", "seed": "b", "nbzoo": "c", "match": "deviates"})
    with pytest.raises(fidelity.RecordError, match="unknown fields"):
        fidelity._check_item("x", 1, {"item": "a", "seed": "b", "key": "k", "value": 1, "vale": 2})


@pytest.mark.parametrize("stem", STEMS)
def test_the_notebook_shows_the_table_and_types_in_no_seed_figure(stem):
    nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert f'fidelity.show("{stem}", cfg)' in code
    figures = {v for v in fidelity.reference(stem)["metrics"].values()}
    literals = {float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", code)}
    assert not figures & literals, f"{stem}: seed figures typed into a cell: {figures & literals}"


# --- each row compares the value it names --------------------------------------------------------


def mutated(value):
    """Another value of the same kind (what a parameter could set)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 1.0
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, [1, 1]]
    if isinstance(value, dict):
        return {**{k: mutated(v) for k, v in value.items()}, "mutated": 1}
    raise TypeError(type(value))


def fidelity_cases():
    return [(stem, p) for stem in STEMS for p in seed_presets(stem) if p in ("full", "full_8p")]


@pytest.mark.parametrize(("stem", "preset"), fidelity_cases())
def test_changing_any_value_an_exact_row_compares_turns_it_to_deviates(stem, preset):
    """The mutation test: each preset value an exact row covers (its key, or each input of a derived
    value such as global_batch), changed one at a time, turns that row to deviates; a row the seed
    leaves open whose value follows a named source says the run departs from it."""
    cfg = fidelity.resolved(stem, preset)
    checked = 0
    for item in fidelity.record(stem)["items"]:
        if "key" not in item:
            continue
        before = fidelity.row(stem, item, cfg)
        for key in fidelity.keys_read(item):
            changed = presets.Config({**presets.TRAINING_DEFAULTS, **cfg})
            if item.get("rule") == "contains":  # the list without the seed's entry
                expected = list(fidelity.seed_value(item, preset))
                changed[key] = [x for x in changed[key] if list(x) != expected]
            else:
                changed[key] = mutated(changed[key])
            after = fidelity.row(stem, item, changed)
            if before["match"] == fidelity.EXACT:
                assert after["match"] == fidelity.DEVIATES, (item["item"], key, after)
                assert "by a parameter" in after["why"], (item["item"], key, after["why"])
                checked += 1
            elif before["match"] == fidelity.OPEN and "source_value" in item:
                assert after["match"] == fidelity.OPEN
                assert "this run departs from" in after["why"], (item["item"], key)
                checked += 1
    assert checked >= 3, f"{stem} [{preset}]: only {checked} values checked"


def test_every_exact_row_compares_its_value_or_names_the_test_that_shows_it():
    """No exact row that only checks a name: a keyed row compares the seed's stated value with the
    preset's; a row about code is exact only with a test of this suite that shows the behaviour."""
    import ast

    for stem in STEMS:
        for item in fidelity.record(stem)["items"]:
            if "key" in item:
                assert item.get("stated", True) is False or "value" in item, item["item"]
                assert item.get("rule", "equal") in fidelity.RULES, item["item"]
                continue
            if item["match"] != fidelity.EXACT:
                continue
            path, _, name = item["test"].partition("::")
            tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
            tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in tests, f"{stem} {item['item']!r}: {item['test']} does not exist"


def test_an_exact_code_row_without_its_test_is_refused():
    with pytest.raises(fidelity.RecordError, match="needs the 'test'"):
        fidelity._check_item("x", 1, {"item": "a", "seed": "b", "nbzoo": "c", "match": "exact"})


@pytest.mark.parametrize("stem", STEMS)
def test_the_tables_are_english_with_the_seeds_words_only_as_quotes(stem):
    cjk = re.compile("[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
    for preset in [*seed_presets(stem), "demo"]:
        for row in fidelity.rows(stem, fidelity.resolved(stem, preset)):
            for column, cell in row.items():
                text = re.sub("「[^」]*」", "", cell)
                assert not cjk.search(text), f"{stem} [{preset}] {column}: {cell}"
        assert not cjk.search(" ".join(fidelity.figures(stem)["row"]))


def test_the_precision_rows_compare_each_device_the_seed_names():
    """01's AMP row: O1 on the GPU, O2 on the NPU -- the preset's per-device dict is the seed's."""
    cfg = fidelity.resolved("01_albert_glue", "full")
    amp = "--fp16 / --fp16_opt_level (AMP_Type)"
    assert fidelity.table("01_albert_glue", cfg).set_index("seed item").loc[amp, "match"] == "exact"
    cfg["precision"] = {"cuda": "bf16", "npu": "O2", "cpu": "O2"}
    row = fidelity.table("01_albert_glue", cfg).set_index("seed item").loc[amp]
    assert row["match"] == fidelity.DEVIATES and "cuda: bf16, the seed's O1" in row["why"]
    cfg["precision"] = "fp16"  # nbzoo's fp16 is apex's O1, but not the NPU rows' O2
    row = fidelity.table("01_albert_glue", cfg).set_index("seed item").loc[amp]
    assert "npu: fp16, the seed's O2" in row["why"] and "cuda" not in row["why"].split("(")[-1]


def test_the_eight_device_row_on_one_device_keeps_the_global_batch():
    table = fidelity.table("06_bert_thor", "full_8p_on_1").set_index("seed item")
    assert table.loc["global batch", "match"] == fidelity.EXACT
    assert table.loc["global batch", "nbzoo"] == "global_batch = 96"
    assert table.loc["devices (DEVICE_NUM, distribute)", "match"] == fidelity.DEVIATES


def test_show_displays_every_cell_whole_under_a_line_of_counts():
    shown = fidelity.show("06_bert_thor", "full")
    counts = fidelity.counts("06_bert_thor", "full")
    assert shown.counts == counts and sum(counts.values()) == len(shown.rows)
    line = fidelity.count_line(counts)
    assert re.fullmatch(r"\d+ exact · \d+ deviates? · \d+ left open by the seed", line)
    page = shown._repr_html_()
    assert line in page and page.count("<tr>") == len(shown.rows) + 1
    longest = max((cell for r in shown.rows for cell in r.values()), key=len)
    assert len(longest) > 50 and html.escape(longest) in page  # no cut at 50 characters
    assert line in repr(shown) and longest in repr(shown)
