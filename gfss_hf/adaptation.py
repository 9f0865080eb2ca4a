"""Per-episode few-shot adaptation of the classifier on frozen features: the one place where a classifier is
fine-tuned on a support set.

API summary (stable):

- [`adapt_classifier`]: the model-aware entry used by evaluation, the `few-shot-segmentation` pipeline,
  `gfss_hf.learning` (supports given as images: `learn_classes`, `adapt_to_supports`) and the scripts; it reads the
  pre-trained rows, `logits_align_corners` and `ignore_index` from the model.
- [`AdaptationConfig`]: hyper-parameters (method, steps, lr, gamma, the reference's switches, `solver`).
- [`adapt_gfss`] (expanded `(T + N)`-way rows `[background, base..., novel...]`), [`adapt_fss`] (a fresh 2-way
  classifier `[background, c*]`), [`adapt`] (dispatch on `config.method`): the model-free engine, which takes
  `align_corners` / `ignore_index` as keyword arguments. [`predict`]: logits of an [`AdaptedClassifier`].
- [`CarryOverState`]: the explicit state of `legacy_carry_over=True` (the reference's drift, for comparison).

Shapes: `D` feature channels, `(h, w)` feature size, `(H, W)` label size (the image canvas), `K` supports per
episode, `E` episodes adapted together. Every function accepts one episode (no `E` axis) or a batch of episodes
that share shapes (leading `E` axis); a batch gives the same result as the episodes one by one (up to float
rounding), because the loss is a sum of per-episode means and every episode has its own parameters.

Labels of supports: 0 background ("none of the classes annotated in this image"), `1..N` the novel classes (novel
class `n` is classifier row `T - 1 + n`), `ignore_index` (255) ignored. With `support_classes`, masks are binary
(0/1/255) and `support_classes[k]` (0-based) names the novel class of support `k`.

The loss (`losses.few_shot_cross_entropy` + gamma * `losses.distillation_loss`) and the solvers that minimise it
(the exact one with analytic gradients, and the plain autograd reference it is tested against) live in
`gfss_hf._solver`, with the rows they start from (random or prototypes). At import time this module needs only
torch and its siblings `_solver` and `losses`, so that it travels with a Hub export of the pipeline.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ._solver import (
    SOLVERS,
    build_loss_spec,
    classifier_logits,
    downsample_labels,
    entropy_term,
    prototype_rows,
    random_rows,
    solve,
    upsample_logits,
)

__all__ = [
    "AdaptationConfig",
    "AdaptedClassifier",
    "CarryOverState",
    "adapt",
    "adapt_classifier",
    "adapt_fss",
    "adapt_gfss",
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
        transductive (`bool`, *optional*, defaults to `False`): add a DIaM-style query term (mean per-pixel entropy
            minus entropy of the mean prediction, on the query features at feature resolution); needs
            `query_features`.
        transductive_weight (`float`, *optional*, defaults to 1.0): weight of that term.
        legacy_carry_over (`bool`, *optional*, defaults to `False`): reproduce the reference's drift: each episode
            starts from the previous episode's adapted classifier, carried in an explicit [`CarryOverState`].
        seed (`int`, *optional*, defaults to 0): seed of the random initialisation (per episode, `seeds` overrides).
        solver (`str`, *optional*, defaults to `"exact"`): how the SGD steps are computed, the same trajectory up to
            float rounding: `"exact"` (analytic gradients with every constant precomputed; much faster on CPU) or
            `"autograd"` (the plain `gfss_hf.losses` reference differentiated by autograd). The default on GPU
            awaits a measurement of both by `bench/gpu_suite.py`.

    The bilinear upsampling's `align_corners` and the ignored label are facts of the model
    (`config.logits_align_corners`, `config.ignore_index`), not hyper-parameters: [`adapt_classifier`] reads them
    from the model; the low-level functions take them as keyword arguments.

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
    transductive: bool = False
    transductive_weight: float = 1.0
    legacy_carry_over: bool = False
    seed: int = 0
    solver: str = "exact"

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
        if self.solver not in SOLVERS:
            bad("solver", self.solver, f"allowed values are {SOLVERS}")

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
    raise ValueError(
        f"{name} must have shape {shape_doc} (or with a leading episode axis), got {tuple(tensor.shape)}."
    )


def _seeds(seeds, default: int, num: int) -> list[int]:
    if seeds is None:
        return [int(default)] * num
    if isinstance(seeds, int):
        return [int(seeds)] * num
    seeds = [int(s) for s in seeds]
    if len(seeds) != num:
        raise ValueError(f"seeds has {len(seeds)} entries for {num} episodes; give one seed per episode.")
    return seeds


def _normalized(features: torch.Tensor | None, enabled: bool) -> torch.Tensor | None:
    """L2 normalisation over the channel axis (-3) of `(..., D, h, w)` features when `enabled`."""
    return F.normalize(features, dim=-3) if enabled and features is not None else features


def _check_features_labels(features: torch.Tensor, labels: torch.Tensor, name: str = "support_labels") -> None:
    if labels.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"{name} has {tuple(labels.shape[:2])} (episodes, supports) but support_features has "
            f"{tuple(features.shape[:2])}; give one label map per support feature."
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer tensor of class labels, got {labels.dtype}.")


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
    align_corners: bool = True,
    ignore_index: int = 255,
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
        align_corners (`bool`, *optional*, defaults to `True`): of the bilinear logit upsampling; the model's
            `config.logits_align_corners` ([`adapt_classifier`] reads it).
        ignore_index (`int`, *optional*, defaults to 255): label of ignored pixels (the model's
            `config.ignore_index`).

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
    ignore = ignore_index
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
        labels = downsample_labels(labels, features.shape[-2:])

    # Initial rows: fresh copy of the pre-trained rows + novel rows.
    seed_list = _seeds(seeds, config.seed, num_episodes)
    if config.novel_init in ("random", "kaiming_uniform"):
        kind = "normal" if config.novel_init == "random" else "kaiming_uniform"
        novel_w = random_rows(seed_list, num_novel, dim, config.init_std, features, kind)
    else:
        novel_w = prototype_rows(features, labels, num_novel, base_w, config.loss_resolution == "feature")
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

    kd_pixels = "all" if config.kd_average_over_padding else "background" if config.kd_skip_novel else "labelled"
    spec = build_loss_spec(
        labels,
        annotated.flatten(0, 1),
        features,
        (base_w, base_b),
        ce_weighting=config.ce_weighting,
        kd_pixels=kd_pixels,
        gamma=config.gamma,
        kd_scale=config.kd_scale,
        ignore_index=ignore,
        align_corners=align_corners,
    )
    extra = None
    if query is not None:
        extra = lambda w, b: config.transductive_weight * entropy_term(w, b, query)  # noqa: E731
    weight, bias, history = solve(features, weight, bias, spec, config.steps, config.lr, extra, config.solver)
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
    align_corners: bool = True,
    ignore_index: int = 255,
) -> AdaptedClassifier:
    r"""
    FSS fine-tuning: a fresh 2-way classifier `[background, c*]` trained with cross-entropy (Eq. 1) on the support
    pixels, features frozen.

    Args:
        support_features (`torch.Tensor` of shape `(K, D, h, w)` or `(E, K, D, h, w)`): frozen support features.
        support_masks (`torch.Tensor` of shape `(K, H, W)` or `(E, K, H, W)`): binary masks, 0 background,
            1 foreground, `ignore_index` ignored.
        config ([`AdaptationConfig`], *optional*): `steps`, `lr`, `init_std`, `ce_weighting`, `loss_resolution`,
            `normalize_features`, `seed`, `solver` apply; the GFSS-only fields are not used.
        seeds (`int` or `list[int]`, *optional*): per-episode seeds of the random initialisation.
        bias (`bool`, *optional*, defaults to `False`): give the 2-way classifier a bias (initialised to 0).
        align_corners (`bool`, *optional*, defaults to `True`): of the bilinear logit upsampling.
        ignore_index (`int`, *optional*, defaults to 255): label of ignored pixels.

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
    ignore = ignore_index
    masks = masks.to(features.device).long()
    bad = (masks != 0) & (masks != 1) & (masks != ignore)
    if bool(bad.any()):
        raise ValueError(f"FSS support masks must be binary (0, 1, {ignore}); found {masks[bad][0].item()}.")
    num_episodes, _, dim = features.shape[:3]
    if config.loss_resolution == "feature":
        masks = downsample_labels(masks, features.shape[-2:])
    weight = random_rows(_seeds(seeds, config.seed, num_episodes), 2, dim, config.init_std, features)
    bias_t = features.new_zeros(num_episodes, 2) if bias else None
    annotated = torch.zeros(num_episodes * masks.shape[1], 2, dtype=torch.bool, device=features.device)
    annotated[:, 1] = True  # every support annotates its class; background is "not c*"
    spec = build_loss_spec(
        masks,
        annotated,
        features,
        None,
        ce_weighting=config.ce_weighting,
        gamma=0.0,
        ignore_index=ignore,
        align_corners=align_corners,
    )
    weight, bias_t, history = solve(features, weight, bias_t, spec, config.steps, config.lr, solver=config.solver)
    result = AdaptedClassifier(weight, bias_t, 1, 1, history, config.normalize_features)
    return result if batched else result.episode(0)


def adapt(
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    base_weight=None,
    base_bias=None,
    *,
    config: AdaptationConfig | None = None,
    **kwargs,
) -> AdaptedClassifier:
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
    logits = classifier_logits(weight, bias, features)
    if size is not None:
        logits = upsample_logits(logits, size, align_corners)
    return logits if batched else logits[0]


# -- the model-aware entry ------------------------------------------------------------------------------------
def adapt_classifier(
    model,
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    config: AdaptationConfig | None = None,
    *,
    support_classes: torch.Tensor | Sequence | None = None,
    num_novel_classes: int | None = None,
    annotated: torch.Tensor | None = None,
    num_teacher_rows: int | None = None,
    seeds: int | Sequence[int] | None = None,
    query_features: torch.Tensor | None = None,
    state: CarryOverState | None = None,
) -> AdaptedClassifier:
    r"""
    Fine-tune a classifier for `model` on support features: the one entry used by evaluation, the pipeline,
    `gfss_hf.learning.learn_classes` and the scripts. It reads from the model, once, what is a fact of the model rather than a
    hyper-parameter: the pre-trained rows of `model.classifier` (GFSS), `config.logits_align_corners` and
    `config.ignore_index`; then runs [`adapt_gfss`] or [`adapt_fss`] according to `config.method`.

    Args:
        model ([`GFSSModel`]): the model whose frozen features `support_features` are; left unchanged.
        support_features (`torch.Tensor` of shape `(K, D, h, w)` or `(E, K, D, h, w)`): frozen support features.
        support_labels (`torch.Tensor` of shape `(K, H, W)` or `(E, K, H, W)`, integer): as for [`adapt_gfss`]
            (GFSS) or binary masks (FSS without `annotated`).
        config ([`AdaptationConfig`], *optional*): hyper-parameters (defaults: the paper's GFSS).
        support_classes (`torch.Tensor` of shape `(K,)` or `(E, K)`, *optional*): GFSS: 0-based novel class of
            each binary mask.
        num_novel_classes (`int`, *optional*): `N`, see [`adapt_gfss`].
        annotated (`torch.Tensor` of shape `(K, N)`, bool, *optional*): novel classes each support is annotated
            for. With FSS it means label maps of `N` classes: one 2-way classifier is adapted per class, on the
            supports annotated for it, and the result is batched with one episode per class.
        num_teacher_rows (`int`, *optional*): GFSS: the first rows of `model.classifier` that act as the pre-trained
            rows and the teacher (default: all rows, learned classes included).
        seeds (`int` or `list[int]`, *optional*): per-episode seeds of the random initialisation.
        query_features (`torch.Tensor`, *optional*): GFSS with `config.transductive` only.
        state ([`CarryOverState`], *optional*): GFSS with `config.legacy_carry_over` only.

    Returns:
        [`AdaptedClassifier`]; predict with [`predict`]`(..., align_corners=model.config.logits_align_corners)`.

    Example:

    ```python
    >>> supports = processor.preprocess_supports([image], [mask], "my-object")  # doctest: +SKIP
    >>> features = gfss_hf.learning.extract_support_features(model, supports)  # doctest: +SKIP
    >>> clf = adapt_classifier(model, features, supports.labels, AdaptationConfig(steps=50),
    ...                        annotated=supports.annotated)  # doctest: +SKIP
    ```
    """
    config = config if config is not None else AdaptationConfig()
    facts = {"align_corners": bool(model.config.logits_align_corners), "ignore_index": int(model.config.ignore_index)}
    if config.method == "gfss":
        rows = slice(None) if num_teacher_rows is None else slice(0, int(num_teacher_rows))
        weight = model.classifier.weight.detach()[rows]
        bias = None if model.classifier.bias is None else model.classifier.bias.detach()[rows]
        return adapt_gfss(
            support_features,
            support_labels,
            weight.reshape(weight.shape[0], -1),
            bias,
            support_classes=support_classes,
            num_novel_classes=num_novel_classes,
            annotated=annotated,
            config=config,
            seeds=seeds,
            query_features=query_features,
            state=state,
            **facts,
        )
    unused = {
        "support_classes": support_classes,
        "num_teacher_rows": num_teacher_rows,
        "query_features": query_features,
        "state": state,
    }
    given = sorted(name for name, value in unused.items() if value is not None)
    if given:
        raise ValueError(f"{given} only apply to method='gfss'; method='fss' trains a fresh 2-way classifier.")
    if annotated is None:
        return adapt_fss(support_features, support_labels, config=config, seeds=seeds, **facts)
    ignore = facts["ignore_index"]
    results = []
    for n in range(annotated.shape[-1]):
        rows = annotated[:, n]
        labels = support_labels[rows]
        binary = torch.where(labels == ignore, labels, (labels == n + 1).long())
        results.append(adapt_fss(support_features[rows], binary, config=config, seeds=seeds, **facts))
    return AdaptedClassifier(
        torch.stack([r.weight for r in results]),
        None,
        1,
        1,
        torch.stack([r.loss_history for r in results]),
        config.normalize_features,
    )
