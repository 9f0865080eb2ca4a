"""Per-episode few-shot adaptation of the classifier on cached features: the one place where a classifier is
fine-tuned on a support set (evaluation and the `few-shot-segmentation` pipeline both call it).

API summary (stable):

- [`AdaptationConfig`]: hyper-parameters (`method` "fss"|"gfss", `steps` 100, `lr` 0.1, `gamma` 10.0, `kd_scale`,
  `kd_skip_novel`, `novel_init`, `ce_weighting`, `kd_average_over_padding`, `loss_resolution` "input"|"feature",
  `transductive`, `legacy_carry_over`, `seed`, ...).
- [`adapt_gfss`]`(support_features, support_labels, base_weight, base_bias=None, *, support_classes=None,
  num_novel_classes=None, config=None, seeds=None, query_features=None, state=None)` -> [`AdaptedClassifier`]
  with the expanded `(T + N)`-way rows `[background, base..., novel...]`.
- [`adapt_fss`]`(support_features, support_masks, *, config=None, seeds=None, bias=False)` -> a fresh 2-way
  [`AdaptedClassifier`] `[background, c*]`.
- [`adapt`]: dispatches on `config.method`.
- [`predict`]`(query_features, classifier, size=None, align_corners=True)` -> logits.
- [`CarryOverState`]: the explicit state of `legacy_carry_over=True` (the reference's drift, for comparison).
- [`learn_classes`]`(model, support_images, support_masks, class_names, ...)`: adapt novel rows from images and
  write them into a [`GFSSModel`] with `expand_classifier`, so `save_pretrained` publishes them.

Shapes: `D` feature channels, `(h, w)` feature size, `(H, W)` label size (the image canvas), `K` supports per
episode, `E` episodes adapted together. Every function accepts one episode (no `E` axis) or a batch of episodes
that share shapes (leading `E` axis); a batch gives the same result as the episodes one by one (up to float
rounding), because the loss is a sum of per-episode means and every episode has its own parameters.

Labels of supports: 0 background ("none of the classes annotated in this image"), `1..N` the novel classes (novel
class `n` is classifier row `T - 1 + n`), `ignore_index` (255) ignored. With `support_classes`, masks are binary
(0/1/255) and `support_classes[k]` (0-based) names the novel class of support `k`.

The loss is the one of `losses.few_shot_cross_entropy` + gamma * `losses.distillation_loss` (tests check values and
gradients against them), evaluated with analytic gradients so that the exact input-resolution loss stays cheap: the
logits are upsampled once per step and everything constant across steps (teacher, labels, weights, the linear part
of the loss) is precomputed once.

This module imports only torch at import time (numpy, PIL and the image processor lazily in `encode_supports`), so
that it travels with a Hub export of the pipeline.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptationConfig",
    "AdaptedClassifier",
    "CarryOverState",
    "EncodedSupports",
    "adapt",
    "adapt_encoded",
    "adapt_fss",
    "adapt_gfss",
    "check_support_background",
    "encode_supports",
    "learn_classes",
    "predict",
]

_METHODS = ("fss", "gfss")
_KD_SCALES = ("reference", "paper")
_NOVEL_INITS = ("random", "prototype", "kaiming_uniform")
_CE_WEIGHTINGS = (None, "reference")
_RESOLUTIONS = ("input", "feature")


@dataclass
class AdaptationConfig:
    r"""
    Hyper-parameters of per-episode classifier fine-tuning (METHOD.md section 4). The defaults are the paper's
    method with the reference's loss scaling; every deviation of the reference code is a named switch.

    Args:
        method (`str`, *optional*, defaults to `"gfss"`):
            `"gfss"`: the pre-trained `(B+1)`-way classifier expanded by one row per novel class, trained with
            CE' + gamma * KD. `"fss"`: a fresh 2-way classifier trained with cross-entropy (Eq. 1).
        steps (`int`, *optional*, defaults to 100): SGD steps.
        lr (`float`, *optional*, defaults to 0.1): learning rate of plain SGD (no momentum, no weight decay).
        gamma (`float`, *optional*, defaults to 10.0): weight of the distillation term (Eq. 8).
        kd_scale (`str`, *optional*, defaults to `"reference"`): `"reference"` divides KD by the number of teacher
            classes (B+1); `"paper"` is Eq. 6 as printed.
        kd_skip_novel (`bool`, *optional*, defaults to `False`): distil only on support pixels NOT labelled as a
            novel class (the teacher is wrong there by construction).
        kd_average_over_padding (`bool`, *optional*, defaults to `False`): average KD over every canvas pixel,
            padding and ignored pixels included, as the reference does.
        novel_init (`str`, *optional*, defaults to `"random"`): `"random"` (normal, std `init_std`, as the paper
            describes), `"kaiming_uniform"` (what the reference code actually does: `nn.Conv2d`'s default, uniform in
            `[-1/sqrt(D), 1/sqrt(D)]`, i.e. Kaiming uniform with `a = sqrt(5)`; `init_std` unused), or
            `"prototype"` (masked average of the support features of the class, scaled to the mean norm of the
            pre-trained rows). GFSS novel rows only; the FSS 2-way classifier always starts from `init_std`.
        init_std (`float`, *optional*, defaults to 0.01): std of the random initialisation.
        ce_weighting (`str`, *optional*): `None` (plain mean) or `"reference"`: foreground pixels weighted
            `n_bg / n_fg` (pooled over the episode's supports), background 1; when either count is 0 both weights
            are 1 (the reference divides by zero there).
        normalize_features (`bool`, *optional*, defaults to `False`): L2-normalise every feature vector (support,
            query, and the teacher's input) over channels before the classifier, in fine-tuning and prediction, as
            the reference code does. The pre-trained rows were trained on unnormalised features, so their logits
            shrink by the feature norm.
        loss_resolution (`str`, *optional*, defaults to `"input"`): `"input"` computes the loss on logits upsampled
            to the label size (exact); `"feature"` downsamples the labels (nearest) to the feature size (faster).
        align_corners (`bool`, *optional*, defaults to `True`): of the bilinear logit upsampling; use the model's
            `config.logits_align_corners`.
        transductive (`bool`, *optional*, defaults to `False`): add a DIaM-style query term (mean per-pixel entropy
            minus entropy of the mean prediction, on the query features at feature resolution); needs
            `query_features`.
        transductive_weight (`float`, *optional*, defaults to 1.0): weight of that term.
        legacy_carry_over (`bool`, *optional*, defaults to `False`): reproduce the reference's drift: each episode
            starts from the previous episode's adapted classifier, carried in an explicit [`CarryOverState`].
        seed (`int`, *optional*, defaults to 0): seed of the random initialisation (per episode, `seeds` overrides).
        ignore_index (`int`, *optional*, defaults to 255): label of ignored pixels.

    Example:

    ```python
    >>> from gfss_hf.adaptation import AdaptationConfig
    >>> config = AdaptationConfig(gamma=0.0, steps=50)
    >>> config.method, config.lr
    ('gfss', 0.1)
    ```
    """

    method: str = "gfss"
    steps: int = 100
    lr: float = 0.1
    gamma: float = 10.0
    kd_scale: str = "reference"
    kd_skip_novel: bool = False
    kd_average_over_padding: bool = False
    novel_init: str = "random"
    init_std: float = 0.01
    ce_weighting: str | None = None
    normalize_features: bool = False
    loss_resolution: str = "input"
    align_corners: bool = True
    transductive: bool = False
    transductive_weight: float = 1.0
    legacy_carry_over: bool = False
    seed: int = 0
    ignore_index: int = 255

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"AdaptationConfig.{name}={value!r} is invalid: {rule}.")

        # Generic over the declared types, so that a new numeric field is checked without a line of its own: a NaN or
        # inf hyper-parameter turns every logit into NaN without an error, and int(2.7) would silently run 2 steps.
        for f in fields(self):
            kind = str(f.type).replace(" ", "").split("|")
            value = getattr(self, f.name)
            if value is None and "None" in kind:
                continue
            if "float" in kind:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    bad(f.name, value, "must be a number")
                if not math.isfinite(float(value)):
                    bad(f.name, value, "must be finite (not NaN or infinity)")
                setattr(self, f.name, float(value))
            elif "int" in kind:
                integral = isinstance(value, numbers.Integral) or (
                    isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()
                )
                if isinstance(value, bool) or not integral:
                    bad(f.name, value, "must be an integer (a float is accepted only when it has no fractional part)")
                setattr(self, f.name, int(value))

        if self.method not in _METHODS:
            bad("method", self.method, f"allowed values are {_METHODS}")
        if int(self.steps) < 0:
            bad("steps", self.steps, "must be >= 0")
        if not float(self.lr) > 0:
            bad("lr", self.lr, "must be > 0")
        if float(self.gamma) < 0:
            bad("gamma", self.gamma, "must be >= 0")
        if self.kd_scale not in _KD_SCALES:
            bad("kd_scale", self.kd_scale, f"allowed values are {_KD_SCALES}")
        if self.novel_init not in _NOVEL_INITS:
            bad("novel_init", self.novel_init, f"allowed values are {_NOVEL_INITS}")
        if self.ce_weighting not in _CE_WEIGHTINGS:
            bad("ce_weighting", self.ce_weighting, f"allowed values are {_CE_WEIGHTINGS}")
        if self.loss_resolution not in _RESOLUTIONS:
            bad("loss_resolution", self.loss_resolution, f"allowed values are {_RESOLUTIONS}")
        if float(self.init_std) < 0:
            bad("init_std", self.init_std, "must be >= 0")

    def replace(self, **changes) -> AdaptationConfig:
        """A copy with some fields changed (unknown names raise)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"AdaptationConfig has no field(s) {unknown}; known fields: {sorted(names)}.")
        return AdaptationConfig(**{**{n: getattr(self, n) for n in names}, **changes})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class AdaptedClassifier:
    r"""
    An adapted 1x1 classifier.

    Args:
        weight (`torch.Tensor` of shape `(C, D)` or `(E, C, D)`): rows `[background, base..., novel...]` (GFSS) or
            `[background, c*]` (FSS), detached.
        bias (`torch.Tensor` of shape `(C,)` or `(E, C)`, *optional*): bias rows, `None` without bias.
        num_base_rows (`int`): `T`, rows that come from the pre-trained classifier (background included); 1 for FSS.
        num_novel_classes (`int`): `N`, rows appended after them (1 for FSS).
        loss_history (`torch.Tensor` of shape `(steps,)` or `(E, steps)`): the fine-tuning loss before each step.
        normalize_features (`bool`, *optional*, defaults to `False`): the rows were fitted on L2-normalised features;
            [`predict`] normalises query features the same way.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    num_base_rows: int
    num_novel_classes: int
    loss_history: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    normalize_features: bool = False

    @property
    def batched(self) -> bool:
        return self.weight.dim() == 3

    @property
    def novel_weight(self) -> torch.Tensor:
        """The novel rows, `(N, D)` or `(E, N, D)`."""
        return self.weight[..., self.num_base_rows :, :]

    @property
    def novel_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[..., self.num_base_rows :]

    def episode(self, index: int) -> AdaptedClassifier:
        """Episode `index` of a batched result, as an unbatched classifier."""
        if not self.batched:
            raise ValueError("this classifier is not batched; it is already a single episode.")
        return AdaptedClassifier(
            self.weight[index],
            None if self.bias is None else self.bias[index],
            self.num_base_rows,
            self.num_novel_classes,
            self.loss_history[index] if self.loss_history.dim() == 2 else self.loss_history,
            self.normalize_features,
        )

    def select(self, indices: Sequence[int]) -> AdaptedClassifier:
        """The episodes `indices` of a batched result, still batched."""
        if not self.batched:
            raise ValueError("this classifier is not batched; select episodes of a batched result.")
        idx = torch.as_tensor(list(indices), device=self.weight.device, dtype=torch.long)
        history = self.loss_history.index_select(0, idx.to(self.loss_history.device))
        return AdaptedClassifier(
            self.weight.index_select(0, idx),
            None if self.bias is None else self.bias.index_select(0, idx),
            self.num_base_rows,
            self.num_novel_classes,
            history if self.loss_history.dim() == 2 else self.loss_history,
            self.normalize_features,
        )


@dataclass
class CarryOverState:
    r"""
    Explicit state of `AdaptationConfig(legacy_carry_over=True)`: the classifier the previous episode ended with.
    The reference code never resets its expanded classifier between episodes (its saved "initial" weights alias the
    live tensors), so each episode starts where the previous one stopped. Pass the same object to consecutive
    `adapt_gfss` calls to reproduce that drift; a fresh object starts from the pre-trained weights.

    Args:
        weight (`torch.Tensor`, *optional*): `(T + N, D)` rows of the last episode.
        bias (`torch.Tensor`, *optional*): their bias.
        episodes (`int`): episodes adapted so far.
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    episodes: int = 0


# -- shape helpers ----------------------------------------------------------------------------------------------
def _batch(tensor: torch.Tensor | None, dims: int, name: str, shape_doc: str) -> tuple[torch.Tensor | None, bool]:
    """Add the episode axis when missing; returns (tensor, was_batched)."""
    if tensor is None:
        return None, False
    if tensor.dim() == dims:
        return tensor.unsqueeze(0), False
    if tensor.dim() == dims + 1:
        return tensor, True
    raise ValueError(f"{name} must have shape {shape_doc} (or with a leading episode axis), got {tuple(tensor.shape)}.")


def _seeds(seeds, default: int, num: int) -> list[int]:
    if seeds is None:
        return [int(default)] * num
    if isinstance(seeds, int):
        return [int(seeds)] * num
    seeds = [int(s) for s in seeds]
    if len(seeds) != num:
        raise ValueError(f"seeds has {len(seeds)} entries for {num} episodes; give one seed per episode.")
    return seeds


def _random_rows(
    seeds: list[int], rows: int, dim: int, std: float, like: torch.Tensor, kind: str = "normal"
) -> torch.Tensor:
    """(E, rows, dim) random rows, episode e from its own CPU generator seeded `seeds[e]` (device-independent):
    `kind="normal"` with std `std`, or `"kaiming_uniform"`: `nn.Conv2d`'s default for a 1x1 conv of `dim` inputs
    (Kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(dim), 1/sqrt(dim)))."""
    out = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if kind == "kaiming_uniform":
            bound = 1.0 / math.sqrt(dim)
            out.append(torch.rand(rows, dim, generator=generator) * (2 * bound) - bound)
        else:
            out.append(torch.randn(rows, dim, generator=generator) * std)
    return torch.stack(out).to(device=like.device, dtype=like.dtype)


def _normalized(features: torch.Tensor | None, enabled: bool) -> torch.Tensor | None:
    """L2 normalisation over the channel axis (-3) of `(..., D, h, w)` features when `enabled`."""
    return F.normalize(features, dim=-3) if enabled and features is not None else features


def _downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest downsampling of (E, K, H, W) labels to (E, K, h, w)."""
    e, k = labels.shape[:2]
    out = F.interpolate(labels.flatten(0, 1)[:, None].float(), size=tuple(size), mode="nearest")
    return out[:, 0].long().view(e, k, *size)


def _classifier_logits(weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """(E, C, D) x (E, K, D, h, w) -> (E, K, C, h, w)."""
    logits = torch.einsum("ecd,ekdhw->ekchw", weight, features)
    if bias is not None:
        logits = logits + bias[:, None, :, None, None]
    return logits


def _upsample(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """(E, K, C, h, w) -> (E, K, C, H, W) bilinear, in channels-last memory: ATen's upsampling is ~2.5x faster there,
    and so is what follows over the class dimension (`argmax(dim=class)` after `predict`: 8x, 92 -> 11 ms on a
    473 x 473 x 17 map; the teacher's softmax)."""
    e, k = logits.shape[:2]
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    low = logits.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    up = F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return up.view(e, k, *up.shape[1:])


def _per_episode_mean(loss_map: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """(E, K, H, W) map (0 where not counted) -> (E,) sums / denom (0 when nothing counted)."""
    return loss_map.flatten(1).sum(1) / denom.clamp_min(1e-12)


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


def _entropy_term(weight, bias, query_features) -> torch.Tensor:
    """Per-episode mean pixel entropy minus entropy of the mean prediction (DIaM-style, feature resolution)."""
    logits = _classifier_logits(weight, bias, query_features)  # (E, Q, C, h, w)
    log_p = torch.log_softmax(logits.float(), dim=2)
    p = log_p.exp()
    cond = -(p * log_p).sum(2).flatten(1).mean(1)
    marginal = p.transpose(1, 2).flatten(2).mean(2)  # (E, C)
    marg_entropy = -(marginal * torch.log(marginal.clamp_min(1e-12))).sum(1)
    return cond - marg_entropy


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


def _build_objective(
    labels_rows, valid, annotated_rows, ce_weights, ce_denom, kd_mask, kd_denom, kd_coef, teacher_probs,
    num_teacher, num_classes, feature_size, align_corners,
) -> _Objective:  # fmt: skip
    """Coefficients of `_Objective` from labels (N, H, W) in row space (0 background, ignore elsewhere `valid`
    false), annotated rows (N, C), per-support denominators (N,) and teacher probabilities (N, T, H, W) or None."""
    n, height, width = labels_rows.shape
    dtype = ce_denom.dtype
    inv_ce = torch.where(ce_denom > 0, 1.0 / ce_denom.clamp_min(1e-12), torch.zeros_like(ce_denom))
    alpha = valid.to(dtype) * inv_ce[:, None, None]
    if ce_weights is not None:
        alpha = alpha * ce_weights
    fg = valid & (labels_rows > 0)
    bg = valid & (labels_rows == 0)
    r = torch.zeros(n, num_classes, height, width, dtype=dtype, device=labels_rows.device)
    r.scatter_(1, torch.where(fg, labels_rows, torch.zeros_like(labels_rows))[:, None], (alpha * fg)[:, None])
    a = alpha.clone()
    b = alpha * bg
    g = torch.zeros_like(alpha)
    if teacher_probs is not None:
        inv_kd = torch.where(kd_denom > 0, kd_coef / kd_denom.clamp_min(1e-12), torch.zeros_like(kd_denom))
        beta = kd_mask.to(dtype) * inv_kd[:, None, None]
        a = a + beta
        g = beta * teacher_probs[:, 0]
        r[:, 1:num_teacher] += beta[:, None] * teacher_probs[:, 1:]
    not_annotated = (~annotated_rows[:, num_teacher:]).to(dtype)[:, :, None]  # (N, num_novel, 1)
    upsample = (height, width) != tuple(feature_size)
    if upsample:
        r = torch.ops.aten.upsample_bilinear2d_backward(r, [height, width], [n, num_classes, *feature_size], align_corners)
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
        flat(a), flat(b), flat(g), r.reshape(n, num_classes, -1), num_teacher, not_annotated, (height, width),
        upsample, align_corners, bands, shift_coef,
    )  # fmt: skip


def _shifted_logits(z_low, low_max, h: int, w: int, objective: _Objective, out=None, exp: bool = False,
                    clamp: bool = True):  # fmt: skip
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
    terms, grad = _exact_terms(logits, objective, has_kd, at(objective.a), at(objective.b), at(objective.g),
                               objective.not_annotated[support])  # fmt: skip
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


def _check_features_labels(features: torch.Tensor, labels: torch.Tensor, name: str = "support_labels") -> None:
    if labels.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"{name} has {tuple(labels.shape[:2])} (episodes, supports) but support_features has "
            f"{tuple(features.shape[:2])}; give one label map per support feature."
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer tensor of class labels, got {labels.dtype}.")


def _prototype_rows(features, novel_labels, num_novel, base_weight, size_matches_features) -> torch.Tensor:
    """(E, N, D) masked averages of support features per novel class, scaled to the mean base-row norm."""
    if size_matches_features:
        small = novel_labels
    else:
        small = _downsample_labels(novel_labels, features.shape[-2:])
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


def adapt_gfss(
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None = None,
    *,
    support_classes: torch.Tensor | Sequence | None = None,
    num_novel_classes: int | None = None,
    annotated: torch.Tensor | None = None,
    config: AdaptationConfig | None = None,
    seeds: int | Sequence[int] | None = None,
    query_features: torch.Tensor | None = None,
    state: CarryOverState | None = None,
) -> AdaptedClassifier:
    r"""
    GFSS fine-tuning (Eq. 4-8): expand the pre-trained classifier by one row per novel class and train all rows
    with CE' + gamma * KD on the support pixels, features frozen (given). Every episode starts from a fresh copy of
    `base_weight` (unless `config.legacy_carry_over`).

    Args:
        support_features (`torch.Tensor` of shape `(K, D, h, w)` or `(E, K, D, h, w)`):
            Frozen dense features of the supports (`model.extract_features`, model in eval mode).
        support_labels (`torch.Tensor` of shape `(K, H, W)` or `(E, K, H, W)`, integer):
            0 background, `1..N` novel class, `ignore_index` ignored (canvas padding included). With
            `support_classes`: binary masks (0/1/`ignore_index`).
        base_weight (`torch.Tensor` of shape `(T, D)` / `(T, D, 1, 1)`, or `(E, T, D)`):
            Pre-trained rows `[background, base...]` (e.g. `model.classifier.weight`); also the frozen teacher.
        base_bias (`torch.Tensor` of shape `(T,)` or `(E, T)`, *optional*):
            Pre-trained bias; novel rows get bias 0 and the bias is trained too.
        support_classes (`torch.Tensor` of shape `(K,)` or `(E, K)`, *optional*):
            0-based novel class of each support; turns binary masks into novel labels.
        num_novel_classes (`int`, *optional*):
            `N`; defaults to the largest novel label present (`max(support_classes) + 1` with `support_classes`).
        annotated (`torch.Tensor` of shape `(K, N)` or `(E, K, N)`, bool, *optional*):
            Novel classes each support is annotated for (its background pixels are "none of these"). Defaults to
            the support's class (`support_classes`) or the classes present in its label map. A label map that
            annotates every class fully passes all `True`.
        config ([`AdaptationConfig`], *optional*): hyper-parameters (defaults: the paper's).
        seeds (`int` or `list[int]`, *optional*): seed of each episode's random novel rows (default `config.seed`).
        query_features (`torch.Tensor` of shape `(Q, D, h, w)` or `(E, Q, D, h, w)`, *optional*):
            Only with `config.transductive`.
        state ([`CarryOverState`], *optional*): only with `config.legacy_carry_over` (single episodes).

    Returns:
        [`AdaptedClassifier`] with `T + N` rows (batched iff the inputs were).

    Example:

    ```python
    >>> feats = torch.randn(1, 8, 4, 4)  # one support, D = 8
    >>> labels = torch.zeros(1, 32, 32, dtype=torch.long)
    >>> labels[0, 8:20, 8:20] = 1  # novel class 1
    >>> base = torch.randn(3, 8) * 0.1  # background + 2 base classes
    >>> clf = adapt_gfss(feats, labels, base, config=AdaptationConfig(steps=5))
    >>> clf.weight.shape
    torch.Size([4, 8])
    ```
    """
    config = config if config is not None else AdaptationConfig()
    annotated_classes = annotated
    features, batched = _batch(support_features, 4, "support_features", "(K, D, h, w)")
    features = _normalized(features, config.normalize_features)
    labels, labels_batched = _batch(support_labels, 3, "support_labels", "(K, H, W)")
    if labels_batched != batched:
        raise ValueError(
            f"support_features {tuple(support_features.shape)} and support_labels {tuple(support_labels.shape)} "
            "disagree about the episode axis; give both with or both without it."
        )
    _check_features_labels(features, labels)
    num_episodes, _, dim = features.shape[:3]
    ignore = config.ignore_index
    labels = labels.to(features.device).long()

    if support_classes is not None:
        classes = torch.as_tensor(support_classes, device=features.device).long()
        classes = classes.view(num_episodes, -1) if classes.dim() <= 1 else classes
        if classes.shape != labels.shape[:2]:
            raise ValueError(
                f"support_classes has shape {tuple(classes.shape)} but there are {tuple(labels.shape[:2])} "
                "(episodes, supports); give one class per support."
            )
        bad = (labels != 0) & (labels != 1) & (labels != ignore)
        if bool(bad.any()):
            raise ValueError(
                f"with support_classes the support masks must be binary (0, 1, {ignore}); found "
                f"{sorted(set(labels[bad].unique().tolist()))[:5]}. Pass novel label maps without support_classes."
            )
        if bool((classes < 0).any()):
            raise ValueError(f"support_classes must be 0-based novel class indices, got {classes.tolist()}.")
        labels = torch.where(labels == 1, classes[:, :, None, None] + 1, labels)
        inferred = int(classes.max().item()) + 1
    else:
        present = labels[labels != ignore]
        inferred = int(present.max().item()) if present.numel() else 0
    num_novel = int(num_novel_classes) if num_novel_classes is not None else inferred
    if num_novel < 1:
        raise ValueError(
            "no novel class: support_labels hold no label in 1..N and num_novel_classes is not given; label the "
            "novel pixels (or pass support_classes with binary masks)."
        )
    if inferred > num_novel:
        raise ValueError(f"a support is labelled with novel class {inferred} but num_novel_classes={num_novel}.")
    bad = (labels < 0) | ((labels > num_novel) & (labels != ignore))
    if bool(bad.any()):
        raise ValueError(
            f"support_labels hold {labels[bad][0].item()}, outside 0..{num_novel} and {ignore}; use 0 background, "
            "1..N novel classes."
        )

    base_weight = base_weight.reshape(*base_weight.shape[:-2], -1) if base_weight.dim() in (4, 5) else base_weight
    base_w, _ = _batch(base_weight.to(features), 2, "base_weight", "(T, D)")
    if base_w.shape[-1] != dim:
        raise ValueError(f"base_weight has {base_w.shape[-1]} features per row but the support features have {dim}.")
    base_w = base_w.expand(num_episodes, -1, -1)
    num_teacher = base_w.shape[1]
    base_b = None
    if base_bias is not None:
        base_b, _ = _batch(base_bias.to(features), 1, "base_bias", "(T,)")
        base_b = base_b.expand(num_episodes, -1)

    # Which novel rows each support image annotates: the classes of its mask (a binary mask annotates its class even
    # when it vanished at the loss resolution, so its background still excludes that class).
    annotated = torch.zeros(num_episodes, labels.shape[1], num_teacher + num_novel, dtype=torch.bool)
    annotated = annotated.to(features.device)
    if annotated_classes is not None:
        given, _ = _batch(torch.as_tensor(annotated_classes, device=features.device), 2, "annotated", "(K, N)")
        if given.shape[1:] != (labels.shape[1], num_novel):
            raise ValueError(
                f"annotated must have shape (K, N) = ({labels.shape[1]}, {num_novel}) per episode, got "
                f"{tuple(given.shape)}."
            )
        annotated[:, :, num_teacher:] = given.bool().expand(num_episodes, -1, -1)
    elif support_classes is not None:
        annotated.scatter_(2, (classes + num_teacher)[:, :, None], True)
    else:
        for n in range(1, num_novel + 1):
            annotated[:, :, num_teacher + n - 1] = (labels == n).flatten(2).any(2)

    if config.loss_resolution == "feature":
        labels = _downsample_labels(labels, features.shape[-2:])
    size = labels.shape[-2:]

    # Initial rows: fresh copy of the pre-trained rows + novel rows.
    seed_list = _seeds(seeds, config.seed, num_episodes)
    if config.novel_init in ("random", "kaiming_uniform"):
        kind = "normal" if config.novel_init == "random" else "kaiming_uniform"
        novel_w = _random_rows(seed_list, num_novel, dim, config.init_std, features, kind)
    else:
        novel_w = _prototype_rows(features, labels, num_novel, base_w, config.loss_resolution == "feature")
    weight = torch.cat([base_w, novel_w], dim=1)
    bias = None
    if base_b is not None:
        bias = torch.cat([base_b, base_b.new_zeros(num_episodes, num_novel)], dim=1)
    if config.legacy_carry_over:
        if state is None:
            raise ValueError(
                "legacy_carry_over=True needs state=CarryOverState() passed to consecutive episodes; create one "
                "and pass the same object to every call."
            )
        if num_episodes != 1:
            raise ValueError("legacy_carry_over=True adapts episodes one after another; pass one episode at a time.")
        if state.weight is not None:
            if state.weight.shape != weight.shape[1:]:
                raise ValueError(
                    f"the carried classifier has shape {tuple(state.weight.shape)} but this episode needs "
                    f"{tuple(weight.shape[1:])}; carry-over needs the same number of classes in every episode."
                )
            weight = state.weight.to(weight)[None].clone()
            if bias is not None and state.bias is not None:
                bias = state.bias.to(bias)[None].clone()
    elif state is not None:
        raise ValueError("state is only used with AdaptationConfig(legacy_carry_over=True); drop it or set the flag.")

    query, _ = _batch(query_features, 4, "query_features", "(Q, D, h, w)")
    query = _normalized(query, config.normalize_features)
    if config.transductive and query is None:
        raise ValueError("transductive=True needs query_features (the frozen features of the query images).")
    if not config.transductive and query is not None:
        raise ValueError("query_features are only used with AdaptationConfig(transductive=True).")
    if query is not None and query.shape[0] != num_episodes:
        raise ValueError(f"query_features has {query.shape[0]} episodes, the supports {num_episodes}.")

    # Constant parts of the loss, computed once for all steps.
    num_classes = num_teacher + num_novel
    valid = labels != ignore
    rows = torch.where(valid & (labels >= 1), labels + num_teacher - 1, torch.zeros_like(labels))
    ce_weights, ce_denom = _ce_weights(labels, valid, config.ce_weighting, features.dtype)
    if config.kd_average_over_padding:
        kd_mask = torch.ones_like(valid)
    elif config.kd_skip_novel:
        kd_mask = valid & (labels == 0)
    else:
        kd_mask = valid
    kd_denom = kd_mask.flatten(1).sum(1).to(features.dtype)
    teacher_probs = None
    if config.gamma > 0:
        with torch.no_grad():
            teacher = _upsample(_classifier_logits(base_w, base_b, features), size, config.align_corners)
            teacher_probs = torch.softmax(teacher.flatten(0, 1).float(), dim=1).to(features.dtype)
    kd_coef = config.gamma / (num_teacher if config.kd_scale == "reference" else 1.0)
    num_shots = labels.shape[1]
    per_support = lambda x: x.repeat_interleave(num_shots)  # noqa: E731  (episode denominators per support)
    objective = _build_objective(
        rows.flatten(0, 1), valid.flatten(0, 1), annotated.flatten(0, 1),
        None if ce_weights is None else ce_weights.flatten(0, 1), per_support(ce_denom),
        kd_mask.flatten(0, 1), per_support(kd_denom), kd_coef, teacher_probs,
        num_teacher, num_classes, features.shape[-2:], config.align_corners,
    )  # fmt: skip
    extra = None
    if query is not None:
        extra = lambda w, b: config.transductive_weight * _entropy_term(w, b, query)  # noqa: E731
    weight, bias, history = _fit(features, weight, bias, objective, config.steps, config.lr, extra)
    if config.legacy_carry_over:
        state.weight, state.bias = weight[0].clone(), None if bias is None else bias[0].clone()
        state.episodes += 1
    result = AdaptedClassifier(weight, bias, num_teacher, num_novel, history, config.normalize_features)
    return result if batched else result.episode(0)


# -- FSS ----------------------------------------------------------------------------------------------------------
def adapt_fss(
    support_features: torch.Tensor,
    support_masks: torch.Tensor,
    *,
    config: AdaptationConfig | None = None,
    seeds: int | Sequence[int] | None = None,
    bias: bool = False,
) -> AdaptedClassifier:
    r"""
    FSS fine-tuning: a fresh 2-way classifier `[background, c*]` trained with cross-entropy (Eq. 1) on the support
    pixels, features frozen.

    Args:
        support_features (`torch.Tensor` of shape `(K, D, h, w)` or `(E, K, D, h, w)`): frozen support features.
        support_masks (`torch.Tensor` of shape `(K, H, W)` or `(E, K, H, W)`): binary masks, 0 background,
            1 foreground, `ignore_index` ignored.
        config ([`AdaptationConfig`], *optional*): `steps`, `lr`, `init_std`, `ce_weighting`, `loss_resolution`,
            `align_corners`, `seed` apply; the GFSS-only fields are not used.
        seeds (`int` or `list[int]`, *optional*): per-episode seeds of the random initialisation.
        bias (`bool`, *optional*, defaults to `False`): give the 2-way classifier a bias (initialised to 0).

    Returns:
        [`AdaptedClassifier`] with 2 rows.

    Example:

    ```python
    >>> feats = torch.randn(1, 8, 4, 4)
    >>> masks = torch.zeros(1, 32, 32, dtype=torch.long)
    >>> masks[0, 4:16, 4:16] = 1
    >>> adapt_fss(feats, masks, config=AdaptationConfig(method="fss", steps=5)).weight.shape
    torch.Size([2, 8])
    ```
    """
    config = config if config is not None else AdaptationConfig(method="fss")
    features, batched = _batch(support_features, 4, "support_features", "(K, D, h, w)")
    features = _normalized(features, config.normalize_features)
    masks, masks_batched = _batch(support_masks, 3, "support_masks", "(K, H, W)")
    if masks_batched != batched:
        raise ValueError("support_features and support_masks disagree about the episode axis.")
    _check_features_labels(features, masks, "support_masks")
    ignore = config.ignore_index
    masks = masks.to(features.device).long()
    bad = (masks != 0) & (masks != 1) & (masks != ignore)
    if bool(bad.any()):
        raise ValueError(f"FSS support masks must be binary (0, 1, {ignore}); found {masks[bad][0].item()}.")
    num_episodes, _, dim = features.shape[:3]
    if config.loss_resolution == "feature":
        masks = _downsample_labels(masks, features.shape[-2:])
    weight = _random_rows(_seeds(seeds, config.seed, num_episodes), 2, dim, config.init_std, features)
    bias_t = features.new_zeros(num_episodes, 2) if bias else None
    valid = masks != ignore
    weights, denom = _ce_weights(masks, valid, config.ce_weighting, features.dtype)
    num_shots = masks.shape[1]
    annotated = torch.zeros(num_episodes * num_shots, 2, dtype=torch.bool, device=features.device)
    annotated[:, 1] = True
    objective = _build_objective(
        torch.where(valid, masks, torch.zeros_like(masks)).flatten(0, 1), valid.flatten(0, 1), annotated,
        None if weights is None else weights.flatten(0, 1), denom.repeat_interleave(num_shots),
        None, None, 0.0, None, 1, 2, features.shape[-2:], config.align_corners,
    )  # fmt: skip
    weight, bias_t, history = _fit(features, weight, bias_t, objective, config.steps, config.lr)
    result = AdaptedClassifier(weight, bias_t, 1, 1, history, config.normalize_features)
    return result if batched else result.episode(0)


def adapt(support_features: torch.Tensor, support_labels: torch.Tensor, base_weight=None, base_bias=None, *,
          config: AdaptationConfig | None = None, **kwargs) -> AdaptedClassifier:  # fmt: skip
    """
    Dispatch on `config.method`: [`adapt_gfss`] (needs `base_weight`) or [`adapt_fss`] (`base_weight` must be
    `None`). Keyword arguments are those of the chosen function.
    """
    config = config if config is not None else AdaptationConfig()
    if config.method == "gfss":
        if base_weight is None:
            raise ValueError("method='gfss' expands the pre-trained classifier: pass base_weight (and base_bias).")
        return adapt_gfss(support_features, support_labels, base_weight, base_bias, config=config, **kwargs)
    if base_weight is not None or base_bias is not None:
        raise ValueError("method='fss' trains a fresh 2-way classifier; base_weight/base_bias are not used.")
    return adapt_fss(support_features, support_labels, config=config, **kwargs)


def predict(
    query_features: torch.Tensor,
    classifier: AdaptedClassifier | torch.Tensor,
    bias: torch.Tensor | None = None,
    size=None,
    align_corners: bool = True,
) -> torch.Tensor:
    r"""
    Logits of adapted classifier(s) on query features.

    Args:
        query_features (`torch.Tensor` of shape `(Q, D, h, w)`, or `(E, Q, D, h, w)` for a batched classifier).
        classifier ([`AdaptedClassifier`] or `torch.Tensor` of shape `(C, D)` / `(E, C, D)`): the rows.
        bias (`torch.Tensor`, *optional*): with a weight tensor, its bias.
        size (`tuple[int, int]`, *optional*): upsample the logits bilinearly to this size (default: feature size).
        align_corners (`bool`, *optional*, defaults to `True`): of that upsampling.

    Returns:
        `torch.Tensor` of shape `(Q, C, H, W)` (or `(E, Q, C, H, W)`).

    Example:

    ```python
    >>> logits = predict(torch.randn(2, 8, 4, 4), torch.randn(3, 8), size=(32, 32))
    >>> logits.shape
    torch.Size([2, 3, 32, 32])
    ```
    """
    if isinstance(classifier, AdaptedClassifier):
        if bias is not None:
            raise ValueError("bias is taken from the AdaptedClassifier; do not pass it separately.")
        weight, bias = classifier.weight, classifier.bias
        query_features = _normalized(query_features, classifier.normalize_features)
    else:
        weight = classifier.reshape(*classifier.shape[:-2], -1) if classifier.dim() in (4, 5) else classifier
    batched = weight.dim() == 3
    features, features_batched = _batch(query_features, 4, "query_features", "(Q, D, h, w)")
    if batched != features_batched:
        raise ValueError(
            f"a batched classifier {tuple(weight.shape)} needs batched query features (E, Q, D, h, w) and vice "
            f"versa; got {tuple(query_features.shape)}."
        )
    weight = weight.to(features) if batched else weight.to(features)[None]
    if bias is not None:
        bias = bias.to(features) if batched else bias.to(features)[None]
    logits = _classifier_logits(weight, bias, features)
    if size is not None:
        logits = _upsample(logits, size, align_corners)
    return logits if batched else logits[0]


# -- supports given as images --------------------------------------------------------------------------------------
@dataclass
class EncodedSupports:
    r"""
    Supports turned into what [`adapt_gfss`] / [`adapt_fss`] read (see [`encode_supports`]).

    Args:
        features (`torch.Tensor` of shape `(K, D, h, w)`): frozen features.
        labels (`torch.Tensor` of shape `(K, S, S)`): 0 background, `1..N` novel class, 255 ignored (padding too).
        annotated (`torch.Tensor` of shape `(K, N)`, bool): classes each support is annotated for.
        class_names (`list[str]`): the `N` classes, in row order.
    """

    features: torch.Tensor
    labels: torch.Tensor
    annotated: torch.Tensor
    class_names: list


def _binary_mask(mask, index: int):
    """0/1/255 (1 foreground) or 0/255 (white-on-black, 255 foreground) or bool -> int64 0/1/255."""
    import numpy as np

    values = set(np.unique(mask).tolist())
    if values <= {0, 1, 255}:
        if 1 not in values and 255 in values:
            return np.where(mask == 255, 1, 0).astype(np.int64)  # a white-on-black PNG
        return mask.astype(np.int64)
    shown = sorted(values - {0, 1, 255})[:6]
    raise ValueError(
        f"support_masks[{index}] has values {shown} besides 0/1/255; a binary mask holds 0 background and 1 "
        "foreground (255 = ignore), or 0 and 255 (a white-on-black PNG). Threshold soft or anti-aliased masks "
        "first, or pass mask_type='label_map' for maps of several classes."
    )


def _fold_name(name: str) -> str:
    return " ".join(name.split()).casefold()


def check_support_background(masks, class_names, support_class=None, ignore_index: int = 255, size=None) -> None:
    """
    Refuse a class whose supports hold no pixel of anything else: with only positive pixels, the fine-tuned row
    learns "everything is this class" and the whole query is labelled with it.

    Args:
        masks (`list[np.ndarray]`): one `HxW` integer mask per support: binary (0 background, 1 object,
            `ignore_index` ignored) when `support_class` is given, else label maps (0 background, `k` =
            `class_names[k - 1]`, `ignore_index` ignored).
        class_names (`list[str]`): the classes, for the message.
        support_class (`list[int]`, *optional*): the 0-based class of each binary mask; `None` for label maps.
        ignore_index (`int`, *optional*, defaults to 255): the ignored label.
        size (`tuple[int, int]`, *optional*): the canvas size when the masks have been resized (for the message).

    Raises:
        `ValueError`: naming the class, its supports and what a support mask must contain.
    """
    import numpy as np

    for n, name in enumerate(class_names):
        rows = [k for k in range(len(masks)) if support_class is None or support_class[k] == n]
        # Another class's pixels are negatives too in a label map; in a binary mask only 0 is.
        other = 1 if support_class is not None else n + 1
        if any(((np.asarray(masks[k]) != other) & (np.asarray(masks[k]) != ignore_index)).any() for k in rows):
            continue
        where = "" if size is None else f" after resizing to {size[1]}x{size[0]}"
        shown = ", ".join(f"support_masks[{k}]" for k in rows)
        raise ValueError(
            f"class {name!r}: no background pixel in any of its supports ({shown}){where}; every pixel is the object "
            "or ignored. A support mask must contain background (0; in a label map, 0 or another class) as well as "
            "the object (1, or 255 on a black mask): mark only the object, so the model also sees what the class "
            "is not."
        )


def encode_supports(
    model,
    support_images,
    support_masks,
    class_names,
    image_processor=None,
    mask_type: str = "binary",
    loss_resolution: str = "input",
) -> EncodedSupports:
    r"""
    Validate user supports, preprocess them with the model's image processor and compute their frozen features
    (the model must be in eval mode). Every check raises an error that names the argument and the fix.

    Args:
        model ([`GFSSModel`]): gives the features and the existing class names.
        support_images (`list`): PIL images, numpy arrays, tensors or paths (any mode; see `load_image`).
        support_masks (`list`): one mask per image (PIL, numpy, tensor or path).
        class_names (`str` or `list[str]`): see [`learn_classes`].
        image_processor ([`GFSSImageProcessor`], *optional*): defaults to `GFSSImageProcessor.from_config`.
        mask_type (`str`, *optional*, defaults to `"binary"`): `"binary"` or `"label_map"` (see [`learn_classes`]).
        loss_resolution (`str`, *optional*, defaults to `"input"`): with `"feature"`, also checks that every
            support keeps a foreground pixel at the feature size.

    Returns:
        [`EncodedSupports`].
    """
    import numpy as np

    from .image_processing_gfss import GFSSImageProcessor, load_image, load_mask

    if mask_type not in ("binary", "label_map"):
        raise ValueError(f"mask_type={mask_type!r} is invalid; use 'binary' or 'label_map'.")
    if support_images is None or (isinstance(support_images, (list, tuple)) and len(support_images) == 0):
        raise ValueError(
            "no support images: pass support_images=[...] and support_masks=[...] (at least one annotated image)."
        )
    images = list(support_images) if isinstance(support_images, (list, tuple)) else [support_images]
    if support_masks is None:
        raise ValueError("support_masks is missing; give one mask per support image.")
    masks = list(support_masks) if isinstance(support_masks, (list, tuple)) else [support_masks]
    if len(masks) != len(images):
        raise ValueError(
            f"got {len(images)} support_images but {len(masks)} support_masks; give exactly one mask per image."
        )
    if class_names is None:
        raise ValueError("class_names is missing; name the class of each support (binary) or of each label value.")
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if mask_type == "binary" and isinstance(class_names, str):
        names = names * len(images)
    for name in names:
        # str(None) would become a class called "None": a name must be given as text.
        if not isinstance(name, str):
            raise ValueError(
                f"class_names holds {name!r} ({type(name).__name__}); every class name must be a non-empty string."
            )
    existing = list(model.config.class_names)
    folded = {_fold_name(n): n for n in existing}
    for name in names:
        if not name.strip():
            raise ValueError(f"class_names holds an empty name {name!r}; give every class a non-empty name.")
        # "Dog " and "dog" would be two rows for one concept, and the new row would fight the pre-trained one.
        if _fold_name(name) in folded:
            raise ValueError(
                f"class name {name!r} is already a class of the model ({folded[_fold_name(name)]!r}; names are "
                f"compared ignoring case and surrounding spaces; classes: {existing}); the model segments it "
                "already. Use another name for a new class."
            )
    if mask_type == "binary":
        if len(names) != len(images):
            raise ValueError(
                f"got {len(images)} support_images but {len(names)} class_names; with binary masks give one class "
                "name per support image (repeat a name for several shots of one class) or a single string."
            )
        unique = list(dict.fromkeys(names))  # first-appearance order
        support_class = [unique.index(n) for n in names]
    else:
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"class_names repeats {repeated}; with label maps each name is one label value (1..N), so names "
                "must be unique."
            )
        if not names:
            raise ValueError("class_names is empty; name the classes of label values 1..N.")
        unique = names
        support_class = None
    pils, arrays = [], []
    for i, (image, mask) in enumerate(zip(images, masks)):
        pil = load_image(image, name=f"support_images[{i}]")
        array = load_mask(mask, name=f"support_masks[{i}]")
        if array.shape != (pil.height, pil.width):
            raise ValueError(
                f"support_masks[{i}] has size {array.shape[1]}x{array.shape[0]} but support_images[{i}] is "
                f"{pil.width}x{pil.height}; a mask must have the size of its image."
            )
        if mask_type == "binary":
            array = _binary_mask(array, i)
            if not (array == 1).any():
                raise ValueError(
                    f"support_masks[{i}] has no foreground pixel; mark the object of class {names[i]!r} with 1 (or "
                    "255 on a black mask)."
                )
        else:
            bad = (array > len(names)) & (array != 255)
            if bad.any():
                raise ValueError(
                    f"support_masks[{i}] holds label {int(array[bad][0])} but class_names has {len(names)} "
                    f"classes; label maps hold 0 background, 1..{len(names)} and 255 (ignore)."
                )
            if not ((array >= 1) & (array != 255)).any():
                raise ValueError(f"support_masks[{i}] has no foreground pixel (no label in 1..{len(names)}).")
        pils.append(pil)
        arrays.append(array)
    check_support_background(arrays, unique, support_class, ignore_index=255)
    processor = image_processor if image_processor is not None else GFSSImageProcessor.from_config(model.config)
    batch = processor(pils, segmentation_maps=arrays, return_tensors="pt")
    labels = batch["labels"].long()
    ignore = processor.ignore_index
    size = tuple(labels.shape[-2:])
    for i in range(labels.shape[0]):
        if not ((labels[i] >= 1) & (labels[i] != ignore)).any():
            raise ValueError(
                f"support_masks[{i}] has no foreground pixel left after resizing to {size[1]}x{size[0]}; give a "
                "larger object (or a larger image_size)."
            )
    param = next(model.parameters())
    with torch.no_grad():
        features = model.extract_features(batch["pixel_values"].to(device=param.device, dtype=param.dtype))
    if loss_resolution == "feature":
        small = _downsample_labels(labels[None], features.shape[-2:])[0]
        for i in range(small.shape[0]):
            if not ((small[i] >= 1) & (small[i] != ignore)).any():
                raise ValueError(
                    f"support_masks[{i}] keeps no foreground pixel at the feature size {features.shape[-1]}x"
                    f"{features.shape[-2]}; use loss_resolution='input' or a larger object."
                )
    # Nearest resizing can drop the last background pixels of a nearly full mask: check again at the canvas size.
    check_support_background(list(labels.numpy()), unique, support_class, ignore_index=ignore, size=size)
    if support_class is not None:
        cls = torch.tensor(support_class)
        labels = torch.where(labels == 1, cls[:, None, None] + 1, labels)
        annotated = torch.nn.functional.one_hot(cls, len(unique)).bool()
    else:
        annotated = torch.ones(labels.shape[0], len(unique), dtype=torch.bool)
        present = {int(v) for v in np.unique(labels.numpy())} - {0, ignore}
        missing = [unique[k - 1] for k in range(1, len(unique) + 1) if k not in present]
        if missing:
            raise ValueError(
                f"class_names {missing} have no pixel in any support label map; annotate them or drop the names."
            )
    return EncodedSupports(features, labels.to(features.device), annotated.to(features.device), unique)


def adapt_encoded(model, encoded: EncodedSupports, config: AdaptationConfig, seeds=None) -> AdaptedClassifier:
    """Run [`adapt_gfss`] (expanding `model.classifier`) or [`adapt_fss`] on encoded supports (one episode).

    For FSS with several classes, one 2-way classifier per class is adapted on that class's supports (other
    supports are not used) and the result is batched with one episode per class.
    """
    config = config.replace(align_corners=model.config.logits_align_corners, ignore_index=model.config.ignore_index)
    if config.method == "gfss":
        weight = model.classifier.weight.detach()
        bias = None if model.classifier.bias is None else model.classifier.bias.detach()
        return adapt_gfss(
            encoded.features,
            encoded.labels,
            weight.reshape(weight.shape[0], -1),
            bias,
            num_novel_classes=len(encoded.class_names),
            annotated=encoded.annotated,
            config=config,
            seeds=seeds,
        )
    results = []
    ignore = config.ignore_index
    for n in range(len(encoded.class_names)):
        rows = encoded.annotated[:, n]
        labels = encoded.labels[rows]
        binary = torch.where(labels == ignore, labels, (labels == n + 1).long())
        results.append(adapt_fss(encoded.features[rows], binary, config=config, seeds=seeds))
    return AdaptedClassifier(
        torch.stack([r.weight for r in results]),
        None,
        1,
        1,
        torch.stack([r.loss_history for r in results]),
        config.normalize_features,
    )


# -- learning classes into a model --------------------------------------------------------------------------------
def learn_classes(
    model,
    support_images,
    support_masks,
    class_names,
    image_processor=None,
    config: AdaptationConfig | None = None,
    mask_type: str = "binary",
    **config_overrides,
):
    r"""
    Teach a [`GFSSModel`] new classes from a few annotated images and keep them: the novel rows adapted by
    [`adapt_gfss`] are appended with `model.expand_classifier`, so `model.save_pretrained(...)` publishes a model
    that segments base + learned classes with a plain forward pass. Calling it again appends more classes (the
    current classifier, learned classes included, acts as the frozen teacher).

    Args:
        model ([`GFSSModel`]): the model; only its classifier changes.
        support_images (`list`): PIL images, numpy arrays, tensors or paths (grayscale, RGBA, 16-bit accepted).
        support_masks (`list`): one mask per image, see `mask_type`.
        class_names (`str` or `list[str]`): with `mask_type="binary"`, the class of each support (one name per
            image; a name may repeat for K shots of one class, a single string applies to all); with
            `mask_type="label_map"`, the classes of values `1..N` of the label maps.
        image_processor ([`GFSSImageProcessor`], *optional*): defaults to `GFSSImageProcessor.from_config`.
        config ([`AdaptationConfig`], *optional*): fine-tuning hyper-parameters (GFSS).
        mask_type (`str`, *optional*, defaults to `"binary"`): `"binary"`: values {0, 1, 255} (1 foreground, 255
            ignored) or {0, 255} (a white-on-black PNG: 255 foreground), or bool; `"label_map"`: 0 background,
            `k` = `class_names[k - 1]`, 255 ignored.
        **config_overrides: fields of [`AdaptationConfig`] (e.g. `steps=50`, `gamma=0`).

    Returns:
        `list[str]`: the names of the learned classes, in the order of their new rows.

    Example:

    ```python
    >>> learn_classes(model, [image], [mask], ["my-object"])  # doctest: +SKIP
    >>> model.save_pretrained("my-model")  # doctest: +SKIP
    ```
    """
    config = (config if config is not None else AdaptationConfig()).replace(**config_overrides)
    if config.method != "gfss":
        raise ValueError(f"learn_classes keeps classes in the expanded classifier; got method={config.method!r}, use 'gfss'.")
    if config.normalize_features:
        raise ValueError(
            "normalize_features=True fits rows to L2-normalised features, but the model's classifier reads raw "
            "features: the learned rows cannot be kept in it. Learn them with normalize_features=False."
        )
    was_training = model.training
    model.eval()
    try:
        encoded = encode_supports(
            model, support_images, support_masks, class_names, image_processor, mask_type, config.loss_resolution
        )
        clf = adapt_encoded(model, encoded, config)
    finally:
        model.train(was_training)
    model.expand_classifier(encoded.class_names, weights=clf.novel_weight, bias=clf.novel_bias)
    return list(encoded.class_names)
