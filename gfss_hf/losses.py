"""Loss functions of gfss_hf, as pure functions on tensors.

Pre-training: `label_smoothed_cross_entropy` (RePRI convention) and the pixel-to-pixel contrastive loss with its
sampler. Few-shot fine-tuning: CE' and the distillation term.

This module imports only torch: the model file imports it relatively, and Hub repos exported with
`trust_remote_code` carry it beside the model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "contrastive_loss_from_samples",
    "count_contrastive_pairs",
    "distillation_loss",
    "few_shot_cross_entropy",
    "label_smoothed_cross_entropy",
    "pixel_contrastive_loss",
    "sample_contrastive_pixels",
]


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, fix: str) -> None:
    """(B, C, H, W) logits against (B, H, W) labels of the same batch and size; `fix` says what to do otherwise."""
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be (B, C, H, W) and labels (B, H, W) with the same B; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape[-2:])} and labels {tuple(labels.shape[-2:])} differ in size; {fix}."
        )


def label_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1, ignore_index: int = 255
) -> torch.Tensor:
    r"""
    Per-pixel cross-entropy with label smoothing, averaged over the labelled pixels.

    The target of a pixel labelled `y` is `q_y = 1 - epsilon` and `q_c = epsilon / (C - 1)` for every other class
    (RePRI's convention, which differs from `torch.nn.functional.cross_entropy(label_smoothing=...)`, where the
    smoothing mass is spread over all `C` classes including `y`).

    Args:
        logits (`torch.Tensor` of shape `(B, C, H, W)`):
            Unnormalised class scores, at the resolution of `labels`.
        labels (`torch.Tensor` of shape `(B, H, W)`, integer):
            Class indices in `[0, C)`, or `ignore_index`.
        epsilon (`float`, *optional*, defaults to 0.1):
            Smoothing mass, in `[0, 1)`. `0` gives plain cross-entropy.
        ignore_index (`int`, *optional*, defaults to 255):
            Label of pixels that do not contribute.

    Returns:
        `torch.Tensor`: scalar loss. When no pixel is labelled it is `0` (still attached to the graph).

    Example:

    ```python
    >>> logits = torch.randn(2, 3, 4, 4)
    >>> labels = torch.randint(0, 3, (2, 4, 4))
    >>> loss = label_smoothed_cross_entropy(logits, labels, epsilon=0.1)
    ```
    """
    _check_logits_labels(logits, labels, "upsample the logits to the label size first")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1).")
    num_classes = logits.shape[1]
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    log_probs = F.log_softmax(logits.float(), dim=1).permute(0, 2, 3, 1)[valid]  # (P, C)
    target = labels[valid].long()
    if bool((target < 0).any()) or bool((target >= num_classes).any()):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(
            f"label {bad} is outside [0, {num_classes}) and is not ignore_index={ignore_index}; remap the labels "
            "to classifier rows (background 0, base 1..B) first."
        )
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    if epsilon == 0.0 or num_classes == 1:
        return nll.mean()
    others = -(log_probs.sum(1)) - nll  # sum of -log p_c over c != y
    loss = (1.0 - epsilon) * nll + epsilon / (num_classes - 1) * others
    return loss.mean()


# -- pre-training: pixel-to-pixel contrastive loss (Eq. 2) and its sampler ----------------------------------------
def _as_long_labels(labels: torch.Tensor, size, name: str) -> torch.Tensor:
    """`(B, H, W)` integer labels -> `(B, h, w)` int64, nearest-downsampled to `size` when it differs."""
    if labels.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(labels.shape)}.")
    if labels.is_floating_point():
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}.")
    if tuple(labels.shape[-2:]) != tuple(size):
        # Nearest keeps labels as labels (no blending of class ids); ContrastiveSeg downsamples the same way.
        labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return labels.long()


def _contrastive_pairs(labels: torch.Tensor, max_views: int, ignore_index: int) -> list[tuple[int, int]]:
    """(image, class) pairs of flat `(B, P)` labels: classes other than `ignore_index` with > `max_views` pixels."""
    pairs = []
    for b in range(labels.shape[0]):
        classes, counts = torch.unique(labels[b], return_counts=True)
        for c, k in zip(classes.tolist(), counts.tolist()):
            if c != ignore_index and k > max_views:
                pairs.append((b, c))
    return pairs


def count_contrastive_pairs(labels: torch.Tensor, size, max_views: int = 100, ignore_index: int = 255) -> int:
    """
    Number `T` of (image, class) pairs [`sample_contrastive_pixels`] would sample from `labels` at embedding size
    `size` (labels downsampled nearest). Sum it over processes to get the global `num_pairs`.

    Args:
        labels (`torch.Tensor` of shape `(B, H, W)`, integer): classes.
        size (`tuple[int, int]`): `(h, w)` of the embeddings.
        max_views (`int`, *optional*, defaults to 100): a class needs more than `max_views` pixels in an image.
        ignore_index (`int`, *optional*, defaults to 255): never counted.

    Returns:
        `int`

    Example:

    ```python
    >>> count_contrastive_pairs(torch.zeros(2, 32, 32, dtype=torch.long), (8, 8), max_views=10)
    2
    ```
    """
    flat = _as_long_labels(labels, size, "labels").reshape(labels.shape[0], -1)
    return len(_contrastive_pairs(flat, max_views, ignore_index))


def sample_contrastive_pixels(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    max_samples: int = 1024,
    max_views: int = 100,
    ignore_index: int = 255,
    num_pairs: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Hard/easy anchor sampling of the pixel contrastive loss (Zhao et al. 2021, as adapted by the paper).

    Labels (and predictions, when given at another size) are downsampled (nearest) to the embedding size. For each
    image, every class present (not `ignore_index`, background included) with MORE than `max_views` pixels forms a
    pair (image, class); `T` is the number of pairs in the batch and every pair gets
    `n = min(max_samples // T, max_views)` views: half "hard" (labelled `c`, predicted `!= c`) and half "easy"
    (labelled `c`, predicted `c`), the short pool topped up from the other one. Because a kept class has more than
    `max_views >= n` pixels, the two pools together always hold `n` pixels. Draws go through `generator` only.

    Args:
        embeddings (`torch.Tensor` of shape `(B, D, h, w)`):
            Pixel embeddings (L2-normalised for the loss).
        labels (`torch.Tensor` of shape `(B, H, W)`, integer):
            Class per pixel (background 0, base 1..B, `ignore_index`), at any size.
        predictions (`torch.Tensor` of shape `(B, h, w)` or `(B, H, W)`, integer):
            Predicted class per pixel (argmax of the logits, best at the embedding size).
        max_samples (`int`, *optional*, defaults to 1024):
            Upper bound of the total number of sampled pixels of the batch.
        max_views (`int`, *optional*, defaults to 100):
            Views per (image, class) pair; a class needs more than `max_views` pixels in an image to be sampled.
        ignore_index (`int`, *optional*, defaults to 255):
            Label of pixels never sampled.
        num_pairs (`int`, *optional*):
            `T` to use instead of this batch's count. In distributed training pass the number of pairs of the GLOBAL
            batch (summed over processes) so that every process picks the `n` a single process would.
        generator (`torch.Generator` or a sequence of `B` generators, *optional*):
            Source of the random draws (CPU generators). With one generator per image, an image's draw does not
            depend on which other images share its batch or process. Defaults to a CPU generator seeded with 0.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the sampled embeddings `(M, D)` (rows of `embeddings`, still attached to
        the graph) and their labels `(M,)` int64, grouped by pair (images in order, classes ascending, hard views
        before easy ones). `M = n * T_local`; `M = 0` when no class qualifies.

    Example:

    ```python
    >>> emb = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1)
    >>> labels = torch.randint(0, 3, (2, 16, 16))
    >>> pred = torch.randint(0, 3, (2, 16, 16))
    >>> x, y = sample_contrastive_pixels(emb, labels, pred, max_samples=64, max_views=10,
    ...                                  generator=torch.Generator().manual_seed(0))
    >>> x.shape, y.shape  # 6 pairs, n = min(64 // 6, 10) = 10 views each
    (torch.Size([60, 8]), torch.Size([60]))
    ```
    """
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must have shape (B, D, h, w), got {tuple(embeddings.shape)}.")
    batch, dim, height, width = embeddings.shape
    if labels.shape[0] != batch or predictions.shape[0] != batch:
        raise ValueError(
            f"embeddings, labels and predictions must share the batch size; got {batch}, {labels.shape[0]} and "
            f"{predictions.shape[0]}."
        )
    if max_samples < 1 or max_views < 1:
        raise ValueError(f"max_samples={max_samples} and max_views={max_views} must both be >= 1.")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    generators = [generator] * batch if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} images; give one per image.")
    size = (height, width)
    labels = _as_long_labels(labels, size, "labels").reshape(batch, -1)
    predictions = _as_long_labels(predictions, size, "predictions").reshape(batch, -1)

    pairs = _contrastive_pairs(labels, max_views, ignore_index)
    total = len(pairs) if num_pairs is None else int(num_pairs)
    if total < len(pairs):
        raise ValueError(
            f"num_pairs={num_pairs} is smaller than the {len(pairs)} (image, class) pairs of this batch alone; pass "
            "the pair count of the whole (global) batch."
        )
    n_view = min(max_samples // total, max_views) if total > 0 else 0
    flat = embeddings.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
    if n_view == 0:
        return flat[:, :0].reshape(0, dim), labels.new_zeros(0)
    rows, out_labels = [], []
    for b, c in pairs:
        is_c = labels[b] == c
        hard = torch.nonzero(is_c & (predictions[b] != c)).flatten()
        easy = torch.nonzero(is_c & (predictions[b] == c)).flatten()
        num_hard, num_easy = hard.numel(), easy.numel()
        if num_hard >= n_view / 2 and num_easy >= n_view / 2:
            keep_hard = n_view // 2
        elif num_hard < n_view / 2:
            keep_hard = num_hard
        else:
            keep_hard = n_view - num_easy
        keep_easy = n_view - keep_hard
        assert keep_hard <= num_hard and keep_easy <= num_easy, "a kept class has more than max_views pixels"
        gen = generators[b]
        pick_hard = hard[torch.randperm(num_hard, generator=gen, device=gen.device)[:keep_hard].to(hard.device)]
        pick_easy = easy[torch.randperm(num_easy, generator=gen, device=gen.device)[:keep_easy].to(easy.device)]
        rows.append(b * height * width + torch.cat([pick_hard, pick_easy]))
        out_labels.append(torch.full((n_view,), c, dtype=torch.long, device=labels.device))
    index = torch.cat(rows)
    return flat.reshape(batch * height * width, dim)[index], torch.cat(out_labels)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradients of every process and returns this process's
    slice: the gradient of the SUM of all processes' losses with respect to the local input.

    Written here (rather than `torch.distributed.nn.functional.all_gather`, deprecated in torch 2.14) because its
    backward needs only `all_reduce`, which every backend, gloo on CPU included, supports."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        import torch.distributed as dist

        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def _distributed_world(gather: bool, group) -> tuple[int, int]:
    if not gather:
        return 1, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def contrastive_loss_from_samples(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    background_index: int | None = 0,
    background_anchors: bool = False,
    gather: bool = False,
    group=None,
) -> torch.Tensor:
    r"""
    Pixel-to-pixel InfoNCE (Eq. 2) over already-sampled pixels, optionally across processes.

    All sampled pixels are the contrast set. Every sampled pixel whose label is not `background_index` is an anchor
    `i` (background pixels stay positives and negatives, as in the paper). With `s_ij = e_i . e_j / temperature`,
    positives `P_i` (same label, `j != i`) and negatives `N_i` (other labels):

    `L_i = -(1 / |P_i|) sum_{p in P_i} log( exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in)) )`,

    and the loss is the mean of `L_i` over the anchors that have at least one positive, times
    `temperature / base_temperature` when `base_temperature` is given (the reference's scaling). Computed in
    float32 with a stable log-sum-exp.

    Distributed (`gather=True` in an initialised process group of `W > 1` processes): the samples of ALL processes
    are gathered (padded to the largest count, with a differentiable all-gather) and form the contrast set; each
    process's own samples are its anchors. The value returned on a process is `W * sum_{local anchors} L_i / A`,
    `A` = anchors of the global batch. Its mean over processes is the single-process loss of the global batch,
    and since the gather's backward sums the gradients of every process's loss and DDP AVERAGES parameter
    gradients over the `W` processes, the factor `W` makes the averaged gradient equal the single-process gradient
    of the global batch. Every process must call this function (it runs collectives), also with zero samples.

    Args:
        embeddings (`torch.Tensor` of shape `(M, D)`):
            L2-normalised embeddings of the sampled pixels (see [`sample_contrastive_pixels`]).
        labels (`torch.Tensor` of shape `(M,)`, integer):
            Their classes.
        temperature (`float`, *optional*, defaults to 0.1):
            `tau` of Eq. 2.
        base_temperature (`float`, *optional*):
            When given, the loss is multiplied by `temperature / base_temperature` (the reference uses 0.07).
        background_index (`int`, *optional*, defaults to 0):
            Label that is never an anchor. `None` makes every sampled pixel an anchor.
        background_anchors (`bool`, *optional*, defaults to `False`):
            Let background pixels be anchors too.
        gather (`bool`, *optional*, defaults to `False`):
            Gather the samples of all processes of `group` (no-op without an initialised process group).
        group (`torch.distributed.ProcessGroup`, *optional*):
            Process group of the gather (default: the world).

    Returns:
        `torch.Tensor`: scalar (float32). `0` (attached to the graph) when no anchor has a positive.

    Example:

    ```python
    >>> emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    >>> loss = contrastive_loss_from_samples(emb, labels, temperature=0.1)
    ```
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"embeddings must be (M, D) and labels (M,) with the same M; got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if temperature <= 0 or (base_temperature is not None and base_temperature <= 0):
        raise ValueError(f"temperature={temperature} and base_temperature={base_temperature} must be > 0.")
    x = embeddings.float()
    y = labels.long()
    world, rank = _distributed_world(gather, group)
    offset = 0
    if world > 1:
        import torch.distributed as dist

        count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        counts = [int(c.item()) for c in counts]
        longest = max(counts)
        pad = longest - x.shape[0]
        # all_gather needs equal shapes: pad with zero rows (label -1), dropped again right after the gather.
        x_pad = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
        y_pad = torch.cat([y, y.new_full((pad,), -1)]) if pad else y
        y_parts = [torch.empty_like(y_pad) for _ in range(world)]
        dist.all_gather(y_parts, y_pad.contiguous(), group=group)
        gathered = _GatherWithGradient.apply(x_pad, group)
        keep = torch.cat([torch.arange(r * longest, r * longest + counts[r], device=x.device) for r in range(world)])
        contrast, contrast_labels = gathered[keep], torch.cat(y_parts)[keep]
        offset = sum(counts[:rank])
        anchors_x = contrast[offset : offset + x.shape[0]]
    else:
        contrast, contrast_labels, anchors_x = x, y, x

    total_rows = contrast.shape[0]
    is_anchor = torch.ones_like(y, dtype=torch.bool)
    if background_index is not None and not background_anchors:
        is_anchor = y != background_index
    same = y[:, None] == contrast_labels[None, :]  # (m, M)
    not_self = torch.ones_like(same)
    if x.shape[0]:
        not_self[torch.arange(x.shape[0], device=x.device), offset + torch.arange(x.shape[0], device=x.device)] = False
    positives = same & not_self
    has_positive = positives.any(dim=1) & is_anchor
    num_local = has_positive.sum()
    num_global = num_local.clone()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(num_global, op=dist.ReduceOp.SUM, group=group)
    if int(num_global.item()) == 0 or total_rows == 0:
        return embeddings.sum() * 0.0
    logits = anchors_x @ contrast.T / temperature  # (m, M)
    # A large finite fill rather than -inf: a row without negatives must give a finite log-sum-exp and gradient.
    neg_lse = logits.masked_fill(same, -1e9).logsumexp(dim=1, keepdim=True)
    log_prob = logits - torch.logaddexp(logits, neg_lse)
    per_anchor = -(log_prob * positives).sum(dim=1) / positives.sum(dim=1).clamp_min(1)
    loss = (per_anchor * has_positive).sum() * (world / num_global.to(per_anchor.dtype))
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def pixel_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    max_samples: int = 1024,
    max_views: int = 100,
    ignore_index: int = 255,
    background_index: int | None = 0,
    background_anchors: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    r"""
    The pixel contrastive loss of one (single-process) batch: [`sample_contrastive_pixels`] followed by
    [`contrastive_loss_from_samples`]. For distributed training call the two steps yourself (pass the global pair
    count to the sampler and `gather=True` to the loss), as `gfss_hf.training` does.

    Args:
        embeddings (`torch.Tensor` of shape `(B, D, h, w)`): L2-normalised pixel embeddings.
        labels (`torch.Tensor` of shape `(B, H, W)`, integer): classes (downsampled nearest to `(h, w)`).
        predictions (`torch.Tensor` of shape `(B, h, w)`, integer): predicted classes.
        temperature, base_temperature, background_index, background_anchors: see [`contrastive_loss_from_samples`].
        max_samples, max_views, ignore_index, generator: see [`sample_contrastive_pixels`].

    Returns:
        `torch.Tensor`: scalar (float32).

    Example:

    ```python
    >>> emb = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1)
    >>> labels = torch.randint(0, 3, (2, 64, 64))
    >>> loss = pixel_contrastive_loss(emb, labels, labels[:, ::4, ::4], generator=torch.Generator().manual_seed(0))
    ```
    """
    x, y = sample_contrastive_pixels(
        embeddings,
        labels,
        predictions,
        max_samples=max_samples,
        max_views=max_views,
        ignore_index=ignore_index,
        generator=generator,
    )
    return contrastive_loss_from_samples(
        x,
        y,
        temperature=temperature,
        base_temperature=base_temperature,
        background_index=background_index,
        background_anchors=background_anchors,
    )


# -- few-shot fine-tuning: CE' (Eq. 4-5) and the distillation term (Eq. 6-7) ----------------------------------------
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce a per-pixel loss map; ignored pixels are 0 in the map and do not count in the mean."""
    if weights is not None:
        loss = loss * weights
    loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denom = weights[valid].sum() if weights is not None else valid.sum()
    # No labelled pixel: 0, still attached to the graph so that callers can always call backward().
    return loss.sum() / denom.clamp_min(1e-12) if bool(valid.any()) else loss.sum() * 0.0


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid; allowed values are {_REDUCTIONS}.")


def few_shot_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    annotated: torch.Tensor | None = None,
    ignore_index: int = 255,
    pixel_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    CE' of the paper (Eq. 4-5): cross-entropy against a partial annotation.

    A support image is annotated for some classifier rows only (one novel class `c*` in the paper's binary masks).
    With `p = softmax(logits)` over ALL rows, a pixel labelled with an annotated row `t` costs `-log p_t`; a pixel
    labelled background (0), which only says "none of this image's annotated classes", costs
    `-log sum_{k not annotated} p_k` (for one class: `-log (1 - p_{c*})`). With several novel classes, each image
    lists its own annotated rows, so the same function serves one and several novel classes. A 2-way classifier
    `[background, c*]` with `annotated = {1}` gives the plain cross-entropy of Eq. 1.

    Args:
        logits (`torch.Tensor` of shape `(B, C, H, W)`):
            Scores over all classifier rows, at the resolution of `labels`.
        labels (`torch.Tensor` of shape `(B, H, W)`, integer):
            An annotated row index for annotated pixels, 0 for background, `ignore_index` for pixels that do not
            count.
        annotated (`torch.Tensor` of shape `(B, C)`, bool, *optional*):
            Rows annotated in each image. Row 0 (background) cannot be annotated. Defaults to the non-zero rows that
            occur in each image's labels (give it explicitly when an image's class may have vanished, e.g. after
            downsampling, so that its background pixels still exclude that class).
        ignore_index (`int`, *optional*, defaults to 255):
            Label of ignored pixels.
        pixel_weights (`torch.Tensor` of shape `(B, H, W)`, *optional*):
            Per-pixel weights; the mean becomes `sum(w * l) / sum(w)` over labelled pixels (the reference's
            `[1, n_bg / n_fg]` class weighting is expressed this way).
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over labelled pixels, `"sum"`, or `"none"` for the `(B, H, W)` map (0 at ignored pixels).

    Returns:
        `torch.Tensor`: a scalar, or the `(B, H, W)` loss map with `reduction="none"`. Computed in float32.

    Example:

    ```python
    >>> logits = torch.randn(1, 4, 8, 8)  # [background, base_1, base_2, novel]
    >>> labels = torch.zeros(1, 8, 8, dtype=torch.long)
    >>> labels[:, 2:5, 2:5] = 3  # pixels of the novel class c* = row 3, the rest is "not c*"
    >>> loss = few_shot_cross_entropy(logits, labels)
    ```
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels, "upsample the logits (or downsample the labels) first")
    batch, num_classes = logits.shape[:2]
    labels = labels.long()
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    if bool(((target < 0) | (target >= num_classes)).any()):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(
            f"label {bad} is not a classifier row of [0, {num_classes}) nor ignore_index={ignore_index}; map the "
            "support masks to rows (background 0, annotated classes to their rows) first."
        )
    if annotated is None:
        annotated = torch.zeros(batch, num_classes, dtype=torch.bool, device=logits.device)
        annotated.scatter_(1, target.flatten(1), True)
        annotated[:, 0] = False
    else:
        annotated = annotated.to(device=logits.device, dtype=torch.bool)
        if annotated.shape != (batch, num_classes):
            raise ValueError(f"annotated must have shape ({batch}, {num_classes}), got {tuple(annotated.shape)}.")
        if bool(annotated[:, 0].any()):
            raise ValueError("annotated marks row 0 (background) as annotated; background means 'not annotated'.")
        labelled = target.flatten(1)
        ok = annotated.gather(1, labelled) | (labelled == 0)
        if not bool(ok.all()):
            raise ValueError("a pixel is labelled with a row that `annotated` does not list for its image; fix one.")
    if pixel_weights is not None and pixel_weights.shape != labels.shape:
        raise ValueError(f"pixel_weights must have shape {tuple(labels.shape)}, got {tuple(pixel_weights.shape)}.")
    z = logits.float()
    lse_all = torch.logsumexp(z, dim=1)
    fg = lse_all - z.gather(1, target[:, None]).squeeze(1)
    # Background pixels: the annotated rows leave the sum (-inf before the log-sum-exp).
    blocked = torch.zeros_like(z).masked_fill(annotated[:, :, None, None].expand_as(z), float("-inf"))
    bg = lse_all - torch.logsumexp(z + blocked, dim=1)
    loss = torch.where(target == 0, bg, fg)
    return _reduce(loss, valid, pixel_weights.float() if pixel_weights is not None else None, reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: str = "reference",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    Distillation term of the paper (Eq. 6-7) from a frozen `(T)`-way teacher (`[background, base...]`) to the
    expanded student `[background, base..., novel_1..novel_N]`.

    The teacher's background included every novel class, so the student's probabilities are folded back onto the
    teacher's classes (Eq. 7): `p~_0 = p_0 + sum_n p_novel_n`, `p~_c = p_c` for the base rows. Then
    `L_i = -sum_c q_c log p~_c` with `q = softmax(teacher_logits)` (no gradient to the teacher).

    Args:
        student_logits (`torch.Tensor` of shape `(B, T + N, H, W)`):
            Scores of the expanded classifier; its first `T` rows are the teacher's rows in the same order.
        teacher_logits (`torch.Tensor` of shape `(B, T, H, W)`):
            Scores of the pre-trained classifier on the same pixels (detached here).
        mask (`torch.Tensor` of shape `(B, H, W)`, bool, *optional*):
            Pixels that count (support pixels; all pixels when `None`).
        scale (`str`, *optional*, defaults to `"reference"`):
            `"reference"` divides by the number of teacher classes `T` as the reference code does (the published
            gamma values were tuned with it); `"paper"` is Eq. 6 as printed (no factor).
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over the masked pixels, `"sum"`, or `"none"` for the `(B, H, W)` map (0 outside the mask).

    Returns:
        `torch.Tensor`: a scalar, or the `(B, H, W)` map with `reduction="none"`. Computed in float32.

    Example:

    ```python
    >>> teacher = torch.randn(2, 3, 8, 8)  # background + 2 base classes
    >>> student = torch.cat([teacher, torch.randn(2, 1, 8, 8)], dim=1)  # + 1 novel class
    >>> loss = distillation_loss(student, teacher, scale="reference")
    ```
    """
    _check_reduction(reduction)
    if scale not in ("reference", "paper"):
        raise ValueError(f"scale={scale!r} is invalid; use 'reference' (divide by T, default) or 'paper' (Eq. 6).")
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"student and teacher logits must be (B, C, H, W); got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    num_teacher = teacher_logits.shape[1]
    if (
        student_logits.shape[0] != teacher_logits.shape[0]
        or student_logits.shape[-2:] != teacher_logits.shape[-2:]
        or student_logits.shape[1] < num_teacher
    ):
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} must extend the teacher's {tuple(teacher_logits.shape)} "
            "(same batch and size, at least as many rows)."
        )
    valid = (
        torch.ones(student_logits.shape[:1] + student_logits.shape[2:], dtype=torch.bool, device=student_logits.device)
        if mask is None
        else mask.to(device=student_logits.device, dtype=torch.bool)
    )
    if valid.shape != student_logits.shape[:1] + student_logits.shape[2:]:
        raise ValueError(f"mask must have shape (B, H, W) = {tuple(valid.shape)}; got {tuple(mask.shape)}.")
    z = student_logits.float()
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    folded_bg = torch.logsumexp(torch.cat([z[:, :1], z[:, num_teacher:]], dim=1), dim=1, keepdim=True)
    log_p = torch.cat([folded_bg, z[:, 1:num_teacher]], dim=1) - lse_all  # log p~ over the teacher's classes
    q = torch.softmax(teacher_logits.detach().float(), dim=1)
    loss = -(q * log_p).sum(dim=1)
    if scale == "reference":
        loss = loss / num_teacher
    return _reduce(loss, valid, None, reduction)
