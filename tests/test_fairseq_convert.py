"""fairseq RoBERTa checkpoints → transformers: safe loading, key names, logits."""

from __future__ import annotations

import argparse
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

from nbzoo import convert_fairseq as cf

E = "encoder.sentence_encoder."
LAYERS, HIDDEN, HEADS, FFN, VOCAB, POSITIONS = 2, 16, 4, 24, 40, 20


def tiny_config(**kw) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=POSITIONS,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        **kw,
    )


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.roberta.embeddings.token_type_embeddings.weight.zero_()  # RoBERTa has no segments
    return model.eval()


def fairseq_names(hf: dict[str, torch.Tensor], head: str | None = "sentence_classification_head"):
    """The same weights under fairseq's key names, written out by hand from fairseq's model code."""
    sd = {
        E + "embed_tokens.weight": hf["roberta.embeddings.word_embeddings.weight"],
        E + "embed_positions.weight": hf["roberta.embeddings.position_embeddings.weight"],
        E + "layernorm_embedding.weight": hf["roberta.embeddings.LayerNorm.weight"],
        E + "layernorm_embedding.bias": hf["roberta.embeddings.LayerNorm.bias"],
        E + "version": torch.tensor([2.0]),
    }
    for i in range(LAYERS):
        h, f = f"roberta.encoder.layer.{i}.", f"{E}layers.{i}."
        for kind in ("weight", "bias"):
            sd[f + f"self_attn.q_proj.{kind}"] = hf[h + f"attention.self.query.{kind}"]
            sd[f + f"self_attn.k_proj.{kind}"] = hf[h + f"attention.self.key.{kind}"]
            sd[f + f"self_attn.v_proj.{kind}"] = hf[h + f"attention.self.value.{kind}"]
            sd[f + f"self_attn.out_proj.{kind}"] = hf[h + f"attention.output.dense.{kind}"]
            sd[f + f"self_attn_layer_norm.{kind}"] = hf[h + f"attention.output.LayerNorm.{kind}"]
            sd[f + f"fc1.{kind}"] = hf[h + f"intermediate.dense.{kind}"]
            sd[f + f"fc2.{kind}"] = hf[h + f"output.dense.{kind}"]
            sd[f + f"final_layer_norm.{kind}"] = hf[h + f"output.LayerNorm.{kind}"]
    if "lm_head.dense.weight" in hf:
        for kind in ("weight", "bias"):
            sd[f"encoder.lm_head.dense.{kind}"] = hf[f"lm_head.dense.{kind}"]
            sd[f"encoder.lm_head.layer_norm.{kind}"] = hf[f"lm_head.layer_norm.{kind}"]
        sd["encoder.lm_head.weight"] = hf["lm_head.decoder.weight"]
        sd["encoder.lm_head.bias"] = hf["lm_head.bias"]
    if head and "classifier.dense.weight" in hf:
        for part in ("dense", "out_proj"):
            for kind in ("weight", "bias"):
                sd[f"classification_heads.{head}.{part}.{kind}"] = hf[f"classifier.{part}.{kind}"]
    return {k: v.clone() for k, v in sd.items()}


def save_fairseq(path, sd, legacy=False, **extra):
    """A checkpoint shaped like fairseq's: args Namespace, model, optimizer history, extra state."""
    args = argparse.Namespace(
        arch="roberta_base",
        encoder_attention_heads=HEADS,
        activation_fn="gelu",
        dropout=0.1,
        attention_dropout=0.1,
        pooler_activation_fn="tanh",
    )
    state = {
        "args": args,
        "model": sd,
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "num_updates": 500000}],
        "extra_state": {"train_iterator": {"epoch": 3}, "val_loss": 1.5},
        **extra,
    }
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


IDS = torch.tensor([[0, 5, 9, 13, 7, 2, 1, 1], [0, 22, 31, 2, 1, 1, 1, 1]])


def fairseq_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, head: str) -> torch.Tensor:
    """RoBERTa's forward pass as fairseq computes it, straight from its state dict (post-LayerNorm
    transformer, learned positions after the padding index, q scaled by head_dim**-0.5, erf GELU,
    classification head on <s> with tanh) — independent of transformers."""
    pad = 1
    mask = ids.ne(pad)
    positions = torch.cumsum(mask, dim=1) * mask + pad
    x = sd[E + "embed_tokens.weight"][ids] + sd[E + "embed_positions.weight"][positions]
    x = F.layer_norm(
        x, (HIDDEN,), sd[E + "layernorm_embedding.weight"], sd[E + "layernorm_embedding.bias"], 1e-5
    )
    b, t, _ = x.shape
    d = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"{E}layers.{i}."

        def lin(name, v, p=p):
            return F.linear(v, sd[p + name + ".weight"], sd[p + name + ".bias"])

        q = lin("self_attn.q_proj", x) * d**-0.5
        k, v = lin("self_attn.k_proj", x), lin("self_attn.v_proj", x)
        q, k, v = (z.view(b, t, HEADS, d).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, HIDDEN)
        x = F.layer_norm(
            x + lin("self_attn.out_proj", attn),
            (HIDDEN,),
            sd[p + "self_attn_layer_norm.weight"],
            sd[p + "self_attn_layer_norm.bias"],
            1e-5,
        )
        h = lin("fc2", 0.5 * lin("fc1", x) * (1 + torch.erf(lin("fc1", x) / math.sqrt(2))))
        x = F.layer_norm(
            x + h,
            (HIDDEN,),
            sd[p + "final_layer_norm.weight"],
            sd[p + "final_layer_norm.bias"],
            1e-5,
        )
    c = f"classification_heads.{head}."
    z = torch.tanh(F.linear(x[:, 0], sd[c + "dense.weight"], sd[c + "dense.bias"]))
    return F.linear(z, sd[c + "out_proj.weight"], sd[c + "out_proj.bias"])


@pytest.fixture
def classifier():
    return randomized(RobertaForSequenceClassification(tiny_config(num_labels=3)))


def test_classifier_logits_equal_the_same_weights_loaded_directly(tmp_path, classifier):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict()))
    converted = cf.convert(path, num_labels=3)
    mask = IDS.ne(1).long()
    with torch.no_grad():
        want = classifier(input_ids=IDS, attention_mask=mask).logits
        got = converted.model(input_ids=IDS, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert converted.initialized_keys == [] and converted.unused_keys == []
    assert converted.config.num_attention_heads == HEADS and converted.config.layer_norm_eps == 1e-5


def test_converted_classifier_matches_fairseqs_own_forward(tmp_path, classifier):
    sd = fairseq_names(classifier.state_dict())
    path = save_fairseq(tmp_path / "model.pt", sd)
    model = cf.convert(path).model
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=IDS.ne(1).long()).logits
        want = fairseq_forward(sd, IDS, "sentence_classification_head")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_lm_logits_and_the_old_key_names(tmp_path):
    """2019 checkpoints: decoder.*, emb_layer_norm, packed in_proj_weight/bias."""
    mlm = randomized(RobertaForMaskedLM(tiny_config()))
    sd = fairseq_names(mlm.state_dict(), head=None)
    old = {}
    for key, value in sd.items():
        key = key.replace("layernorm_embedding", "emb_layer_norm")
        old["decoder." + key[len("encoder.") :]] = value
    for i in range(LAYERS):
        p = f"decoder.sentence_encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            old[p + f"in_proj_{kind}"] = torch.cat([old.pop(p + f"{n}_proj.{kind}") for n in "qkv"])
    path = save_fairseq(tmp_path / "model.pt", old, legacy=True)
    converted = cf.convert(path, task="masked-lm")
    with torch.no_grad():
        want = mlm(input_ids=IDS, attention_mask=IDS.ne(1).long()).logits
        got = converted.model(input_ids=IDS, attention_mask=IDS.ne(1).long()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_pretrained_checkpoint_gets_a_fresh_head_and_saves_as_safetensors(tmp_path):
    mlm = randomized(RobertaForMaskedLM(tiny_config()))
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(mlm.state_dict()))
    converted = cf.convert(path, num_labels=2, id2label={0: "1", 1: "0"})
    assert sorted(converted.initialized_keys) == sorted(
        f"classifier.{p}.{k}" for p in ("dense", "out_proj") for k in ("weight", "bias")
    )
    assert "encoder.lm_head.weight" in converted.unused_keys
    folder = cf.save_safetensors(converted.model, tmp_path / "hf")
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    assert not list(tmp_path.glob("hf.tmp-*"))
    again = RobertaForSequenceClassification.from_pretrained(folder).eval()
    assert again.config.id2label == {0: "1", 1: "0"}
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=IDS).logits, converted.model(input_ids=IDS).logits, rtol=0, atol=0
        )


def test_named_head_and_wrong_shapes(tmp_path, classifier):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict(), head="mnli"))
    assert cf.convert(path, head_name="mnli").config.num_labels == 3
    with pytest.raises(cf.CheckpointError, match="no classification head 'sst2'.*it has: mnli"):
        cf.convert(path, head_name="sst2")
    with pytest.raises(cf.CheckpointError, match=r"classifier.out_proj.weight has shape \(3, 16\)"):
        cf.convert(path, head_name="mnli", num_labels=2)


def test_prenorm_and_foreign_state_dicts_are_refused(tmp_path, classifier):
    sd = fairseq_names(classifier.state_dict())
    sd[E + "layer_norm.weight"] = torch.ones(HIDDEN)
    with pytest.raises(cf.CheckpointError, match="pre-LayerNorm"):
        cf.convert(save_fairseq(tmp_path / "a.pt", sd))
    torch.save(
        {"model": {"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}}, tmp_path / "b.pt"
    )
    with pytest.raises(cf.CheckpointError, match="not a fairseq RoBERTa state dict"):
        cf.convert(tmp_path / "b.pt")
    torch.save({"weights": 1}, tmp_path / "c.pt")
    with pytest.raises(cf.CheckpointError, match=r"c\.pt: expected a fairseq checkpoint"):
        cf.load_checkpoint(tmp_path / "c.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_code_is_never_run(tmp_path, classifier, legacy):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = save_fairseq(
        tmp_path / "evil.pt",
        fairseq_names(classifier.state_dict()),
        legacy=legacy,
        extra_state=payload,
    )
    with pytest.raises(
        cf.CheckpointError, match=r"evil\.pt: refusing to unpickle the global (posix|os)\.system"
    ):
        cf.load_checkpoint(path)
    assert not marker.exists()


def test_fairseq_objects_become_inert_placeholders(tmp_path, classifier, monkeypatch):
    """Old checkpoints pickle fairseq's meters; they load as placeholders, without fairseq."""
    module = types.ModuleType("fairseq.meters")

    class AverageMeter:
        def __init__(self):
            self.avg, self.count = 0.25, 7

    AverageMeter.__module__, AverageMeter.__qualname__ = "fairseq.meters", "AverageMeter"
    module.AverageMeter = AverageMeter
    monkeypatch.setitem(sys.modules, "fairseq", types.ModuleType("fairseq"))
    monkeypatch.setitem(sys.modules, "fairseq.meters", module)
    extra = {"train_meters": {"train_loss": AverageMeter()}}
    path = save_fairseq(
        tmp_path / "model.pt", fairseq_names(classifier.state_dict()), extra_state=extra
    )
    monkeypatch.delitem(sys.modules, "fairseq.meters")
    monkeypatch.delitem(sys.modules, "fairseq")
    ckpt = cf.load_checkpoint(path)
    assert ckpt.placeholders == ["fairseq.meters.AverageMeter"]
    assert ckpt.args.encoder_attention_heads == HEADS
    raw = torch.load(
        path, map_location="cpu", pickle_module=cf.restricted_pickle, weights_only=False
    )
    meter = raw["extra_state"]["train_meters"]["train_loss"]
    assert isinstance(meter, cf.Placeholder) and meter.state == {"avg": 0.25, "count": 7}


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(cf.CheckpointError, match=r"junk\.pt"):
        cf.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such checkpoint"):
        cf.load_checkpoint(tmp_path / "missing.pt")


def test_command_line(tmp_path, classifier, capsys):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict()))
    assert cf.main([str(path), str(tmp_path / "out"), "--num-labels", "3"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert cf.main([str(tmp_path / "none.pt"), str(tmp_path / "out2")]) == 2
    assert "none.pt: no such checkpoint" in capsys.readouterr().err


def test_newer_checkpoints_keep_the_model_settings_in_cfg(tmp_path, classifier):
    """fairseq >= 0.10: "args" is None and "cfg" is a plain dict (OmegaConf.to_container)."""
    sd = fairseq_names(classifier.state_dict())
    cfg = {"model": {"_name": "roberta", "encoder_attention_heads": HEADS, "dropout": 0.2}}
    torch.save({"args": None, "cfg": cfg, "model": sd}, tmp_path / "model.pt")
    converted = cf.convert(tmp_path / "model.pt")
    assert (
        converted.config.num_attention_heads == HEADS
        and converted.config.hidden_dropout_prob == 0.2
    )


def test_an_existing_folder_of_the_users_is_never_wiped(tmp_path, classifier, capsys):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert cf.main([str(path), str(out), "--num-labels", "3"]) == 2
    assert "out holds notes.txt that nbzoo did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"]


def test_a_rerun_replaces_its_earlier_output(tmp_path, classifier):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict()))
    assert cf.main([str(path), str(tmp_path / "out"), "--num-labels", "3"]) == 0
    first = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    assert cf.main([str(path), str(tmp_path / "out"), "--num-labels", "3"]) == 0
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out"]


def test_a_rerun_replaces_an_earlier_fine_tuning_output_with_its_training_record(
    tmp_path, classifier
):
    """03's fine-tuning writes training_record.json beside the saved model; its next run saves
    into the same folder."""
    from nbzoo import launch

    out = cf.save_safetensors(classifier, tmp_path / "hf")
    launch.write_record(out / "training_record.json", {})
    cf.save_safetensors(classifier, out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".nbzoo-owned", "config.json", "model.safetensors"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_full_disk_leaves_no_temporary_folder(tmp_path, classifier, monkeypatch, capsys):
    path = save_fairseq(tmp_path / "model.pt", fairseq_names(classifier.state_dict()))
    real = RobertaForSequenceClassification.save_pretrained

    def disk_full(self, folder, **kw):
        real(self, folder, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RobertaForSequenceClassification, "save_pretrained", disk_full)
    for _ in range(2):
        assert cf.main([str(path), str(tmp_path / "out"), "--num-labels", "3"]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_checkpoint_without_embed_tokens_gets_a_message(tmp_path, classifier, capsys):
    sd = fairseq_names(classifier.state_dict())
    del sd[E + "embed_tokens.weight"]
    path = save_fairseq(tmp_path / "model.pt", sd)
    assert cf.main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.pt: the state dict lacks 'encoder.sentence_encoder.embed_tokens.weight'" in err
    assert not (tmp_path / "out").exists()
