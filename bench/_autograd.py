"""Plain-autograd fine-tuning with the signatures of `gfss_hf.adaptation.adapt_fss` / `adapt_gfss`: the baseline the
exact solver of `gfss_hf.adaptation` replaces, for the benchmarks.

Each step computes the logits (upsampled to the label size with the input-resolution loss), the loss with
`gfss_hf.losses` (CE' + gamma x KD, or the 2-way CE of FSS) as a sum of per-episode means, and its gradient with
`torch.autograd`; nothing is precomputed but the teacher. The initial rows come from the library itself (`steps=0`),
so both solvers start from the same classifier with the same per-episode seeds, and their predictions must agree up
to float rounding. `tests/test_adaptation.py` checks the same identity on toy episodes; this module is meant to move
into the library as its autograd reference one day.

`autograd_solver()` swaps these functions into `gfss_hf.evaluation` for the duration of a `with` block, so that
`evaluate_episodes` runs the whole `paper` protocol (feature cache, batched episodes) on the autograd solver.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gfss_hf.adaptation import AdaptationConfig, AdaptedClassifier, adapt_fss, adapt_gfss
from gfss_hf.losses import distillation_loss, few_shot_cross_entropy

__all__ = ["autograd_adapt_fss", "autograd_adapt_gfss", "autograd_solver"]


def _episode_axis(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    batched = features.dim() == 5
    if not batched:
        features, labels = features[None], labels[None]
    return features, labels.to(features.device).long(), batched


def _unsupported(config: AdaptationConfig) -> None:
    if config.transductive or config.legacy_carry_over:
        raise NotImplementedError("the autograd reference covers neither transductive nor legacy_carry_over runs.")


def _ce_weights(labels: torch.Tensor, valid: torch.Tensor, mode: str | None):
    """Pixel weights (E, K, H, W) of CE' (None or the reference's [1, n_bg / n_fg] per episode)."""
    if mode != "reference":
        return None
    fg = valid & (labels != 0)
    n_fg = fg.flatten(1).sum(1).float()
    n_bg = (valid & (labels == 0)).flatten(1).sum(1).float()
    ratio = torch.where((n_fg > 0) & (n_bg > 0), n_bg / n_fg.clamp_min(1), torch.ones_like(n_fg))
    return torch.where(fg, ratio[:, None, None, None], torch.ones((), device=labels.device))


def _per_episode_mean(loss_map: torch.Tensor, counted: torch.Tensor, num_episodes: int) -> torch.Tensor:
    """(E*K, H, W) map, 0 where not counted, and (E*K, H, W) pixel weights -> (E,) per-episode means."""
    total = loss_map.reshape(num_episodes, -1).sum(1)
    return total / counted.reshape(num_episodes, -1).sum(1).clamp_min(1e-12)


def _logits(weight, bias, features, size, align_corners):
    """(E, C, D) x (E, K, D, h, w) -> (E*K, C, H, W), upsampled when `size` is not the feature size."""
    logits = torch.einsum("ecd,ekdhw->ekchw", weight, features)
    if bias is not None:
        logits = logits + bias[:, None, :, None, None]
    logits = logits.flatten(0, 1)
    if tuple(size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
    return logits


def _sgd(init: AdaptedClassifier, loss_fn, steps: int, lr: float) -> AdaptedClassifier:
    """Plain SGD on the rows (and bias) of `init` for `loss_fn(weight, bias) -> (E,)`, gradients by autograd."""
    weight = init.weight.detach().clone()
    bias = None if init.bias is None else init.bias.detach().clone()
    history = []
    for _ in range(steps):
        params = [weight.requires_grad_(True)] + ([bias.requires_grad_(True)] if bias is not None else [])
        with torch.enable_grad():
            per_episode = loss_fn(weight, bias)
            grads = torch.autograd.grad(per_episode.sum(), params)
        history.append(per_episode.detach())
        weight = (weight - lr * grads[0]).detach()
        if bias is not None:
            bias = (bias - lr * grads[1]).detach()
    loss_history = torch.stack(history, 1) if history else init.loss_history
    return AdaptedClassifier(weight, bias, init.num_base_rows, init.num_novel_classes, loss_history)


def autograd_adapt_gfss(
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None = None,
    *,
    support_classes=None,
    num_novel_classes: int | None = None,
    config: AdaptationConfig | None = None,
    seeds=None,
    query_features=None,
    state=None,
) -> AdaptedClassifier:
    r"""
    [`gfss_hf.adaptation.adapt_gfss`] by plain autograd SGD on `few_shot_cross_entropy + gamma * distillation_loss`.

    Args:
        support_features, support_labels, base_weight, base_bias, support_classes, num_novel_classes, config, seeds:
            as for `adapt_gfss` (one episode or a leading episode axis).
        query_features, state: accepted for the signature; transductive and carry-over runs are not covered.

    Returns:
        [`AdaptedClassifier`], as `adapt_gfss` returns it.
    """
    config = config if config is not None else AdaptationConfig()
    _unsupported(config)
    init = adapt_gfss(support_features, support_labels, base_weight, base_bias, support_classes=support_classes,
                      num_novel_classes=num_novel_classes, config=config.replace(steps=0), seeds=seeds)  # fmt: skip
    features, labels, batched = _episode_axis(support_features, support_labels)
    num_episodes, num_shots = labels.shape[:2]
    teacher_rows, num_novel = init.num_base_rows, init.num_novel_classes
    if support_classes is not None:
        classes = torch.as_tensor(support_classes, device=features.device).long().view(num_episodes, num_shots)
        labels = torch.where(labels == 1, classes[:, :, None, None] + 1, labels)
        annotated = F.one_hot(classes, num_novel).bool()
    else:
        annotated = torch.stack([(labels == n).flatten(2).any(2) for n in range(1, num_novel + 1)], dim=2)
    if config.loss_resolution == "feature":  # nearest, as the engine downsamples
        labels = F.interpolate(labels.flatten(0, 1)[:, None].float(), size=features.shape[-2:], mode="nearest")
        labels = labels[:, 0].long().view(num_episodes, num_shots, *features.shape[-2:])
    size = labels.shape[-2:]
    ignore = config.ignore_index
    valid = labels != ignore
    rows = torch.where(valid & (labels >= 1), labels + teacher_rows - 1, labels).flatten(0, 1)
    annotated_rows = torch.zeros(num_episodes * num_shots, teacher_rows + num_novel, dtype=torch.bool,
                                 device=features.device)  # fmt: skip
    annotated_rows[:, teacher_rows:] = annotated.flatten(0, 1)
    weights = _ce_weights(labels, valid, config.ce_weighting)
    ce_counted = valid.float() if weights is None else weights * valid
    if config.kd_average_over_padding:
        kd_mask = torch.ones_like(valid)
    elif config.kd_skip_novel:
        kd_mask = valid & (labels == 0)
    else:
        kd_mask = valid
    teacher_bias = None if init.bias is None else init.bias[..., :teacher_rows]
    weight0 = init.weight if init.batched else init.weight[None]
    bias0 = teacher_bias if teacher_bias is None or init.batched else teacher_bias[None]
    with torch.no_grad():
        teacher = _logits(weight0[:, :teacher_rows], bias0, features, size, config.align_corners)

    def loss_fn(weight, bias):
        logits = _logits(weight, bias, features, size, config.align_corners)
        ce = few_shot_cross_entropy(logits, rows, annotated=annotated_rows, ignore_index=ignore,
                                    pixel_weights=None if weights is None else weights.flatten(0, 1),
                                    reduction="none")  # fmt: skip
        loss = _per_episode_mean(ce, ce_counted, num_episodes)
        if config.gamma > 0:
            kd = distillation_loss(logits, teacher, mask=kd_mask.flatten(0, 1), scale=config.kd_scale,
                                   reduction="none")  # fmt: skip
            loss = loss + config.gamma * _per_episode_mean(kd, kd_mask.float(), num_episodes)
        return loss

    result = _sgd(init if init.batched else _batched(init), loss_fn, config.steps, config.lr)
    return result if batched else result.episode(0)


def autograd_adapt_fss(
    support_features: torch.Tensor,
    support_masks: torch.Tensor,
    *,
    config: AdaptationConfig | None = None,
    seeds=None,
    bias: bool = False,
) -> AdaptedClassifier:
    r"""
    [`gfss_hf.adaptation.adapt_fss`] by plain autograd SGD on the 2-way cross-entropy of `few_shot_cross_entropy`.

    Args:
        support_features, support_masks, config, seeds, bias: as for `adapt_fss`.

    Returns:
        [`AdaptedClassifier`] with 2 rows.
    """
    config = config if config is not None else AdaptationConfig(method="fss")
    _unsupported(config)
    init = adapt_fss(support_features, support_masks, config=config.replace(steps=0), seeds=seeds, bias=bias)
    features, masks, batched = _episode_axis(support_features, support_masks)
    num_episodes = masks.shape[0]
    if config.loss_resolution == "feature":
        masks = F.interpolate(masks.flatten(0, 1)[:, None].float(), size=features.shape[-2:], mode="nearest")
        masks = masks[:, 0].long().view(num_episodes, -1, *features.shape[-2:])
    valid = masks != config.ignore_index
    weights = _ce_weights(masks, valid, config.ce_weighting)
    counted = valid.float() if weights is None else weights * valid
    annotated = torch.tensor([False, True], device=features.device).expand(masks.shape[0] * masks.shape[1], 2)

    def loss_fn(weight, bias_t):
        logits = _logits(weight, bias_t, features, masks.shape[-2:], config.align_corners)
        ce = few_shot_cross_entropy(logits, masks.flatten(0, 1), annotated=annotated, ignore_index=config.ignore_index,
                                    pixel_weights=None if weights is None else weights.flatten(0, 1),
                                    reduction="none")  # fmt: skip
        return _per_episode_mean(ce, counted, num_episodes)

    result = _sgd(init if init.batched else _batched(init), loss_fn, config.steps, config.lr)
    return result if batched else result.episode(0)


def _batched(single: AdaptedClassifier) -> AdaptedClassifier:
    """An unbatched classifier with a leading episode axis of 1."""
    bias = None if single.bias is None else single.bias[None]
    return AdaptedClassifier(single.weight[None], bias, single.num_base_rows, single.num_novel_classes,
                             single.loss_history[None])  # fmt: skip


@contextlib.contextmanager
def autograd_solver(calls: dict | None = None):
    """
    Within the block, `gfss_hf.evaluation.evaluate_episodes` fine-tunes with the autograd functions of this module
    (the names its `paper` protocol calls are swapped in the module and restored on exit). Pass a dict as `calls` to
    count the calls (`{"fss": n, "gfss": m}`): a run that counted none did not use this solver (the library changed
    how it calls the engine), and its timing must not be reported as the autograd one.
    """
    import gfss_hf.evaluation as evaluation

    missing = [name for name in ("adapt_fss", "adapt_gfss") if not hasattr(evaluation, name)]
    if missing:
        raise RuntimeError(f"gfss_hf.evaluation no longer imports {missing}; update bench/_autograd.py.")
    counts = calls if calls is not None else {}
    counts.setdefault("fss", 0)
    counts.setdefault("gfss", 0)

    def fss(*args, **kwargs):
        counts["fss"] += 1
        return autograd_adapt_fss(*args, **kwargs)

    def gfss(*args, **kwargs):
        counts["gfss"] += 1
        return autograd_adapt_gfss(*args, **kwargs)

    saved = evaluation.adapt_fss, evaluation.adapt_gfss
    evaluation.adapt_fss, evaluation.adapt_gfss = fss, gfss
    try:
        yield counts
    finally:
        evaluation.adapt_fss, evaluation.adapt_gfss = saved
