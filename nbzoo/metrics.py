"""Metrics, throughput and the results record every notebook writes.

Metric functions wrap scikit-learn / scipy; the results record is ``results/<notebook-stem>.json``.
The seeds' figures travel in the record under ``reference`` and are always labelled as the seed's.
scikit-learn and scipy are imported where a metric needs them: every notebook imports this module,
most need neither, and the two cost a kernel about 1 s of CPU to import.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nbzoo import paths, safe_write

IGNORE_INDEX = -100
# a results record's extra: each checked metric's learnt-nothing baseline (nbzoo.lesson.record)
BASELINES = "baselines"


def accuracy(predictions, labels) -> float:
    from sklearn import metrics as skm

    return float(skm.accuracy_score(np.asarray(labels), np.asarray(predictions)))


def f1(predictions, labels) -> float:
    from sklearn import metrics as skm

    return float(skm.f1_score(np.asarray(labels), np.asarray(predictions)))


def pearson(predictions, labels) -> float:
    from scipy import stats

    return float(
        stats.pearsonr(np.asarray(predictions, float), np.asarray(labels, float)).statistic
    )


def spearman(predictions, labels) -> float:
    from scipy import stats

    return float(
        stats.spearmanr(np.asarray(predictions, float), np.asarray(labels, float)).statistic
    )


def perplexity(mean_loss: float) -> float:
    """exp of a mean token-level cross-entropy (nats)."""
    return float(math.exp(mean_loss))


def masked_token_accuracy(logits_or_predictions, labels, ignore_index: int = IGNORE_INDEX) -> float:
    """Accuracy over positions whose label is not ``ignore_index`` (the masked positions)."""
    pred = np.asarray(logits_or_predictions)
    labels = np.asarray(labels)
    if pred.ndim == labels.ndim + 1:
        pred = pred.argmax(-1)
    keep = labels != ignore_index
    if not keep.any():
        raise ValueError("no labelled (masked) positions to score")
    return float((pred[keep] == labels[keep]).mean())


# --- the demos' checks of their own learning ------------------------------------------------------

# How far above "learnt nothing" a demo's metric must be: 5 standard errors of that metric on the
# evaluation set, for a model at the baseline. A model that learnt nothing gets there by chance with
# probability < 3e-7 (one-sided normal tail), so a pass says it learnt; the bar is set by the baseline
# and the size of the evaluation set, not by the value today's run happens to reach.
LEARNING_SIGMAS = 5.0


def majority_rate(labels) -> float:
    """Accuracy of always answering the most frequent label."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    return float(counts.max() / counts.sum())


def proportion_standard_error(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` items (binomial: sqrt(p(1-p)/n))."""
    return math.sqrt(p * (1.0 - p) / n)


# --- thresholds on measured proportions ------------------------------------------------------------

# How sure a check must be that a proportion is below its threshold before it fails: one false
# alarm in a thousand runs of a model that meets it exactly (and fewer for one that does better).
PROPORTION_CONFIDENCE = 0.999


def proportion_bounds(
    successes: int, n: int, confidence: float = PROPORTION_CONFIDENCE
) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) bounds of a proportion seen as ``successes`` of ``n``:
    the true share is above the first with probability ``confidence``, below the second likewise.
    Exact at every ``n``: no normal approximation."""
    from scipy.stats import beta

    if not (isinstance(n, int | np.integer) and n >= 1 and 0 <= successes <= n):
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}")
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, n - successes + 1))
    upper = 1.0 if successes == n else float(beta.ppf(1.0 - alpha, successes + 1, n - successes))
    return lower, upper


def proportion_at_least(
    metric: str,
    successes: int,
    n: int,
    threshold: float,
    confidence: float = PROPORTION_CONFIDENCE,
) -> dict[str, Any]:
    """One row of a check that a proportion measured on ``n`` items (``successes`` of them: e.g.
    int8 predictions that agree with fp32) is at least ``threshold``, judged for its ``n``.

    The check fails only when the items show, at ``confidence``, that the true proportion is
    below ``threshold``: when the one-sided exact (Clopper-Pearson) upper confidence bound of
    ``successes / n`` is below it -- equivalently when a binomial test of "proportion =
    threshold" against "less" has a p-value under ``1 - confidence``. The raw ``successes / n
    >= threshold`` is not a sound check on a small set: at 0.99 on 64 items, one item decides
    it, and a model whose true agreement is exactly 0.99 fails it in 47% of runs. Asking the
    reverse (the lower bound above the threshold) demands more than a small set can show: even
    64 of 64 gives a 99.9% lower bound of 0.898. ``shown`` says whether it does show it.

    The row: ``this run`` (successes / n), ``n``, ``wanted`` (the threshold), the bound,
    ``met`` (no evidence below the threshold: what a notebook asserts) and ``shown``."""
    if not 0 < threshold < 1:
        raise ValueError(f"{metric}: the threshold must lie in (0, 1); got {threshold}")
    try:
        lower, upper = proportion_bounds(successes, n, confidence)
    except ValueError as exc:
        raise ValueError(f"{metric}: {exc}") from None
    successes, n = int(successes), int(n)
    level = f"{100 * confidence:g}%"
    return {
        "metric": metric,
        "this run": successes / n,
        "n": n,
        "wanted": f">= {threshold:g}",
        f"upper bound ({level})": upper,
        "met": bool(upper >= threshold),
        f"lower bound ({level})": lower,
        "shown": bool(lower >= threshold),
    }


def samples_per_second(samples: int, seconds: float) -> float:
    return float(samples / seconds) if seconds > 0 else float("nan")


# Dense bf16 peak TFLOP/s by device name fragment (vendor datasheets), for MFU.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 tensor cores; V100 has no bf16
    "Ascend910B": 313.0,
    "Ascend910": 256.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.replace(" ", "").lower():
            return value
    return None


def mfu(flops_per_step: float, step_seconds: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak."""
    peak = peak_tflops(device_name)
    if peak is None or step_seconds <= 0:
        return None
    return float(flops_per_step / step_seconds / (peak * 1e12))


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "torch_npu", "onnxruntime", "nbzoo"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(
    stem: str,
    *,
    preset: str,
    rt,
    metrics: Mapping[str, float],
    reference: Mapping[str, Any],
    samples_per_second: float | None = None,
    extra: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``results/<stem>.json`` atomically and return its path.

    ``reference`` is the seed's record: ``{"source": "seeds/002_albert.md", "setting": "...",
    "metrics": {...}, "samples_per_second": ...}``.
    """
    bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float | np.number)}
    if bad:
        raise TypeError(f"metrics must be a flat dict of numbers; not numbers: {bad}")
    from nbzoo.data.download import fetched
    from nbzoo.device import accelerator_name, precision_record

    record = {
        "notebook": stem,
        "preset": preset,
        "device": rt.kind,
        "device_name": accelerator_name(rt),
        "precision": rt.precision,
        "precision_path": precision_record(rt),
        "downloaded": fetched(),  # by nbzoo.data.download in this process
        "devices": rt.world_size,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "reference": dict(reference),
        "samples_per_second": None if samples_per_second is None else float(samples_per_second),
        "versions": _versions(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        record["extra"] = dict(extra)
    path = paths.results_dir(output_dir) / f"{stem}.json"
    text = json.dumps(_plain(record), indent=2, allow_nan=True) + "\n"
    safe_write.write_output_file(
        path, text.encode("utf-8"), "nbzoo.metrics.write_results", recognise=results_record(stem)
    )
    return path


def results_record(stem: str):
    """The test that a file is a results record :func:`write_results` wrote for ``stem`` (the
    one file of a results folder it may replace without a marker listing it)."""

    def recognise(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        fields = {"notebook", "preset", "metrics", "versions", "finished_at"}
        return isinstance(data, dict) and data.get("notebook") == stem and fields <= set(data)

    return recognise


def read_json_records(
    folder: Path, keys: Collection[str], required: Collection[str] = ()
) -> list[dict[str, Any]]:
    """The ``*.json`` files of ``folder`` (name order) that hold an object with all of ``keys``;
    other JSON is passed over. A file that cannot be read as JSON, or a record that lacks one of
    ``required``, is passed over too, with one line on stderr naming it and what is wrong: one
    broken file must not hide the others' results (``nbzoo results``, ``nbzoo bench``)."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            _skipped(path, f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
            continue
        except UnicodeDecodeError as exc:
            _skipped(path, f"not UTF-8 text (byte {exc.start})")
            continue
        except OSError as exc:
            _skipped(path, f"unreadable ({exc.strerror or exc})")
            continue
        if isinstance(record, dict) and all(k in record for k in keys):
            if missing := [k for k in required if k not in record]:
                _skipped(path, f"a record without {', '.join(missing)}")
                continue
            records.append(record)
    return records


def in_order(records: list[dict[str, Any]], key: str, order: Sequence[str]) -> list[dict[str, Any]]:
    """``records`` sorted by where their ``key`` stands in ``order``; the others after, as they came."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(records, key=lambda r: rank.get(r[key], len(rank)))


def _skipped(path: Path, why: str) -> None:
    print(f"nbzoo: skipped {path}: {why}", file=sys.stderr, flush=True)


def read_results(folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The results records of ``folder``; one without a field the results table shows is named
    on stderr and passed over."""
    return read_json_records(
        paths.results_dir(folder), ("notebook", "metrics"), ("preset", "device", "precision")
    )
