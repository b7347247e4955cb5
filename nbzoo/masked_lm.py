"""Masked-LM training of notebooks 04 (Reformer) and 05 (Longformer): one backend, ``kind`` says
which model. The verbs: :func:`prepare_data` (the seed's ``corpus/`` + ``lf_token/``),
:func:`build_model`, :func:`train` (in this process, or under torchrun when ``devices > 1``) and
:func:`load_weights` for ``mode = "eval"`` (the notebooks then score the loaded weights with
:func:`nbzoo.longseq.evaluate_mlm`, as after training).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import get_linear_schedule_with_warmup

from nbzoo import launch, lesson, longseq, metrics, patching, paths, safe_write, verdicts, weights
from nbzoo.data import corpus
from nbzoo.device import Runtime
from nbzoo.train import TrainConfig, TrainResult, config_hash, fit, steps_per_epoch

KINDS = ("reformer", "longformer")
# The runtime patches each model trains under (the notebook applies them; so does every rank).
PATCHES = {
    "reformer": ("reformer_lsh_seeded", "reformer_inference_path"),
    "longformer": ("longformer_sliding_window", "longformer_static_global"),
}
# The metrics each notebook's training evaluates at every epoch end.
EVAL_KEYS = {
    "reformer": ("masked_token_accuracy", "baseline_accuracy"),
    "longformer": ("perplexity", "unigram_perplexity"),
}
RECORD = "training_record.json"  # beside the final weights: the run's history
STEMS = {"reformer": "04_reformer_mlm", "longformer": "05_longformer_mlm"}
# Knobs of the parameters cells that set the model's architecture: keys of model_config, given
# their own line so that a learner changes one without restating the whole model_config.
MODEL_KNOBS = {"reformer": ("num_buckets", "num_hashes"), "longformer": ("attention_window",)}
# Each notebook's learning checks, the seed's metric first (04: Acc@1, 05: perplexity).
CHECKED = {
    "reformer": ("masked_token_accuracy", "perplexity"),
    "longformer": ("perplexity", "masked_token_accuracy"),
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


def apply_patches(kind: str) -> None:
    _check_kind(kind)
    for name in PATCHES[kind]:
        patching.apply(name)


@dataclass
class Data:
    tokenizer: Any
    docs: dict[str, list[str]]
    train_set: corpus.BlockDataset
    test_set: corpus.BlockDataset


def prepare_data(cfg: Any, write: bool = True) -> Data:
    """The corpus and tokenizer under ``cfg.data_dir`` cut into blocks. ``write``: generate the
    demo corpus and (re)train its tokenizer first (generated text is retrained on every run,
    deterministic and < 1 s); the ranks of a torchrun job read what the notebook wrote."""
    # the ranks of a torchrun job load, as "local" data, what the notebook generated
    source = cfg.data_source if write else "local"
    tokenizer, docs = corpus.prepare_data(
        paths.resolve(cfg.data_dir),
        source,
        cfg.sample_sizes,
        seed=cfg.seed,
        vocab_size=cfg.tokenizer_vocab_size,
    )
    return Data(
        tokenizer,
        docs,
        corpus.block_dataset(docs["train"], tokenizer, cfg.block_size),
        corpus.block_dataset(docs["test"], tokenizer, cfg.block_size),
    )


def build_model(kind: str, cfg: Any, tokenizer) -> torch.nn.Module:
    """The model of ``cfg`` from the seed ``cfg.seed``; with ``init_checkpoint`` its weights are
    then those of that checkpoint (a run's ``final/`` folder or its model.safetensors)."""
    _check_kind(kind)
    torch.manual_seed(cfg.seed)
    model = longseq.build_mlm_model(
        kind, cfg.model_name, model_config(kind, cfg), tokenizer, cfg.block_size
    )
    if cfg.get("init_checkpoint"):
        load_weights(model, cfg.init_checkpoint)
    return model


def model_config(kind: str, cfg: Any) -> dict[str, Any]:
    """``cfg.model_config`` with the architecture knobs of :data:`MODEL_KNOBS` on top."""
    _check_kind(kind)
    knobs = {k: cfg[k] for k in MODEL_KNOBS[kind] if cfg.get(k) is not None}
    return {**cfg.model_config, **knobs}


def global_ids(cfg: Any, tokenizer) -> tuple[int, ...]:
    return (tokenizer.bos_token_id,) if cfg.get("global_attention") == "bos" else ()


def train_collator(kind: str, cfg: Any, tokenizer):
    """04: BERT's token-level masking; 05: whole n-gram masking, ``<s>`` tokens global."""
    if kind == "reformer":
        return corpus.mlm_collator(tokenizer, cfg.mlm_probability, seed=cfg.seed)
    return longseq.GlobalOnTokens(
        corpus.ngram_collator(
            tokenizer, cfg.mlm_probability, max_ngram=cfg.max_ngram, seed=cfg.seed
        ),
        global_ids(cfg, tokenizer),
    )


def test_batches(kind: str, cfg: Any, tokenizer, test_set) -> list[dict[str, torch.Tensor]]:
    """The test set masked once (seed + 1), so every evaluation scores the same positions."""
    if kind == "reformer":
        collator = corpus.mlm_collator(tokenizer, cfg.mlm_probability, seed=cfg.seed + 1)
    else:
        collator = longseq.GlobalOnTokens(
            corpus.ngram_collator(tokenizer, cfg.mlm_probability, cfg.max_ngram, seed=cfg.seed + 1),
            global_ids(cfg, tokenizer),
        )
    return corpus.masked_batches(test_set, collator, cfg.eval_batch_size)


def masked_tokens(batch: dict[str, torch.Tensor]) -> int:
    """What the masked-LM loss averages over: the batch's masked (labelled) tokens. The training
    loop weighs each micro-batch of a step by its share of them, so that the loss of a step is the
    mean over all the global batch's masked tokens whatever the devices and grad_accum."""
    return int((batch["labels"] != metrics.IGNORE_INDEX).sum())


def final_dir(cfg: Any) -> Path:
    """Where rank 0 saves the trained weights (model.safetensors) and the run's record."""
    return paths.resolve(cfg.checkpoint_dir) / "final"


WRITER = "nbzoo.masked_lm (the trained weights)"


def save_weights(model: torch.nn.Module, folder: str | os.PathLike, result: TrainResult) -> Path:
    """model.safetensors and the run's record into ``folder``, a folder nbzoo creates or marked
    (nbzoo.safe_write), each through a temporary name."""
    folder = Path(folder)
    owned = safe_write.claim(folder, WRITER, what="checkpoint_dir's final/")
    with owned.file("model.safetensors") as tmp:
        save_model(model, str(tmp))
    launch.write_record(folder / RECORD, {"result": asdict(result)})
    return folder


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> TrainResult:
    """Load a checkpoint's weights into ``model`` (same architecture); return the history of the
    run that wrote it (empty when it has no record)."""
    path = paths.resolve(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(
            f"{file}: no weights here; init_checkpoint must name a trained run's final/ folder "
            "(checkpoint_dir/final, written by mode=train) or its model.safetensors"
        )
    weights.read_safetensors_keys(file)  # a truncated file: named, with what is wrong
    missing, unexpected = load_model(
        model, str(file), strict=False, device=str(next(model.parameters()).device)
    )
    purpose = "init_checkpoint must be a masked-LM run's final/ folder (checkpoint_dir/final)"
    weights.check_head(file, missing, {"lm_head.": "masked-LM head (lm_head)"}, purpose)
    if missing or unexpected:
        raise weights.UnusableCheckpoint(
            f"{file}: does not fit this model's architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    weights.check_finite(model, file)
    record = file.parent / RECORD
    if record.exists():
        return TrainResult(**launch.read_record(record)["result"])
    return TrainResult([], [], 0, 0, 0.0, None)


def train(
    kind: str,
    cfg: Any,
    rt: Runtime,
    model: torch.nn.Module,
    data: Data,
    eval_batches: list[dict[str, torch.Tensor]],
    unigram: longseq.Unigram,
) -> TrainResult:
    """Train ``model`` (on ``rt.device``) with AdamW and linear warm-up / decay; evaluate at every
    epoch end. With ``devices`` (× ``nnodes``) > 1 the ranks train under torchrun and ``model``
    gets the weights rank 0 saved."""
    if launch.needed(cfg, rt):
        record = launch.run(
            "nbzoo.masked_lm:train_on_rank", cfg, final_dir(cfg).with_name("launch"), kind=kind
        )
        load_weights(model, final_dir(cfg))
        return TrainResult(**record["result"])
    # where the weights go is asked before training (nbzoo.safe_write), not after it
    safe_write.check_claim(final_dir(cfg), WRITER, what="checkpoint_dir's final/")
    steps = cfg.epochs * steps_per_epoch(
        len(data.train_set), cfg.batch_size, rt.world_size, cfg.get("grad_accum", 1)
    )
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    train_cfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        grad_accum=cfg.get("grad_accum", 1),
        max_steps=cfg.max_steps or None,
        max_grad_norm=1.0,
        checkpoint_dir=paths.resolve(cfg.checkpoint_dir) / "training",
        checkpoint_every=cfg.checkpoint_every or None,
        seed=cfg.seed,
        run_id=config_hash(launch.identity(cfg), len(data.train_set), patching.active()),
        desc=f"{kind} mlm",
        # the masks are drawn as one process collating the step's whole global batch would draw them
        collate_global_batch=True,
        # Reformer's reversible layers run their own backward passes, and transformers' Reformer
        # never uses lm_head.bias in its forward (the decoder holds its own)
        ddp_static_graph=kind == "reformer",
    )

    def evaluate(m):
        scores = longseq.evaluate_mlm(m, eval_batches, rt, unigram)
        return {k: scores[k] for k in EVAL_KEYS[kind]}

    result = fit(
        model,
        data.train_set,
        optimizer,
        rt,
        train_cfg,
        collate_fn=train_collator(kind, cfg, data.tokenizer),
        scheduler=scheduler,
        eval_fn=evaluate,
        loss_counts=masked_tokens,  # the model's own loss: a mean over the masked tokens
    )
    if rt.is_main:
        save_weights(model, final_dir(cfg), result)
    return result


def train_on_rank(cfg: Any, rt: Runtime, kind: str) -> dict[str, Any]:
    """The torchrun entry point (``nbzoo.launch``): every rank trains on its shard."""
    apply_patches(kind)
    data = prepare_data(cfg, write=False)
    model = build_model(kind, cfg, data.tokenizer).to(rt.device)
    unigram = longseq.Unigram.fit(
        data.train_set.blocks, len(data.tokenizer), data.tokenizer.all_special_ids
    )
    eval_batches = test_batches(kind, cfg, data.tokenizer, data.test_set)
    result = train(kind, cfg, rt, model, data, eval_batches, unigram)
    return {"result": asdict(result)}


def learning_checks(
    kind: str, cfg: Any, scores: dict[str, float], test_batches, unigram: longseq.Unigram
) -> lesson.Checks:
    """What a model that learnt nothing scores on these test positions: the most frequent training
    token (masked-token accuracy, a proportion of the masked tokens) and the unigram model
    (perplexity, lower is better, its standard error from the tokens' log-likelihoods)."""
    _check_kind(kind)
    checks = {
        "masked_token_accuracy": lesson.Check(
            "masked_token_accuracy",
            scores["masked_token_accuracy"],
            verdicts.proportion(
                "most frequent token", scores["baseline_accuracy"], int(scores["masked_tokens"])
            ),
        ),
        "perplexity": lesson.Check(
            "perplexity",
            scores["perplexity"],
            longseq.unigram_perplexity(test_batches, unigram),
            higher_is_better=False,
        ),
    }
    return lesson.learning_checks(cfg, *(checks[m] for m in CHECKED[kind]))


def record(
    kind: str,
    cfg: Any,
    rt: Runtime,
    scores: dict[str, float],
    result: TrainResult,
    checks: lesson.Checks,
    also: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> lesson.Results:
    """Write this run's results record (:func:`nbzoo.lesson.record`): the checked metrics, the
    seed's first, then ``also`` (e.g. the ONNX export's largest difference); ``extra`` beside."""
    _check_kind(kind)
    shown = {m: scores[m] for m in CHECKED[kind]} | dict(also or {})
    return lesson.record(
        STEMS[kind],
        cfg,
        rt,
        shown,
        checks=checks,
        samples_per_second=result.samples_per_second or None,
        extra={
            "steps": result.steps,
            "model_name": cfg.model_name,
            "block_size": cfg.block_size,
            "masked_tokens": int(scores["masked_tokens"]),
            "patches": patching.active(),
            "mode": cfg.mode,
            **(extra or {}),
        },
    )


def learning_sentences(
    kind: str, scores: dict[str, float], test_batches, unigram: longseq.Unigram
) -> list[str]:
    """This run against a model that learnt nothing, on the same masked positions, worded by
    :func:`nbzoo.verdicts.compare`: accuracy against the most frequent token, perplexity
    against the unigram model; the seed's metric first."""
    _check_kind(kind)
    n = int(scores["masked_tokens"])
    accuracy = verdicts.compare(
        verdicts.proportion("this model", scores["masked_token_accuracy"], n),
        verdicts.proportion("guessing the most frequent token", scores["baseline_accuracy"], n),
        what="masked-token accuracy",
    )
    model_perplexity = verdicts.Estimate(
        "this model",
        scores["perplexity"],
        "perplexity",
        n,
        standard_error=scores["perplexity_standard_error"],
    )
    perplexity = verdicts.compare(
        model_perplexity,
        longseq.unigram_perplexity(test_batches, unigram),
        higher_is_better=False,
        what="perplexity",
    )
    seed = {"masked_token_accuracy": " (the seed's Acc@1)", "perplexity": " (the seed's metric)"}
    mark = {m: seed[m] if m == CHECKED[kind][0] else "" for m in seed}
    sentences = {
        "masked_token_accuracy": f"Masked-token accuracy{mark['masked_token_accuracy']} on "
        f"{n:,} masked tokens: {accuracy}.",
        "perplexity": f"Perplexity of the masked tokens{mark['perplexity']}, lower is better: "
        f"{perplexity}.",
    }
    return [sentences[m] for m in CHECKED[kind]]
