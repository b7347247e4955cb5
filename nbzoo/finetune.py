"""GLUE fine-tuning of a sequence classifier (SST-2 classification, STS-B regression).

Notebook 01 walks through these steps one by one: :func:`prepare_data`, :func:`build_model`,
:func:`train` (in this process, or under torchrun when ``devices > 1``) and :func:`evaluate`
(``mode = "eval"``: a fine-tuned checkpoint's dev metrics, the seed's ``train_eval_8p.sh``).
Notebook 02 calls :func:`finetune_glue` when it needs 01's checkpoint and finds none. The
configuration is the notebook's resolved preset (``nbzoo.presets.resolve("01_albert_glue", ...)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from nbzoo import (
    launch,
    length_grouping,
    lesson,
    metrics,
    packing,
    paths,
    safe_write,
    verdicts,
    weights,
)
from nbzoo.data import glue
from nbzoo.device import Runtime
from nbzoo.text import word_tokenizer
from nbzoo.train import TrainConfig, TrainResult, config_hash, fit, predict, steps_per_epoch

TINY = (
    "tiny"  # model_name of the demo: an ALBERT built from ``model_config`` and trained from scratch
)


def prepare_data(task: str, cfg: Any) -> dict[str, glue.GlueSplit]:
    """Generate (``data_source = "generate"``) or download (``"download"``) the task into
    ``cfg.data_dir`` in GLUE's layout, or read what is there (``"local"``); return train and dev."""
    data_dir = paths.resolve(cfg.data_dir)
    if cfg.data_source == "generate":
        glue.write_sample_dataset(data_dir, task, dict(cfg.sample_sizes), seed=cfg.seed)
    elif cfg.data_source == "download":
        glue.download_task(data_dir, task)
    elif cfg.data_source != "local":
        raise ValueError(
            f"data_source must be generate, download or local; got {cfg.data_source!r}"
        )
    return read_data(task, cfg)


def read_data(task: str, cfg: Any) -> dict[str, glue.GlueSplit]:
    """Train and dev of ``task`` as they are in ``cfg.data_dir`` (what every rank reads)."""
    data_dir = paths.resolve(cfg.data_dir)
    return {split: glue.read_split(data_dir, task, split) for split in ("train", "dev")}


def task_checkpoint(folder: str | Path, task: str) -> Path:
    """The fine-tuned checkpoint of ``task`` in ``folder``: ``folder/<task>/`` (a run's
    ``checkpoint_dir``) or ``folder`` itself, each a ``save_pretrained`` folder."""
    folder = paths.resolve(folder)
    for candidate in (folder / task, folder):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"{folder}: no checkpoint of {task} here: expected {folder / task}/config.json or "
        f"{folder}/config.json (a folder written by save_pretrained, as 01 writes under checkpoint_dir)"
    )


def build_tokenizer(cfg: Any, train: glue.GlueSplit, task: str = "sst2"):
    if cfg.get("init_checkpoint"):
        return AutoTokenizer.from_pretrained(task_checkpoint(cfg.init_checkpoint, task))
    if cfg.model_name == TINY:
        return word_tokenizer(train.text_a + (train.text_b or []))
    return AutoTokenizer.from_pretrained(cfg.model_name)


def num_labels(task: str) -> int:
    return 2 if task == "sst2" else 1


HEADS = {"sst2": "SST-2 classifier (2 labels)", "stsb": "STS-B regression head (1 output)"}


def build_model(task: str, cfg: Any, tokenizer) -> torch.nn.Module:
    """The tiny ALBERT (``model_name = "tiny"``), the pretrained model ``model_name``, or, with
    ``init_checkpoint``, a fine-tuned checkpoint to continue from."""
    if cfg.get("init_checkpoint"):
        folder = task_checkpoint(cfg.init_checkpoint, task)
        model, _ = weights.pretrained(
            AutoModelForSequenceClassification, folder, num_labels=num_labels(task)
        )
        weights.check_finite(model, folder)
        return model
    if cfg.model_name == TINY:
        config = AlbertConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            num_labels=num_labels(task),
            # the position table may be longer than the training length (02 exports seq 128)
            **{"max_position_embeddings": cfg.max_seq_length, **cfg.model_config},
        )
        return AlbertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(
        cfg.model_name, num_labels=num_labels(task)
    )


def task_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The seed's metrics: accuracy for SST-2; Pearson and Spearman for STS-B."""
    if task == "sst2":
        return {"sst2_accuracy": metrics.accuracy(outputs.argmax(-1), labels)}
    scores = outputs.reshape(-1)
    return {
        "stsb_pearson": metrics.pearson(scores, labels),
        "stsb_spearman": metrics.spearman(scores, labels),
    }


def make_optimizer(model: torch.nn.Module, cfg: Any, total_steps: int):
    """AdamW without weight decay on biases and LayerNorm, linear warm-up then linear decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    return optimizer, scheduler


def checkpoint_path(cfg: Any, task: str) -> Path:
    return paths.resolve(cfg.checkpoint_dir) / task


@dataclass
class Finetuned:
    task: str
    model: torch.nn.Module
    tokenizer: Any
    result: TrainResult
    metrics: dict[str, float]
    checkpoint: Path


def finetune_glue(
    task: str, cfg: Any, rt: Runtime, data: dict[str, glue.GlueSplit] | None = None
) -> Finetuned:
    """Data → tokenizer → model → training → dev metrics → ``save_pretrained`` checkpoint."""
    data = data or prepare_data(task, cfg)
    tokenizer = build_tokenizer(cfg, data["train"], task)
    train_set = glue.EncodedGlue(data["train"], tokenizer, cfg.max_seq_length)
    dev_set = glue.EncodedGlue(data["dev"], tokenizer, cfg.max_seq_length)
    torch.manual_seed(cfg.seed)
    model = build_model(task, cfg, tokenizer).to(rt.device)
    grad_accum = cfg.get("grad_accum", 1)  # notebook 02 fine-tunes without the knob
    steps = cfg.epochs * steps_per_epoch(len(train_set), cfg.batch_size, rt.world_size, grad_accum)
    optimizer, scheduler = make_optimizer(model, cfg, steps)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        outputs, labels = predict(m, dev_set, rt, batch_size=128)
        return task_metrics(task, outputs, labels)

    folder = checkpoint_path(cfg, task)
    owned = safe_write.claim(folder, WRITER, what="checkpoint_dir")  # refused before training
    train_cfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        grad_accum=grad_accum,
        max_steps=cfg.max_steps or None,
        max_grad_norm=1.0,
        checkpoint_dir=folder / "training",
        checkpoint_every=cfg.checkpoint_every or None,
        seed=cfg.seed,
        run_id=config_hash(task, launch.identity(cfg), len(train_set)),
        desc=f"{task} training",
    )
    collate, plan, packed = None, None, contextlib.nullcontext()
    how = packing.mode(cfg)  # "off" for notebook 02, which has no packing knob
    if how != "off":
        # Whole sentences in rows, the loss still the mean over each step's sentences: "plain"
        # packs the sentences a padded step holds (an exact change); "length" groups them by
        # length first (as group_by_length) and lays each step in one row, attended per sentence.
        collate = packing.PackedCollator(
            cfg.max_seq_length, pad_token_id=tokenizer.pad_token_id, one_row=how == "length"
        )
        packed = packing.packed_training(model, rt.kind, packing.LENGTH_ATTENTION.get(how))
    if how == "length":
        lengths = train_set.features["attention_mask"].sum(dim=1).tolist()
        plan = length_grouping.batch_plan(lengths, len(train_set), cfg.batch_size, cfg.seed)
    with packed:
        result = fit(
            model, train_set, optimizer, rt, train_cfg, collate_fn=collate,
            scheduler=scheduler, eval_fn=evaluate, batch_plan=plan,
        )  # fmt: skip
    final = result.evals[-1] if result.evals else evaluate(model)
    scores = {k: v for k, v in final.items() if k not in ("step", "epoch")}
    if rt.is_main:
        with owned.staged() as tmp:  # every file through a temporary name
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        launch.write_record(folder / RECORD, {"result": asdict(result), "metrics": scores})
    return Finetuned(task, model, tokenizer, result, scores, folder)


RECORD = "training_record.json"  # beside the checkpoint: the run's history and final metrics
WRITER = "nbzoo.finetune (the fine-tuned checkpoint)"


def train(
    task: str, cfg: Any, rt: Runtime, data: dict[str, glue.GlueSplit] | None = None
) -> Finetuned:
    """Fine-tune ``task``: in this process, or with ``devices`` (× ``nnodes``) > 1 on every rank
    under torchrun, then the checkpoint rank 0 saved is loaded here."""
    if not launch.needed(cfg, rt):
        return finetune_glue(task, cfg, rt, data)
    folder = checkpoint_path(cfg, task)
    record = launch.run("nbzoo.finetune:train_on_rank", cfg, folder / "launch", task=task)
    model, tokenizer = load_finetuned(folder, rt.device, task)
    return Finetuned(
        task, model, tokenizer, TrainResult(**record["result"]), record["metrics"], folder
    )


def train_on_rank(cfg: Any, rt: Runtime, task: str) -> dict[str, Any]:
    """The torchrun entry point (``nbzoo.launch``): every rank fine-tunes on its shard."""
    run = finetune_glue(task, cfg, rt, read_data(task, cfg))
    return {"result": asdict(run.result), "metrics": run.metrics}


def evaluate(
    task: str, cfg: Any, rt: Runtime, data: dict[str, glue.GlueSplit] | None = None
) -> Finetuned:
    """``mode = "eval"``, the seed's ``train_eval_8p.sh``: the dev metrics of a fine-tuned
    checkpoint -- ``init_checkpoint``, else the one this preset's training saved in
    ``checkpoint_dir``. On that run's own checkpoint they equal its final metrics exactly. The
    training history comes from the run's record beside the checkpoint (empty without one)."""
    folder = task_checkpoint(cfg.get("init_checkpoint") or paths.resolve(cfg.checkpoint_dir), task)
    data = data or read_data(task, cfg)
    model, tokenizer = load_finetuned(folder, rt.device, task)
    dev_set = glue.EncodedGlue(data["dev"], tokenizer, cfg.max_seq_length)
    outputs, labels = predict(model, dev_set, rt, batch_size=128)
    scores = task_metrics(task, outputs, labels)
    result = TrainResult([], [], 0, 0, 0.0, None)
    if (folder / RECORD).exists():
        result = TrainResult(**launch.read_record(folder / RECORD)["result"])
    print(f"{task}: evaluated {folder} on {len(dev_set)} dev rows: {scores}")
    return Finetuned(task, model, tokenizer, result, scores, folder)


def load_finetuned(path: str | Path, device: torch.device | str = "cpu", task: str = "sst2"):
    """A checkpoint of ``task`` written by :func:`finetune_glue`: (model in eval mode, tokenizer).
    A checkpoint without the task's head (a pretrained model: transformers would add one at
    random), with another task's head, or with NaN weights is refused, naming what it lacks."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: no fine-tuned checkpoint here (config.json missing); run 01_albert_glue first"
        )
    model, info = weights.pretrained(AutoModelForSequenceClassification, path)
    wanted = f"a checkpoint fine-tuned on {task} (01_albert_glue saves it as checkpoint_dir/{task})"
    weights.check_head(path, info["missing_keys"], {"classifier.": HEADS[task]}, f"use {wanted}")
    if model.config.num_labels != num_labels(task):
        held = next((HEADS[t] for t in HEADS if num_labels(t) == model.config.num_labels), None)
        raise weights.UnusableCheckpoint(
            f"{path}: its head has {model.config.num_labels} outputs"
            f"{f' (the {held})' if held else ''}, but {task} needs the {HEADS[task]}: use {wanted}"
        )
    weights.check_finite(model, path)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


# --- the lesson's views of a run (notebook 01) ------------------------------------------------------


def learning_checks(cfg: Any, runs: dict[str, Finetuned], data: dict[str, dict]) -> lesson.Checks:
    """Each task's metric against what a model that learnt nothing scores on the same dev set:
    always answering the majority class (SST-2), a prediction unrelated to the score (STS-B)."""
    checks = []
    if "sst2" in runs:
        labels = data["sst2"]["dev"].labels
        majority = verdicts.proportion("majority class", metrics.majority_rate(labels), len(labels))
        checks.append(
            lesson.Check("sst2_accuracy", runs["sst2"].metrics["sst2_accuracy"], majority)
        )
    if "stsb" in runs:
        unrelated = verdicts.correlation("no correlation", 0.0, len(data["stsb"]["dev"].labels))
        checks.append(lesson.Check("stsb_pearson", runs["stsb"].metrics["stsb_pearson"], unrelated))
    return lesson.learning_checks(cfg, *checks)


def record(cfg: Any, rt: Runtime, runs: dict[str, Finetuned], checks: lesson.Checks):
    """results/01_albert_glue.json for a run that succeeded, and the table to show."""
    scores = {name: value for run in runs.values() for name, value in run.metrics.items()}
    seconds = sum(run.result.train_seconds for run in runs.values())
    speed = sum(run.result.samples for run in runs.values()) / seconds if seconds else None
    extra = {
        "steps": {t: run.result.steps for t, run in runs.items()},
        "model_name": cfg.model_name,
        "mode": cfg.mode,
        "checkpoints": {t: str(run.checkpoint) for t, run in runs.items()},
    }
    return lesson.record(
        "01_albert_glue", cfg, rt, scores, checks=checks, samples_per_second=speed, extra=extra
    )


def albert_ideas(config: AlbertConfig):
    """ALBERT's two ideas in parameters: this ALBERT, the same without cross-layer sharing, and a
    BERT of the same width and depth (no factorised embedding, no sharing). Counted on the meta
    device: shapes, no memory."""
    import pandas as pd
    from transformers import BertConfig, BertModel

    layers = config.num_hidden_layers
    variants = {
        "ALBERT: factorised embedding, one layer shared by all": config,
        "ALBERT without sharing: each layer its own weights": AlbertConfig(
            **{**config.to_dict(), "num_hidden_groups": layers}
        ),
    }
    rows = []
    with torch.device("meta"):
        for name, variant in variants.items():
            model = AlbertForSequenceClassification(variant).albert
            rows.append((name, model.embeddings, model.encoder))
        bert = BertModel(
            BertConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                num_hidden_layers=layers,
                num_attention_heads=config.num_attention_heads,
                intermediate_size=config.intermediate_size,
                max_position_embeddings=config.max_position_embeddings,
            )
        )
        rows.append(("BERT of the same width and depth", bert.embeddings, bert.encoder))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    table = pd.DataFrame(
        [(name, count(emb), count(enc)) for name, emb, enc in rows],
        columns=["model", "embedding parameters", "encoder parameters"],
    ).set_index("model")
    table["total"] = table.sum(axis=1)
    return table


def peak_and_end(run: Finetuned, dev_rows: int) -> str:
    """Where the dev metric peaked against where training ended, worded from their uncertainty:
    a fall after the peak is overfitting only if it is more than the dev set's noise."""
    name = next(iter(run.metrics))
    evals = [e for e in run.result.evals if name in e]
    if len(evals) < 2:
        return ""
    best = max(evals, key=lambda e: e[name])
    last = evals[-1]
    if best is last:
        return f"{name} was best at the end (epoch {last['epoch']}: {last[name]:.4f})."
    estimate = verdicts.proportion if name.endswith("accuracy") else verdicts.correlation
    verdict = verdicts.compare(
        estimate(f"epoch {best['epoch']}", best[name], dev_rows),
        estimate(f"the last epoch ({last['epoch']})", last[name], dev_rows),
        what=name,
    )
    words = "overfitting: " if verdict.significant else "within the dev set's noise: "
    return f"{name} peaked at epoch {best['epoch']} and ended lower, {words}{verdict.text}."
