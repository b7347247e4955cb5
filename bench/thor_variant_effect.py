"""Notebook 06's THOR grid trained both ways: ``thor_variant = "mindspore"`` (the seed's code) and
``"nbzoo"``, everything else as the preset.

    .venv/bin/python bench/thor_variant_effect.py [--preset demo|long] [--json FILE]

The two variants differ in three structural choices (nbzoo.optim.thor.VARIANTS): when THOR gathers
its factor statistics (each refresh step's own batch, or every ``stats_every`` steps into a running
average), whether a Linear's bias is folded into A, and how the tied word embedding / MLM decoder is
preconditioned. For each variant the script trains every THOR point of the preset's grid from the
same weights and batches as the notebook and reports the best point's final masked-LM accuracy with
its binomial standard error over the masked tokens evaluated. SGD and AdamW do not depend on the
variant and are not trained.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import torch

from nbzoo import catalog, optimizer_comparison, presets, pretraining
from nbzoo import device as nbdevice

STEM = "06_bert_thor"


def preset_config(preset: str) -> presets.Config:
    """The notebook's defaults merged with ``preset``, on the CPU, as ``nbzoo run`` would build it."""
    params = catalog.notebook_parameters(catalog.notebooks_dir() / f"{STEM}.ipynb")
    namespace = {k: ast.literal_eval(p["default"]) for k, p in params.items()}
    namespace["device"] = "cpu"
    return presets.resolve(STEM, preset, namespace)


def measure(preset: str, overrides: dict | None = None) -> dict:
    """Both variants' THOR grids on ``preset`` (``overrides`` change it for both: the test
    shrinks it)."""
    cfg = presets.Config({**preset_config(preset), **(overrides or {})})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = nbdevice.setup("cpu", cfg.precision, cfg.seed)
    pretraining.prepare_data(cfg)
    train_data, eval_data = pretraining.load_data(cfg)
    runs, seconds = {}, {}
    for variant in pretraining.THOR_VARIANTS:
        tick = time.perf_counter()
        runs[variant] = optimizer_comparison.thor_variant_runs(
            cfg, rt, train_data, eval_data, variant
        )
        seconds[variant] = time.perf_counter() - tick
    masked = optimizer_comparison.masked_tokens_evaluated(eval_data)
    rows = optimizer_comparison.thor_variant_table(runs, masked)
    for row in rows:
        row["grid seconds"] = seconds[row["thor_variant"]]
        row["every point"] = {r.label: r.final_accuracy for r in runs[row["thor_variant"]]}
    baseline, _ = pretraining.baseline_accuracy(eval_data.arrays())
    return {
        "preset": preset,
        "steps": cfg.max_steps,
        "eval_split": cfg.eval_split,
        "baseline_accuracy": baseline,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['preset']} preset, {result['steps']} steps, evaluation {result['eval_split']}; "
        f"most-frequent-token baseline {result['baseline_accuracy']:.4f}",
        "",
        "| thor_variant | best grid point | final MLM accuracy ± SE | every point |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        points = ", ".join(f"{k}: {v:.4f}" for k, v in r["every point"].items())
        lines.append(
            f"| {r['thor_variant']} | {r['best grid point']} | {r['final MLM accuracy']:.4f} ± "
            f"{r['standard error']:.4f} (n = {r['masked tokens evaluated']}) | {points} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=["demo", "long"])
    parser.add_argument("--json", type=Path, help="write the measurement here")
    args = parser.parse_args()
    result = measure(args.preset)
    print(markdown(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
