"""Notebook 06's full-preset code path on a GPU for a few steps: a device check, not a reproduction.

    python bench/thor_gpu_check.py [--device cuda] [--steps 120] [--paired-steps 200] [--json FILE]
    python bench/thor_gpu_check.py --tiny --device cpu      # the same path at toy size (a test)
    python bench/thor_gpu_check.py --table [--update-readme bench/README.md]   # from the record

The `full` preset trains BERT-Large with THOR on the MLPerf shards under torchrun. Those shards
cannot be fetched here, so this check writes shards of the same shape (sequence 512, 76 masked
positions, BERT's 30,522-token vocabulary; the demo's Markov-chain language) and runs the preset's
settings on them -- batch 12, THOR's refresh every 100 steps, statistics every 10, blocks of 128,
MindSpore's learning rate and damping, bf16 autocast with THOR's factors in fp32 -- for ``--steps``
steps, through the torchrun entry point the notebook uses for ``devices > 1``. One setting per
optimizer (THOR, its momentum-SGD counterpart, AdamW): the accuracies say nothing after so few
steps on a made-up language; the step times, THOR's cost breakdown and the alternating THOR /
AdamW step-time ratio are what this measures, next to the seed's 275 ms per step (8 Ascend 910,
batch 12 each: another machine, a reference only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nbzoo import bench, launch, metrics, optimizer_comparison, paths, presets, pretraining
from nbzoo import device as nbdevice
from nbzoo.device import accelerator_name

STEM = "06_bert_thor"
RECORD = "results/bench/thor_gpu_check.json"  # where the GPU run's record is committed
MARKERS = ("<!-- thor-gpu-check:start -->", "<!-- thor-gpu-check:end -->")
BERT_VOCAB = 30522
MLPERF_SHAPE = {"vocab_size": BERT_VOCAB, "seq_length": 512, "max_predictions": 76}
TINY_MODEL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 32,
}


def check_config(
    device: str, steps: int, samples: int, data_dir: Path, tiny: bool
) -> presets.Config:
    """The notebook's `full` preset with generated shards of the MLPerf shape and ``steps`` steps."""
    # every knob at None takes the preset's value (as in the notebook; no nbformat needed here)
    namespace = {k: None for k in presets.load(STEM)["full"]}
    common = {"device": device, "precision": "auto", "seed": 0, "devices": 1, "output_dir": None}
    cfg = presets.resolve(STEM, "full", {**namespace, **common})
    frequency = cfg.frequency if not tiny else 10
    overrides = {
        "data_source": "generate",
        "data_dir": str(data_dir),
        "sample_spec": {"vocab_size": 128, "seq_length": 32, "max_predictions": 5}
        if tiny
        else MLPERF_SHAPE,
        "num_samples": samples,
        "samples_per_shard": max(1, samples // 4),
        "eval_samples": min(256, samples // 4),
        "max_steps": steps,
        "eval_every": max(1, steps // 2),
        "frequency": frequency,
        "stats_every": cfg.stats_every if not tiny else 5,
        "checkpoint_dir": "",
        "checkpoint_every": 0,
        "grid": {
            "thor": [{"lr": 0.006464, "damping": 0.007035}],
            "sgd": [{"lr": 0.006464}],
            "adamw": [{"lr": 1e-4}],
        },
    }
    if tiny:
        overrides.update(model_config=TINY_MODEL, batch_size=8, eval_batch_size=32, threads=1)
    return presets.Config({**cfg, **overrides})


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = check_config(args.device, args.steps, args.samples, out / "shards", args.tiny)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tick = time.perf_counter()
    shards = pretraining.prepare_data(cfg)
    print(f"{len(shards)} shards of {cfg.sample_spec} in {time.perf_counter() - tick:.0f} s")
    rt = nbdevice.setup(cfg.device, cfg.precision, cfg.seed)
    record: dict[str, Any] = {
        "device": rt.kind,
        "device_name": accelerator_name(rt),
        "precision": rt.precision,
        "versions": metrics._versions(),
        "config": {k: v for k, v in cfg.items() if k != "grid"},
        "grid": cfg.grid,
        "seed_ms_per_step": optimizer_comparison.SEED_MS_PER_STEP,
        "seed_ms_per_step_note": "8 x Ascend 910, batch 12 each, MindSpore (reference only)",
    }

    # the grid, through the same torchrun entry point the notebook uses for devices > 1
    tick = time.perf_counter()
    launched = launch.run(
        "nbzoo.optimizer_comparison:grid_on_rank", {**cfg, "devices": 1}, out / "torchrun"
    )
    runs = [pretraining.Run(**r) for r in launched["runs"]]
    record["torchrun_seconds"] = time.perf_counter() - tick
    record["runs"] = []
    for r in runs:
        row = {
            "optimizer": r.optimizer,
            "lr": r.lr,
            "damping": r.damping,
            "steps": r.steps,
            "finite_loss": not r.diverged,
            "first_loss": r.history[0]["loss"],
            "last_loss": r.history[-1]["loss"],
            "final_mlm_accuracy": r.final_accuracy,
            **optimizer_comparison.step_time_ms(r),
        }
        if r.optimizer == "thor":
            row["cost_breakdown_ms_per_step"] = optimizer_comparison.thor_cost_breakdown(r)
            row["refreshes"] = len(r.refresh_log)
            row["inversions"] = sum(e["refreshed"] for e in r.refresh_log)
            row["failed_inversions"] = sum(e.get("failed", 0) for e in r.refresh_log)
        record["runs"].append(row)
        print(_line(row), flush=True)
    best = optimizer_comparison.best_runs(runs)
    record["sequential_step_time_ratio"] = optimizer_comparison.sequential_step_time_ratio(best)

    # THOR / AdamW step time, alternating step by step (as the notebook's metric), in this process
    train_data, _ = pretraining.load_data(cfg)
    rt.reset_peak_memory()
    paired = optimizer_comparison.paired_step_times(
        cfg, rt, train_data, best, steps=args.paired_steps
    )
    record["paired"] = paired
    record["peak_memory_bytes_paired"] = rt.peak_memory_bytes()
    print(
        f"alternating {paired['steps']} steps: THOR {paired['thor_ms']:.1f} ms, AdamW "
        f"{paired['adamw_ms']:.1f} ms, ratio {paired['ratio']:.3f}",
        flush=True,
    )
    path = Path(args.json or out / "thor_gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics._plain(record), indent=1) + "\n")
    print(f"→ {path}")
    return record


def markdown(record: dict[str, Any], source: str = RECORD) -> str:
    """The record as a short markdown report: one row per optimizer, THOR's cost, the ratios."""
    cfg = record["config"]
    spec = cfg["sample_spec"]
    lines = [
        f"Generated by `python bench/thor_gpu_check.py --table` from `{source}`: "
        f"{record['device_name']}, {record['precision']} autocast, torch "
        f"{record['versions'].get('torch', '?')}, transformers "
        f"{record['versions'].get('transformers', '?')}; batch {cfg['batch_size']}, sequence "
        f"{spec.get('seq_length')}, {cfg['max_steps']} steps per optimizer, THOR refresh every "
        f"{cfg['frequency']} steps, statistics every {cfg['stats_every']}.",
        "",
        "| optimizer | lr | loss, first → last step | median ms / step | mean ms / step |",
        "|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['first_loss']:.3f} → {r['last_loss']:.3f}"
            f"{'' if r['finite_loss'] else ' (not finite)'} "
            f"| {r['whole step (ms, median)']:.1f} | {r['whole step (ms, mean)']:.1f} |"
        )
    thor = next((r for r in record["runs"] if r["optimizer"] == "thor"), None)
    paired = record["paired"]
    lines += [
        "",
        f"THOR / AdamW median step time, alternating step by step ({paired['steps']} steps each): "
        f"**{paired['ratio']:.2f}** ({paired['thor_ms']:.1f} vs {paired['adamw_ms']:.1f} ms); "
        f"from the separate runs: {record['sequential_step_time_ratio']:.2f}.",
    ]
    if thor is not None:
        cost = thor["cost_breakdown_ms_per_step"]
        parts = ", ".join(
            f"{k.replace(' (ms/step)', '')} {v:.1f}"
            for k, v in cost.items()
            if k.endswith("(ms/step)") and k != "all-reduce (ms/step)"
        )
        lines.append(
            f"THOR's own work, ms per step averaged over the run (host clock): {parts}; "
            f"{thor['refreshes']} refreshes, {thor['inversions']} layer inversions, "
            f"{thor['failed_inversions']} failed."
        )
    lines.append(
        f"Seed: {record['seed_ms_per_step']:g} ms per step ({record['seed_ms_per_step_note']})."
    )
    return "\n".join(lines) + "\n"


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['optimizer']}: {row['steps']} steps, loss {row['first_loss']:.3f} → "
        f"{row['last_loss']:.3f}{'' if row['finite_loss'] else ' (NOT FINITE)'}, median "
        f"{row['whole step (ms, median)']:.1f} ms/step"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=120, help="training steps per optimizer")
    parser.add_argument("--paired-steps", type=int, default=200, help="alternating timed steps")
    parser.add_argument("--samples", type=int, default=2400, help="generated samples")
    parser.add_argument("--workdir", default="build/thor_gpu_check", help="shards, torchrun files")
    parser.add_argument(
        "--json", default=None, help="the record (default: WORKDIR/thor_gpu_check.json)"
    )
    parser.add_argument("--tiny", action="store_true", help="a toy model and language (tests)")
    parser.add_argument("--table", action="store_true", help=f"print the report of {RECORD}")
    parser.add_argument(
        "--update-readme",
        default=None,
        metavar="PATH",
        help="with --table: write it between the thor-gpu-check markers of PATH",
    )
    args = parser.parse_args(argv)
    if args.table:
        text = markdown(json.loads(paths.resolve(RECORD).read_text(encoding="utf-8")))
        if args.update_readme:
            bench.update_readme(paths.resolve(args.update_readme), text, MARKERS)
        print(text, end="")
        return 0
    record = run(args)
    return (
        0
        if all(r["finite_loss"] for r in record["runs"])
        and math.isfinite(record["paired"]["ratio"])
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
