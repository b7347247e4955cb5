"""How fast nbzoo's fairseq reader iterates a binarized dataset, next to slicing the raw memmap.

    .venv/bin/python bench/fairseq_reader.py [--tokens 10000000] [--repeats 5] [--folder DIR]

Writes a dataset of ``--tokens`` uint16 ids (sentence lengths drawn around SST-2's, 1-64 BPE
tokens) with ``nbzoo.data.fairseq.write_dataset``, then times one pass over every item:

* raw memmap: ``np.memmap`` of the .bin, item i = ``mm[start[i]:end[i]]`` with the offsets read from
  the .idx beforehand (both as an ``np.memmap`` object and as a plain ndarray view of it, whichever
  is faster is the baseline);
* the reader: ``for x in MMapIndexedDataset(prefix)`` and ``ds[i]`` for every i.

Each pass does the same work per item: nothing but taking the slice (``touch``), or the int64
copy a training batch needs (``astype``, what fairseq's own reader does per item). The best of
``--repeats`` passes counts; the ratio is reader tokens/s over baseline tokens/s. This is a
benchmark to read, not a timed test: the machine's load moves the numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

from nbzoo.data.fairseq import MMapIndexedDataset, write_dataset


def make_dataset(prefix: Path, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(2.0, 7.0, size=tokens // 6), 1, 64).astype(np.int64)
    ends = np.cumsum(lengths)
    lengths = lengths[: np.searchsorted(ends, tokens) + 1]
    lengths[-1] -= int(lengths.sum()) - tokens
    flat = rng.integers(4, 50265, size=tokens, dtype=np.uint16)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    write_dataset(prefix, (flat[a:b] for a, b in pairwise(bounds)), vocab_size=50265)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = (args.folder or Path(tmp)) / "bench"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make_dataset(prefix, args.tokens)
        print(f"wrote {args.tokens:,} tokens in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        ds = MMapIndexedDataset(prefix)
        print(
            f"opened {ds!r} in {1000 * (time.perf_counter() - start):.1f} ms (header and index checked)"
        )

        # The baseline: offsets from the .idx computed up front, then nothing but slicing.
        idx = np.fromfile(f"{prefix}.idx", dtype=np.uint8)
        n = int(idx[18:26].view("<u8")[0])
        sizes = idx[26 : 26 + 4 * n].view("<i4")
        pointers = np.frombuffer(idx[26 + 4 * n :].tobytes(), dtype="<i8")
        starts = (pointers // 2).tolist()
        ends = (pointers // 2 + sizes).tolist()
        mm = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r")
        plain = mm.view(np.ndarray)

        def raw(array, work):
            def run():
                for a, b in zip(starts, ends, strict=True):
                    work(array[a:b])

            return run

        def reader_iter(work):
            def run():
                for x in ds:
                    work(x)

            return run

        def reader_index(work):
            def run():
                for i in range(len(ds)):
                    work(ds[i])

            return run

        def touch(x):
            return x

        def astype(x):
            return x.astype(np.int64)

        tokens = ds.num_tokens
        print(f"{'work per item':<14}{'path':<34}{'M tokens/s':>11}{'ratio':>8}")
        for name, work in (("touch", touch), ("astype int64", astype)):
            base = {
                "raw np.memmap slices": best_of(raw(mm, work), args.repeats),
                "raw ndarray-view slices": best_of(raw(plain, work), args.repeats),
            }
            best = min(base.values())
            rows = {
                **base,
                "reader: for x in ds": best_of(reader_iter(work), args.repeats),
                "reader: ds[i] for i in range(n)": best_of(reader_index(work), args.repeats),
            }
            for path, seconds in rows.items():
                print(f"{name:<14}{path:<34}{tokens / seconds / 1e6:>11.1f}{best / seconds:>8.2f}")
        print("ratio = baseline time (faster raw path) / this path's time; >= 0.8 is the target")


if __name__ == "__main__":
    main()
