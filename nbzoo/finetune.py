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

from nbzoo import launch, length_grouping, metrics, packing, paths
from nbzoo.data import glue
from nbzoo.device import Runtime
from nbzoo.text import word_tokenizer
from nbzoo.train import TrainConfig, TrainResult, config_hash, fit, predict

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


def build_model(task: str, cfg: Any, tokenizer) -> torch.nn.Module:
    """The tiny ALBERT (``model_name = "tiny"``), the pretrained model ``model_name``, or, with
    ``init_checkpoint``, a fine-tuned checkpoint to continue from."""
    if cfg.get("init_checkpoint"):
        return AutoModelForSequenceClassification.from_pretrained(
            task_checkpoint(cfg.init_checkpoint, task), num_labels=num_labels(task)
        )
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
    steps = cfg.epochs * -(-len(train_set) // (cfg.batch_size * rt.world_size))
    optimizer, scheduler = make_optimizer(model, cfg, steps)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        outputs, labels = predict(m, dev_set, rt, batch_size=128)
        return task_metrics(task, outputs, labels)

    folder = checkpoint_path(cfg, task)
    train_cfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
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
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        launch.write_record(folder / RECORD, {"result": asdict(result), "metrics": scores})
    return Finetuned(task, model, tokenizer, result, scores, folder)


RECORD = "training_record.json"  # beside the checkpoint: the run's history and final metrics


def train(
    task: str, cfg: Any, rt: Runtime, data: dict[str, glue.GlueSplit] | None = None
) -> Finetuned:
    """Fine-tune ``task``: in this process, or with ``devices`` (× ``nnodes``) > 1 on every rank
    under torchrun, then the checkpoint rank 0 saved is loaded here."""
    if not launch.needed(cfg, rt):
        return finetune_glue(task, cfg, rt, data)
    folder = checkpoint_path(cfg, task)
    record = launch.run("nbzoo.finetune:train_on_rank", cfg, folder / "launch", task=task)
    model, tokenizer = load_finetuned(folder, rt.device)
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
    model, tokenizer = load_finetuned(folder, rt.device)
    dev_set = glue.EncodedGlue(data["dev"], tokenizer, cfg.max_seq_length)
    outputs, labels = predict(model, dev_set, rt, batch_size=128)
    scores = task_metrics(task, outputs, labels)
    result = TrainResult([], [], 0, 0, 0.0, None)
    if (folder / RECORD).exists():
        result = TrainResult(**launch.read_record(folder / RECORD)["result"])
    print(f"{task}: evaluated {folder} on {len(dev_set)} dev rows: {scores}")
    return Finetuned(task, model, tokenizer, result, scores, folder)


def load_finetuned(path: str | Path, device: torch.device | str = "cpu"):
    """A checkpoint written by :func:`finetune_glue`: (model in eval mode, tokenizer)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: no fine-tuned checkpoint here (config.json missing); run 01_albert_glue first"
        )
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
