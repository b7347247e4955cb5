"""How Reformer's LSH attention groups vectors, measured on a model (notebook 04).

Each LSH layer hashes a query-key vector ``v`` by a random rotation ``R`` (``d x b/2``, one per
head and hash round): its bucket is the argmax of ``[vR, -vR]``, one of ``b = num_buckets``.
What to expect of "two positions share a bucket", from first principles:

* the hash depends on the direction of ``v`` only, and the rotation is random, so the chance that
  two vectors share a bucket depends only on the angle between them -- 1 at cosine 1, 0 at
  cosine -1 (opposite vectors take opposite buckets), and 1/b for two vectors at right angles;
* two *random directions* in d dimensions are nearly at right angles (cosine about 0, spread
  1/sqrt(d)): they share a bucket 1/b of the time, and so would any two positions if the model's
  vectors pointed in random directions (upstream draws the rotation's entries from a Gaussian,
  which cuts the sphere into parts equal only on average: the share then lies a little above 1/b,
  by a term that shrinks like 1/d -- about 0.003 for 4 buckets at d = 32);
* a trained model's vectors do not: they share directions (the same token, the same role in the
  sentence), so any two of its positions share a bucket as often as their angles make likely --
  the average of the curve above over the angles between its vectors, which hashing the same
  vectors with freshly drawn rotations measures; and positions holding the same token, whose
  vectors nearly coincide, share one far more often. That is LSH doing its job: similar vectors
  meet in a chunk, and attention is computed only there.

:func:`bucket_sharing` measures all three on a model and returns :class:`BucketSharing`, with its
table, its figure and the comparisons worded by :mod:`nbzoo.verdicts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nbzoo import verdicts

# ordered pairs of positions whose angle is measured, per block: every pair up to 256 tokens, a
# sample beyond (the shares in one bucket count every pair, at any length)
MAX_PAIRS = 65_536
COSINE_GRID = np.linspace(-1.0, 1.0, 21)  # angles at which the hash's curve is measured
PAIRS_PER_COSINE = 128  # random pairs per cosine of the grid, per rotation draw
MIN_PAIRS_PER_BIN = 200  # a bin of the model's pairs is plotted only with this many


@dataclass
class LayerCapture:
    """One LSH layer's query-key vectors and buckets from one forward pass."""

    module: torch.nn.Module
    vectors: torch.Tensor  # (batch, heads, length, head size): what the layer hashed
    buckets: torch.Tensor  # (batch, heads, hash rounds, length), bucket of each round, 0..b-1


def num_buckets(module: torch.nn.Module) -> int:
    """Buckets per hash round of an LSH layer (a factorised ``[b1, b2]`` makes b1 * b2)."""
    b = module.num_buckets
    return int(b) if isinstance(b, int) else math.prod(b)


def lsh_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = [m for m in model.modules() if type(m).__name__ == "LSHSelfAttention"]
    if not layers:
        raise ValueError("the model has no LSH attention layer (config.attn_layers has no 'lsh')")
    return layers


@torch.no_grad()
def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> list[LayerCapture]:
    """Run ``model`` once (eval mode) on ``input_ids`` and keep, for every LSH layer, the vectors
    it hashed (the output of its shared query-key projection, split into heads) and the buckets
    it put them in."""
    layers = lsh_layers(model)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers))}
    hooks = []
    for i, m in enumerate(layers):
        hooks.append(
            m.query_key.register_forward_hook(lambda _m, _a, out, i=i: seen[i].update(qk=out))
        )
        hooks.append(
            m.register_forward_hook(lambda _m, _a, out, i=i: seen[i].update(b=out.buckets))
        )
    was_training = model.training
    try:
        model.eval()(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    captured = []
    for i, m in enumerate(layers):
        qk, buckets = seen[i]["qk"], seen[i]["b"]  # (B, L, H*d), (B, H, rounds, L) offset
        batch, length, _ = qk.shape
        heads, size = m.num_attention_heads, m.attention_head_size
        vectors = qk.view(batch, length, heads, size).transpose(1, 2).float().cpu()
        buckets = buckets.view(batch, heads, -1, length).cpu()
        rounds = buckets.shape[2]
        offsets = torch.arange(rounds).view(1, 1, rounds, 1) * num_buckets(m)
        captured.append(LayerCapture(m, vectors, buckets - offsets))
    return captured


def hash_with_fresh_rotations(
    module: torch.nn.Module, vectors: torch.Tensor, rounds: int, draw: int
) -> torch.Tensor:
    """``vectors`` (batch, heads, length, d) hashed by ``module``'s own hash function with the
    rotations of hash seed ``draw``: (batch, heads, rounds, length) buckets. Torch's global
    random state and the module's hash seed are left as they were."""
    kept = module.hash_seed
    try:
        with torch.random.fork_rng(devices=[]):
            module.hash_seed = draw
            buckets = module._hash_vectors(vectors, rounds, None)
    finally:
        module.hash_seed = kept
    batch, heads, _ = buckets.shape
    buckets = buckets.view(batch, heads, rounds, -1)
    return buckets - torch.arange(rounds).view(1, 1, rounds, 1) * num_buckets(module)


def pair_index(length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered pairs (i, j), i != j, of positions: all of them up to :data:`MAX_PAIRS`, else a
    uniform sample of that many."""
    if length * (length - 1) <= MAX_PAIRS:
        i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        keep = i != j
        return i[keep], j[keep]
    i = torch.randint(0, length, (MAX_PAIRS,), generator=generator)
    j = (i + torch.randint(1, length, (MAX_PAIRS,), generator=generator)) % length
    return i, j


def _share_over_blocks(name: str, shares: Sequence[float]) -> verdicts.Estimate:
    """A share measured block by block: the mean of the blocks' shares, with the standard error
    of that mean (the blocks are the independent units; pairs within a block are not); the
    blocks' shares are kept so that two shares over the same blocks compare paired."""
    values = np.asarray([s for s in shares if math.isfinite(s)], dtype=float)
    if values.size < 2:
        raise ValueError(f"{name}: a share over blocks needs at least two blocks with pairs")
    se = float(values.std(ddof=1) / math.sqrt(values.size))
    return verdicts.Estimate(
        name, float(values.mean()), "proportion", int(values.size), standard_error=se, items=values
    )


def _random_unit(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=-1)


def random_directions_share(
    module: torch.nn.Module, pairs: int = 20_000, seed: int = 0, draws: Sequence[int] = ()
) -> verdicts.Estimate:
    """How often two independent random directions share a bucket under ``module``'s hash:
    ``pairs`` independent pairs per head and hash round, hashed with the module's own rotations
    or, given ``draws``, with the fresh rotations of each of those hash seeds (pooled). A
    proportion whose expectation is 1/num_buckets when the hash cuts the sphere into equal parts;
    upstream's rotations have Gaussian entries, whose parts are equal only on average, which
    adds a term that shrinks as the head size grows (two buckets, a single cut through the
    origin, are always equal)."""
    g = torch.Generator().manual_seed(seed)
    heads, size, rounds = module.num_attention_heads, module.attention_head_size, module.num_hashes
    same = []
    for draw in draws or [None]:
        both = _random_unit((2, heads, pairs, size), g)
        if draw is None:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                buckets = module._hash_vectors(both, rounds, None).view(2, heads, rounds, pairs)
        else:
            buckets = hash_with_fresh_rotations(module, both, rounds, draw)
        same.append((buckets[0] == buckets[1]).flatten())
    hits = torch.cat(same).double()
    return verdicts.proportion("random directions", float(hits.mean()), hits.numel())


def collision_curve(
    module: torch.nn.Module, draws: Sequence[int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The hash's own curve: for each cosine of :data:`COSINE_GRID`, the share of random pairs of
    unit vectors at that cosine which ``module``'s hash puts in one bucket, over the fresh
    rotations of ``draws``."""
    g = torch.Generator().manual_seed(seed)
    heads, size, rounds = module.num_attention_heads, module.attention_head_size, module.num_hashes
    n = len(COSINE_GRID) * PAIRS_PER_COSINE
    cosines = torch.tensor(COSINE_GRID, dtype=torch.float32).repeat_interleave(PAIRS_PER_COSINE)
    share = np.zeros(len(COSINE_GRID))
    for draw in draws:
        x = _random_unit((heads, n, size), g)
        z = torch.randn((heads, n, size), generator=g)
        z = torch.nn.functional.normalize(z - (z * x).sum(-1, keepdim=True) * x, dim=-1)
        c = cosines.view(1, n, 1)
        y = c * x + torch.sqrt(torch.clamp(1 - c * c, min=0.0)) * z  # cos(x, y) = c
        buckets = hash_with_fresh_rotations(module, torch.stack([x, y]), rounds, draw)
        same = (buckets[0] == buckets[1]).float()  # (heads, rounds, n)
        share += same.view(heads, rounds, len(COSINE_GRID), -1).mean((0, 1, 3)).numpy()
    return COSINE_GRID.copy(), share / len(draws)


def _pairs_alike(keys: torch.Tensor) -> torch.Tensor:
    """Per row of ``keys`` (G, L): the ordered pairs (i, j), i != j, with equal keys, counted
    from how often each key occurs (n alike make n² - n pairs): no L x L comparison."""
    groups, length = keys.shape
    keys = keys.long() - keys.min()
    span = int(keys.max()) + 1
    combined = (torch.arange(groups).view(-1, 1) * span + keys).flatten()
    values, counts = torch.unique(combined, return_counts=True)
    squares = torch.zeros(groups, dtype=torch.float64)
    squares.index_add_(0, values // span, counts.double() ** 2)
    return squares - length


def _pair_shares(
    buckets_per_layer: Sequence[torch.Tensor], input_ids: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per block, over layers, heads and hash rounds: the share of all pairs of positions in one
    bucket, and the share of the pairs holding the same token (NaN in a block without any)."""
    batch, length = input_ids.shape
    together = torch.zeros(batch, dtype=torch.float64)
    alike = torch.zeros_like(together)
    same_token = torch.zeros_like(together)
    for buckets in buckets_per_layer:  # (B, H, rounds, L)
        heads, rounds = buckets.shape[1:3]
        kinds = int(buckets.max()) + 1
        tokens = input_ids.view(batch, 1, 1, length).expand_as(buckets)
        per_group = (batch, heads * rounds)
        pairs = _pairs_alike(buckets.reshape(-1, length)).view(per_group)
        both = _pairs_alike((tokens * kinds + buckets).reshape(-1, length)).view(per_group)
        token_pairs = _pairs_alike(tokens.reshape(-1, length)).view(per_group)
        together += pairs.mean(1) / (length * (length - 1))
        alike += both.sum(1)
        same_token += token_pairs.sum(1)
    token_share = torch.where(same_token > 0, alike / same_token.clamp(min=1), torch.nan)
    return (together / len(buckets_per_layer)).numpy(), token_share.numpy()


@dataclass
class BucketSharing:
    """What :func:`bucket_sharing` measured; ``table()``, ``plot()`` and ``sentences()`` show it."""

    num_buckets: int
    random: verdicts.Estimate  # random directions, this model's rotations
    any_pair: verdicts.Estimate  # any two positions, this model's rotations (over blocks)
    same_token: verdicts.Estimate  # positions holding the same token (over blocks)
    fresh: dict[str, np.ndarray]  # the same three under fresh rotations: one share per draw
    cosines: dict[str, np.ndarray]  # the cosines of the pairs compared (a sample)
    curve: tuple[np.ndarray, np.ndarray]  # the hash's share against cosine, fresh rotations
    binned: tuple[np.ndarray, np.ndarray]  # this model's pairs: bin centre, share (own rotations)

    @property
    def floor(self) -> verdicts.Estimate:
        """1 / num_buckets: what random directions score, exactly (no uncertainty)."""
        return verdicts.Estimate("1/num_buckets", 1.0 / self.num_buckets, "proportion", 1, 0.0)

    def table(self):
        import pandas as pd

        rows = []
        for name, estimate in (
            ("random directions", self.random),
            ("this model: any two positions", self.any_pair),
            ("this model: positions holding the same token", self.same_token),
        ):
            fresh = self.fresh[name]
            q1, median, q3 = np.percentile(fresh, [25, 50, 75])
            rows.append(
                {
                    "pairs of vectors": name,
                    "mean cosine": float(np.mean(self.cosines[name])),
                    "share in one bucket (this model's rotations)": str(estimate),
                    f"expected from their angles ({len(fresh)} fresh rotation draws)": (
                        f"{median:.4f} (IQR {q1:.4f}–{q3:.4f})"
                    ),
                }
            )
        return pd.DataFrame(rows).set_index("pairs of vectors")

    def sentences(self) -> list[str]:
        what = "share of pairs in one bucket"
        return [
            verdicts.compare(self.random, self.floor, what=what).text,
            verdicts.compare(self.any_pair, self.floor, what=what).text,
            verdicts.compare(self.same_token, self.any_pair, what=what).text,
        ]

    def summary(self) -> list[str]:
        """Three sentences for a notebook's summary, worded from this measurement."""
        model, same = (
            "this model: any two positions",
            "this model: positions holding the same token",
        )
        fresh = self.fresh[model]
        q1, median, q3 = np.percentile(fresh, [25, 50, 75])
        where = (
            "above"
            if self.any_pair.value > q3
            else "below"
            if self.any_pair.value < q1
            else "within"
        )
        on_floor, above_floor, similar = self.sentences()
        return [
            f"Two random directions share an LSH bucket {self.random.value:.3f} of the time: "
            f"{on_floor}.",
            f"Any two positions of the trained model share a bucket {self.any_pair.value:.3f} of "
            f"the time, not 1/num_buckets: {above_floor}. Its query-key vectors are not random "
            f"directions (mean cosine {np.mean(self.cosines[model]):.2f}): hashed with "
            f"{len(fresh)} fresh rotations, the same vectors share one {median:.3f} of the time "
            f"(IQR {q1:.3f}–{q3:.3f}), what their angles predict; the model's own rotations, "
            f"which it was trained with, give a share {where} that range.",
            f"Positions holding the same token (mean cosine "
            f"{np.mean(self.cosines[same]):.2f}) share a bucket {self.same_token.value:.3f} of "
            f"the time: {similar}.",
        ]

    def plot(self):
        """Left: the hash's chance of putting two vectors in one bucket against their cosine,
        and this model's pairs on it; right: the cosines the model's pairs actually have."""
        import matplotlib.pyplot as plt

        fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(10.5, 3.8), layout="constrained")
        grid, share = self.curve
        ax.plot(grid, share, "-", color="0.3", label="random pairs at that cosine")
        centres, binned = self.binned
        ax.plot(centres, binned, "o", ms=4, label="this model's pairs (its rotations)")
        ax.axhline(1 / self.num_buckets, ls="--", color="tab:red", label="1/num_buckets")
        ax.set(
            xlabel="cosine of the angle between two vectors",
            ylabel="share of pairs in one bucket",
            title="LSH puts similar vectors together",
            xlim=(-1.05, 1.05),
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=8, loc="upper left")
        bins = np.linspace(-1, 1, 41)
        for name, colour in zip(self.cosines, ("0.5", "tab:blue", "tab:orange"), strict=True):
            ax_h.hist(self.cosines[name], bins=bins, density=True, histtype="step", lw=1.6,
                      color=colour, label=name)  # fmt: skip
        ax_h.set(
            xlabel="cosine of the angle between two vectors",
            ylabel="density of pairs (log scale)",
            title="the angles the pairs actually have",
            yscale="log",
            ylim=(1e-2, None),
        )
        ax_h.legend(fontsize=8, loc="upper left")
        return fig


def bucket_sharing(
    model: torch.nn.Module, input_ids: torch.Tensor, draws: int = 20, seed: int = 0
) -> BucketSharing:
    """How often LSH puts two positions of ``input_ids`` (blocks, one row each) in one bucket,
    over the model's LSH layers, heads and hash rounds: any two positions, positions holding the
    same token, and -- the first-principles expectation -- random directions of the same size,
    each also under ``draws`` fresh rotation draws, with the hash's curve against the cosine of
    the angle between the vectors. The blocks are the units of the standard errors."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 2:
        raise ValueError(f"bucket_sharing needs at least two blocks (B, L); got {input_ids.shape}")
    captured = capture(model, input_ids)
    module = captured[0].module
    g = torch.Generator().manual_seed(seed)
    ids = input_ids.cpu()
    any_blocks, token_blocks = _pair_shares([c.buckets for c in captured], ids)
    fresh_draws = [seed + 1000 + k for k in range(draws)]
    fresh = {"random directions": [], "this model: any two positions": []}
    fresh["this model: positions holding the same token"] = []
    for draw in fresh_draws:
        rehashed = [
            hash_with_fresh_rotations(c.module, c.vectors, c.buckets.shape[2], draw)
            for c in captured
        ]
        a, t = _pair_shares(rehashed, ids)
        fresh["this model: any two positions"].append(float(a.mean()))
        fresh["this model: positions holding the same token"].append(float(np.nanmean(t)))
        fresh["random directions"].append(
            random_directions_share(module, 2_000, seed + draw, [draw]).value
        )
    cosines, binned = _cosines_and_bins(captured, ids, pair_index(ids.shape[1], g), g)
    return BucketSharing(
        num_buckets=num_buckets(module),
        random=random_directions_share(module, seed=seed),
        any_pair=_share_over_blocks("any two positions", any_blocks),
        same_token=_share_over_blocks("same-token positions", token_blocks),
        fresh={k: np.asarray(v) for k, v in fresh.items()},
        cosines=cosines,
        curve=collision_curve(module, fresh_draws[: max(1, draws // 2)], seed),
        binned=binned,
    )


def _cosines_and_bins(captured, ids, pairs, g, sample: int = 20_000):
    """The cosines of the compared pairs (a sample of each kind, for the histogram), random
    directions' for reference, and this model's share in one bucket per bin of cosine."""
    i, j = pairs
    same_token = ids[:, i] == ids[:, j]  # (B, P)
    pair_cos, all_cos, all_same, token_cos = [], [], [], []
    for c in captured:
        unit = torch.nn.functional.normalize(c.vectors, dim=-1)  # (B, H, L, d)
        cos = torch.stack([(u[:, i] * u[:, j]).sum(-1) for u in unit])  # (B, H, P), by block
        same = c.buckets[..., i] == c.buckets[..., j]  # (B, H, rounds, P)
        pair_cos.append(cos.flatten())
        all_cos.append(cos[:, :, None].expand_as(same).flatten())
        all_same.append(same.flatten())
        token_cos.append(cos[same_token[:, None].expand_as(cos)])
    cos, same = torch.cat(all_cos).numpy(), torch.cat(all_same).numpy()
    edges = np.linspace(-1, 1, 21)
    which = np.clip(np.digitize(cos, edges) - 1, 0, len(edges) - 2)
    counts = np.bincount(which, minlength=len(edges) - 1)
    hits = np.bincount(which, weights=same, minlength=len(edges) - 1)
    keep = counts >= MIN_PAIRS_PER_BIN
    centres = (edges[:-1] + edges[1:]) / 2
    size = captured[0].vectors.shape[-1]
    x, y = _random_unit((2, sample, size), g)

    def sampled(values: np.ndarray) -> np.ndarray:
        if values.size <= sample:
            return values
        return values[torch.randperm(values.size, generator=g)[:sample].numpy()]

    cosines = {
        "random directions": (x * y).sum(-1).numpy(),
        "this model: any two positions": sampled(torch.cat(pair_cos).numpy()),
        "this model: positions holding the same token": sampled(torch.cat(token_cos).numpy()),
    }
    return cosines, (centres[keep], hits[keep] / counts[keep])
