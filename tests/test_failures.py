"""What a user's mistake or a fault ends in (issue 26, the robustness half): one clear error that
names the file, record, field or knob -- never a raw traceback from deep in a library, a silently
wrong result, a silent hang, or processes left running after the run was stopped.

Each test reproduces one defect of the issue with the smallest input that shows it."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AlbertModel,
    ReformerConfig,
    ReformerForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from nbzoo import cli, convert_fairseq, finetune, launch, masked_lm, metrics, presets, pretraining
from nbzoo import device as nbdevice
from nbzoo import sentence_prediction as sp
from nbzoo.data import corpus, fairseq, glue, mlperf
from nbzoo.data.fairseq_glue import binarize_sst2
from nbzoo.data.gpt2_bpe import RobertaEncoder, train_bpe
from nbzoo.train import TrainConfig, fit
from tests.conftest import ROOT, probe_project, run_python
from tests.test_fairseq_convert import fairseq_names, randomized, save_fairseq, tiny_config


def cpu() -> nbdevice.Runtime:
    torch.set_num_threads(1)
    return nbdevice.setup("cpu", "fp32", 0)


# --- defect 3: non-finite numbers ------------------------------------------------------------


@pytest.mark.parametrize("text", ["1e999", "nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_on_the_command_line_is_refused_naming_the_knob(text):
    path = cli.find_notebook("01_albert_glue")
    with pytest.raises(cli.UsageError, match="parameter learning_rate must be a finite number"):
        cli.parse_overrides(path, [f"learning_rate={text}"], cli.notebook_parameters(path))


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_the_notebooks_own_check_refuses_a_non_finite_knob_on_the_papermill_route(value):
    namespace = {k: None for t in presets.load("01_albert_glue").values() for k in t}
    with pytest.raises(presets.PresetError, match="parameter learning_rate must be a finite"):
        presets.resolve("01_albert_glue", "demo", {**namespace, "learning_rate": value})


def test_a_non_finite_number_inside_a_dict_knob_is_refused_with_where_it_is():
    with pytest.raises(presets.PresetError, match=r"model_config\['hidden_dropout_prob'\] is nan"):
        presets.check_domain("01_albert_glue", "model_config", {"hidden_dropout_prob": NAN})


NAN = float("nan")


def _diverging_run(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = [{"x": x[i], "y": x[i].sum(0, keepdim=True)} for i in range(64)]
    model = torch.nn.Linear(4, 1)

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch["x"]), batch["y"])

    cfg = TrainConfig(
        epochs=5, batch_size=8, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, desc="toy"
    )
    return model, data, loss_fn, cfg


def test_training_that_goes_non_finite_stops_naming_the_step_and_the_loss(tmp_path):
    """A learning rate far too large: the loss overflows within a few steps. The run stops at the
    first non-finite loss, and the checkpoint it leaves holds the last finite weights."""
    model, data, loss_fn, cfg = _diverging_run(tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e18)
    # nbzoo.train.Diverged, a FloatingPointError
    with pytest.raises(
        FloatingPointError, match=r"toy: the training loss is (nan|inf) at step \d+"
    ) as info:
        fit(model, data, optimizer, cpu(), cfg, loss_fn=loss_fn)
    step = int(str(info.value).split(" at step ")[1].split()[0])
    assert "learning rate 1e+18" in str(info.value)
    saved = torch.load(cfg.checkpoint_dir / "last" / "trainer_state.pt", weights_only=True)
    assert saved["state"]["step"] < step
    from safetensors.torch import load_file

    weights = load_file(cfg.checkpoint_dir / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- tiny checkpoints of the notebooks' models -------------------------------------------------

ALBERT = dict(
    vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=24, max_position_embeddings=32,
)  # fmt: skip


def albert_checkpoint(folder: Path, labels: int = 2, head: bool = True, nan: bool = False) -> Path:
    torch.manual_seed(0)
    config = AlbertConfig(**ALBERT, num_labels=labels)
    model = AlbertForSequenceClassification(config) if head else AlbertModel(config)
    if nan:
        with torch.no_grad():
            model.classifier.weight[0, 0] = float("nan")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def glue_config(tmp_path, **values):
    return presets.Config(
        {"checkpoint_dir": str(tmp_path / "unused"), "max_seq_length": 16, **values}
    )


DATA = {"dev": None}  # finetune.evaluate refuses before it reads the data


# --- defect 4 / 12: mode = eval on a checkpoint without the task's head ------------------------


def test_eval_of_a_checkpoint_without_the_classifier_names_the_missing_head(tmp_path):
    """A pretrained ALBERT (no classifier): transformers would add one at random and score it."""
    folder = albert_checkpoint(tmp_path / "albert-base", head=False)
    cfg = glue_config(tmp_path, init_checkpoint=str(folder))
    with pytest.raises(ValueError, match="no SST-2 classifier .* in this checkpoint") as info:
        finetune.evaluate("sst2", cfg, cpu(), data=DATA)
    assert str(folder) in str(info.value) and "classifier.weight" in str(info.value)


def test_eval_of_stsb_on_an_sst2_checkpoint_says_it_lacks_the_regression_head(tmp_path):
    """task = both on an SST-2-only checkpoint: STS-B would be scored with SST-2's two logits
    (before: scipy's broadcast error)."""
    folder = albert_checkpoint(tmp_path / "sst2", labels=2)
    cfg = glue_config(tmp_path, init_checkpoint=str(folder))
    with pytest.raises(ValueError, match="stsb needs the STS-B regression head") as info:
        finetune.evaluate("stsb", cfg, cpu(), data=DATA)
    assert str(folder) in str(info.value) and "2 outputs" in str(info.value)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file_and_the_weight(tmp_path):
    folder = albert_checkpoint(tmp_path / "diverged", nan=True)
    cfg = glue_config(tmp_path, init_checkpoint=str(folder))
    with pytest.raises(ValueError, match="classifier.weight holds 1 NaN or infinite values"):
        finetune.evaluate("sst2", cfg, cpu(), data=DATA)


def _dictionary(size: int) -> fairseq.Dictionary:
    d = fairseq.Dictionary()
    for i in range(size - len(d) - 1):
        d.add_symbol(str(i))
    d.add_symbol("<mask>")
    return d


def test_roberta_eval_without_the_classifier_names_the_missing_head(tmp_path):
    config = tiny_config(num_labels=2)
    RobertaModel(config).save_pretrained(tmp_path / "roberta", safe_serialization=True)
    with pytest.raises(ValueError, match="no sentence-classification head") as info:
        sp.load_checkpoint(tmp_path / "roberta", _dictionary(config.vocab_size), num_classes=2)
    assert "classifier.dense.weight" in str(info.value)


def test_roberta_eval_of_a_fairseq_model_pt_without_its_head_names_fairseqs_head(tmp_path):
    """A pretrained roberta.base model.pt: no classification_heads.sentence_classification_head."""
    hf = randomized(RobertaForSequenceClassification(tiny_config(num_labels=2))).state_dict()
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(hf, head=None))
    dictionary = _dictionary(tiny_config().vocab_size)
    with pytest.raises(ValueError, match="classification_heads.sentence_classification_head"):
        sp.load_checkpoint(path, dictionary, num_classes=2)
    # the same checkpoint with its head is evaluated
    path = save_fairseq(tmp_path / "tuned.pt", fairseq_names(hf))
    assert sp.load_checkpoint(path, dictionary, num_classes=2).config.num_labels == 2


REFORMER = dict(
    vocab_size=32, hidden_size=16, attention_head_size=8, num_attention_heads=2,
    attn_layers=["local"], feed_forward_size=16, axial_pos_shape=[4, 4],
    axial_pos_embds_dim=[8, 8], max_position_embeddings=16, local_attn_chunk_length=4,
    is_decoder=False,
)  # fmt: skip


def test_masked_lm_eval_of_weights_without_the_lm_head_names_the_missing_head(tmp_path):
    model = ReformerForMaskedLM(ReformerConfig(**REFORMER))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    save_file({k: v.contiguous() for k, v in body.items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no masked-LM head \(lm_head\)"):
        masked_lm.load_weights(ReformerForMaskedLM(ReformerConfig(**REFORMER)), tmp_path)


def test_masked_lm_weights_with_nan_are_refused_naming_the_weight(tmp_path):
    model = ReformerForMaskedLM(ReformerConfig(**REFORMER))
    with torch.no_grad():
        model.lm_head.decoder.bias[3] = float("inf")
    save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="NaN or infinite values"):
        masked_lm.load_weights(ReformerForMaskedLM(ReformerConfig(**REFORMER)), tmp_path)


# --- defect 9: errors that name no file -------------------------------------------------------


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_safetensors_init_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    albert = albert_checkpoint(tmp_path / "albert")
    _truncated(albert / "model.safetensors")
    cfg = glue_config(tmp_path, init_checkpoint=str(albert), model_name="tiny")
    with pytest.raises(ValueError, match="not a complete safetensors file") as info:
        finetune.build_model("sst2", cfg, tokenizer=None)
    assert str(albert / "model.safetensors") in str(info.value)

    bert = pretraining.build_model(TINY_BERT, seed=0)
    save_model(bert, str(tmp_path / "bert.safetensors"))
    _truncated(tmp_path / "bert.safetensors")
    with pytest.raises(ValueError, match="bert.safetensors: not a complete safetensors file"):
        pretraining.load_checkpoint(tmp_path / "bert.safetensors", bert)

    reformer = ReformerForMaskedLM(ReformerConfig(**REFORMER))
    save_model(reformer, str(tmp_path / "model.safetensors"))
    _truncated(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a complete safetensors file"):
        masked_lm.load_weights(reformer, tmp_path)


def test_convert_fairseq_on_random_bytes_says_the_file_is_not_a_fairseq_checkpoint(
    tmp_path, capsys
):
    rng = random.Random(0)
    files = [tmp_path / "protocol21.pt"]
    files[0].write_bytes(b"\x80\x15" + rng.randbytes(500))  # "unsupported pickle protocol: 21"
    for i in range(20):
        files.append(tmp_path / f"random{i}.pt")
        files[-1].write_bytes(rng.randbytes(rng.randrange(1, 4000)))
    for path in files:
        assert convert_fairseq.main([str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path} is not a fairseq checkpoint")
    assert not (tmp_path / "out").exists()


# --- defect 6: wrong inputs that passed ---------------------------------------------------------


@pytest.mark.parametrize("labels", ["0", "-3"])
def test_convert_fairseq_refuses_a_label_count_below_one_in_one_line(tmp_path, capsys, labels):
    with pytest.raises(SystemExit) as info:
        convert_fairseq.main(["model.pt", str(tmp_path / "out"), "--num-labels", labels])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: argument --num-labels: expected an integer >= 1, got {labels}"]


def test_a_foreign_tokenizer_in_lf_token_is_refused_with_its_unknown_token_rate(tmp_path):
    """lf_token/ whose tokenizer_config.json names a BERT tokenizer of 5 tokens: every word of
    the corpus would be [UNK]."""
    root = tmp_path / "seed"
    corpus.write_sample_corpus(root, {"train": 30, "test": 5}, seed=0)
    corpus.train_tokenizer(corpus.read_corpus(root, "train"), root / "lf_token", 300)
    (root / "lf_token" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    (root / "lf_token" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer"})
    )
    with pytest.raises(ValueError, match=r"\d+\.\d% of the tokens of .*train_corpus.txt") as info:
        corpus.prepare_data(root, "local")
    assert "[UNK]" in str(info.value) and str(root / "lf_token") in str(info.value)


def test_the_seeds_own_tokenizer_passes_the_unknown_token_check(tmp_path, capsys):
    root = tmp_path / "seed"
    corpus.write_sample_corpus(root, {"train": 30, "test": 5}, seed=0)
    corpus.train_tokenizer(corpus.read_corpus(root, "train"), root / "lf_token", 300)
    corpus.prepare_data(root, "local")
    assert "warning" not in capsys.readouterr().out


def test_binarizing_with_a_word_level_dict_txt_stops_with_the_unknown_rate(tmp_path):
    """fairseq's dict.txt holds BPE ids; one of words leaves nearly every BPE token <unk>."""
    glue.write_sample_dataset(tmp_path / "glue", "sst2", {"train": 40, "dev": 10, "test": 5})
    train = glue.read_split(tmp_path / "glue", "sst2", "train")
    train_bpe(train.text_a, tmp_path / "bpe", vocab_size=300)
    words = sorted({w for s in train.text_a for w in s.split()})
    (tmp_path / "bpe" / "dict.txt").write_text("".join(f"{w} 1\n" for w in words))
    encoder = RobertaEncoder.from_dir(tmp_path / "bpe")
    with pytest.raises(ValueError, match=r"of the tokens of .*train.tsv .* are <unk>") as info:
        binarize_sst2(tmp_path / "glue", tmp_path / "SST-2-bin", encoder)
    assert str(tmp_path / "bpe" / "dict.txt") in str(info.value)
    assert not (tmp_path / "SST-2-bin").exists()  # stopped before anything was written


TINY_BERT = {
    "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 32,
}  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("masked_lm_positions", 600, "outside the sequence of 24 tokens"),
        ("input_ids", 45, "outside the vocabulary of 40 tokens"),
        ("masked_lm_ids", -1, "outside the vocabulary of 40 tokens"),
    ],
)
def test_mlperf_values_beyond_the_model_name_the_shard_record_and_field(
    tmp_path, field, value, bound
):
    spec = mlperf.SampleSpec(vocab_size=40, seq_length=24, max_predictions=4)
    samples = mlperf.generate_samples(spec, 6, seed=0)
    samples[field][4][1] = value  # the 5th sample: shard 1 (3 per shard), its record 1
    rows = [{k: v[i] for k, v in samples.items()} for i in range(6)]
    mlperf.write_shard(tmp_path / mlperf.shard_name(0, 2), rows[:3])
    mlperf.write_shard(tmp_path / mlperf.shard_name(1, 2), rows[3:])
    cfg = presets.Config(
        data_dir=str(tmp_path), preset="demo", eval_samples=2, train_samples=0,
        model_config=TINY_BERT,
    )  # fmt: skip
    with pytest.raises(mlperf.TFRecordError, match=rf"record 1 .*{field}.* holds {value}") as info:
        pretraining.load_data(cfg)  # the demo reads every record up front
    assert mlperf.shard_name(1, 2) in str(info.value) and bound in str(info.value)


# --- defect 8: silent hangs of a several-machine run ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_machine_without_node_0_says_what_it_waits_for_and_gives_up(tmp_path):
    port, work = _free_port(), tmp_path / f"rdzv-{uuid.uuid4().hex}"
    code = f"""
import time
from nbzoo import launch, presets
cfg = presets.Config(device="cpu", precision="fp32", seed=0, nnodes=2, node_rank=1,
                     master_addr="127.0.0.1", master_port={port}, rendezvous_timeout=2)
start = time.monotonic()
try:
    launch.run("tests.jobs.sleep_job:sleep", cfg, {str(work)!r}, seconds=1)
except launch.RendezvousError as exc:
    print("GAVE UP:", exc)
print(f"after {{time.monotonic() - start:.0f}} s")
"""
    # before: torchrun retried for 600 s in silence (the subprocess's timeout ends the test)
    try:
        out = run_python(code, timeout=120).stdout
    finally:
        for pid in processes_of(work.name):  # what a failed run leaves: ours, by marker
            os.kill(pid, signal.SIGKILL)
    waiting = (
        f"node 1 of 2: connecting to node 0 at 127.0.0.1:{port} (master_addr:master_port), "
        "up to 2 s (rendezvous_timeout)"
    )
    assert out.index(waiting) < out.index("GAVE UP"), out  # said before torchrun started
    assert "gave up, the machines did not meet" in out, out


def test_an_unresolvable_master_addr_fails_at_once_naming_it(tmp_path):
    cfg = presets.Config(
        device="cpu", precision="fp32", seed=0, nnodes=2, node_rank=1,
        master_addr="no-such-host.invalid", master_port=29500,
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(launch.RendezvousError, match="master_addr 'no-such-host.invalid' does not"):
        launch.run("tests.jobs.sleep_job:sleep", cfg, tmp_path / "work")
    assert time.monotonic() - start < launch.RESOLVE_SECONDS + 5  # no torchrun was started


# --- defect 14: --verbose -----------------------------------------------------------------------


def test_verbose_streams_the_kernels_output_while_the_notebook_runs(tmp_path):
    code = "import sys, time\nprint('first', flush=True)\nprint('to stderr', file=sys.stderr)\n"
    code += "time.sleep(4)\nprint('second')"
    env = probe_project(tmp_path, code, "marker: str = ''")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbzoo.cli", "run", "01_probe", "--output-dir",
         str(tmp_path / "out"), "--verbose"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "first":
                assert proc.poll() is None, "'first' came only after the run ended"
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert [x.strip() for x in lines][-1] == "first", "".join(lines)
    assert "second" in rest and "to stderr" in err and proc.returncode == 0, err


# --- defect 15: stopping a run stops all of it -------------------------------------------------


def processes_of(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def gone_within(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_of(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _job_code(workdir: Path) -> str:
    """A notebook cell: a 2-rank gloo job that sleeps, its launch folder (in every command line of
    the job) named after the test's unique marker."""
    return (
        "from nbzoo import launch, presets\n"
        'cfg = presets.Config(device="cpu", precision="fp32", seed=0, devices=2)\n'
        f'launch.run("tests.jobs.sleep_job:sleep", cfg, {str(workdir)!r})\n'
    )


def _wait_for_ranks(kc, cell: str, timeout: float = 120) -> str:
    """The output of the cell ``cell`` (an execute request's id) until both ranks are up."""
    seen, deadline = "", time.monotonic() + timeout
    while seen.count("is up") < 2 and time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:  # queue.Empty
            continue
        if msg["parent_header"].get("msg_id") != cell:
            continue
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
    assert seen.count("is up") == 2, seen
    return seen


@pytest.mark.slow
def test_interrupting_or_killing_the_kernel_of_a_two_process_run_leaves_no_process_of_it(
    tmp_path,
):
    from jupyter_client.manager import start_new_kernel

    marker = f"stop-{uuid.uuid4().hex}"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        # a kernel interrupt (JupyterLab's stop button): the cell ends, torchrun and ranks too
        first = kc.execute(_job_code(tmp_path / f"{marker}-a"))
        _wait_for_ranks(kc, first)
        assert len(processes_of(f"{marker}-a")) == 3  # torchrun and its two ranks
        km.interrupt_kernel()
        assert gone_within(f"{marker}-a", 20) == []
        while (reply := kc.get_shell_msg(timeout=60))["parent_header"].get("msg_id") != first:
            pass
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        # a kernel killed outright (SIGKILL: no cleanup runs in it)
        second = kc.execute(_job_code(tmp_path / f"{marker}-b"))
        _wait_for_ranks(kc, second)
        assert len(processes_of(f"{marker}-b")) == 3
        os.kill(km.provisioner.process.pid, signal.SIGKILL)
        assert gone_within(f"{marker}-b", 20) == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        for pid in processes_of(marker):  # what a failed test leaves: ours, by marker
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "timeout"])
def test_nbzoo_run_stopped_by_ctrl_c_or_timeout_leaves_no_process_of_its_run(tmp_path, how):
    marker = f"stop-{uuid.uuid4().hex}"
    env = {
        **os.environ,
        **probe_project(tmp_path, _job_code(tmp_path / marker), "marker: str = ''"),
    }
    argv = [sys.executable, "-m", "nbzoo.cli", "run", "01_probe", "--output-dir", str(tmp_path)]
    if how == "timeout":
        # coreutils' timeout sends SIGTERM to its whole process group when the time is up, and
        # relays a SIGTERM it gets the same way: the test sends it one once the job is up
        # instead of guessing how long the start takes
        argv = ["timeout", "300", *argv]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a terminal's foreground job: its own process group
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(processes_of(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(processes_of(marker)) == 3, "the job never started"
        if how == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            proc.terminate()  # to timeout, which passes it on as at the end of its time
        _, err = proc.communicate(timeout=60)
        assert gone_within(marker, 20) == []
        said = "nbzoo: interrupted" if how == "SIGINT" else "nbzoo: stopped by SIGTERM"
        assert said in err and proc.returncode in (130, 143), err
    finally:
        proc.kill()
        for pid in processes_of(marker):
            os.kill(pid, signal.SIGKILL)


# --- item 6: thresholds on proportions judged for their sample size ------------------------------


def test_one_flip_in_64_sentences_is_no_evidence_against_99_percent_agreement():
    """The browser test's shape: 63 of 64 int8 predictions agree (0.984 < 0.99 raw)."""
    row = metrics.proportion_at_least("int8_agreement", 63, 64, 0.99)
    assert row["met"] and not row["shown"] and row["this run"] == 63 / 64


def test_agreement_clearly_below_the_threshold_fails_at_every_size():
    assert not metrics.proportion_at_least("a", 59, 64, 0.99)["met"]  # 5 flips in 64
    assert not metrics.proportion_at_least("a", 975, 1000, 0.99)["met"]
    assert not metrics.proportion_at_least("a", 3, 6, 0.99)["met"]


def test_the_proportion_check_is_the_exact_one_sided_binomial_test():
    from scipy import stats

    for k, n in [(63, 64), (60, 64), (59, 64), (985, 1000), (5, 6)]:
        p = stats.binomtest(k, n, 0.99, alternative="less").pvalue
        assert metrics.proportion_at_least("a", k, n, 0.99)["met"] == (p >= 0.001)


def test_a_model_that_meets_the_threshold_exactly_fails_the_check_rarely():
    """The false-alarm rate the check promises (<= 0.1 %), counted over the binomial law."""
    from scipy import stats

    for n in (6, 64, 256, 872):  # the rehearsal's, the browser test's, the demo's, SST-2's dev set
        # "met" grows with k: the largest k that fails, by bisection
        low, high = -1, n  # fails at low (or none does), passes at high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (
                (low, mid) if metrics.proportion_at_least("a", mid, n, 0.99)["met"] else (mid, high)
            )
        assert metrics.proportion_at_least("a", n, n, 0.99)["met"]
        assert stats.binom.cdf(low, n, 0.99) <= 0.001 < stats.binom.cdf(high, n, 0.99)


def test_the_rehearsal_stopped_by_timeout_ends_in_one_line():
    """``make rehearse`` under ``timeout``: SIGTERM takes Ctrl-C's way out (papermill shuts the
    kernel down; the test above shows that this stops the notebook's ranks)."""
    code = (
        "import sys, time\nfrom nbzoo import rehearse\n"
        "rehearse.main = lambda argv=None: (print('running', flush=True), time.sleep(60))\n"
        "sys.exit(rehearse.stoppable_main())"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "running"
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.strip() == "rehearsal: stopped by SIGTERM", err
