"""nbzoo.launch: one torchrun launcher for the training notebooks (01, 03, 04, 05, 06).

For each notebook's training entry point: a 2-process gloo run under torchrun and a 1-process run
with the same global batch give the same losses (fp32 tolerance), and ``mode = "eval"`` on the
trained checkpoint reproduces the run's final metrics exactly. Tiny configs: the launches are the
slow part (two Python processes each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbzoo import device as nbdevice
from nbzoo import (
    finetune,
    launch,
    longseq,
    masked_lm,
    optimizer_comparison,
    patching,
    presets,
    pretraining,
)
from nbzoo import sentence_prediction as sp
from nbzoo.data import glue

# fp32 tolerance: the same arithmetic in another order (two half-batches, a gradient all-reduce)
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6


def config(stem: str, preset: str = "demo", **overrides):
    """A notebook's resolved preset, as its parameters cell would give it."""
    tables = presets.load(stem)
    namespace = {k: None for table in tables.values() for k in table}
    namespace.update({k: None for k in presets.TRAINING_DEFAULTS})
    namespace.update(device="cpu", precision="fp32", seed=0, output_dir=None)
    namespace.update(overrides)
    return presets.resolve(stem, preset, namespace)


def changed(cfg, **values):
    return presets.Config({**cfg, **values})


def cpu_runtime(seed: int = 0):
    torch.set_num_threads(1)
    return nbdevice.setup("cpu", "fp32", seed)


def losses(result) -> np.ndarray:
    history = result["history"] if isinstance(result, dict) else result.history
    return np.array([h["loss"] for h in history])


def assert_same_losses(two_process, one_process, steps: int):
    a, b = losses(two_process), losses(one_process)
    assert len(a) == len(b) == steps
    np.testing.assert_allclose(a, b, rtol=LOSS_RTOL, atol=LOSS_ATOL)


# --- the launcher itself (fast) ---------------------------------------------------------------


def test_one_machine_launches_standalone_so_two_jobs_never_share_a_port():
    args = launch.Launch(devices=8).torchrun_args()
    assert args == ["--nproc_per_node=8", "--standalone"]


def test_several_machines_pass_the_rendezvous_of_node_zero():
    spec = launch.Launch(
        devices=8, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29400
    )
    assert spec.world_size == 16
    assert spec.torchrun_args() == [
        "--nproc_per_node=8",
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=10.0.0.5",
        "--master_port=29400",
        "--rdzv_conf=timeout=300",  # rendezvous_timeout's default: the machines wait 5 minutes
    ]


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"devices": 0}, "devices must be an integer >= 1"),
        ({"nnodes": 2, "node_rank": 2}, "node_rank must be an integer from 0 to nnodes - 1 = 1"),
        ({"master_port": 70000}, "master_port must be a TCP port"),
        ({"master_addr": ""}, "master_addr must name node 0"),
    ],
)
def test_a_bad_launch_knob_is_refused_with_its_name(knobs, message):
    with pytest.raises(ValueError, match=message):
        launch.Launch(**knobs)


def test_a_mode_other_than_train_or_eval_is_refused():
    with pytest.raises(ValueError, match="mode must be one of train, eval; got 'test'"):
        launch.check_mode({"mode": "test"})


def test_only_the_notebook_process_of_a_multi_device_run_launches():
    one = nbdevice.Runtime(kind="cpu", precision="fp32")
    rank = nbdevice.Runtime(kind="cpu", precision="fp32", rank=1, world_size=2)
    assert launch.needed({"devices": 2}, one)
    assert not launch.needed({"devices": 1}, one)
    assert not launch.needed({"devices": 2}, rank)


def test_a_results_file_records_the_processes_the_training_ran_on():
    rt = nbdevice.Runtime(kind="cpu", precision="fp32")
    assert launch.recorded_runtime(rt, {"devices": 2, "nnodes": 2}).world_size == 4
    assert launch.recorded_runtime(rt, {"devices": 2, "mode": "eval"}).world_size == 1


@pytest.mark.parametrize(
    "stem", ["01_albert_glue", "03_roberta_sst2", "04_reformer_mlm", "05_longformer_mlm"]
)
def test_full_8p_is_the_seeds_eight_device_row_and_full_its_one_device_row(stem):
    full, eight = config(stem, "full"), config(stem, "full_8p")
    assert (full.devices, eight.devices) == (1, 8)
    assert eight.batch_size == full.batch_size  # per device: the global batch is 8 times larger
    assert eight.checkpoint_dir != full.checkpoint_dir
    epochs = {"01_albert_glue": (2, 7), "03_roberta_sst2": (1, 10), "04_reformer_mlm": (1, 10)}
    assert (full.epochs, eight.epochs) == epochs.get(stem, (3, 3))


def test_bert_thor_full_8p_is_the_seeds_run_of_eight_devices_with_batch_12_each():
    full, eight = config("06_bert_thor", "full"), config("06_bert_thor", "full_8p")
    assert (full.devices, eight.devices) == (1, 8)
    assert eight.batch_size * eight.devices == 96


def test_the_seeds_3000_steps_of_96_samples_stay_inside_one_epoch():
    """config.py's epoch_size 1: the reported run reads 288,000 of the 9,600,000 MLPerf samples,
    once, on 8 devices or on one with grad_accum 8."""
    for preset in ("full_8p", "full_8p_on_1"):
        cfg = config("06_bert_thor", preset)
        assert cfg.max_steps * launch.global_batch(cfg) == 288_000
        assert pretraining.epochs_read(cfg, cfg.devices, 9_600_000) == 1
    assert pretraining.epochs_read(config("06_bert_thor", "full"), 1, 9_600_000) == 1


def test_the_global_batch_counts_devices_machines_and_accumulated_micro_batches():
    cfg = {"batch_size": 12, "devices": 8, "nnodes": 2, "grad_accum": 3}
    assert launch.global_batch(cfg) == 12 * 8 * 2 * 3
    assert launch.batch_line({"batch_size": 12, "devices": 1, "nnodes": 1, "grad_accum": 8}) == (
        "global batch 96 = 12 per device × 1 device × 1 machine × grad_accum 8"
    )


def test_an_explicit_devices_knob_wins_over_the_preset():
    assert config("01_albert_glue", "full_8p", devices=2).devices == 2
    assert config("01_albert_glue", "demo").devices == 1


# --- 01: GLUE fine-tuning ----------------------------------------------------------------------


def glue_config(tmp, run: str, batch_size: int, **extra):
    return config(
        "01_albert_glue",
        task="sst2",
        data_dir=str(tmp / "glue"),
        data_source="local",
        model_config={
            "embedding_size": 16,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "classifier_dropout_prob": 0.0,
            "initializer_range": 0.15,
            "max_position_embeddings": 16,
        },
        max_seq_length=16,
        epochs=1,
        batch_size=batch_size,
        max_steps=4,
        checkpoint_every=0,
        checkpoint_dir=str(tmp / run),
        **extra,
    )


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glue")
    glue.write_sample_dataset(tmp / "glue", "sst2", {"train": 128, "dev": 40}, seed=0)
    cfg = glue_config(tmp, "one", batch_size=16)
    rt = cpu_runtime()
    return tmp, cfg, rt, finetune.train("sst2", cfg, rt)


@pytest.fixture(scope="module")
def glue_two(glue_run):
    tmp, _, rt, _ = glue_run
    return finetune.train("sst2", glue_config(tmp, "two", batch_size=8, devices=2), rt)


@pytest.mark.slow
def test_glue_fine_tuning_on_two_processes_matches_one_process_with_the_same_global_batch(
    glue_run, glue_two
):
    tmp, _, rt, one = glue_run
    two = glue_two
    assert_same_losses(two.result, one.result, steps=4)
    assert two.result.samples == one.result.samples == 64
    assert two.metrics["sst2_accuracy"] == pytest.approx(one.metrics["sst2_accuracy"], abs=1 / 40)


@pytest.mark.slow
def test_glue_fine_tuning_with_grad_accum_2_on_one_process_matches_two_processes(
    glue_run, glue_two
):
    tmp, _, rt, one = glue_run
    accum = finetune.train("sst2", glue_config(tmp, "accum", batch_size=8, grad_accum=2), rt)
    assert_same_losses(accum.result, glue_two.result, steps=4)
    assert_same_losses(accum.result, one.result, steps=4)
    assert accum.result.samples == 64


@pytest.mark.slow
def test_glue_eval_mode_reproduces_the_trained_runs_metrics_exactly(glue_run):
    _, cfg, rt, one = glue_run
    evaluated = finetune.evaluate("sst2", changed(cfg, mode="eval"), rt)
    assert evaluated.metrics == one.metrics
    assert evaluated.result.history == one.result.history  # the run's record beside the checkpoint


# --- 03: fairseq sentence prediction -------------------------------------------------------------


def sst2_config(tmp, run: str, batch_size: int, **extra):
    return config(
        "03_roberta_sst2",
        data_dir=str(tmp / "bin"),
        glue_dir=str(tmp / "glue"),
        bpe_dir=str(tmp / "bpe"),
        sample_sizes={"train": 128, "dev": 40, "test": 8},
        bpe_vocab_size=300,
        model_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        dropout=0.0,
        epochs=1,
        batch_size=batch_size,
        max_steps=4,
        checkpoint_dir=str(tmp / run),
        **extra,
    )


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sst2")
    cfg = sst2_config(tmp, "one", batch_size=16)
    folder = sp.prepare_data(cfg)
    rt = cpu_runtime()
    return tmp, cfg, rt, folder, sp.train(cfg, rt, folder)


@pytest.fixture(scope="module")
def sst2_two(sst2_run):
    tmp, _, rt, folder, _ = sst2_run
    cfg = sst2_config(tmp, "two", batch_size=8, devices=2, data_source="binarized")
    return sp.train(cfg, rt, folder)


@pytest.mark.slow
def test_roberta_fine_tuning_on_two_processes_matches_one_process_with_the_same_global_batch(
    sst2_run, sst2_two
):
    tmp, _, rt, folder, one = sst2_run
    assert_same_losses(sst2_two.result, one.result, steps=4)
    assert sst2_two.checkpoint == tmp / "two" / "hf"


@pytest.mark.slow
def test_roberta_fine_tuning_with_grad_accum_2_on_one_process_matches_two_processes(
    sst2_run, sst2_two
):
    tmp, _, rt, folder, one = sst2_run
    cfg = sst2_config(tmp, "accum", batch_size=8, grad_accum=2, data_source="binarized")
    accum = sp.train(cfg, rt, folder)
    assert_same_losses(accum.result, sst2_two.result, steps=4)
    assert_same_losses(accum.result, one.result, steps=4)


@pytest.mark.slow
def test_roberta_eval_mode_reproduces_the_trained_runs_accuracy_exactly(sst2_run):
    _, cfg, rt, folder, one = sst2_run
    evaluated = sp.evaluate(changed(cfg, mode="eval"), rt, folder)
    assert evaluated.accuracy == one.accuracy
    assert evaluated.result.history == one.result.history


# --- 04 / 05: masked LM ------------------------------------------------------------------------


def mlm_config(stem: str, tmp, run: str, batch_size: int, **extra):
    return config(
        stem,
        data_dir=str(tmp / "corpus"),
        sample_sizes={"train": 120, "test": 20},
        epochs=1,
        batch_size=batch_size,
        max_steps=3,
        eval_batch_size=8,
        checkpoint_dir=str(tmp / run),
        **extra,
    )


def mlm_train_in_process(kind: str, cfg, rt):
    """What the notebook's cells do: data, model, the masked test set, training."""
    masked_lm.apply_patches(kind)
    data = masked_lm.prepare_data(cfg)
    model = masked_lm.build_model(kind, cfg, data.tokenizer).to(rt.device)
    unigram = longseq.Unigram.fit(
        data.train_set.blocks, len(data.tokenizer), data.tokenizer.all_special_ids
    )
    batches = masked_lm.test_batches(kind, cfg, data.tokenizer, data.test_set)
    result = masked_lm.train(kind, cfg, rt, model, data, batches, unigram)
    return data, model, unigram, batches, result


MLM = {"reformer": "04_reformer_mlm", "longformer": "05_longformer_mlm"}


@pytest.fixture(scope="module", params=sorted(MLM))
def mlm_run(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    cfg = mlm_config(MLM[kind], tmp, "one", batch_size=4)
    rt = cpu_runtime()
    # the notebook's kernel keeps its patches; this module's tests keep them for the fixture's
    # life only, so that later modules (test_patches_longseq's upstream checks) see upstream
    with patching.applied(*masked_lm.PATCHES[kind]):
        yield kind, tmp, cfg, rt, mlm_train_in_process(kind, cfg, rt)


def mlm_train_again(kind: str, cfg, rt, data, eval_batches=()):
    model = masked_lm.build_model(kind, cfg, data.tokenizer)
    unigram = longseq.Unigram.fit(data.train_set.blocks, len(data.tokenizer), [])
    return masked_lm.train(kind, cfg, rt, model, data, list(eval_batches), unigram)


@pytest.fixture(scope="module")
def mlm_two(mlm_run):
    kind, tmp, _, rt, (data, *_) = mlm_run
    cfg = mlm_config(MLM[kind], tmp, "two", batch_size=2, devices=2, data_source="local")
    return mlm_train_again(kind, cfg, rt, data)


@pytest.mark.slow
def test_masked_lm_on_two_processes_matches_one_process_with_the_same_global_batch(
    mlm_run, mlm_two
):
    """The masks are drawn for the global batch and the loss is averaged over its masked tokens,
    so the two half-batches train as the whole one would."""
    kind, tmp, _, rt, (data, *_, one) = mlm_run
    assert_same_losses(mlm_two, one, steps=3)
    assert (tmp / "two" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_masked_lm_with_grad_accum_2_on_one_process_matches_two_processes(mlm_run, mlm_two):
    """Each micro-batch weighs by its share of the step's masked tokens (not 1/2 each): the
    step's loss is the mean over all of them, as on two processes."""
    kind, tmp, _, rt, (data, _, _, batches, one) = mlm_run
    cfg = mlm_config(MLM[kind], tmp, "accum", batch_size=2, grad_accum=2, data_source="local")
    accum = mlm_train_again(kind, cfg, rt, data, batches)
    assert_same_losses(accum, mlm_two, steps=3)
    assert_same_losses(accum, one, steps=3)


@pytest.mark.slow
def test_masked_lm_eval_mode_reproduces_the_trained_runs_metrics_exactly(mlm_run):
    kind, _, cfg, rt, (data, model, unigram, batches, result) = mlm_run
    final = longseq.evaluate_mlm(model, batches, rt, unigram)
    fresh = masked_lm.build_model(kind, changed(cfg, mode="eval"), data.tokenizer)
    record = masked_lm.load_weights(fresh, masked_lm.final_dir(cfg))
    assert longseq.evaluate_mlm(fresh, batches, rt, unigram) == final
    assert record.history == result.history
    assert {k: final[k] for k in masked_lm.EVAL_KEYS[kind]} == {
        k: result.evals[-1][k] for k in masked_lm.EVAL_KEYS[kind]
    }


# --- 06: BERT pretraining with THOR -------------------------------------------------------------


def thor_config(tmp, batch_size: int, **extra):
    extra = {"checkpoint_dir": str(tmp / "checkpoints"), **extra}
    return config(
        "06_bert_thor",
        threads=1,
        grid_workers=1,
        data_dir=str(tmp / "shards"),
        num_samples=400,
        samples_per_shard=200,
        eval_samples=100,
        batch_size=batch_size,
        max_steps=4,
        eval_every=2,
        eval_batch_size=50,
        frequency=2,
        stats_every=1,
        grid={"thor": [{"lr": 0.02, "damping": 0.007035}], "adamw": [{"lr": 0.003}]},
        **extra,
    )


@pytest.fixture(scope="module")
def thor_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("thor")
    cfg = thor_config(tmp, batch_size=16)
    pretraining.prepare_data(cfg)
    rt = cpu_runtime()
    train_data, eval_data = pretraining.load_data(cfg)
    return tmp, cfg, rt, eval_data, optimizer_comparison.run(cfg, rt, train_data, eval_data)


@pytest.fixture(scope="module")
def thor_two(thor_run):
    tmp, _, rt, _, _ = thor_run
    cfg = thor_config(tmp, batch_size=8, devices=2, checkpoint_dir="")
    return optimizer_comparison.run(cfg, rt, [], [], workdir=tmp / "torchrun")


@pytest.mark.slow
def test_thor_pretraining_with_grad_accum_2_on_one_process_matches_two_processes(
    thor_run, thor_two
):
    """THOR gathers its statistics over both micro-batches of a step and counts optimizer steps
    (its refreshes every ``frequency`` of them); each micro-batch weighs in the loss by its share
    of the step's masked tokens and samples."""
    tmp, _, rt, eval_data, _ = thor_run
    cfg = thor_config(tmp, batch_size=8, grad_accum=2, checkpoint_dir="")
    train_data, _ = pretraining.load_data(cfg)
    accum = optimizer_comparison.run(cfg, rt, train_data, eval_data)
    assert [r.optimizer for r in accum] == ["thor", "adamw"]
    for a, b in zip(accum, thor_two, strict=True):
        assert_same_losses(a, b, steps=4)
    assert [r["step"] for r in accum[0].refresh_log] == [0, 2]  # frequency 2, in optimizer steps
    assert accum[0].refresh_log == thor_two[0].refresh_log


@pytest.mark.slow
def test_thor_pretraining_on_two_processes_matches_one_process_with_the_same_global_batch(
    thor_run, thor_two
):
    """THOR all-reduces its factors; the masked-LM loss is averaged over the global batch."""
    tmp, _, rt, _, one = thor_run
    two = thor_two
    assert [r.optimizer for r in two] == ["thor", "adamw"]
    for a, b in zip(two, one, strict=True):
        assert_same_losses(a, b, steps=4)
        np.testing.assert_allclose(
            [e["mlm_accuracy"] for e in a.evals], [e["mlm_accuracy"] for e in b.evals], atol=0.02
        )


@pytest.mark.slow
def test_thor_eval_mode_reproduces_the_trained_runs_final_accuracy_exactly(thor_run):
    tmp, cfg, rt, eval_data, runs = thor_run
    thor = runs[0]
    last = tmp / "checkpoints" / "thor-lr0.02-d0.007035" / "last"
    scores = pretraining.evaluate_checkpoint(
        changed(cfg, mode="eval", init_checkpoint=str(last)), rt, eval_data
    )
    assert scores["mlm_accuracy"] == thor.final_accuracy
    assert scores["mlm_loss"] == thor.evals[-1]["mlm_loss"]


def test_a_pretraining_checkpoint_of_another_shape_is_refused_with_its_path(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 4)}, str(path))
    cfg = config("06_bert_thor")
    with pytest.raises(ValueError, match="other.safetensors: not this model_config's"):
        pretraining.initial_model(changed(cfg, init_checkpoint=str(path)))
    with pytest.raises(FileNotFoundError, match="model.ckpt-28252 .*--config"):
        pretraining.initial_model(changed(cfg, init_checkpoint=str(tmp_path / "missing")))
    (tmp_path / "bert.ckpt").write_bytes(b"MindSpore")
    with pytest.raises(ValueError, match="bert.ckpt: a MindSpore checkpoint; .* convert it first"):
        pretraining.initial_model(changed(cfg, init_checkpoint=str(tmp_path / "bert.ckpt")))


def test_a_pretraining_checkpoint_is_read_into_the_model_in_place_one_tensor_at_a_time(
    tmp_path, monkeypatch
):
    """No second copy of the whole model while loading (BERT-Large: 1.3 GB on every rank): each
    tensor of the file is copied into the model's own and let go before the next is read."""
    import weakref

    import safetensors
    from safetensors.torch import save_model

    cfg = config("06_bert_thor")
    source = pretraining.build_model(cfg.model_config, seed=5)
    save_model(source, str(tmp_path / "model.safetensors"))  # the tied decoder stored once
    model = pretraining.build_model(cfg.model_config, cfg.seed, initialize=False)
    storage = {k: t.data_ptr() for k, t in model.state_dict().items()}
    read, opened = [], safetensors.safe_open

    class OneTensorAtATime:
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            assert all(r() is None for r in read), "two tensors of the file alive at once"
            tensor = self.file.get_tensor(name)
            read.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", OneTensorAtATime)
    pretraining.load_checkpoint(tmp_path, model)
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == storage  # in place
    assert len(read) == len(storage)
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_every_grid_point_starts_from_the_same_weights_without_a_kept_copy(tmp_path):
    """initial_model rebuilds the start for each run: the seeded initialisation, or the
    checkpoint's weights, the same every time."""
    cfg = config("06_bert_thor")
    a, b = pretraining.initial_model(cfg), pretraining.initial_model(cfg)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
    from safetensors.torch import save_model

    other = pretraining.build_model(cfg.model_config, seed=7)
    save_model(other, str(tmp_path / "other.safetensors"))
    loaded = pretraining.initial_model(
        changed(cfg, init_checkpoint=str(tmp_path / "other.safetensors"))
    )
    for name, tensor in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


MMAP_PROBE = """
import ctypes, torch
from nbzoo import pretraining
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mapped_on_its_own():  # a new 2 MiB tensor (the size of BERT-Large's activations)
    before = libc.mallinfo2().hblks
    y = torch.ones(1 << 19)
    return libc.mallinfo2().hblks - before
print(pretraining.return_freed_memory())
x = torch.ones(4 << 20)
del x  # a freed 16 MiB tensor: glibc's default would move its threshold up to 16 MiB
print(mapped_on_its_own())  # without return_freed_memory: 0, from the heap
"""


def test_on_a_cpu_a_freed_activation_goes_back_to_the_system_not_to_mallocs_heap(tmp_path):
    """After a large tensor is freed, glibc serves the next ones up to its size from its heap,
    which keeps them once freed; return_freed_memory maps each tensor of 1 MiB or more on its
    own (counted in mallinfo2's hblks), so that freeing it returns it."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    script = tmp_path / "probe.py"
    script.write_text(MMAP_PROBE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "1"]


def test_the_global_batch_is_per_device_batch_times_devices_machines_and_micro_batches():
    cfg = {"batch_size": 12, "devices": 8, "nnodes": 1, "grad_accum": 1}
    assert launch.global_batch(cfg) == 96
    assert launch.global_batch({**cfg, "devices": 1, "grad_accum": 8}) == 96
    assert launch.global_batch({**cfg, "devices": 2, "nnodes": 2, "grad_accum": 3}) == 144
