"""THOR (Chen et al., AAAI 2021; MindSpore ``nn.thor``) as a ``torch.optim.Optimizer``.

THOR is K-FAC with the choices that made it fast on Ascend. For a layer ``y = W a`` the Fisher block of
``W`` is approximated by a Kronecker product of two small matrices, ``A = E[a aᵀ]`` over the layer's
inputs and ``G = E[g gᵀ]`` over the gradients of its outputs, and the update is the damped natural
gradient ``(G + √λ I)⁻¹ ∇W (A + √λ I)⁻¹``. What we take from MindSpore (``nn/optim/thor.py``,
``nn/layer/thor_layer.py`` and the BERT model-zoo config), and what we add:

* Layers. Every ``nn.Linear``: its bias first-order as MindSpore's, or (``fold_bias``) folded into
  ``A`` as a constant input 1, as the paper's formulation has it. Every ``nn.Embedding`` the way
  ``EmbeddingThor`` does it: its input is one-hot, so ``A`` is diagonal, the expected count of each
  token per sequence. MindSpore converts every Embedding, BERT's position table included, and gives
  LayerNorm parameters a diagonal rule, ``g / (g²/b + √λ)``; both are our defaults, and
  ``first_order=("position_embeddings",)`` / ``layernorm="first_order"`` leave them to the plain
  gradient instead. Any other parameter takes the first-order update, explicitly;
  :meth:`THOR.layer_table` lists which parameter gets which rule.
* A weight shared by two layers -- BERT's word embedding, reused (tied) by the MLM decoder.
  MindSpore (``tied="embedding"``, the default) preconditions the summed gradient with the
  embedding's factors alone, which ignores the decoder's curvature. With ``tied="kronecker_sum"``
  its Fisher block is approximated by the *sum* of the two layers' Kronecker products,
  ``F = P₁⊗Q₁ + P₂⊗Q₂`` (P: the vocabulary side, Q: the hidden side; a folded decoder bias becomes
  one more hidden column, which the embedding never touches), and we apply the exact damped
  inverse of that sum. Inverting a sum of two Kronecker products is cheap through a generalized
  eigen-decomposition per side (``XᵀP₁X = I, XᵀP₂X = S``; ``YᵀQ₁Y = I, YᵀQ₂Y = T``):
  ``F⁻¹ vec(R) = vec(X [(Xᵀ R Y) / (1 + s tᵀ)] Yᵀ)``.
* Scaling as MindSpore: ``A = Σ a aᵀ / N`` over the N rows (tokens) of a step, ``G = b² Σ g gᵀ / N`` with
  b the number of sequences (undoing the mean over the batch in the loss), damping ``√λ`` added to
  each factor.
* Statistics: MindSpore's (``statistics="refresh"``, the default) are those of each refresh step's
  own batch; ``"running"`` gathers them every ``stats_every`` steps into a running average
  (``stat_decay``). The damped inverses are recomputed every ``frequency`` optimizer steps
  (MindSpore: 100) and reused in between. :data:`VARIANTS` names the two sets of choices.
* Factors split into diagonal blocks of ``block_size`` (MindSpore: 128): only the block-diagonal
  part is ever gathered, stored or inverted, so a 30522-row decoder factor costs 239 blocks of
  128², not 30522².
* The paper's trace rule: at a refresh, a layer's inverse is recomputed only if the trace of its
  damped Fisher block moved by more than ``trace_threshold`` (relative) since its last inversion.
* Polynomial learning-rate and damping schedules (MindSpore's BERT: lr 0.006464 → 1e-6 power 2,
  damping 0.007035 → 1e-6 power 4, over 30000 steps), momentum (``v = μv + d; w -= lr·v``), weight
  decay added to the preconditioned gradient (not LayerNorm, not biases) and clipping of each
  tensor's update to norm ``clip_norm`` (MindSpore's ``enable_clip_grad``: ClipByNorm 1.0 per tensor).
* Factors are gathered in fp32 (fp64 for fp64 parameters) whatever autocast computes in. Under
  DDP the running averages are averaged over ranks before every refresh, so every rank inverts the
  same matrices and applies the same update (the average of per-rank averages is the running
  average of the rank-averaged statistics, since the running average is linear).
* ``precondition=False``: no hooks, no factors -- the same momentum SGD with the same schedules,
  weight decay and clipping. That is THOR's first-order counterpart.
* Memory. Between steps THOR holds the momentum, the running factors and their damped inverses,
  each once, as fp32 blocks (MindSpore's GPU THOR keeps the same two per layer in fp32: the factors
  in the layer, ``matrix_a`` / ``matrix_g``, the inverses in the optimizer). A step's sums exist
  only while it gathers statistics, and the update is applied a batch of layers at a time, so the
  preconditioned directions never make a second copy of the gradients.

The cost of each part (statistics in the hooks, all-reduce, inversions, preconditioning) is timed
in :attr:`THOR.timings` (host wall-clock; exact on CPU).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["THOR", "PolySchedule", "MINDSPORE_BERT", "VARIANTS"]


@dataclass(frozen=True)
class PolySchedule:
    """``(start - end) · (1 - step / total_steps) ** power + end`` (MindSpore's ``get_poly_lr``
    without warm-up); after ``total_steps`` it stays at ``end``."""

    start: float
    end: float
    power: float
    total_steps: int

    def __call__(self, step: int) -> float:
        frac = min(step, self.total_steps) / self.total_steps
        return (self.start - self.end) * (1.0 - frac) ** self.power + self.end


# MindSpore model zoo, official/nlp/Bert pretrain config, section Thor.
MINDSPORE_BERT = {
    "lr": PolySchedule(0.006464, 1e-6, 2.0, 30000),
    "damping": PolySchedule(0.007035, 1e-6, 4.0, 30000),
    "momentum": 0.9,
    "weight_decay": 1e-5,
    "frequency": 100,
    "clip_norm": 1.0,
}


# The two sets of THOR's structural choices (the ``thor_variant`` of notebook 06):
# - "mindspore", MindSpore's bert_thor (``nn/optim/thor.py``, ``nn/layer/thor_layer.py``): A and G
#   are the statistics of each refresh step's own batch (``DenseThor`` assigns ``x^T x / N`` when
#   its ``thor`` flag is on, at every ``frequency``-th step; no average over steps), biases take
#   the plain gradient (``BiasAdd`` after the THOR matmul), and BERT's tied word embedding is
#   preconditioned with the embedding's factors alone (the MLM decoder is a plain matmul with the
#   embedding table, not a THOR layer);
# - "nbzoo": statistics gathered every ``stats_every`` steps into a running average
#   (``stat_decay``), biases folded into A as a constant input 1 (the paper's formulation), and
#   the tied weight's Fisher block as the sum of both layers' Kronecker products.
VARIANTS = {
    "mindspore": {"statistics": "refresh", "fold_bias": False, "tied": "embedding"},
    "nbzoo": {"statistics": "running", "fold_bias": True, "tied": "kronecker_sum"},
}
STATISTICS = ("refresh", "running")
TIED = ("embedding", "kronecker_sum")

# At most this many layers per batched preconditioning product: the stacked gradients and their
# products are temporary copies (BERT-Large's 98 layers of 1024 × 1025 would be 400 MB each).
STACK_GROUPS = 16


def _as_schedule(value: float | Callable[[int], float]) -> Callable[[int], float]:
    return value if callable(value) else (lambda step, v=float(value): v)


class _Factor:
    """A symmetric PSD factor kept as diagonal blocks (``blocks``: nb × b × b, zero-padded to
    nb·b) or, for an embedding's one-hot input, as a diagonal (``diag``: d)."""

    def __init__(self, dim: int, block: int, diagonal: bool, dtype, device):
        self.dim, self.diagonal = dim, diagonal
        self.b = dim if (diagonal or dim <= block) else block
        self.nb = 1 if diagonal else math.ceil(dim / self.b)
        shape = (dim,) if diagonal else (self.nb, self.b, self.b)
        self.value = torch.zeros(shape, dtype=dtype, device=device)  # running average
        # this step's accumulation: held only while a step gathers statistics, None in between
        self.sum: torch.Tensor | None = None
        self.initialized = False

    def add(self, x: torch.Tensor) -> None:
        """Add ``x`` (this factor's shape) to the step's accumulation."""
        if self.sum is None:
            self.sum = torch.zeros_like(self.value)
        self.sum += x

    def accumulate_rows(self, x: torch.Tensor) -> None:
        """Add Σ xᵢ xᵢᵀ over the rows of ``x`` (N × dim), block-diagonal part only."""
        pad = self.nb * self.b - self.dim
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        xb = x.reshape(x.shape[0], self.nb, self.b).transpose(0, 1)  # nb × N × b
        self.add(torch.bmm(xb.transpose(1, 2), xb))

    def damped_blocks(self, damping: float, like: _Factor | None = None) -> torch.Tensor:
        """Blocks of ``value + damping·I`` (nb × b × b); a diagonal factor is cut into the blocks of
        ``like`` when it is paired with a blocked one."""
        if self.diagonal:
            v = self.value + damping
            b, nb = (like.b, like.nb) if like is not None else (self.dim, 1)
            pad = nb * b - self.dim
            v = torch.nn.functional.pad(v, (0, pad), value=1.0)
            return torch.diag_embed(v.reshape(nb, b))
        eye = torch.eye(self.b, dtype=self.value.dtype, device=self.value.device)
        blocks = self.value + damping * eye
        pad = self.nb * self.b - self.dim
        if pad:  # padded coordinates: identity, never mixed with real ones
            blocks[-1, self.b - pad :, self.b - pad :] = eye[:pad, :pad]
        return blocks

    def damped_trace(self, damping: float) -> torch.Tensor:
        trace = self.value.sum() if self.diagonal else self.value.diagonal(0, 1, 2).sum()
        return trace + damping * self.dim


def _apply_left(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ m, for blocks nb × b × b and m of shape dim × k; or, with a leading
    stack dimension on both (K × nb × b × b and K × dim × k), one such product per layer."""
    *lead, nb, b, _ = blocks.shape
    dim = m.shape[-2]
    if nb == 1 and b == dim:  # one block: a plain product (the common case below 128)
        return blocks[..., 0, :, :] @ m
    pad = nb * b - dim
    if pad:
        m = torch.nn.functional.pad(m, (0, 0, 0, pad))
    out = (blocks @ m.reshape(*lead, nb, b, -1)).reshape(*lead, nb * b, -1)
    return out[..., :dim, :]


def _apply_right(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """m @ blockdiag(blocks), for m of shape k × dim (or a stack of both, as in _apply_left)."""
    return _apply_left(blocks.transpose(-1, -2), m.transpose(-1, -2)).transpose(-1, -2)


def _block_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of SPD blocks through Cholesky (as MindSpore's CholeskyTrsm)."""
    return torch.cholesky_inverse(torch.linalg.cholesky(blocks))


def _generalized_eig(p1: torch.Tensor, p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: X with Xᵀ p1 X = I and Xᵀ p2 X = diag(s)."""
    lower = torch.linalg.cholesky(p1)
    li = torch.linalg.solve_triangular(
        lower, torch.eye(lower.shape[-1], dtype=p1.dtype, device=p1.device), upper=False
    )
    m = li @ p2 @ li.transpose(1, 2)
    s, u = torch.linalg.eigh((m + m.transpose(1, 2)) / 2)
    return li.transpose(1, 2) @ u, s


@dataclass
class _Use:
    """One module that uses a group's weight, and the two factors it contributes."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "embedding"
    row: _Factor  # output side for a Linear (G), token side for an Embedding (A, diagonal)
    col: _Factor  # input side for a Linear (A), hidden side for an Embedding (G)
    has_bias_col: bool  # the group folds a bias: this use's column space has one more coordinate
    rows: int = 0  # N (tokens) accumulated this step
    seqs: int = 0  # b (sequences) accumulated this step
    calls: int = 0  # forwards accumulated this step: its micro-batches (grad_accum)


class _Group:
    """A weight (and the bias folded into it) with the modules that use it."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, uses: list[_Use]):
        self.weight, self.bias, self.uses = weight, bias, uses
        self.inverse: dict[str, torch.Tensor] = {}  # single use: row_inv, col_inv; pair: x, s, y, t
        self.trace: float | None = None  # damped trace at the last inversion
        self.refreshes = 0

    @property
    def name(self) -> str:
        return " + ".join(u.name for u in self.uses)

    def gradient(self) -> torch.Tensor:
        """[∇W | ∇b]: rows on the row factor's side, columns on the column factor's side (a Linear's
        weight is out × in, an Embedding's vocab × hidden: both already in that orientation)."""
        g = self.weight.grad
        if self.bias is not None:
            g = torch.cat([g, self.bias_gradient()[:, None]], dim=1)
        return g

    def bias_gradient(self) -> torch.Tensor:
        """The bias's gradient; zeros where the bias took no part in this step's loss."""
        return self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)

    def split(self, d: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        if self.bias is None:
            return {self.weight: d}
        return {self.weight: d[:, :-1], self.bias: d[:, -1]}


class THOR(torch.optim.Optimizer):
    """THOR for the Linear and Embedding layers of ``model``; first-order for everything else.

    Args:
        model: the network (the optimizer registers hooks on its layers; call :meth:`remove_hooks`
            to detach them).
        lr, damping: a number or a schedule ``step -> value`` (e.g. :class:`PolySchedule`).
        momentum, weight_decay: as MindSpore's ApplyMomentum and decay filter (no decay for
            LayerNorm parameters and biases).
        frequency: optimizer steps (``step()`` calls) between refreshes of the damped inverses
            (refresh at steps 0, f, 2f, ...). With gradient accumulation the statistics of a
            gathering step are summed over all its micro-batches (every forward / backward before
            its ``step()``).
        statistics: ``"refresh"`` (MindSpore) -- A and G are the statistics of each refresh
            step's own batch; ``"running"`` -- gathered every ``stats_every`` steps into a running
            average with decay ``stat_decay``.
        stats_every: (``"running"``) steps between gatherings; must divide ``frequency``.
        stat_decay: (``"running"``) running-average decay of the factors.
        fold_bias: fold each Linear's bias into A as a constant input 1 (the paper); False
            (MindSpore): biases take the first-order update.
        tied: a weight shared by an Embedding and a Linear (BERT's word embedding and MLM
            decoder): ``"embedding"`` (MindSpore) -- the summed gradient preconditioned with the
            embedding's factors alone; ``"kronecker_sum"`` -- the exact damped inverse of the sum
            of both layers' Kronecker products.
        block_size: factors are split into diagonal blocks of this size.
        trace_threshold: the paper's rule -- a layer's inverse is recomputed at a refresh only if
            its damped Fisher trace changed by more than this fraction since its last inversion.
            0 (default) refreshes every layer at every refresh, as MindSpore's released THOR does.
        clip_norm: each tensor's update direction is clipped to this norm (None: no clipping).
        precondition: False gives the same optimizer without second-order information.
        first_order: module-name fragments of Linear / Embedding layers left first-order
            (MindSpore converts every Dense and Embedding, position embeddings included: default
            none; ``("position_embeddings",)`` leaves BERT's position table first-order).
        layernorm: ``"diagonal"`` -- MindSpore's rule for LayerNorm parameters,
            ``g / (g²/b + √λ)`` with b the sequences per step (``ThorGpu._process_layernorm``);
            ``"first_order"`` -- the plain gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | Callable[[int], float] = MINDSPORE_BERT["lr"],
        damping: float | Callable[[int], float] = MINDSPORE_BERT["damping"],
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        frequency: int = 100,
        stats_every: int = 10,
        stat_decay: float = 0.9,
        block_size: int = 128,
        trace_threshold: float = 0.0,
        clip_norm: float | None = 1.0,
        precondition: bool = True,
        first_order: Iterable[str] = (),
        layernorm: str = "diagonal",
        statistics: str = "refresh",
        fold_bias: bool = False,
        tied: str = "embedding",
    ):
        if statistics not in STATISTICS:
            raise ValueError(
                f"statistics must be one of {', '.join(STATISTICS)}; got {statistics!r}"
            )
        if tied not in TIED:
            raise ValueError(f"tied must be one of {', '.join(TIED)}; got {tied!r}")
        if frequency < 1:
            raise ValueError(f"frequency must be ≥ 1; got {frequency}")
        if statistics == "running":
            if stats_every < 1 or frequency % stats_every:
                raise ValueError(
                    f"stats_every ({stats_every}) must be ≥ 1 and divide frequency ({frequency}), "
                    "so that every refresh sees fresh statistics"
                )
            if not 0.0 <= stat_decay < 1.0:
                raise ValueError(f"stat_decay must be in [0, 1); got {stat_decay}")
        else:  # each refresh step's own statistics: gathered at refreshes, nothing averaged
            stats_every, stat_decay = frequency, 0.0
        self.statistics, self.fold_bias, self.tied = statistics, fold_bias, tied
        params, seen = [], set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        super().__init__(params, {"lr": 0.0, "damping": 0.0})
        self.lr_schedule, self.damping_schedule = _as_schedule(lr), _as_schedule(damping)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.frequency, self.stats_every, self.stat_decay = frequency, stats_every, stat_decay
        self.block_size, self.trace_threshold, self.clip_norm = (
            block_size,
            trace_threshold,
            clip_norm,
        )
        self.precondition = precondition
        self.first_order = tuple(first_order)
        if layernorm not in ("diagonal", "first_order"):
            raise ValueError(f"layernorm must be 'diagonal' or 'first_order'; got {layernorm!r}")
        self.layernorm = layernorm
        self._batch = 1  # sequences per step, seen by the hooks (for the LayerNorm rule)
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.steps = 0
        self.timings = {"statistics": 0.0, "all-reduce": 0.0, "inversion": 0.0, "precondition": 0.0}
        self.refresh_log: list[dict[str, int]] = []
        self._warned: set[str] = set()  # layers whose inversion failed, warned about once
        self._stacked: list[tuple[list[_Group], torch.Tensor, torch.Tensor]] | None = None
        self._names: dict[nn.Parameter, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(p, n)  # a shared weight is named after its first use
        self._layernorm = {
            p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        }
        self._no_decay = self._layernorm | {
            p for n, p in model.named_parameters() if n.endswith("bias")
        }
        self._uses_of: dict[int, int] = {}  # layers using each weight (2: a tied weight)
        for m in {id(m): m for m in model.modules()}.values():
            if isinstance(m, nn.Linear | nn.Embedding):
                self._uses_of[id(m.weight)] = self._uses_of.get(id(m.weight), 0) + 1
        self.groups: list[_Group] = self._build_groups(model) if precondition else []
        self._hooks = [
            u.module.register_forward_hook(self._forward_hook(u))
            for g in self.groups
            for u in g.uses
        ]
        self._scale: float | None = None

    # --- structure ---------------------------------------------------------------------------

    def _build_groups(self, model: nn.Module) -> list[_Group]:
        by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            if isinstance(m, nn.Linear | nn.Embedding) and m.weight.requires_grad:
                if any(f in name for f in self.first_order):
                    continue
                by_weight.setdefault(id(m.weight), []).append((name, m))
        groups = []
        for modules in by_weight.values():
            # the same module reachable under two names is one use
            unique = list({id(m): (n, m) for n, m in modules}.values())
            if len(unique) > 2:
                raise ValueError(
                    f"weight shared by {len(unique)} layers ({', '.join(n for n, _ in unique)}): "
                    "THOR handles a weight used by one or two layers"
                )
            if len(unique) == 2 and self.tied == "embedding":
                # MindSpore: the embedding's factors precondition the summed gradient; the
                # other layer (the decoder) gathers nothing, its bias is first-order
                embeddings = [(n, m) for n, m in unique if isinstance(m, nn.Embedding)]
                unique = embeddings[:1] or unique[:1]
            biases = [m.bias for _, m in unique if isinstance(m, nn.Linear) and m.bias is not None]
            foldable = self.fold_bias and len(biases) == 1 and biases[0].requires_grad
            bias = biases[0] if foldable else None
            weight = unique[0][1].weight
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            uses = []
            for name, m in unique:
                if isinstance(m, nn.Linear):
                    rows, cols = m.out_features, m.in_features
                    row = _Factor(rows, self.block_size, False, dtype, weight.device)
                    col = _Factor(
                        cols + int(bias is not None), self.block_size, False, dtype, weight.device
                    )
                    uses.append(_Use(name, m, "linear", row, col, bias is not None))
                else:
                    if m.max_norm is not None:
                        raise ValueError(f"{name}: embeddings with max_norm are not supported")
                    rows, cols = m.num_embeddings, m.embedding_dim
                    row = _Factor(rows, self.block_size, True, dtype, weight.device)
                    col = _Factor(
                        cols + int(bias is not None), self.block_size, False, dtype, weight.device
                    )
                    uses.append(_Use(name, m, "embedding", row, col, bias is not None))
            groups.append(_Group(weight, bias, uses))
        return groups

    def layer_table(self) -> list[dict[str, str]]:
        """Each parameter and how THOR updates it."""
        how: dict[nn.Parameter, str] = {}
        for g in self.groups:
            kinds = " + ".join(f"{u.kind} {u.name}" for u in g.uses)
            shape = "; ".join(
                f"{u.kind}: {'diag ' if u.row.diagonal else ''}{u.row.dim}×{u.row.dim}"
                f" ⊗ {u.col.dim}×{u.col.dim} ({u.row.nb}+{u.col.nb} blocks)"
                for u in g.uses
            )
            tag = "THOR"
            if len(g.uses) == 2:
                tag = "THOR, shared weight (sum of 2 Kronecker products)"
            elif self._uses_of.get(id(g.weight), 1) > 1 and g.uses[0].kind == "embedding":
                tag = "THOR, shared weight (the embedding's factors alone, as MindSpore)"
            how[g.weight] = f"{tag}: {kinds} | {shape}"
            if g.bias is not None:
                how[g.bias] = f"{tag}: folded into {self._names[g.weight]} as a constant input"
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                name = self._names[p]
                if p in how:
                    treatment = how[p]
                elif not self.precondition:
                    treatment = "first-order (precondition=False)"
                elif p in self._layernorm and self.layernorm == "diagonal":
                    treatment = "LayerNorm: diagonal Fisher g / (g²/b + √λ) (MindSpore)"
                else:
                    treatment = "first-order (not a Linear/Embedding layer THOR handles)"
                rows.append(
                    {
                        "parameter": name,
                        "shape": "×".join(map(str, p.shape)),
                        "update": treatment,
                        "weight decay": "no" if p in self._no_decay else "yes",
                    }
                )
        return rows

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def attach_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Under fp16 loss scaling the output gradients the hooks see are scaled; with the scaler
        attached, G is gathered from unscaled gradients."""
        self.grad_scaler = scaler

    # --- statistics ----------------------------------------------------------------------------

    @property
    def collecting(self) -> bool:
        """Whether this optimizer step gathers statistics (every forward / backward before its
        ``step()``, all micro-batches of a gradient accumulation included)."""
        return self.precondition and self.steps % self.stats_every == 0

    def _forward_hook(self, use: _Use):
        def hook(module, args, output):
            if not (self.collecting and module.training and torch.is_grad_enabled()):
                return
            tick = time.perf_counter()
            x = args[0]
            use.seqs += x.shape[0] if x.dim() > 1 else 1
            use.calls += 1
            if use.kind == "linear":
                a = x.detach().reshape(-1, x.shape[-1]).to(use.col.value.dtype)
                if use.has_bias_col:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                use.col.accumulate_rows(a)
                use.rows += a.shape[0]
                keep = None
            else:
                # rows of padding_idx get no gradient from the lookup: they are not samples of it
                ids = x.detach().reshape(-1)
                pad = module.padding_idx
                keep = None if pad is None else ids != pad
                kept = ids if keep is None else ids[keep]
                use.row.add(torch.bincount(kept, minlength=use.row.dim).to(use.row.value.dtype))
                use.rows += kept.numel()
            if output.requires_grad:
                output.register_hook(self._grad_hook(use, keep))
            self.timings["statistics"] += time.perf_counter() - tick

        return hook

    def _grad_hook(self, use: _Use, keep: torch.Tensor | None = None):
        def hook(grad):
            tick = time.perf_counter()
            g = grad.detach().reshape(-1, grad.shape[-1]).to(use.col.value.dtype)
            if keep is not None:
                g = g[keep]
            if self.grad_scaler is not None and self.grad_scaler.is_enabled():
                if self._scale is None:
                    self._scale = float(self.grad_scaler.get_scale())
                g = g / self._scale
            if use.kind == "linear":
                use.row.accumulate_rows(g)
            else:
                if use.has_bias_col:
                    g = torch.nn.functional.pad(g, (0, 1))
                use.col.accumulate_rows(g)
            self.timings["statistics"] += time.perf_counter() - tick

        return hook

    def _finish_statistics(self) -> None:
        """Turn this step's sums into factors, fold them into the running averages and let the
        sums go (they are needed again only at the next gathering step)."""
        tick = time.perf_counter()
        for g in self.groups:
            for u in g.uses:
                if u.rows == 0:
                    continue
                # LayerNorm's rule divides by the per-device batch (MindSpore's batch_size): the
                # sequences of one micro-batch, so that grad_accum k on one device and k devices
                # take the same step
                self._batch = max(1, round(u.seqs / u.calls))
                # b² / N: per-sequence gradients, averaged over rows. With grad_accum the step's
                # loss is the mean over the sequences of all its micro-batches (each micro-batch
                # weighted by its share), so b counts them all.
                scale_g = u.seqs**2 / u.rows
                if u.kind == "linear":
                    scales = {"row": ("mul", scale_g), "col": ("div", u.rows)}
                else:
                    scales = {"row": ("div", u.seqs), "col": ("mul", scale_g)}
                for side, (op, by) in scales.items():
                    f = getattr(u, side)
                    value = f.sum if f.sum is not None else torch.zeros_like(f.value)
                    value = value.mul_(by) if op == "mul" else value.div_(by)  # the sum, scaled
                    if not torch.isfinite(value).all():  # an overflowed fp16 step: drop it
                        continue
                    if f.initialized:
                        f.value.mul_(self.stat_decay).add_(value, alpha=1 - self.stat_decay)
                    else:
                        f.value.copy_(value)
                        f.initialized = True
                u.row.sum = u.col.sum = None
                u.rows = u.seqs = u.calls = 0
        self._scale = None
        self.timings["statistics"] += time.perf_counter() - tick

    def _all_reduce_factors(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        tick = time.perf_counter()
        factors = [f for g in self.groups for u in g.uses for f in (u.row, u.col)]
        flat = torch.cat([f.value.reshape(-1) for f in factors])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for f in factors:
            n = f.value.numel()
            f.value.copy_(flat[offset : offset + n].view_as(f.value))
            offset += n
        self.timings["all-reduce"] += time.perf_counter() - tick

    # --- inversion -------------------------------------------------------------------------------

    def _refresh(self, damping: float) -> None:
        self._all_reduce_factors()
        tick = time.perf_counter()
        root = math.sqrt(damping)
        refreshed = skipped = failed = 0
        for g in self.groups:
            if not all(f.initialized for u in g.uses for f in (u.row, u.col)):
                continue
            trace = float(sum(u.row.damped_trace(root) * u.col.damped_trace(root) for u in g.uses))
            if g.inverse and g.trace is not None:
                if abs(trace - g.trace) <= self.trace_threshold * abs(g.trace):
                    skipped += 1
                    continue
            try:
                inverse = self._invert(g, root)
            except torch.linalg.LinAlgError as exc:
                # A run going astray (too high a learning rate in a grid) grows activations whose
                # factors, in fp32, no longer show the damping: the damped blocks are not
                # numerically positive definite. Keep the last good inverse (none yet: the layer
                # stays first-order) and let the run go on -- its accuracy shows what happened,
                # the log counts every failure, and each layer warns once.
                failed += 1
                if g.name not in self._warned:
                    self._warned.add(g.name)
                    warnings.warn(
                        f"THOR step {self.steps}: inverting {g.name} failed ({exc}); keeping its "
                        "previous inverse (later failures of this layer are only counted in "
                        "refresh_log)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            g.inverse = inverse
            g.trace = trace
            g.refreshes += 1
            refreshed += 1
        self._stacked = None  # restacked at the next preconditioning
        self.refresh_log.append(
            {"step": self.steps, "refreshed": refreshed, "skipped": skipped, "failed": failed}
        )
        self.timings["inversion"] += time.perf_counter() - tick

    @staticmethod
    def _invert(g: _Group, root: float) -> dict[str, torch.Tensor]:
        """The damped inverse of one group's Fisher block (raises LinAlgError when a damped block
        is not positive definite, or not finite)."""
        if len(g.uses) == 1:
            u = g.uses[0]
            col = _block_inverse(u.col.damped_blocks(root))
            if u.row.diagonal:
                row = 1.0 / (u.row.value + root)
            else:
                row = _block_inverse(u.row.damped_blocks(root))
            inverse = {"row": row, "col": col}
        else:
            u1, u2 = g.uses
            like = u2.row if u1.row.diagonal else u1.row
            x, s = _generalized_eig(
                u1.row.damped_blocks(root, like), u2.row.damped_blocks(root, like)
            )
            y, t = _generalized_eig(u1.col.damped_blocks(root), u2.col.damped_blocks(root))
            inverse = {"x": x, "s": s, "y": y, "t": t}
        if not all(torch.isfinite(v).all() for v in inverse.values()):
            raise torch.linalg.LinAlgError("the inverse is not finite")
        return inverse

    def _stacks(self) -> list[tuple[list[_Group], torch.Tensor, torch.Tensor]]:
        """Groups that share one shape (BERT's q, k, v and output projections of every layer,
        ...), :data:`STACK_GROUPS` at a time, with their block inverses stacked: (groups, row
        stack, column stack). Each group's inverse then becomes a view into its stack, so nothing
        is held twice. Rebuilt after each refresh or restore."""
        if self._stacked is None:
            by_shape: dict[tuple, list[_Group]] = {}
            for g in self.groups:
                inv = g.inverse
                if "row" in inv and inv["row"].dim() == 3 and inv["col"].dim() == 3:
                    key = (
                        tuple(inv["row"].shape),
                        tuple(inv["col"].shape),
                        tuple(g.weight.shape),
                        g.bias is not None,
                        inv["row"].dtype,
                        inv["row"].device,
                    )
                    by_shape.setdefault(key, []).append(g)
            self._stacked = []
            chunks = (
                same[i : i + STACK_GROUPS]
                for same in by_shape.values()
                for i in range(0, len(same), STACK_GROUPS)
            )
            for groups in chunks:
                if len(groups) < 2:
                    continue
                rows = torch.stack([g.inverse["row"] for g in groups])
                cols = torch.stack([g.inverse["col"] for g in groups])
                for i, g in enumerate(groups):
                    g.inverse = {"row": rows[i], "col": cols[i]}
                self._stacked.append((groups, rows, cols))
        return self._stacked

    def _preconditioned(self, damping: float) -> Iterator[list[tuple[nn.Parameter, torch.Tensor]]]:
        """The preconditioned direction of every parameter THOR handles, a batch of parameters at
        a time: the caller applies each batch before the next one is computed, so that no more
        than one batch of directions exists at once (all of them together would be a second copy
        of the gradients: 1.3 GB for BERT-Large).

        Groups of one shape go through one batched product (a batch of :meth:`_stacks`): done a
        group at a time, each group's handful of small kernels is a launch apiece on a GPU
        (BERT-Large on an H200: 27.5 ms per step for about 150 groups, bench/README.md). The
        arithmetic per group is the same either way (a test checks). The other groups follow one
        at a time, then LayerNorm's diagonal rule, in one last batch."""
        stacked: set[int] = set()
        for groups, rows, cols in self._stacks():
            if any(g.weight.grad is None for g in groups):  # handled one at a time below
                continue
            stacked.update(id(g) for g in groups)
            yield self._precondition_stack(groups, rows, cols)  # nothing of it kept here
        tick = time.perf_counter()
        batch = []
        for g in self.groups:
            if id(g) not in stacked and g.inverse and g.weight.grad is not None:
                batch.extend(g.split(self._precondition(g)).items())
        if self.layernorm == "diagonal":
            ln = [p for p in self._layernorm if p.grad is not None]
            if ln:
                grads = [p.grad for p in ln]
                fisher = torch._foreach_mul(grads, grads)
                torch._foreach_div_(fisher, float(self._batch))
                torch._foreach_add_(fisher, math.sqrt(damping))
                batch.extend(zip(ln, torch._foreach_div(grads, fisher), strict=True))
        self.timings["precondition"] += time.perf_counter() - tick
        if batch:
            yield batch

    def _precondition_stack(
        self, groups: list[_Group], rows: torch.Tensor, cols: torch.Tensor
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        tick = time.perf_counter()
        grads = torch.stack([g.weight.grad for g in groups]).to(rows.dtype)
        if groups[0].bias is not None:
            biases = torch.stack([g.bias_gradient() for g in groups]).to(rows.dtype)
            grads = torch.cat([grads, biases[..., None]], dim=-1)
        out = _apply_right(_apply_left(rows, grads), cols)
        batch = []
        for g, d in zip(groups, out.unbind(0), strict=True):
            batch.extend(g.split(d).items())
        self.timings["precondition"] += time.perf_counter() - tick
        return batch

    def _precondition(self, g: _Group) -> torch.Tensor:
        grad = g.gradient().to(next(iter(g.inverse.values())).dtype)
        inv = g.inverse
        if "row" in inv:
            row = inv["row"]
            left = grad * row[:, None] if row.dim() == 1 else _apply_left(row, grad)
            return _apply_right(left, inv["col"])
        # Work in the padded space: eigenvectors are not aligned with the padding, so nothing may be
        # cropped before the final product (the padded coordinates decouple and come back zero).
        x, s, y, t = inv["x"], inv["s"], inv["y"], inv["t"]
        rows, cols = grad.shape
        padded = torch.nn.functional.pad(grad, (0, t.numel() - cols, 0, s.numel() - rows))
        inner = _apply_right(_apply_left(x.transpose(1, 2), padded), y)
        inner = inner / (1.0 + s.reshape(-1)[:, None] * t.reshape(-1)[None, :])
        return _apply_right(_apply_left(x, inner), y.transpose(1, 2))[:rows, :cols]

    # --- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr, damping = self.lr_schedule(self.steps), self.damping_schedule(self.steps)
        group = self.param_groups[0]
        group["lr"], group["damping"] = lr, damping
        done: set[nn.Parameter] = set()
        if self.precondition:
            if self.collecting:
                self._finish_statistics()
            if self.steps % self.frequency == 0:
                self._refresh(damping)
            for batch in self._preconditioned(damping):
                batch = [(p, d) for p, d in batch if p.grad is not None]
                self._update([p for p, _ in batch], [d.to(p.dtype) for p, d in batch], lr)
                done.update(p for p, _ in batch)
                del batch  # before the next batch is computed
        rest = [p for p in group["params"] if p.grad is not None and p not in done]
        self._update(rest, [p.grad.clone() for p in rest], lr)
        self.steps += 1
        return loss

    def _update(self, params: list[nn.Parameter], dirs: list[torch.Tensor], lr: float) -> None:
        """The first-order tail, over a batch of tensors at once (torch._foreach_*, as torch's own
        optimizers do): weight decay, per-tensor clipping, momentum, update. Each tensor's
        arithmetic is its own, so batching does not change it. ``dirs`` are modified in place."""
        if not params:
            return
        if self.weight_decay:
            decayed = [(d, p) for d, p in zip(dirs, params, strict=True) if p not in self._no_decay]
            if decayed:
                torch._foreach_add_(
                    [d for d, _ in decayed], [p for _, p in decayed], alpha=self.weight_decay
                )
        if self.clip_norm is not None:
            norms = torch.stack(torch._foreach_norm(dirs))
            scales = torch.clamp(self.clip_norm / (norms + 1e-12), max=1.0)
            torch._foreach_mul_(dirs, list(scales.unbind()))
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, self.momentum)
        torch._foreach_add_(bufs, dirs)
        torch._foreach_add_(params, bufs, alpha=-lr)

    # --- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As torch's optimizers: references to the state, not copies (a checkpoint writes them
        at once; copies would add the factors and inverses again at every save)."""
        sd = super().state_dict()
        groups = []
        for g in self.groups:
            groups.append(
                {
                    "name": g.name,
                    "factors": [
                        {
                            "row": u.row.value,
                            "col": u.col.value,
                            "initialized": [u.row.initialized, u.col.initialized],
                        }
                        for u in g.uses
                    ],
                    "inverse": dict(g.inverse),
                    "trace": g.trace,
                    "refreshes": g.refreshes,
                }
            )
        sd["thor"] = {
            "steps": self.steps,
            "batch": self._batch,
            "precondition": self.precondition,
            "groups": groups,
            "timings": dict(self.timings),
            "refresh_log": [dict(r) for r in self.refresh_log],
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        thor = state_dict.pop("thor", None)
        if thor is None:
            raise ValueError("not a THOR state dict (no 'thor' entry)")
        if thor["precondition"] != self.precondition:
            raise ValueError(
                f"state dict has precondition={thor['precondition']}, this optimizer {self.precondition}"
            )
        names = [g.name for g in self.groups]
        saved = [g["name"] for g in thor["groups"]]
        if names != saved:
            raise ValueError(f"THOR layers differ from the state dict's: {names} vs {saved}")
        super().load_state_dict(state_dict)
        for g, s in zip(self.groups, thor["groups"], strict=True):
            for u, f in zip(g.uses, s["factors"], strict=True):
                u.row.value.copy_(f["row"])
                u.col.value.copy_(f["col"])
                u.row.initialized, u.col.initialized = (bool(x) for x in f["initialized"])
            device = g.weight.device
            g.inverse = {k: v.to(device) for k, v in s["inverse"].items()}
            g.trace, g.refreshes = s["trace"], int(s["refreshes"])
        self._stacked = None
        self.steps = int(thor["steps"])
        self._batch = int(thor["batch"])
        self.timings = dict(thor["timings"])
        self.refresh_log = [dict(r) for r in thor["refresh_log"]]
