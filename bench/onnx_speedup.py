"""Optimized ONNX Runtime vs PyTorch eager on ALBERT at the seed's shape (seq 128, batch 32).

    .venv/bin/python bench/onnx_speedup.py --model base --threads 2
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/onnx_speedup.py --model tiny --no-spin

``--model`` is ``tiny`` (notebook 01's demo architecture), ``base`` (albert-base-v2's architecture:
throughput does not depend on the weights, so a randomly initialised model measures it without a
download) or a fine-tuned checkpoint folder. Inputs are random token ids with realistic padding
(lengths uniform in [seq/8, seq]). The model goes through the notebook's pipeline (export → onnxslim →
ORT transformer optimizer → ORT's dynamic int8 quantization of the optimized graph), then PyTorch, the
optimized fp32 graph and the int8 one alternate timing rounds on the same batches with the same thread
count; the medians of the per-round ratios are compared (with their IQR). Prints one JSON record, with
the CPU's int8 instruction sets.

On a machine whose cores are shared, libgomp's default busy-waiting makes PyTorch with several
threads collapse (each thread spins for a barrier while its partner is descheduled); run with
``OMP_WAIT_POLICY=PASSIVE`` and ``--no-spin`` (ORT's equivalent) to see the frameworks rather than
the scheduler, and with ``--threads 1`` for a number no neighbour can distort.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AlbertConfig, AlbertForSequenceClassification  # noqa: E402

from nbzoo.export import albert, quantize  # noqa: E402

ARCHS = {
    "tiny": dict(
        embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=1000,
    ),
    # albert-base-v2's config.json
    "base": dict(
        embedding_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, vocab_size=30000, hidden_act="gelu_new",
    ),
}  # fmt: skip


def build(name: str, positions: int):
    if name in ARCHS:
        torch.manual_seed(0)
        config = AlbertConfig(
            max_position_embeddings=max(positions, 512), num_labels=2, **ARCHS[name]
        )
        model = AlbertForSequenceClassification(config)
        with torch.no_grad():  # non-zero biases, so that no Add is folded away as a no-op
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model.eval()
    from nbzoo.finetune import load_finetuned

    return load_finetuned(name)[0]


def features(vocab: int, n: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, seq // 8), seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(5, vocab, size=(n, seq)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base", help="tiny | base | a checkpoint folder")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=2, help="batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-spin", action="store_true", help="ORT threads sleep instead of spinning")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = build(args.model, args.seq)
    feats = features(model.config.vocab_size, args.batch * args.batches, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        stages = albert.build_stages(model, feats, tmp, parity_samples=4)
        models = {name: stages.paths[name] for name in ("onnx_opt", "onnx_int8")}
        result = albert.speedup(
            model, models, feats, args.batch, args.batches, args.rounds,
            args.threads, spinning=not args.no_spin,
        )  # fmt: skip
    result |= {
        "model": args.model,
        "fused": stages.fused,
        "max_abs_logit_diff": stages.parity["onnx_opt"],
        "int8_max_abs_logit_diff": stages.parity["onnx_int8"],
        "int8": quantize.int8_instruction_sets(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
