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
    "encode_supports",
    "learn_classes",
    "predict",
]

_METHODS = ("fss", "gfss")
_KD_SCALES = ("reference", "paper")
_NOVEL_INITS = ("random", "prototype")
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
        novel_init (`str`, *optional*, defaults to `"random"`): `"random"` (normal, std `init_std`, the reference)
            or `"prototype"` (masked average of the support features of the class, scaled to the mean norm of the
            pre-trained rows).
        init_std (`float`, *optional*, defaults to 0.01): std of the random initialisation.
        ce_weighting (`str`, *optional*): `None` (plain mean) or `"reference"`: foreground pixels weighted
            `n_bg / n_fg` (pooled over the episode's supports), background 1; when either count is 0 both weights
            are 1 (the reference divides by zero there).
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
        self.steps = int(self.steps)

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
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    num_base_rows: int
    num_novel_classes: int
    loss_history: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

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


def _random_rows(seeds: list[int], rows: int, dim: int, std: float, like: torch.Tensor) -> torch.Tensor:
    """(E, rows, dim) normal rows, episode e from its own CPU generator seeded `seeds[e]` (device-independent)."""
    out = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        out.append(torch.randn(rows, dim, generator=generator) * std)
    return torch.stack(out).to(device=like.device, dtype=like.dtype)


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
    """(E, K, C, h, w) -> (E, K, C, H, W) bilinear."""
    e, k = logits.shape[:2]
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    up = F.interpolate(logits.flatten(0, 1), size=tuple(size), mode="bilinear", align_corners=align_corners)
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

    Shapes (channels-last): `N = E * K` supports; `a, b, g` `(N, S, 1)` with `S` pixels at the loss resolution; `R`
    `(N, P, C)` with `P` pixels at the feature resolution; M1 = rows not annotated in the support (`not_annotated`
    `(N, num_novel)` marks the novel ones; base rows always are), M2 = row 0 + the novel rows (the teacher's
    background folded back, Eq. 7).
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
    not_annotated = (~annotated_rows[:, num_teacher:]).to(dtype)  # (N, num_novel)
    upsample = (height, width) != tuple(feature_size)
    if upsample:
        big_r = torch.ops.aten.upsample_bilinear2d_backward(
            r, [height, width], [n, num_classes, *feature_size], align_corners
        )
    else:
        big_r = r
    flat = lambda x: x.reshape(n, -1, 1)  # noqa: E731
    big_r = big_r.permute(0, 2, 3, 1).reshape(n, -1, num_classes)
    return _Objective(
        flat(a), flat(b), flat(g), big_r, num_teacher, not_annotated, (height, width), upsample, align_corners
    )


def _upsample_last(x: torch.Tensor, n: int, h: int, w: int, objective) -> torch.Tensor:
    """Bilinear upsampling of channels-last (N, h*w, C) to (N, H*W, C) (channels-last is ~3x faster on CPU)."""
    channels = x.shape[-1]
    up = F.interpolate(
        x.view(n, h, w, channels).permute(0, 3, 1, 2),  # an NCHW view with channels-last strides
        size=objective.size,
        mode="bilinear",
        align_corners=objective.align_corners,
    )
    return up.permute(0, 2, 3, 1).reshape(n, -1, channels)


def _class_sums(exp: torch.Tensor, num_teacher: int, not_annotated: torch.Tensor):
    """Sums of `exp` (N, S, C) over all rows, over M1 (rows not annotated) and over M2 (row 0 + novel rows), plus the
    row-0 and novel columns (copies, small). Rows below `num_teacher` are never annotated, so M1 = base rows + the
    non-annotated novel rows: each sum is direct (no subtraction, no cancellation)."""
    exp_bg = exp[..., :1].clone()
    exp_novel = exp[..., num_teacher:].clone()
    s_base = exp[..., :num_teacher].sum(dim=2, keepdim=True)
    s_novel = exp_novel.sum(dim=2, keepdim=True)
    s_m1 = s_base + (exp_novel * not_annotated[:, None, :]).sum(dim=2, keepdim=True)
    return s_base + s_novel, s_m1, exp_bg + s_novel, exp_bg, exp_novel


def _fit(features, weight, bias, objective: _Objective, steps: int, lr: float, extra=None):
    """Plain SGD on (weight, bias) for `objective` with analytic gradients (see `_Objective`); `extra(w, b)` is an
    optional additional per-episode loss differentiated by autograd. Returns detached parameters and the (E, steps)
    loss history (the loss before each step).

    Logits are kept channels-last (pixels, classes): bilinear upsampling and its adjoint are ~3x faster on CPU in
    that layout, and the per-pixel reductions over classes read contiguous memory."""
    num_episodes, num_shots, dim = features.shape[:3]
    h, w = features.shape[-2:]
    n = num_episodes * num_shots
    pixels_last = features.reshape(num_episodes, num_shots, dim, h * w).transpose(2, 3).contiguous()  # (E, K, P, D)
    weight = weight.detach().clone()
    bias = bias.detach().clone() if bias is not None else None
    num_classes = weight.shape[1]
    height, width = objective.size
    history = []
    for _ in range(steps):
        z_low = torch.einsum("ekpd,ecd->ekpc", pixels_last, weight)
        if bias is not None:
            z_low = z_low + bias[:, None, None, :]
        z_low = z_low.reshape(n, h * w, num_classes)
        if objective.upsample:
            # Stable exp without a pass over the big tensor: subtract the per-pixel maximum over classes at the
            # feature resolution BEFORE upsampling. Upsampling is linear and the same for every class, so the result
            # is the upsampled logits minus the upsampled maximum, a per-pixel shift that bounds every upsampled logit
            # from above (non-negative weights); the exact maximum is used if a sum underflows.
            low_max = z_low.amax(dim=2, keepdim=True)
            z = _upsample_last(z_low - low_max, n, h, w, objective)
            shift = _upsample_last(low_max, n, h, w, objective)
        else:
            shift = z_low.amax(dim=2, keepdim=True)
            z = z_low - shift
        exp = torch.exp(z)
        sums = _class_sums(exp, objective.num_teacher, objective.not_annotated)
        if bool((sums[1] < 1e-30).any()):
            extra_shift = z.amax(dim=2, keepdim=True)
            shift = shift + extra_shift
            exp = (z - extra_shift).exp_()
            sums = _class_sums(exp, objective.num_teacher, objective.not_annotated)
        del z
        s_all, s_m1, s_m2, exp_bg, exp_novel = sums
        log_terms = (
            objective.a * s_all.log()
            - objective.b * s_m1.clamp_min(1e-30).log()
            - objective.g * s_m2.clamp_min(1e-30).log()
            + (objective.a - objective.b - objective.g) * shift
        )
        linear = (objective.R * z_low).sum(dim=(1, 2))
        loss = (log_terms.sum(dim=(1, 2)) - linear).view(num_episodes, num_shots).sum(1)
        u = objective.a / s_all
        v = objective.b / s_m1.clamp_min(1e-30)
        wg = objective.g / s_m2.clamp_min(1e-30)
        # d loss / d z = a softmax - b softmax over M1 - g softmax over M2, written into `exp` in place: base rows
        # are all in M1, row 0 is also in M2, novel rows are in M2 and in M1 unless annotated.
        grad = exp.mul_(u - v)
        grad[..., :1] -= wg * exp_bg
        grad[..., objective.num_teacher :] = exp_novel * (u - v * objective.not_annotated[:, None, :] - wg)
        if objective.upsample:
            grad = torch.ops.aten.upsample_bilinear2d_backward(
                grad.view(n, height, width, num_classes).permute(0, 3, 1, 2),
                [height, width],
                [n, num_classes, h, w],
                objective.align_corners,
            )
            grad = grad.permute(0, 2, 3, 1).reshape(n, h * w, num_classes)
        grad = (grad - objective.R).view(num_episodes, num_shots, h * w, num_classes)
        grad_weight = torch.einsum("ekpc,ekpd->ecd", grad, pixels_last)
        grad_bias = grad.sum(dim=(1, 2)) if bias is not None else None
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


# -- GFSS ---------------------------------------------------------------------------------------------------------
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
    if config.novel_init == "random":
        novel_w = _random_rows(seed_list, num_novel, dim, config.init_std, features)
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
    result = AdaptedClassifier(weight, bias, num_teacher, num_novel, history)
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
    result = AdaptedClassifier(weight, bias_t, 1, 1, history)
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
    names = [class_names] if isinstance(class_names, str) else [str(n) for n in class_names]
    if mask_type == "binary" and isinstance(class_names, str):
        names = names * len(images)
    existing = list(model.config.class_names)
    for name in names:
        if not name.strip():
            raise ValueError(f"class_names holds an empty name {name!r}; give every class a non-empty name.")
        if name in existing:
            raise ValueError(
                f"class name {name!r} is already a class of the model ({existing}); the model segments it already. "
                "Use another name for a new class."
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
