"""The lesson functions of notebooks 04 and 05 (nbzoo.masked_lm): the architecture knobs reach the
model, the learning checks set each metric against what a model that learnt nothing scores, in the
right direction, the seed's metric first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbzoo import longseq, masked_lm, presets


def _cfg(stem: str, **given):
    namespace = dict.fromkeys(presets.load(stem)["demo"], None)
    namespace.update(device="cpu", precision=None, seed=0, output_dir=None, **given)
    return presets.resolve(stem, "demo", namespace)


def test_the_architecture_knobs_reach_the_models_config():
    cfg = _cfg("04_reformer_mlm", num_buckets=8, num_hashes=1)
    config = masked_lm.model_config("reformer", cfg)
    assert (config["num_buckets"], config["num_hashes"]) == (8, 1)
    assert config["hidden_size"] == cfg.model_config["hidden_size"]  # the rest stays
    demo = masked_lm.model_config("reformer", _cfg("04_reformer_mlm"))
    assert (demo["num_buckets"], demo["num_hashes"]) == (4, 2)  # the preset's
    window = masked_lm.model_config("longformer", _cfg("05_longformer_mlm", attention_window=64))
    assert window["attention_window"] == 64


def test_a_full_preset_keeps_the_checkpoints_own_hashing():
    namespace = dict.fromkeys(presets.load("04_reformer_mlm")["full"], None)
    namespace.update(device="cpu", precision=None, seed=0, output_dir=None)
    cfg = presets.resolve("04_reformer_mlm", "full", namespace)
    config = masked_lm.model_config("reformer", cfg)
    assert (config["num_buckets"], config["num_hashes"]) == ([64, 128], 1)


def _batches_and_unigram():
    labels = torch.full((4, 50), -100)
    labels[:, ::5] = torch.tensor([3, 3, 4, 5, 3, 3, 6, 3, 4, 3])
    unigram = longseq.Unigram(np.array([0.0, 0.0, 0.0, 50.0, 20.0, 10.0, 10.0, 10.0]))
    return [{"labels": labels}], unigram


def _scores(perplexity: float, accuracy: float = 0.9):
    return {
        "masked_token_accuracy": accuracy,
        "baseline_accuracy": 0.6,
        "perplexity": perplexity,
        "perplexity_standard_error": 0.1,
        "unigram_perplexity": 3.0,
        "masked_tokens": 4000.0,
    }


def test_the_learning_checks_put_the_seeds_metric_first_and_perplexity_lower_is_better():
    batches, unigram = _batches_and_unigram()
    cfg = _cfg("05_longformer_mlm")
    baseline = longseq.unigram_perplexity(batches, unigram).value
    good = masked_lm.learning_checks("longformer", cfg, _scores(1.2), batches, unigram)
    assert [c.metric for c in good.checks] == ["perplexity", "masked_token_accuracy"]
    assert good.checks[0].higher_is_better is False and good.passed and good.required
    bad = masked_lm.learning_checks("longformer", cfg, _scores(baseline), batches, unigram)
    assert not bad.passed and "perplexity" in bad.failures
    reformer = masked_lm.learning_checks("reformer", _cfg("04_reformer_mlm"), _scores(1.2),
                                         batches, unigram)  # fmt: skip
    assert [c.metric for c in reformer.checks] == ["masked_token_accuracy", "perplexity"]


def test_the_learning_sentences_are_verdicts_seed_metric_first():
    batches, unigram = _batches_and_unigram()
    lines = masked_lm.learning_sentences("longformer", _scores(1.2), batches, unigram)
    assert lines[0].startswith("Perplexity of the masked tokens (the seed's metric)")
    assert "this model ahead of the unigram model by" in lines[0]
    assert lines[1].startswith("Masked-token accuracy on 4,000 masked tokens:")
    lines = masked_lm.learning_sentences("reformer", _scores(1.2, 0.6), batches, unigram)
    assert lines[0].startswith("Masked-token accuracy (the seed's Acc@1)")
    assert "no significant difference" in lines[0]  # 0.6 against a baseline of 0.6
    with pytest.raises(ValueError, match="kind must be one of"):
        masked_lm.learning_sentences("bert", _scores(1.2), batches, unigram)
