"""The solvers of per-episode classifier fine-tuning: plain SGD on the rows (and bias) of a 1x1 classifier over
frozen features, for the loss that a [`LossSpec`] describes (CE' + gamma * KD of `gfss_hf.losses`, or the 2-way CE
of FSS, as a sum of per-episode means).

Two solvers compute the same SGD trajectory (up to float rounding):

- `"exact"` ([`solve`] default): analytic gradients of the input-resolution loss; everything constant across steps
  (teacher, labels, weights, the linear part of the loss) is precomputed once, and a step costs one upsampling of
  the logits, one exp and one adjoint upsampling (see `_Objective`, `_RowBands`, `_fit`).
- `"autograd"` ([`reference_loss`] + `torch.autograd`): the loss written plainly with `gfss_hf.losses` on
  upsampled logits. It is the specification the exact solver is tested against, and a selectable solver
  (`AdaptationConfig(solver="autograd")`) for the benchmarks and for devices where it may be the faster one.

Private to `gfss_hf`: [`gfss_hf.adaptation`] builds the [`LossSpec`] from its inputs and calls [`solve`] from the
starting rows of [`random_rows`] or [`prototype_rows`]. Imports only torch and `gfss_hf.losses`, so that it travels
with a Hub export of the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import distillation_loss, few_shot_cross_entropy

__all__ = [
    "SOLVERS",
    "LossSpec",
    "build_loss_spec",
    "classifier_logits",
    "downsample_labels",
    "entropy_term",
    "prototype_rows",
    "random_rows",
    "reference_loss",
    "solve",
    "upsample_logits",
]

SOLVERS = ("exact", "autograd")


@dataclass
class LossSpec:
    r"""
    The fine-tuning loss of one call, in classifier-row space, for `N = E * K` supports (`E` episodes of `K`
    supports each; the loss of an episode is the sum over its supports, each divided by the episode's
    denominators).

    Args:
        labels (`torch.Tensor` of shape `(N, H, W)`, int64): classifier row of each pixel at the loss resolution
            (0 background; 0 too where `valid` is false).
        valid (`torch.Tensor` of shape `(N, H, W)`, bool): pixels that count in CE'.
        annotated (`torch.Tensor` of shape `(N, C)`, bool): rows each support is annotated for (never row 0 nor a
            teacher row); a background pixel means "none of these".
        ce_weights (`torch.Tensor` of shape `(N, H, W)`, *optional*): pixel weights of CE'.
        ce_denom (`torch.Tensor` of shape `(N,)`): CE' denominator of each support's episode (the sum of the
            weights of its labelled pixels); its dtype is the dtype of the computation.
        kd_mask (`torch.Tensor` of shape `(N, H, W)`, bool, *optional*): pixels that count in KD.
        kd_denom (`torch.Tensor` of shape `(N,)`, *optional*): KD denominator of each support's episode.
        teacher_logits (`torch.Tensor` of shape `(N, T, H, W)`, *optional*): the frozen teacher's logits at the loss
            resolution; `None`: no KD term.
        gamma (`float`): weight of KD.
        kd_scale (`str`): `"reference"` (KD divided by `T`) or `"paper"`.
        num_teacher (`int`): `T`, rows shared with the teacher (background included; 1 for FSS).
        num_classes (`int`): `C`, all rows.
        feature_size (`tuple[int, int]`): `(h, w)` of the features.
        align_corners (`bool`): of the bilinear upsampling of the logits to `(H, W)`.
    """

    labels: torch.Tensor
    valid: torch.Tensor
    annotated: torch.Tensor
    ce_weights: torch.Tensor | None
    ce_denom: torch.Tensor
    kd_mask: torch.Tensor | None
    kd_denom: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    gamma: float
    kd_scale: str
    num_teacher: int
    num_classes: int
    feature_size: tuple
    align_corners: bool

    @property
    def kd_coef(self) -> float:
        """gamma, divided by `T` with the reference's scaling."""
        return self.gamma / (self.num_teacher if self.kd_scale == "reference" else 1.0)


# -- the loss of an adaptation call -------------------------------------------------------------------------
def classifier_logits(weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """(E, C, D) x (E, K, D, h, w) -> (E, K, C, h, w)."""
    logits = torch.einsum("ecd,ekdhw->ekchw", weight, features)
    if bias is not None:
        logits = logits + bias[:, None, :, None, None]
    return logits


def upsample_logits(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """(E, K, C, h, w) -> (E, K, C, H, W) bilinear, in channels-last memory: ATen's upsampling is ~2.5x faster there,
    and so is what follows over the class dimension (`argmax(dim=class)` after `predict`: 8x, 92 -> 11 ms on a
    473 x 473 x 17 map; the teacher's softmax)."""
    e, k = logits.shape[:2]
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    low = logits.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    up = F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return up.view(e, k, *up.shape[1:])


def _ce_weights(labels, valid, mode, dtype):
    """Pixel weights of CE' (None, or the reference's [1, n_bg / n_fg] per episode) and the per-episode
    denominators (sum of weights over labelled pixels). `labels`: (E, K, H, W), foreground = any label >= 1."""
    if mode != "reference":
        return None, valid.flatten(1).sum(1).to(dtype)
    fg = valid & (labels != 0)
    n_fg = fg.flatten(1).sum(1).to(dtype)
    n_bg = (valid & (labels == 0)).flatten(1).sum(1).to(dtype)
    # The reference divides by n_fg even when a resized mask lost its foreground: use weight 1 when a count is 0.
    ratio = torch.where((n_fg > 0) & (n_bg > 0), n_bg / n_fg.clamp_min(1), torch.ones_like(n_fg))
    weights = torch.where(fg, ratio[:, None, None, None], torch.ones((), dtype=dtype, device=labels.device))
    return weights, (weights * valid).flatten(1).sum(1)


def entropy_term(weight, bias, query_features) -> torch.Tensor:
    """Per-episode mean pixel entropy minus entropy of the mean prediction (DIaM-style, feature resolution)."""
    logits = classifier_logits(weight, bias, query_features)  # (E, Q, C, h, w)
    log_p = torch.log_softmax(logits.float(), dim=2)
    p = log_p.exp()
    cond = -(p * log_p).sum(2).flatten(1).mean(1)
    marginal = p.transpose(1, 2).flatten(2).mean(2)  # (E, C)
    marg_entropy = -(marginal * torch.log(marginal.clamp_min(1e-12))).sum(1)
    return cond - marg_entropy


def build_loss_spec(
    labels: torch.Tensor,
    annotated: torch.Tensor,
    features: torch.Tensor,
    teacher_rows: tuple | None,
    *,
    ce_weighting: str | None,
    kd_pixels: str = "labelled",
    gamma: float = 0.0,
    kd_scale: str = "reference",
    ignore_index: int = 255,
    align_corners: bool = True,
) -> LossSpec:
    r"""
    The [`LossSpec`] of an adaptation call, with everything constant across steps computed once (rows of the
    labels, pixel weights, denominators, the teacher's logits).

    Args:
        labels (`torch.Tensor` of shape `(E, K, H, W)`, int64): 0 background, `1..N` novel class (row
            `T - 1 + n`), `ignore_index` ignored; at the loss resolution.
        annotated (`torch.Tensor` of shape `(E * K, C)`, bool): rows each support is annotated for.
        features (`torch.Tensor` of shape `(E, K, D, h, w)`): frozen support features.
        teacher_rows (`tuple`, *optional*): `(weight (E, T, D), bias (E, T) or None)`, the pre-trained rows; `None`
            for a classifier without teacher (FSS: `T = 1`, no KD).
        ce_weighting (`str`, *optional*): `None` or `"reference"` (foreground weighted `n_bg / n_fg`).
        kd_pixels (`str`, *optional*, defaults to `"labelled"`): KD on the labelled pixels, on the `"background"`
            ones only, or on `"all"` canvas pixels (padding included, as the reference).
        gamma (`float`, *optional*, defaults to 0.0): weight of KD (0: none).
        kd_scale (`str`, *optional*, defaults to `"reference"`): see [`LossSpec`].
        ignore_index (`int`, *optional*, defaults to 255): label of ignored pixels.
        align_corners (`bool`, *optional*, defaults to `True`): of the logit upsampling.
    """
    num_teacher = 1 if teacher_rows is None else teacher_rows[0].shape[1]
    num_shots = labels.shape[1]
    valid = labels != ignore_index
    rows = torch.where(valid & (labels >= 1), labels + num_teacher - 1, torch.zeros_like(labels))
    ce_weights, ce_denom = _ce_weights(labels, valid, ce_weighting, features.dtype)
    kd_mask = {"all": torch.ones_like(valid), "background": valid & (labels == 0), "labelled": valid}[kd_pixels]
    kd_denom = kd_mask.flatten(1).sum(1).to(features.dtype)
    teacher = None
    if teacher_rows is not None and gamma > 0:
        with torch.no_grad():
            teacher = upsample_logits(classifier_logits(*teacher_rows, features), labels.shape[-2:], align_corners)
            teacher = teacher.flatten(0, 1)
    per_support = lambda x: x.repeat_interleave(num_shots)  # noqa: E731  (episode denominators per support)
    return LossSpec(
        labels=rows.flatten(0, 1),
        valid=valid.flatten(0, 1),
        annotated=annotated,
        ce_weights=None if ce_weights is None else ce_weights.flatten(0, 1),
        ce_denom=per_support(ce_denom),
        kd_mask=kd_mask.flatten(0, 1),
        kd_denom=per_support(kd_denom),
        teacher_logits=teacher,
        gamma=float(gamma),
        kd_scale=kd_scale,
        num_teacher=num_teacher,
        num_classes=annotated.shape[1],
        feature_size=tuple(features.shape[-2:]),
        align_corners=align_corners,
    )


# -- the starting rows, and labels at the feature resolution -----------------------------------------------
def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """
    Nearest downsampling of label maps to the feature size (`loss_resolution="feature"`, and the prototypes).

    Args:
        labels (`torch.Tensor` of shape `(E, K, H, W)`, integer): label maps.
        size (`tuple[int, int]`): `(h, w)`.

    Returns:
        `torch.Tensor` of shape `(E, K, h, w)`, int64.
    """
    e, k = labels.shape[:2]
    out = F.interpolate(labels.flatten(0, 1)[:, None].float(), size=tuple(size), mode="nearest")
    return out[:, 0].long().view(e, k, *size)


def random_rows(
    seeds: list[int], rows: int, dim: int, std: float, like: torch.Tensor, kind: str = "normal"
) -> torch.Tensor:
    """
    Random starting rows, episode `e` from its own CPU generator seeded `seeds[e]` (device-independent).

    Args:
        seeds (`list[int]`): one seed per episode (`E`).
        rows (`int`): rows per episode.
        dim (`int`): `D`, features per row.
        std (`float`): standard deviation with `kind="normal"`.
        like (`torch.Tensor`): the rows take its device and dtype.
        kind (`str`, *optional*, defaults to `"normal"`): `"normal"`, or `"kaiming_uniform"`: `nn.Conv2d`'s default
            for a 1x1 conv of `dim` inputs (Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(dim), 1/sqrt(dim))).

    Returns:
        `torch.Tensor` of shape `(E, rows, dim)`.
    """
    out = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if kind == "kaiming_uniform":
            bound = 1.0 / math.sqrt(dim)
            out.append(torch.rand(rows, dim, generator=generator) * (2 * bound) - bound)
        else:
            out.append(torch.randn(rows, dim, generator=generator) * std)
    return torch.stack(out).to(device=like.device, dtype=like.dtype)


def prototype_rows(features, novel_labels, num_novel, base_weight, size_matches_features) -> torch.Tensor:
    """
    Prototype starting rows: masked averages of the support features per novel class, scaled to the mean norm of
    the pre-trained rows.

    Args:
        features (`torch.Tensor` of shape `(E, K, D, h, w)`): support features.
        novel_labels (`torch.Tensor` of shape `(E, K, H, W)` or `(E, K, h, w)`): 0 background, `1..N` novel class.
        num_novel (`int`): `N`.
        base_weight (`torch.Tensor` of shape `(E, T, D)`): the pre-trained rows.
        size_matches_features (`bool`): the labels are already at the feature size (else downsampled, nearest).

    Returns:
        `torch.Tensor` of shape `(E, N, D)`.
    """
    if size_matches_features:
        small = novel_labels
    else:
        small = downsample_labels(novel_labels, features.shape[-2:])
    e, k, d = features.shape[:3]
    rows = []
    target_norm = base_weight.norm(dim=-1).mean(-1)  # (E,)
    flat = features.flatten(3)  # (E, K, D, P)
    lab = small.flatten(2)  # (E, K, P)
    for n in range(1, num_novel + 1):
        m = (lab == n).to(features.dtype)  # (E, K, P)
        total = torch.einsum("ekdp,ekp->ed", flat, m)
        count = m.flatten(1).sum(1)
        proto = total / count.clamp_min(1.0)[:, None]
        proto = proto / proto.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target_norm[:, None]
        rows.append(proto)
    return torch.stack(rows, dim=1)


# -- the autograd reference -----------------------------------------------------------------------------------
def _per_support_mean(loss_map: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """(N, H, W) map, 0 where not counted -> (N,) sums / denom (0 when the denominator is 0)."""
    inv = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-12), torch.zeros_like(denom))
    return loss_map.flatten(1).sum(1) * inv


def reference_loss(
    weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    r"""
    The loss of [`LossSpec`] written plainly: logits upsampled to the label size, `few_shot_cross_entropy` +
    gamma * `distillation_loss` of `gfss_hf.losses`, differentiable by autograd. The definition the exact solver must
    match.

    Args:
        weight (`torch.Tensor` of shape `(E, C, D)`): classifier rows.
        bias (`torch.Tensor` of shape `(E, C)`, *optional*): their bias.
        features (`torch.Tensor` of shape `(E, K, D, h, w)`): frozen support features.
        spec ([`LossSpec`]): the loss.

    Returns:
        `torch.Tensor` of shape `(E,)`: the loss of each episode.
    """
    num_episodes = features.shape[0]
    logits = torch.einsum("ecd,ekdhw->ekchw", weight, features)
    if bias is not None:
        logits = logits + bias[:, None, :, None, None]
    logits = logits.flatten(0, 1)
    size = tuple(spec.labels.shape[-2:])
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=spec.align_corners)
    # -1 is never a row: the ignored pixels of `valid` cannot be confused with a class.
    targets = torch.where(spec.valid, spec.labels, torch.full_like(spec.labels, -1))
    ce = few_shot_cross_entropy(
        logits, targets, annotated=spec.annotated, ignore_index=-1, pixel_weights=spec.ce_weights, reduction="none"
    )
    loss = _per_support_mean(ce, spec.ce_denom.float())
    if spec.teacher_logits is not None:
        kd = distillation_loss(logits, spec.teacher_logits, mask=spec.kd_mask, scale=spec.kd_scale, reduction="none")
        loss = loss + spec.gamma * _per_support_mean(kd, spec.kd_denom.float())
    return loss.view(num_episodes, -1).sum(1)


def _fit_autograd(features, weight, bias, spec: LossSpec, steps: int, lr: float, extra=None):
    """Plain SGD with gradients of [`reference_loss`] (+ `extra(w, b)`) by autograd; same returns as `_fit`."""
    weight = weight.detach().clone()
    bias = bias.detach().clone() if bias is not None else None
    history = []
    for _ in range(steps):
        params = [weight.requires_grad_(True)] + ([bias.requires_grad_(True)] if bias is not None else [])
        with torch.enable_grad():
            loss = reference_loss(weight, bias, features, spec)
            if extra is not None:
                loss = loss + extra(weight, bias)
            grads = torch.autograd.grad(loss.sum(), params)
        history.append(loss.detach().to(weight.dtype))
        weight = (weight - lr * grads[0]).detach()
        if bias is not None:
            bias = (bias - lr * grads[1]).detach()
    hist = torch.stack(history, dim=1) if history else weight.new_zeros(features.shape[0], 0)
    return weight, bias, hist


def solve(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LossSpec,
    steps: int,
    lr: float,
    extra=None,
    solver: str = "exact",
):
    r"""
    `steps` steps of plain SGD (no momentum, no weight decay) on the classifier for the loss of `spec`.

    Args:
        features (`torch.Tensor` of shape `(E, K, D, h, w)`): frozen support features.
        weight (`torch.Tensor` of shape `(E, C, D)`): initial rows.
        bias (`torch.Tensor` of shape `(E, C)`, *optional*): initial bias (trained too).
        spec ([`LossSpec`]): the loss.
        steps (`int`): SGD steps.
        lr (`float`): learning rate.
        extra (`callable`, *optional*): `extra(weight, bias) -> (E,)`, an additional loss differentiated by autograd
            (the transductive term).
        solver (`str`, *optional*, defaults to `"exact"`): `"exact"` (analytic gradients) or `"autograd"`.

    Returns:
        `tuple`: detached `weight`, `bias` and the `(E, steps)` loss history (the loss before each step).
    """
    if solver == "exact":
        return _fit(features, weight, bias, _build_objective(spec), steps, lr, extra)
    if solver == "autograd":
        return _fit_autograd(features, weight, bias, spec, steps, lr, extra)
    raise ValueError(f"solver={solver!r} is invalid; allowed values are {SOLVERS}.")


# -- the exact solver ---------------------------------------------------------------------------------------------
@dataclass
class _Objective:
    """The fine-tuning loss of one call, precomputed once for all SGD steps.

    Every loss here (CE', KD, plain CE) has the per-pixel form
    `a_i * lse(z_i) - b_i * lse(z_i over rows M1) - g_i * lse(z_i over rows M2) - <r_i, z_i>` with `z_i` the logits of
    pixel `i` at the loss resolution and constants `a, b, g, r` (labels, pixel weights, 1/denominators and teacher
    probabilities folded in). The linear part is moved to the feature resolution once (`R = U^T r`, `U` the
    bilinear upsampling), so a step costs one upsampling of the logits, one exp and one adjoint upsampling, and
    nothing that does not change across steps is recomputed.

    Shapes (class-major): `N = E * K` supports; at the loss resolution, logits and gradients are `(1, N, C, S)`
    and `a, b, g` and the class sums `(1, N, 1, S)`, `S` the pixels (in `bands` layout when upsampling, see
    `_RowBands`); `R` `(N, C, P)` with `P` pixels at the feature resolution;
    `shift_coef` `(N, 1, P)` = `U^T (a - b - g)` when `bands` is used; M1 = rows not annotated in the support
    (`not_annotated` `(N, num_novel, 1)` marks the novel ones; base rows always are), M2 = row 0 + the novel rows
    (the teacher's background folded back, Eq. 7).
    """

    a: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor
    R: torch.Tensor
    num_teacher: int
    not_annotated: torch.Tensor
    size: tuple
    upsample: bool
    align_corners: bool
    bands: _RowBands | None = None
    shift_coef: torch.Tensor | None = None


# exp() of anything below this is a float32 denormal: slow on x86 (tens of cycles each) and, at most 17 x 1.6e-38,
# invisible in the class sums, which are >= 1 (the per-pixel maximum is subtracted) unless they underflow, a case
# `_fit` detects (sums < 1e-30) and redoes with the exact per-pixel maximum.
_EXP_FLOOR = -87.0
# The exact path runs over the whole map when more than 1 / this of the pixels need it, else pixel by pixel.
_DENSE_EXACT_FACTOR = 8


def _source_coordinates(out_size: int, in_size: int, align_corners: bool):
    """ATen's `upsample_bilinear2d` source coordinates (float32) of the `out_size` outputs, unclamped and clamped,
    and the scale between consecutive outputs."""
    y = torch.arange(out_size, dtype=torch.float32)
    if align_corners:
        scale = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=torch.float32)
        unclamped = y * scale
    else:
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        unclamped = scale * (y + 0.5) - 0.5
    return unclamped, unclamped.clamp_min(0), float(scale)


# Up to this many feature columns, the column interpolation is a dense matrix product (it reads and writes the
# class-major layout directly); beyond, its cost grows with the width and ATen's kernel is used.
_DENSE_COLUMNS = 96


def _column_matrix(in_w: int, out_w: int, align_corners: bool, dtype, device) -> torch.Tensor:
    """(out_w, in_w) matrix of ATen's bilinear interpolation along one axis."""
    _, src, _ = _source_coordinates(out_w, in_w, align_corners)
    left = src.long().clamp(max=in_w - 1)
    right = (left + 1).clamp(max=in_w - 1)
    lam = (src - left.to(torch.float32)).double()
    matrix = torch.zeros(out_w, in_w, dtype=torch.float64)
    rows = torch.arange(out_w)
    matrix.index_put_((rows, left), 1 - lam, accumulate=True)
    matrix.index_put_((rows, right), lam, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


class _RowBands:
    """Bilinear upsampling along the rows, `h -> H`, in a band layout where it is one broadcast `lerp` and its
    adjoint a sum and a matrix-vector product, instead of a gather and a scatter over the big tensor.

    Output row `y` is `(1 - l_y) * row[k_y] + l_y * row[k_y + 1]`; band `k` holds the output rows with `k_y = k`
    (`k <= h - 1`: the input rows are extended by a copy of the last one, where ATen puts the rows past the last
    input row), and the `j`-th rows of all bands are stored together: a map in band layout is
    `(..., rows_per_band, h, W)`, padded to the longest band. `gather` puts an `(N, H, W)` map into it with 0 at the
    padding (the padding rows of `up` repeat a real row; every per-pixel weight of the loss is 0 there, so they
    add nothing). Source coordinates follow ATen's `upsample_bilinear2d` (float32, either `align_corners`), so
    `up(F.interpolate(z, (h, W)))` equals `F.interpolate(z, (H, W))` up to float rounding.

    The adjoint uses that the source coordinate is affine in `y`: within band `k`, `l = c_k + j * s` (`s` the row
    scale), so `sum_j l g_j = c_k sum_j g_j + s sum_j j g_j`, a sum and a weighted sum over `j` for all bands and
    maps at once; the rows clamped to the first input row (`align_corners=False`) are corrected one by one.
    """

    def __init__(self, h: int, out_h: int, align_corners: bool, dtype, device, w: int = 0, out_w: int = 0):
        unclamped, src, scale = _source_coordinates(out_h, h, align_corners)
        key = src.long().clamp(max=h - 1)
        lam = src - key.to(torch.float32)  # in band h - 1 both ends are the last row: any weight gives ATen's value
        counts = torch.bincount(key, minlength=h)
        per_band = int(counts.max())
        self.num_bands, self.rows_per_band = h, per_band
        first = torch.cumsum(counts, 0) - counts  # first output row of each band (keys are non-decreasing in y)
        j = torch.arange(out_h) - first[key]
        slot = j * h + key
        lam_grid = torch.zeros(per_band * h, dtype=torch.float64)
        lam_grid[slot] = lam.double()
        index = torch.zeros(per_band * h, dtype=torch.long)
        index[slot] = torch.arange(out_h)
        valid = torch.zeros(per_band * h, dtype=torch.bool)
        valid[slot] = True
        # Affine weights l = c_k + j * s (c_k from the band's first row; empty bands get 0), and the rows where
        # ATen's clamping at the top departs from them.
        offset = torch.zeros(h, dtype=torch.float64)
        used = counts > 0
        offset[used] = unclamped.double()[first[used]] - torch.arange(h, dtype=torch.float64)[used]
        delta = lam.double() - (offset[key] + j.double() * scale)
        exceptional = delta.abs() > 1e-6
        self.lam = lam_grid.view(per_band, h, 1).to(device=device, dtype=dtype)
        self.row_numbers = torch.arange(per_band, device=device, dtype=dtype)
        self.offset, self.step = offset.to(device=device, dtype=dtype)[:, None], scale
        # Columns (w -> out_w): a dense (w, out_w) interpolation matrix when narrow enough, else None (ATen).
        self.columns_t = None
        if 0 < w <= _DENSE_COLUMNS:
            self.columns_t = _column_matrix(w, out_w, align_corners, dtype, device).t().contiguous()
        self.fix_rows, self.fix_bands = j[exceptional].to(device), key[exceptional].to(device)
        self.fix_delta = delta[exceptional].to(device=device, dtype=dtype)[:, None]
        self.geometric = not bool(exceptional.any()) and bool((offset >= 0).all())  # `exp_up` applies
        self.index, self.valid = index.to(device), valid.to(device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) -> (N, rows_per_band, h, W), 0 at the padding rows."""
        out = x.index_select(1, self.index) * self.valid.view(1, -1, 1).to(x.dtype)
        return out.view(x.shape[0], self.rows_per_band, self.num_bands, x.shape[2])

    def up(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(M, h + 1, W) (the last row a copy of row h - 1) -> `out` (M, rows_per_band, h, W)."""
        return torch.lerp(rows[:, None, :-1], rows[:, None, 1:], self.lam, out=out)

    def exp_up(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`exp(up(rows))` without an exp per output value: within a band, `l = c_k + j * s`, so
        `exp((1 - l) A + l B) = exp(A + c_k D) * exp(s D) ** j` with `D = B - A`: two exps per band and column, then
        one product per row. Only when `geometric` (no clamped rows) and every value of `rows` is at least
        `_EXP_FLOOR`: each partial product is then itself one of the exps, in [exp(_EXP_FLOOR), 1], so nothing
        overflows or underflows (at the padding rows, where the loss weights are 0, the progression runs on)."""
        a = rows[:, :-1]
        diff = rows[:, 1:] - a
        ratio = (diff * self.step).exp_()
        out[:, 0] = torch.addcmul(a, diff, self.offset).exp_()
        for j in range(1, self.rows_per_band):
            torch.mul(out[:, j - 1], ratio, out=out[:, j])
        return out

    def adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        """(M, rows_per_band, h, W) -> (M, h, W), the transpose of `up` with the copied row folded back (`grad` must
        be 0 at the padding)."""
        m, width = grad.shape[0], grad.shape[-1]
        total = grad.sum(dim=1)  # (M, h, W)
        weighted = self.row_numbers @ grad.reshape(m, self.rows_per_band, -1)  # sum_j j g_j, (M, h * W)
        upper = weighted.view(m, self.num_bands, width).mul_(self.step).addcmul_(total, self.offset)  # sum_j l g_j
        if len(self.fix_rows):
            upper.index_add_(1, self.fix_bands, grad[:, self.fix_rows, self.fix_bands] * self.fix_delta)
        out = total.sub_(upper)  # sum_j (1 - l) g_j
        out[:, 1:] += upper[:, :-1]
        out[:, -1] += upper[:, -1]
        return out


def _build_objective(spec: LossSpec) -> _Objective:
    """Coefficients of `_Objective` from a [`LossSpec`]."""
    labels_rows, valid, ce_denom = spec.labels, spec.valid, spec.ce_denom
    num_teacher, num_classes, feature_size, align_corners = (
        spec.num_teacher,
        spec.num_classes,
        spec.feature_size,
        spec.align_corners,
    )
    n, height, width = labels_rows.shape
    dtype = ce_denom.dtype
    inv_ce = torch.where(ce_denom > 0, 1.0 / ce_denom.clamp_min(1e-12), torch.zeros_like(ce_denom))
    alpha = valid.to(dtype) * inv_ce[:, None, None]
    if spec.ce_weights is not None:
        alpha = alpha * spec.ce_weights
    fg = valid & (labels_rows > 0)
    bg = valid & (labels_rows == 0)
    r = torch.zeros(n, num_classes, height, width, dtype=dtype, device=labels_rows.device)
    r.scatter_(1, torch.where(fg, labels_rows, torch.zeros_like(labels_rows))[:, None], (alpha * fg)[:, None])
    a = alpha.clone()
    b = alpha * bg
    g = torch.zeros_like(alpha)
    if spec.teacher_logits is not None:
        teacher_probs = torch.softmax(spec.teacher_logits.float(), dim=1).to(dtype)
        kd_denom = spec.kd_denom
        inv_kd = torch.where(kd_denom > 0, spec.kd_coef / kd_denom.clamp_min(1e-12), torch.zeros_like(kd_denom))
        beta = spec.kd_mask.to(dtype) * inv_kd[:, None, None]
        a = a + beta
        g = beta * teacher_probs[:, 0]
        r[:, 1:num_teacher] += beta[:, None] * teacher_probs[:, 1:]
    not_annotated = (~spec.annotated[:, num_teacher:]).to(dtype)[:, :, None]  # (N, num_novel, 1)
    upsample = (height, width) != tuple(feature_size)
    if upsample:
        r = torch.ops.aten.upsample_bilinear2d_backward(
            r, [height, width], [n, num_classes, *feature_size], align_corners
        )
    bands = shift_coef = None
    if upsample:
        # The per-pixel shift of `_fit` is the upsampled feature-resolution maximum, so its term in the loss,
        # sum_i (a - b - g)_i shift_i, is moved to the feature resolution once, like the linear part.
        shift_coef = torch.ops.aten.upsample_bilinear2d_backward(
            (a - b - g)[:, None], [height, width], [n, 1, *feature_size], align_corners
        ).reshape(n, 1, -1)
        bands = _RowBands(feature_size[0], height, align_corners, dtype, labels_rows.device, feature_size[1], width)
        flat = lambda x: bands.gather(x).reshape(1, n, 1, -1)  # noqa: E731
    else:
        flat = lambda x: x.reshape(1, n, 1, -1)  # noqa: E731
    return _Objective(
        flat(a),
        flat(b),
        flat(g),
        r.reshape(n, num_classes, -1),
        num_teacher,
        not_annotated,
        (height, width),
        upsample,
        align_corners,
        bands,
        shift_coef,
    )


def _shifted_logits(
    z_low, low_max, h: int, w: int, objective: _Objective, out=None, exp: bool = False, clamp: bool = True
):
    """Logits (N, C, h*w) minus their per-pixel maximum `low_max` (N, 1, h*w), at the loss resolution, clamped
    below at `_EXP_FLOOR` (unless `clamp=False`): (1, N, C, S); their exp with `exp=True`. Written into `out`
    (reused across steps: a fresh tensor this size costs as much as the arithmetic, in page faults) when given."""
    n, channels = z_low.shape[:2]
    low = z_low - low_max
    if not objective.upsample:
        low = low[None].clamp_(min=_EXP_FLOOR) if clamp else low[None]
        return low.exp_() if exp else low
    bands, width = objective.bands, objective.size[1]
    # Columns first, at (h, W): small. The row interpolation reads h + 1 rows, the last a copy of row h - 1.
    if bands.columns_t is not None:
        low = low.view(n * channels, h, w)
        low = torch.cat([low, low[:, -1:]], dim=1)
        rows = torch.matmul(low, bands.columns_t)  # (N*C, h + 1, W)
    else:  # ATen's kernel is ~4x faster on channels-last memory
        low = low.view(n, channels, h, w).contiguous(memory_format=torch.channels_last)
        cols = F.interpolate(low, size=(h, width), mode="bilinear", align_corners=objective.align_corners)
        rows = cols.new_empty(n * channels, h + 1, width)
        rows.view(n, channels, h + 1, width)[:, :, :h] = cols
        rows[:, h] = rows[:, h - 1]
    if out is None:
        out = rows.new_empty(1, n, channels, bands.rows_per_band * bands.num_bands * width)
    banded = out.view(n * channels, bands.rows_per_band, h, width)
    above_floor = float(rows.amin()) >= _EXP_FLOOR  # then so is every lerp of them: no clamping pass
    if exp and above_floor and bands.geometric:
        bands.exp_up(rows, banded)
        return out
    bands.up(rows, banded)
    if clamp and not above_floor:
        out.clamp_(min=_EXP_FLOOR)
    return out.exp_() if exp else out


def _adjoint(grad: torch.Tensor, h: int, w: int, objective: _Objective) -> torch.Tensor:
    """The transpose of `_shifted_logits`' upsampling: (B, N, C, X) -> (N, C, h*w)."""
    if not objective.upsample:
        return grad[0]
    n, channels = grad.shape[1:3]
    bands, width = objective.bands, objective.size[1]
    rows = bands.adjoint(grad.view(n * channels, bands.rows_per_band, bands.num_bands, width))
    if bands.columns_t is not None:
        return torch.matmul(rows, bands.columns_t.t()).view(n, channels, h * w)
    # The column adjoint reads channels-last memory, where ATen's kernel is ~4x faster.
    rows = rows.view(n, channels, h, width).contiguous(memory_format=torch.channels_last)
    low = torch.ops.aten.upsample_bilinear2d_backward(rows, [h, width], [n, channels, h, w], objective.align_corners)
    return low.reshape(n, channels, h * w)


def _class_sums(exp: torch.Tensor, num_teacher: int, not_annotated: torch.Tensor):
    """Sums of `exp` (B, N, C, X) over all rows, over M1 (rows not annotated) and over M2 (row 0 + novel rows), each
    (B, N, 1, X). Rows below `num_teacher` are never annotated, so M1 = base rows + the non-annotated novel rows:
    each sum is direct (no subtraction, no cancellation)."""
    exp_novel = exp[:, :, num_teacher:]
    s_base = exp[:, :, :num_teacher].sum(dim=2, keepdim=True)
    s_novel = exp_novel.sum(dim=2, keepdim=True)
    s_m1 = s_base + (exp_novel * not_annotated).sum(dim=2, keepdim=True)
    return s_base + s_novel, s_m1, exp[:, :, :1] + s_novel


def _vecdot(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-support sums of weights * values, both (1, N, 1, S) -> (N,)."""
    n = weights.shape[1]
    return torch.linalg.vecdot(weights.view(n, -1), values.view(n, -1))


def _underflowing_pixels(objective: _Objective, s_all, s_m1, s_m2, has_kd: bool) -> torch.Tensor | None:
    """(pixel indices, support indices) where a class sum with a non-zero weight fell below 1e-30 (where the exp
    floor starts to matter), or None."""
    if float(s_m1.amin()) >= 1e-30 and (not has_kd or float(s_m2.amin()) >= 1e-30):
        return None  # s_all >= s_m1: every sum is fine (the common case: two reductions)
    bad = ((s_all < 1e-30) & (objective.a > 0)) | ((s_m1 < 1e-30) & (objective.b > 0))
    if has_kd:
        bad |= (s_m2 < 1e-30) & (objective.g > 0)
    support, pixel = bad.view(bad.shape[1], -1).nonzero(as_tuple=True)
    return (pixel, support) if len(pixel) else None


def _exact_terms(z: torch.Tensor, objective: _Objective, has_kd: bool, a, b, g, not_annotated):
    """Per-pixel log-sum-exp terms `a*lse(z) - b*lse(z over M1) - g*lse(z over M2)` (..., 1, X) and their gradient
    (..., C, X) for logits `z` (..., N, C, X) (unclamped), each log-sum-exp with its own maximum: exact where the
    shared shift of `_fit` underflows. `a, b, g` broadcast against (..., N, 1, X), `not_annotated` is (N, num_novel,
    1)."""
    num_teacher, num_classes = objective.num_teacher, z.shape[-2]
    in_m1 = torch.ones(*not_annotated.shape[:-2], num_classes, 1, dtype=torch.bool, device=z.device)
    in_m1[..., num_teacher:, :] = not_annotated.bool()
    in_m2 = torch.zeros(num_classes, 1, dtype=torch.bool, device=z.device)
    in_m2[0] = True
    in_m2[num_teacher:] = True
    sets = [(None, a, 1.0), (in_m1, b, -1.0)] + ([(in_m2, g, -1.0)] if has_kd else [])
    terms, grad = 0.0, torch.zeros_like(z)
    for in_set, weight, sign in sets:
        masked = z if in_set is None else z.masked_fill(~in_set, float("-inf"))
        lse = torch.logsumexp(masked, dim=-2, keepdim=True)
        terms = terms + sign * weight * lse
        probs = (masked - lse).clamp_(min=_EXP_FLOOR).exp_()  # no denormals; below the floor is below rounding
        if in_set is not None:
            probs *= in_set
        grad.addcmul_(probs, weight, value=sign)
    return terms, grad


def _exact_pixels(z: torch.Tensor, pixel, support, objective: _Objective, has_kd: bool):
    """`_exact_terms` at K pixels of `z` (1, N, C, S): terms (K,) and gradient (K, C)."""
    at = lambda x: x[0, support, 0, pixel][:, None, None]  # noqa: E731  (K, 1, 1)
    logits = z[0, support, :, pixel][:, :, None]  # (K, C, 1)
    terms, grad = _exact_terms(
        logits, objective, has_kd, at(objective.a), at(objective.b), at(objective.g), objective.not_annotated[support]
    )
    return terms[:, 0, 0], grad[:, :, 0]


def _exact_map(z: torch.Tensor, objective: _Objective, has_kd: bool):
    """`_exact_terms` at every pixel of `z` (1, N, C, S): per-support sums of the terms (N,) and the gradient."""
    terms, grad = _exact_terms(z, objective, has_kd, objective.a, objective.b, objective.g, objective.not_annotated)
    return terms.sum(dim=(0, 2, 3)), grad


def _fit(features, weight, bias, objective: _Objective, steps: int, lr: float, extra=None):
    """Plain SGD on (weight, bias) for `objective` with analytic gradients (see `_Objective`); `extra(w, b)` is an
    optional additional per-episode loss differentiated by autograd. Returns detached parameters and the (E, steps)
    loss history (the loss before each step).

    At the loss resolution, logits are `(B, N, C, X)`: the per-class slices of the sums and of the gradient are
    contiguous runs of `X` values, the row upsampling is a broadcast `lerp` into a buffer reused across steps and
    its adjoint one matrix product per band (see `_RowBands`)."""
    num_episodes, num_shots, dim = features.shape[:3]
    h, w = features.shape[-2:]
    n = num_episodes * num_shots
    flat_features = features.reshape(num_episodes, num_shots, dim, h * w)  # (E, K, D, P)
    weight = weight.detach().clone()
    bias = bias.detach().clone() if bias is not None else None
    num_classes, num_teacher = weight.shape[1], objective.num_teacher
    features_t = flat_features.transpose(2, 3)  # (E, K, P, D), a view: MKL reads it transposed faster than a copy
    shift_weight = None if objective.upsample else objective.a - objective.b - objective.g
    has_kd = bool(objective.g.any())
    buffer = None
    history = []
    for _ in range(steps):
        z_low = torch.matmul(weight[:, None], flat_features)  # (E, K, C, P)
        if bias is not None:
            z_low = z_low + bias[:, None, :, None]
        z_low = z_low.reshape(n, num_classes, h * w)
        # Stable exp without a pass over the big tensor: subtract the per-pixel maximum over classes at the feature
        # resolution BEFORE upsampling. Upsampling is linear and the same for every class, so the result is the
        # upsampled logits minus the upsampled maximum, a per-pixel shift that bounds every upsampled logit from
        # above (non-negative weights); the exact maximum is used if a sum underflows.
        low_max = z_low.amax(dim=1, keepdim=True)
        if objective.upsample:
            shift_sum = (objective.shift_coef * low_max).sum(dim=(1, 2))
        else:
            shift_sum = (shift_weight * low_max[None]).sum(dim=(0, 2, 3))
        exp = _shifted_logits(z_low, low_max, h, w, objective, buffer, exp=True)
        buffer = exp if objective.upsample else None
        s_all, s_m1, s_m2 = _class_sums(exp, num_teacher, objective.not_annotated)
        underflowing = _underflowing_pixels(objective, s_all, s_m1, s_m2, has_kd)
        s_m1, s_m2 = s_m1.clamp_min_(1e-30), s_m2.clamp_min_(1e-30)
        # d loss / d z = a softmax - b softmax over M1 - g softmax over M2, written into `exp` in place, one
        # contiguous class slice at a time: row 0 is in M1 and M2, base rows in M1, novel rows in M2 and in M1
        # unless annotated.
        u = objective.a / s_all
        v = objective.b / s_m1
        u_v = u - v
        if has_kd:
            wg = objective.g / s_m2
            exp[:, :, :1].mul_(u_v - wg)
            exp[:, :, num_teacher:].mul_(u.sub_(wg) - v * objective.not_annotated)
        else:
            exp[:, :, :1].mul_(u_v)
            exp[:, :, num_teacher:].mul_(u - v * objective.not_annotated)
        exp[:, :, 1:num_teacher].mul_(u_v)
        grad = exp
        # The loss (its history is returned): per-pixel log-sum-exps as dot products with their weights.
        log_s = [s_all.log_(), s_m1.log_()] + ([s_m2.log_()] if has_kd else [])
        log_terms = _vecdot(objective.a, log_s[0]) - _vecdot(objective.b, log_s[1])
        if has_kd:
            log_terms -= _vecdot(objective.g, log_s[2])
        if underflowing is not None:
            # At a few pixels every class of a log-sum-exp that counts is far below the shared shift (logits that
            # cross between feature pixels, or a class set far below the maximum): redo those pixels exactly, each
            # class set with its own maximum.
            pixel, support = underflowing
            z = _shifted_logits(z_low, low_max, h, w, objective, clamp=False)
            if _DENSE_EXACT_FACTOR * len(pixel) > z.shape[1] * z.shape[3]:
                # Many pixels (saturated logits): vectorised over the whole map, not gathered pixel by pixel.
                log_terms, grad = _exact_map(z, objective, has_kd)
            else:
                exact, exact_grad = _exact_pixels(z, pixel, support, objective, has_kd)
                weights = (objective.a, -objective.b, -objective.g)
                shared = sum(wt[0, support, 0, pixel] * log[0, support, 0, pixel] for wt, log in zip(weights, log_s))
                log_terms = log_terms.index_add(0, support, exact - shared)
                grad[0, support, :, pixel] = exact_grad
        linear = (objective.R * z_low).sum(dim=(1, 2))
        loss = (log_terms + shift_sum - linear).view(num_episodes, num_shots).sum(1)
        grad = _adjoint(grad, h, w, objective)
        grad = (grad - objective.R).view(num_episodes, num_shots, num_classes, h * w)
        grad_weight = torch.matmul(grad, features_t).sum(dim=1)
        grad_bias = grad.sum(dim=(1, 3)) if bias is not None else None
        if extra is not None:
            with torch.enable_grad():
                params = [weight.clone().requires_grad_(True)]
                if bias is not None:
                    params.append(bias.clone().requires_grad_(True))
                extra_loss = extra(params[0], params[1] if bias is not None else None)
                extra_grads = torch.autograd.grad(extra_loss.sum(), params)
            loss = loss + extra_loss.detach()
            grad_weight = grad_weight + extra_grads[0]
            if bias is not None:
                grad_bias = grad_bias + extra_grads[1]
        history.append(loss)
        weight = weight - lr * grad_weight
        if bias is not None:
            bias = bias - lr * grad_bias
    hist = torch.stack(history, dim=1) if history else weight.new_zeros(num_episodes, 0)
    return weight, bias, hist
