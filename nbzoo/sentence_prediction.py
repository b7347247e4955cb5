"""fairseq's ``sentence_prediction`` fine-tuning of RoBERTa (the seed's SST-2 recipe) on nbzoo.train.

Notebook 03 walks through these steps -- :func:`prepare_data`, :func:`build_model`, :func:`train`
(in this process, or under torchrun when ``devices > 1``) and :func:`evaluate` (``mode = "eval"``,
the seed's ``train_eval_8p.sh``); the configuration is its resolved preset
(``nbzoo.presets.resolve("03_roberta_sst2", ...)``). fairseq's recipe
(``examples/roberta/config/finetuning/sst_2.yaml``): Adam with betas (0.9, 0.98), eps 1e-6 and
decoupled weight decay 0.1 on every parameter (fairseq's Adam is AdamW), lr 1e-5 with linear
warm-up over 1256 updates then polynomial (power 1) decay to 0 at update 20935 (``warmup_updates``,
``total_num_update``: counted in updates, whatever the epochs; README.glue.md computes them for 10
epochs of 32 sentences, 6% warm-up), ``max_update`` 20935, batches of at most 32 sentences and 4400
tokens (``--max-tokens``, batched as fairseq does), dropout 0.1, ``<s>`` prepended to every
sentence, max 512 positions, 10 epochs.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    RobertaConfig,
    RobertaForSequenceClassification,
    get_polynomial_decay_schedule_with_warmup,
)

from nbzoo import (
    convert_fairseq,
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
from nbzoo.data import fairseq, glue, sources
from nbzoo.data.download import DownloadError, download
from nbzoo.data.fairseq_batching import EpochBatches
from nbzoo.data.fairseq_glue import (
    BINARIZED_HINT,
    BINARIZER,
    PadCollator,
    SentencePredictionDataset,
    binarize_sst2,
    label_folder,
)
from nbzoo.data.gpt2_bpe import BPE_HINT, BPE_WRITER, RobertaEncoder, download_gpt2_bpe, train_bpe
from nbzoo.device import Runtime
from nbzoo.train import TrainConfig, TrainResult, config_hash, fit, predict, steps_per_epoch

TINY = "tiny"  # a RoBERTa built from ``model_config`` and trained from scratch (the demo)
BASE_CONFIG = "roberta-base-config"  # roberta.base's architecture, random weights (perf preset)
DATA_SOURCES = ("generate", "download", "binarized")


def prepare_data(cfg: Any) -> Path:
    """The binarized SST-2 folder (``input0/`` + ``label/`` or the seed's ``lable/``) the run
    trains on.

    ``generate``: sample TSVs in GLUE's layout → a small byte-level BPE learnt on them → binarize.
    ``download``: GLUE's SST-2 archive + fairseq's GPT-2 BPE files → binarize.
    ``binarized``: ``data_dir`` already holds fairseq's output (the seed's ``SST-2`` folder).
    """
    data_dir = paths.resolve(cfg.data_dir)
    if cfg.data_source not in DATA_SOURCES:
        raise ValueError(
            f"data_source must be one of {', '.join(DATA_SOURCES)}; got {cfg.data_source!r}"
        )
    if cfg.data_source == "binarized":
        parts = [data_dir / "input0" / "dict.txt", data_dir / "input0" / "train.idx"]
        if (data_dir / "input0").is_dir():
            labels = label_folder(data_dir)
            parts += [labels / "dict.txt", labels / "train.idx"]
        for part in parts:
            if not part.exists():
                raise FileNotFoundError(
                    f"{part}: missing; data_dir must be fairseq's binarized SST-2 folder "
                    f"(input0/ and label/ or the seed's lable/): {sources.FAIRSEQ_SST2_HOWTO}"
                )
        return data_dir
    glue_dir, bpe_dir = paths.resolve(cfg.glue_dir), paths.resolve(cfg.bpe_dir)
    if cfg.data_source == "generate":
        generated = _Generated(cfg)
        # all three folders are asked before any is written: one of the user's stops the run
        # with nothing written (nbzoo.safe_write)
        safe_write.check_claim(
            glue_dir,
            glue.GENERATOR,
            what="glue_dir",
            hint=glue.KEEP_HINT,
            adopt=glue.generated_alike(generated.sizes, generated.seed),
        )
        safe_write.check_replaceable(
            bpe_dir, BPE_WRITER, what="bpe_dir", hint=BPE_HINT, adopt=generated.bpe_alike
        )
        safe_write.check_replaceable(
            data_dir, BINARIZER, what="data_dir", hint=BINARIZED_HINT, adopt=generated.bin_alike
        )
        generated.write_glue(glue_dir)
        generated.write_bpe(bpe_dir, adopt=generated.bpe_alike)
        adopt = generated.bin_alike
    else:
        glue.download_task(glue_dir, "sst2")
        download_gpt2_bpe(bpe_dir)
        adopt = None
    binarize_sst2(glue_dir, data_dir, RobertaEncoder.from_dir(bpe_dir), adopt=adopt)
    return data_dir


class _Generated:
    """The demo's three generated folders (GLUE TSVs, BPE files, binarized data), and the test
    that an unmarked folder holds exactly what they would be (a folder an nbzoo without markers
    wrote: adopted, see nbzoo.safe_write)."""

    def __init__(self, cfg: Any):
        self.sizes, self.seed, self.vocab = dict(cfg.sample_sizes), cfg.seed, cfg.bpe_vocab_size

    def write_glue(self, folder: Path) -> None:
        glue.write_sample_dataset(folder, "sst2", self.sizes, seed=self.seed)

    def write_bpe(self, folder: Path, adopt=None) -> None:
        train = glue.generate_split("sst2", self.sizes["train"], self.seed, "train")
        train_bpe(train.text_a, folder, vocab_size=self.vocab, adopt=adopt)

    def bpe_alike(self, folder: Path) -> bool:
        return safe_write.built_alike(folder, self.write_bpe)

    def bin_alike(self, folder: Path) -> bool:
        def build(scratch: Path) -> None:
            glue_dir, bpe_dir = scratch.with_name(".glue-source"), scratch.with_name(".bpe-source")
            self.write_glue(glue_dir)
            self.write_bpe(bpe_dir)
            binarize_sst2(glue_dir, scratch, RobertaEncoder.from_dir(bpe_dir))

        return safe_write.built_alike(folder, build, loose=("preprocess.log",))


def load_splits(
    folder: str | os.PathLike, max_positions: int
) -> dict[str, SentencePredictionDataset]:
    """fairseq's train and valid splits (valid is GLUE's dev set)."""
    return {
        split: SentencePredictionDataset(folder, split, max_positions=max_positions)
        for split in ("train", "valid")
    }


def batch_plan(cfg: Any, train: SentencePredictionDataset):
    """fairseq's --max-tokens batching (``max_tokens`` tokens, at most ``batch_size`` sentences
    per batch, fixed batches shuffled per epoch), or None for plain batches of ``batch_size``
    when ``max_tokens`` is 0. With ``packing = "length"`` either is grouped by length within
    windows of steps (``nbzoo.length_grouping``)."""
    grouped = packing.mode(cfg) == "length"
    if not cfg.max_tokens:
        if not grouped:
            return None
        return length_grouping.batch_plan(train.item_tokens, len(train), cfg.batch_size, cfg.seed)
    window = None
    if grouped:
        window = cfg.batch_size * length_grouping.mega_batch_mult(len(train), cfg.batch_size)
    return EpochBatches(
        train.item_tokens, cfg.max_tokens, cfg.batch_size, seed=cfg.seed, length_window=window
    ).epoch


def download_roberta_base(model_path: Path, url: str) -> Path:
    """Fetch fairseq's roberta.base archive and unpack its model.pt (and dict.txt) beside
    ``model_path``, into a folder that is nbzoo's (nbzoo.safe_write: new, empty or marked); tar
    members that would land outside the folder are refused."""
    root = safe_write.claim(
        model_path.parent,
        "nbzoo's roberta.base download",
        what="the folder of model_name",
        hint="place model.pt there yourself, or name a model_name in an empty or new folder",
    )
    remote = sources.remote(url)  # fairseq publishes no checksum for roberta.base (sources.py)
    archive = download(
        url, root.path(Path(url).name), sha256=remote.sha256, size=remote.size, owner=root
    )
    try:
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and Path(m.name).name in ("model.pt", "dict.txt")
            ]
            for member in members:
                source = tar.extractfile(member)
                with source, root.file(Path(member.name).name) as tmp, open(tmp, "wb") as out:
                    while block := source.read(1 << 20):
                        out.write(block)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(
            f"{archive}: damaged archive ({exc}); delete it and run again to download it anew"
        ) from None
    if not model_path.exists():
        raise FileNotFoundError(f"{archive}: no model.pt inside to place at {model_path}")
    return model_path


def fetch_model(cfg: Any) -> Path | None:
    """The fairseq ``model.pt`` that ``model_name`` names, downloaded from ``model_url`` when it
    is missing; None for the models built in code and for ``init_checkpoint`` runs."""
    if cfg.get("init_checkpoint") or cfg.model_name in (TINY, BASE_CONFIG):
        return None
    model_path = paths.resolve(cfg.model_name)
    if not model_path.exists() and cfg.model_url:
        download_roberta_base(model_path, cfg.model_url)
    return model_path


def build_model(cfg: Any, dictionary: fairseq.Dictionary, num_classes: int) -> torch.nn.Module:
    """A tiny RoBERTa from ``model_config`` (demo), roberta.base's architecture with random weights
    (perf), a fairseq ``model.pt`` converted to transformers (full; classifier freshly made), or,
    with ``init_checkpoint``, a fine-tuned checkpoint (``save_pretrained`` folder) to continue from."""
    if cfg.get("init_checkpoint"):
        return load_checkpoint(cfg.init_checkpoint, dictionary, dropout=cfg.dropout)
    common = dict(
        vocab_size=len(dictionary),  # dict.txt + the 4 specials + <mask>, as fairseq builds it
        bos_token_id=dictionary.bos(),
        pad_token_id=dictionary.pad(),
        eos_token_id=dictionary.eos(),
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        num_labels=num_classes,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    if cfg.model_name in (TINY, BASE_CONFIG):
        # fairseq's learned positions start after the padding index: max_positions + 2 rows.
        config = RobertaConfig(
            **{
                **common,
                "max_position_embeddings": cfg.max_positions + dictionary.pad() + 1,
                **(cfg.model_config if cfg.model_name == TINY else {}),
            }
        )
        return RobertaForSequenceClassification(config)
    model_path = fetch_model(cfg)
    converted = convert_fairseq.convert(
        model_path,
        task="sequence-classification",
        num_labels=num_classes,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    if converted.config.vocab_size != len(dictionary):
        raise ValueError(
            f"{model_path}: embeddings for {converted.config.vocab_size} symbols, but the data's "
            f"dictionary (+<mask>) has {len(dictionary)}: binarize with the model's dict.txt"
        )
    return converted.model


HEAD = "sentence-classification head"
# where each format keeps it: transformers' RobertaForSequenceClassification, fairseq's model.pt
HEAD_KEYS = {"classifier.": HEAD}
FAIRSEQ_HEAD = f"classification_heads.{convert_fairseq.DEFAULT_HEAD}"


def load_checkpoint(
    folder: str | os.PathLike,
    dictionary: fairseq.Dictionary,
    num_classes: int | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """A fine-tuned classifier: the save_pretrained folder :func:`finetune` writes
    (``checkpoint_dir/hf``) or a fairseq ``model.pt`` fine-tuned on the task (the seed's
    ``train_eval_8p.sh`` evaluates those), checked against the data's dictionary. With
    ``num_classes`` (``mode = eval``) the classifier must be in the checkpoint with that many
    outputs and every weight finite: a checkpoint without it would be scored with a classifier
    initialised at random."""
    folder = paths.resolve(folder)
    if "dropout" in overrides:
        dropout = overrides.pop("dropout")
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if folder.is_file():  # a fairseq checkpoint
        converted = convert_fairseq.convert(folder, num_labels=num_classes, **overrides)
        model, missing = converted.model, converted.initialized_keys
        heads = {"classifier.": f"{HEAD} ({FAIRSEQ_HEAD}.*)"}
    else:
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder}: no fine-tuned checkpoint here (config.json missing); expected the "
                "save_pretrained folder 03 writes to checkpoint_dir/hf, or a fairseq model.pt"
            )
        model, info = weights.pretrained(RobertaForSequenceClassification, folder, **overrides)
        missing, heads = info["missing_keys"], HEAD_KEYS
    if model.config.vocab_size != len(dictionary):
        raise ValueError(
            f"{folder}: embeddings for {model.config.vocab_size} symbols, but the data's "
            f"dictionary (+<mask>) has {len(dictionary)}: evaluate on the data it was trained on"
        )
    if num_classes is not None:
        purpose = "mode = eval scores a checkpoint fine-tuned on this task (checkpoint_dir/hf)"
        weights.check_head(folder, missing, heads, purpose)
        if model.config.num_labels != num_classes:
            raise weights.UnusableCheckpoint(
                f"{folder}: its classifier has {model.config.num_labels} outputs, but the data "
                f"has {num_classes} classes: evaluate on the task it was fine-tuned on"
            )
        weights.check_finite(model, folder)
    return model


def schedule_updates(cfg: Any, run_updates: int) -> tuple[int, int]:
    """(warm-up updates, decay length in updates) of the polynomial schedule, counted in optimizer
    steps as fairseq counts updates: ``warmup_updates`` / ``total_num_update`` where the preset
    gives them (fairseq's sst_2 recipe: 1256 / 20935, whatever the epochs and devices), else
    ``warmup_ratio`` of this run's own ``run_updates``."""
    total = getattr(cfg, "total_num_update", 0) or run_updates
    warmup = getattr(cfg, "warmup_updates", 0) or round(cfg.warmup_ratio * total)
    return warmup, total


def make_optimizer(model: torch.nn.Module, cfg: Any, run_updates: int):
    """fairseq's Adam (decoupled weight decay on all parameters) + polynomial decay with warm-up
    (:func:`schedule_updates`; after the decay the learning rate stays at 0, as fairseq's)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.learning_rate,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    warmup, total = schedule_updates(cfg, run_updates)
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer, warmup, total, lr_end=0.0, power=1.0
    )
    return optimizer, scheduler


def accuracy(
    model: torch.nn.Module, dataset: SentencePredictionDataset, rt: Runtime, batch_size: int = 128
) -> float:
    logits, labels = predict(
        model, dataset, rt, batch_size, collate_fn=PadCollator(dataset.dictionary.pad())
    )
    return metrics.accuracy(logits.argmax(-1), labels)


@dataclass
class Finetuned:
    model: torch.nn.Module
    result: TrainResult
    accuracy: float
    splits: dict[str, SentencePredictionDataset]
    checkpoint: Path | None = None  # the save_pretrained folder of the model


def finetune(
    cfg: Any,
    rt: Runtime,
    data_folder: str | os.PathLike,
    splits: dict[str, SentencePredictionDataset] | None = None,
) -> Finetuned:
    """Binarized data → RoBERTa → fairseq's SST-2 recipe → valid accuracy."""
    splits = splits or load_splits(data_folder, cfg.max_positions)
    train, valid = splits["train"], splits["valid"]
    # where the model goes is asked before training (nbzoo.safe_write), not after it
    convert_fairseq.check_output(hf_checkpoint(cfg))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, train.dictionary, len(train.class_names)).to(rt.device)
    plan = batch_plan(cfg, train)
    grad_accum = cfg.get("grad_accum", 1)
    per_epoch = (
        -(-len(plan(0, rt.rank, rt.world_size)) // grad_accum)
        if plan
        else steps_per_epoch(len(train), cfg.batch_size, rt.world_size, grad_accum)
    )
    steps = cfg.epochs * per_epoch
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    train_cfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        grad_accum=grad_accum,
        max_steps=cfg.max_steps or None,
        max_grad_norm=cfg.clip_norm or None,
        checkpoint_dir=paths.resolve(cfg.checkpoint_dir) / "training"
        if cfg.checkpoint_dir
        else None,
        checkpoint_every=cfg.checkpoint_every or None,
        seed=cfg.seed,
        run_id=config_hash(launch.identity(cfg), len(train)),
        desc="SST-2 fine-tuning",
    )
    collate, packed = PadCollator(train.dictionary.pad()), contextlib.nullcontext()
    how = packing.mode(cfg)
    if how != "off":
        # whole sentences in rows, the loss the mean over each step's sentences: "plain" packs
        # a padded step's sentences into rows of max_positions (exact), "length" lays the
        # sentences of a length-grouped step (batch_plan) in one row, attended per sentence
        collate = packing.PackedCollator(
            cfg.max_positions, pad_token_id=train.dictionary.pad(), one_row=how == "length"
        )
        packed = packing.packed_training(model, rt.kind, packing.LENGTH_ATTENTION.get(how))
    with packed:
        result = fit(
            model,
            train,
            optimizer,
            rt,
            train_cfg,
            collate_fn=collate,
            scheduler=scheduler,
            eval_fn=lambda m: {"accuracy": accuracy(m, valid, rt)},
            batch_plan=plan,
        )
    final = result.evals[-1]["accuracy"] if result.evals else accuracy(model, valid, rt)
    if rt.is_main:
        convert_fairseq.save_safetensors(model, hf_checkpoint(cfg))
        launch.write_record(
            hf_checkpoint(cfg) / RECORD, {"result": asdict(result), "accuracy": final}
        )
    return Finetuned(model, result, float(final), splits, hf_checkpoint(cfg))


RECORD = "training_record.json"  # beside the checkpoint: the run's history and final accuracy


def hf_checkpoint(cfg: Any) -> Path:
    """Where the fine-tuned model is saved (``save_pretrained``: config.json + model.safetensors)."""
    return paths.resolve(cfg.checkpoint_dir) / "hf"


def train(
    cfg: Any,
    rt: Runtime,
    data_folder: str | os.PathLike,
    splits: dict[str, SentencePredictionDataset] | None = None,
) -> Finetuned:
    """Fine-tune in this process, or with ``devices`` (× ``nnodes``) > 1 on every rank under
    torchrun, then load the checkpoint rank 0 saved."""
    if not launch.needed(cfg, rt):
        return finetune(cfg, rt, data_folder, splits)
    splits = splits or load_splits(data_folder, cfg.max_positions)
    fetch_model(cfg)  # here, once: the ranks would each download it into the same file
    record = launch.run(
        "nbzoo.sentence_prediction:train_on_rank",
        cfg,
        hf_checkpoint(cfg).with_name("launch"),
        data_folder=str(data_folder),
    )
    model = load_checkpoint(hf_checkpoint(cfg), splits["train"].dictionary).to(rt.device)
    return Finetuned(
        model,
        TrainResult(**record["result"]),
        float(record["accuracy"]),
        splits,
        hf_checkpoint(cfg),
    )


def train_on_rank(cfg: Any, rt: Runtime, data_folder: str) -> dict[str, Any]:
    """The torchrun entry point (``nbzoo.launch``): every rank fine-tunes on its shard."""
    run = finetune(cfg, rt, data_folder)
    return {"result": asdict(run.result), "accuracy": run.accuracy}


def evaluate(
    cfg: Any,
    rt: Runtime,
    data_folder: str | os.PathLike,
    splits: dict[str, SentencePredictionDataset] | None = None,
) -> Finetuned:
    """``mode = "eval"``, the seed's ``train_eval_8p.sh``: valid accuracy of a fine-tuned
    checkpoint -- ``init_checkpoint``, else the one this preset's training saved. On that run's
    own checkpoint it equals the run's final accuracy exactly; the history comes from the run's
    record beside the checkpoint (empty without one)."""
    splits = splits or load_splits(data_folder, cfg.max_positions)
    folder = paths.resolve(cfg.get("init_checkpoint") or hf_checkpoint(cfg))
    train = splits["train"]
    model = load_checkpoint(folder, train.dictionary, len(train.class_names)).to(rt.device)
    score = accuracy(model, splits["valid"], rt)
    result = TrainResult([], [], 0, 0, 0.0, None)
    if (folder / RECORD).exists():
        result = TrainResult(**launch.read_record(folder / RECORD)["result"])
    print(f"evaluated {folder} on {len(splits['valid'])} valid sentences: accuracy {score:.4f}")
    return Finetuned(model, result, score, splits, folder)


def predict_sentences(
    model: torch.nn.Module,
    encoder: RobertaEncoder,
    sentences: list[str],
    class_names: list[str],
    rt: Runtime,
) -> list[tuple[str, str, float]]:
    """(sentence, predicted label symbol, probability) for raw text, encoded as the data was."""
    items = [{"input_ids": torch.from_numpy(encoder.encode(s, add_bos=True))} for s in sentences]
    batch = rt.to_device(PadCollator(encoder.dictionary.pad())(items))
    model.eval()
    with torch.no_grad(), rt.autocast():
        probs = model(**batch).logits.float().softmax(-1).cpu().numpy()
    best = probs.argmax(-1)
    return [
        (s, class_names[k], float(p[k])) for s, k, p in zip(sentences, best, probs, strict=True)
    ]


# --- the lesson's views of a run (notebook 03) ------------------------------------------------------

# GLUE's SST-2 labels; fairseq's label dictionary orders them by frequency in the training data
SST2_LABEL_NAMES = {"0": "negative", "1": "positive"}


def label_names(class_names: list[str]) -> list[str]:
    """Readable names of the classes in the model's output order ("1" → "positive")."""
    return [SST2_LABEL_NAMES.get(c, c) for c in class_names]


class FairseqTokenizer:
    """Raw text → the ids this model was trained on (GPT-2 BPE, then dict.txt, ``<s>`` in front),
    with the calls the sentiment box makes of a tokenizer (``nbzoo.widgets.sentiment_box``)."""

    def __init__(self, encoder: RobertaEncoder):
        self.encoder = encoder

    def __call__(self, text: str, *, max_length: int = 512, padding=None, **_: Any):
        ids = self.encoder.encode(text, add_bos=True)[:max_length]
        mask = np.ones_like(ids)
        if padding == "max_length":
            fill = max_length - len(ids)
            ids = np.concatenate([ids, np.full(fill, self.encoder.dictionary.pad(), ids.dtype)])
            mask = np.concatenate([mask, np.zeros(fill, mask.dtype)])
        return {"input_ids": ids[None], "attention_mask": mask[None]}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        d = self.encoder.dictionary
        specials = {d.bos(): "<s>", d.eos(): "</s>", d.pad(): "<pad>", d.unk(): "<unk>"}
        return [specials.get(i) or self.encoder.decode([i]).strip() for i in ids]


def learning_checks(cfg: Any, run: Finetuned) -> lesson.Checks:
    """Validation accuracy against always answering the majority class of the same split."""
    valid = run.splits["valid"]
    majority = metrics.majority_rate(valid.targets)
    baseline = verdicts.proportion("majority class", majority, len(valid))
    return lesson.learning_checks(cfg, lesson.Check("accuracy", run.accuracy, baseline))


def record(cfg: Any, rt: Runtime, run: Finetuned, checks: lesson.Checks):
    """results/03_roberta_sst2.json for a run that succeeded, and the table to show."""
    extra = {
        "steps": run.result.steps,
        "model_name": cfg.model_name,
        "data_source": cfg.data_source,
        "train_sentences": len(run.splits["train"]),
        "valid_sentences": len(run.splits["valid"]),
        "mode": cfg.mode,
        "checkpoint": str(run.checkpoint),
    }
    return lesson.record(
        "03_roberta_sst2", cfg, rt, {"accuracy": run.accuracy}, checks=checks,
        samples_per_second=run.result.samples_per_second, extra=extra,
    )  # fmt: skip
