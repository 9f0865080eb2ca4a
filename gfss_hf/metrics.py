"""Pooled segmentation metrics: per-class intersection and union summed over episodes (or images), never averaged
per episode.

Every number of the three evaluation protocols comes from one object, [`PooledIoU`]: a `(C, C)` confusion matrix
(rows: ground truth, columns: prediction) summed over everything it was given, so that

- `IoU_c = I_c / U_c` with `I_c` and `U_c` summed over all episodes that involve class `c`;
- `mIoU` is the mean of `IoU_c` over a class subset (classes that never occur are left out, not counted as 0);
- FB-IoU is the mean of the pooled background IoU and the pooled foreground IoU (all non-background classes
  merged), the FSS convention;
- the GFSS summary gives base / novel / mean / harmonic mean under the `diam` convention (background NOT part of
  the base mIoU) or the `capl` convention (background part of the base mIoU, plus the total over all classes).

The mean of per-episode IoUs, which the literature warns against, is tracked separately
(`episode_mean_iou`) so that both numbers can be reported and compared. Accumulators of different processes are
summed exactly (integers only), so the result does not depend on how episodes were split across processes.

The metric vocabulary is defined here, next to the numbers it names: [`METRIC_NAMES`] (every key an evaluation
writes, with its display name), [`HEADLINE_METRICS`] (the columns of each protocol's table) and [`metric_keys`].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from transformers.utils import logging

__all__ = [
    "GFSS_CONVENTIONS",
    "HEADLINE_METRICS",
    "METRIC_NAMES",
    "PooledIoU",
    "STD_SUFFIX",
    "gfss_summary",
    "harmonic_mean",
    "metric_keys",
]

logger = logging.get_logger(__name__)

GFSS_CONVENTIONS = ("diam", "capl")

# Per-episode IoUs are summed in fixed point (units of 2**-40): integer sums are exact and associative, so merging
# accumulators in any order (one process or many) gives bit-identical results. 2**40 * 2**23 episodes < 2**63.
_FIXED_POINT = float(2**40)

# The ONE metric vocabulary: every key an evaluation writes into `results.json`, with its display name (used by
# `results.md`, the model card's table and the card's `model-index`). Order = column order of the tables.
METRIC_NAMES: dict[str, str] = {
    "fss_novel_miou": "2-way novel",
    "gfss_novel_miou": "(B+2)-way novel",
    "gfss_base_miou": "base",
    "gfss_mean_miou": "mean",
    "gfss_harmonic_miou": "harmonic",
    "fss_fb_iou": "FB-IoU (2-way)",
    "gfss_fb_iou": "FB-IoU (GFSS)",
    "base_miou": "base",
    "novel_miou": "novel",
    "mean_miou": "mean",
    "harmonic_miou": "harmonic",
    "total_miou": "total",
    "fss_novel_episode_miou": "2-way novel, per-episode mean",
    "gfss_novel_episode_miou": "(B+2)-way novel, per-episode mean",
    "gfss_base_episode_miou": "base, per-episode mean",
    "novel_episode_miou": "novel, per-episode mean",
}
# The headline numbers of each protocol (tables, model cards); the per-episode means are kept in results.json for
# comparison with other code bases only, because IoU pooled over episodes is the protocols' number.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "paper": (
        "fss_novel_miou",
        "gfss_novel_miou",
        "gfss_base_miou",
        "gfss_mean_miou",
        "gfss_harmonic_miou",
        "fss_fb_iou",
        "gfss_fb_iou",
    ),
    "diam": ("base_miou", "novel_miou", "mean_miou", "harmonic_miou"),
    "capl": ("base_miou", "novel_miou", "mean_miou", "harmonic_miou", "total_miou"),
}
# `<key>_std`: sample standard deviation over runs (`diam`, `capl`), shown as "value ± std".
STD_SUFFIX = "_std"
_PAPER_KEYS = tuple(k for k in METRIC_NAMES if k.startswith(("fss_", "gfss_")))
_RUN_KEYS = ("base_miou", "novel_miou", "mean_miou", "harmonic_miou", "novel_episode_miou")


def metric_keys(protocol: str) -> tuple[str, ...]:
    """
    The keys of `EvaluationResult.metrics` for `protocol` (fractions in [0, 1]).

    - `paper`: `fss_novel_miou` (2-way novel mIoU), `fss_fb_iou`, `gfss_novel_miou` ((B+2)-way novel mIoU),
      `gfss_base_miou` (binary IoU of the extra base image's class), `gfss_mean_miou`, `gfss_harmonic_miou`,
      `gfss_fb_iou` (novel vs. rest: a base prediction counts as background), and the per-episode means
      `*_episode_miou` (for comparison only).
    - `diam`: `base_miou` (background excluded), `novel_miou`, `mean_miou`, `harmonic_miou`,
      `novel_episode_miou`: means over runs, each with a `*_std` (sample standard deviation over runs).
    - `capl`: as `diam` with background in `base_miou`, plus `total_miou` (all classes).
    """
    if protocol == "paper":
        return _PAPER_KEYS
    if protocol == "diam":
        keys = _RUN_KEYS
    elif protocol == "capl":
        keys = (*_RUN_KEYS, "total_miou")
    else:
        raise ValueError(f"protocol={protocol!r} is not known; use one of {list(HEADLINE_METRICS)}.")
    return tuple(k for key in keys for k in (key, f"{key}_std"))


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean `2ab / (a + b)` of two scores (0 when both are 0, nan when either is nan)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def _nanmean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else float("nan")


class PooledIoU:
    r"""
    Pooled intersection-over-union accumulator over a fixed label space of `num_classes` classes.

    `update` takes predicted and ground-truth label maps of one or several episodes (or images); it adds their
    confusion matrix (computed with one `torch.bincount`, pixels labelled `ignore_index` skipped) to the running sum.
    All statistics are read from that sum, so the order and the grouping of updates do not matter.

    Args:
        num_classes (`int`):
            Size of the label space (e.g. `B + 1 + N` classifier rows: background, base, novel).
        ignore_index (`int`, *optional*, defaults to 255):
            Ground-truth label of pixels that are not scored.
        background_index (`int`, *optional*, defaults to 0):
            The background class, used by `fb_iou` and by the `capl` / `diam` conventions.
        device (`torch.device` or `str`, *optional*):
            Where the sums live (defaults to CPU; `update` moves its counts there).

    Example:

    ```python
    >>> import torch
    >>> from gfss_hf.metrics import PooledIoU
    >>> metric = PooledIoU(num_classes=3)
    >>> labels = torch.tensor([[[0, 1, 1, 255]], [[0, 2, 2, 2]]])  # two episodes of 1x4 pixels
    >>> preds = torch.tensor([[[0, 1, 0, 2]], [[0, 2, 2, 0]]])
    >>> metric.update(preds, labels)
    >>> [round(v, 3) for v in metric.iou().tolist()]
    [0.5, 0.5, 0.667]
    >>> round(metric.mean_iou([1, 2]), 4)
    0.5833
    ```
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        background_index: int | None = 0,
        device: torch.device | str | None = None,
    ):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 (the size of the label space).")
        if background_index is not None and not 0 <= background_index < num_classes:
            raise ValueError(
                f"background_index={background_index} is outside [0, {num_classes}); pass a class index or None."
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a class of the label space [0, {num_classes}); use a label outside "
                "it (255 by convention)."
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.background_index = background_index
        device = torch.device("cpu") if device is None else torch.device(device)
        # [target, prediction] pixel counts, summed over all updates.
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        # Sum (fixed point) and number of per-episode IoUs of each class, for `episode_mean_iou` only.
        self.episode_iou_sum = torch.zeros(self.num_classes, dtype=torch.int64, device=device)
        self.episode_count = torch.zeros(self.num_classes, dtype=torch.int64, device=device)
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)

    # -- accumulation ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.confusion.device

    def to(self, device: torch.device | str) -> PooledIoU:
        """Move the sums to `device` (in place). Returns `self`."""
        for name in ("confusion", "episode_iou_sum", "episode_count", "num_updates"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def reset(self) -> None:
        """Zero every sum."""
        for tensor in (self.confusion, self.episode_iou_sum, self.episode_count, self.num_updates):
            tensor.zero_()

    def episode_confusion(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Confusion matrices of a batch of episodes, without accumulating them.

        Args:
            predictions (`torch.Tensor` of shape `(E, H, W)` or `(H, W)`, integer): predicted classes.
            labels (`torch.Tensor` of the same shape, integer): ground truth, `ignore_index` skipped.

        Returns:
            `torch.Tensor` of shape `(E, C, C)`, int64, on the device of `labels`: `[e, target, prediction]` counts.
        """
        if predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape; bring "
                "both to the label resolution first."
            )
        if labels.dim() == 2:
            predictions, labels = predictions[None], labels[None]
        if labels.dim() != 3:
            raise ValueError(f"expected (E, H, W) or (H, W) label maps, got shape {tuple(labels.shape)}.")
        if predictions.is_floating_point() or labels.is_floating_point():
            raise TypeError("predictions and labels must be integer class maps; take `logits.argmax(1)` first.")
        c = self.num_classes
        num = labels.shape[0]
        labels = labels.reshape(num, -1).long()
        predictions = predictions.reshape(num, -1).long().to(labels.device)
        valid = labels != self.ignore_index
        target, pred = labels[valid], predictions[valid]
        for name, values in (("label", target), ("prediction", pred)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= c):
                bad = values[(values < 0) | (values >= c)][0].item()
                raise ValueError(
                    f"{name} value {bad} is outside the label space [0, {c}) and is not ignore_index="
                    f"{self.ignore_index}; map labels to classifier rows or raise num_classes."
                )
        episode = torch.arange(num, device=labels.device)[:, None].expand_as(labels)[valid]
        flat = (episode * c + target) * c + pred
        return torch.bincount(flat, minlength=num * c * c).reshape(num, c, c)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """
        Add episodes (or images) to the sums.

        Args:
            predictions (`torch.Tensor` of shape `(E, H, W)` or `(H, W)`, integer): predicted classes in
                `[0, num_classes)`.
            labels (`torch.Tensor` of the same shape, integer): ground truth in `[0, num_classes)` or
                `ignore_index`.

        Each leading index is one episode for `episode_mean_iou`; for the pooled numbers the grouping is irrelevant.
        """
        per_episode = self.episode_confusion(predictions, labels)
        self.add_confusion(per_episode)

    def add_confusion(self, per_episode: torch.Tensor) -> None:
        """Add precomputed confusion matrices `(E, C, C)` (or one `(C, C)`), each counted as one episode."""
        if per_episode.dim() == 2:
            per_episode = per_episode[None]
        c = self.num_classes
        if per_episode.shape[1:] != (c, c):
            raise ValueError(f"confusion matrices must be (E, {c}, {c}), got {tuple(per_episode.shape)}.")
        per_episode = per_episode.to(device=self.device, dtype=torch.int64)
        self.confusion += per_episode.sum(0)
        inter = per_episode.diagonal(dim1=1, dim2=2)
        union = per_episode.sum(1) + per_episode.sum(2) - inter
        present = union > 0
        iou = inter.double() / union.clamp(min=1).double()
        self.episode_iou_sum += torch.where(present, torch.round(iou * _FIXED_POINT), 0).to(torch.int64).sum(0)
        self.episode_count += present.sum(0)
        self.num_updates += per_episode.shape[0]

    # -- merging -----------------------------------------------------------------------------------------------
    def _check_compatible(self, other: PooledIoU) -> None:
        if not isinstance(other, PooledIoU):
            raise TypeError(f"can only merge another PooledIoU, got {type(other).__name__}.")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge an accumulator of {other.num_classes} classes (ignore {other.ignore_index}) into one "
                f"of {self.num_classes} classes (ignore {self.ignore_index}); both must share the label space."
            )

    def merge(self, other: PooledIoU) -> PooledIoU:
        """Add the sums of `other` (same label space) into `self`. Returns `self`."""
        self._check_compatible(other)
        self.confusion += other.confusion.to(self.device)
        self.episode_iou_sum += other.episode_iou_sum.to(self.device)
        self.episode_count += other.episode_count.to(self.device)
        self.num_updates += other.num_updates.to(self.device)
        return self

    def __add__(self, other: PooledIoU) -> PooledIoU:
        return self.copy().merge(other)

    def copy(self) -> PooledIoU:
        """An independent copy."""
        out = PooledIoU(self.num_classes, self.ignore_index, self.background_index, self.device)
        return out.merge(self)

    def reduce(self, accelerator=None) -> PooledIoU:
        """
        Sum the accumulators of all processes (in place, on every process). Returns `self`.

        Args:
            accelerator (`accelerate.Accelerator`, *optional*): reduce with `accelerator.reduce(..., "sum")`.
                Without it, `torch.distributed.all_reduce` is used when a process group is initialised; otherwise
                nothing happens (a single process already holds the whole sum).

        The sums are integers, so the reduced values are exact and independent of the number of processes.
        """
        tensors = self._flat()
        if accelerator is not None:
            if accelerator.num_processes == 1:
                return self
            reduced = accelerator.reduce(tensors, reduction="sum")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            reduced = tensors.clone()
            torch.distributed.all_reduce(reduced)
        else:
            return self
        self._load_flat(reduced)
        return self

    def _flat(self) -> torch.Tensor:
        return torch.cat(
            [self.confusion.flatten(), self.episode_iou_sum, self.episode_count, self.num_updates.reshape(1)]
        )

    def _load_flat(self, flat: torch.Tensor) -> None:
        c = self.num_classes
        flat = flat.to(self.device)
        self.confusion = flat[: c * c].reshape(c, c).clone()
        self.episode_iou_sum = flat[c * c : c * c + c].clone()
        self.episode_count = flat[c * c + c : c * c + 2 * c].clone()
        self.num_updates = flat[-1].clone()

    def state_dict(self) -> dict:
        """Plain-Python state (JSON-serialisable)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "background_index": self.background_index,
            "confusion": self.confusion.cpu().tolist(),
            "episode_iou_sum": self.episode_iou_sum.cpu().tolist(),
            "episode_count": self.episode_count.cpu().tolist(),
            "num_updates": int(self.num_updates),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PooledIoU:
        """Inverse of `state_dict`."""
        out = cls(state["num_classes"], state["ignore_index"], state["background_index"])
        out.confusion = torch.tensor(state["confusion"], dtype=torch.int64)
        out.episode_iou_sum = torch.tensor(state["episode_iou_sum"], dtype=torch.int64)
        out.episode_count = torch.tensor(state["episode_count"], dtype=torch.int64)
        out.num_updates = torch.tensor(state["num_updates"], dtype=torch.int64)
        return out

    # -- statistics --------------------------------------------------------------------------------------------
    @property
    def intersection(self) -> torch.Tensor:
        """`(C,)` int64: pixels of class `c` predicted as `c`, summed."""
        return self.confusion.diagonal().clone()

    @property
    def union(self) -> torch.Tensor:
        """`(C,)` int64: pixels labelled `c` or predicted as `c` (ignore pixels excluded), summed."""
        return self.confusion.sum(0) + self.confusion.sum(1) - self.confusion.diagonal()

    def iou(self) -> torch.Tensor:
        """`(C,)` float64 pooled IoU per class; `nan` for a class never labelled nor predicted."""
        union = self.union.double()
        return torch.where(union > 0, self.intersection.double() / union.clamp(min=1), float("nan")).cpu()

    def _classes(self, classes: Sequence[int] | None) -> list[int]:
        if classes is None:
            return list(range(self.num_classes))
        out = [int(c) for c in classes]
        bad = [c for c in out if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are outside the label space [0, {self.num_classes}).")
        return out

    def mean_iou(self, classes: Sequence[int] | None = None) -> float:
        """
        Mean of the pooled per-class IoUs over `classes` (default: all); classes that never occurred are skipped.

        Args:
            classes (`Sequence[int]`, *optional*): class indices to average over.

        Returns:
            `float` in [0, 1], or `nan` when none of `classes` occurred.
        """
        iou = self.iou()
        return _nanmean(float(iou[c]) for c in self._classes(classes))

    def episode_mean_iou(self, classes: Sequence[int] | None = None) -> float:
        """
        The per-episode convention the protocols do NOT use, for comparison: per class, the mean of its IoU in each
        episode where it was labelled or predicted; then the mean over `classes`.

        Args:
            classes (`Sequence[int]`, *optional*): class indices to average over (default: all).
        """
        count = self.episode_count.cpu()
        per_class = torch.where(
            count > 0, self.episode_iou_sum.cpu().double() / _FIXED_POINT / count.clamp(min=1), float("nan")
        )
        return _nanmean(float(per_class[c]) for c in self._classes(classes))

    def fb_iou(self, foreground_classes: Sequence[int] | None = None) -> float:
        """
        Foreground-background IoU, the FSS convention (PFENet, RePRI): the mean of the pooled IoU of "background" and
        the pooled IoU of "foreground", each a union of classes.

        Args:
            foreground_classes (`Sequence[int]`, *optional*): the classes merged into foreground; every other class
                counts as background. Default: every class except `background_index`. Pass the novel classes to
                score a GFSS prediction as "novel vs. rest" (a base prediction then counts as background).
        """
        if foreground_classes is None:
            if self.background_index is None:
                raise ValueError(
                    "fb_iou needs a background class: construct the accumulator with background_index=0 or pass "
                    "foreground_classes."
                )
            foreground_classes = [c for c in range(self.num_classes) if c != self.background_index]
        fg = torch.zeros(self.num_classes, dtype=torch.bool)
        fg[self._classes(foreground_classes)] = True
        conf = self.confusion.cpu()
        fg_fg = int(conf[fg][:, fg].sum())
        bg_bg = int(conf[~fg][:, ~fg].sum())
        mixed = int(conf.sum()) - fg_fg - bg_bg  # pixels whose label and prediction disagree on fg/bg
        scores = [
            bg_bg / (bg_bg + mixed) if bg_bg + mixed else float("nan"),
            fg_fg / (fg_fg + mixed) if fg_fg + mixed else float("nan"),
        ]
        return _nanmean(scores)

    def summary(
        self,
        base_classes: Sequence[int],
        novel_classes: Sequence[int],
        convention: str = "diam",
    ) -> dict[str, float]:
        """
        GFSS scores of this accumulator; see [`gfss_summary`].

        Example:

        ```python
        >>> metric = PooledIoU(num_classes=4)  # background, 2 base, 1 novel
        >>> metric.update(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 1, 2, 0]]))
        >>> metric.summary([1, 2], [3], convention="diam")["base"]
        1.0
        ```
        """
        return gfss_summary(self.iou(), base_classes, novel_classes, convention, self.background_index)

    def per_class(self, id2label: dict[int, str] | None = None) -> dict[str, float]:
        """Pooled IoU per class name (or index), classes that never occurred left out."""
        out = {}
        for c, value in enumerate(self.iou().tolist()):
            if not math.isnan(value):
                out[id2label[c] if id2label else str(c)] = value
        return out


def gfss_summary(
    iou: torch.Tensor | Sequence[float],
    base_classes: Sequence[int],
    novel_classes: Sequence[int],
    convention: str = "diam",
    background_index: int | None = 0,
) -> dict[str, float]:
    """
    Base / novel / mean / harmonic-mean mIoU of GFSS from per-class IoUs, by named convention.

    Args:
        iou (`torch.Tensor` of shape `(C,)` or a sequence of floats): pooled IoU per class (`nan` = never occurred).
        base_classes (`Sequence[int]`): indices of the base classes (WITHOUT background).
        novel_classes (`Sequence[int]`): indices of the novel classes.
        convention (`str`, *optional*, defaults to `"diam"`):
            - `"diam"` (DIaM, BCM): base mIoU over the base classes only, background excluded;
              `mean = (base + novel) / 2`.
            - `"capl"` (CAPL, POP): base mIoU over background + base classes; `total` = mean over background, base
              and novel classes; `mean` as above.
        background_index (`int`, *optional*, defaults to 0): the background class (`capl` needs it).

    Returns:
        `dict` with `base`, `novel`, `mean`, `harmonic` (and `total` for `capl`), floats in [0, 1].
    """
    if convention not in GFSS_CONVENTIONS:
        raise ValueError(
            f"convention={convention!r} is not known; use 'diam' (background excluded from base) or 'capl' "
            "(background included, plus 'total')."
        )
    values = [float(v) for v in (iou.tolist() if isinstance(iou, torch.Tensor) else iou)]
    base = [int(c) for c in base_classes]
    novel = [int(c) for c in novel_classes]
    if background_index is not None and background_index in base + novel:
        raise ValueError(
            f"background_index={background_index} appears among base_classes/novel_classes; pass the object "
            "classes only (the convention decides where background goes)."
        )
    if convention == "capl":
        if background_index is None:
            raise ValueError("the 'capl' convention counts background in the base mIoU: give background_index.")
        base = [background_index, *base]
    base_miou = _nanmean(values[c] for c in base)
    novel_miou = _nanmean(values[c] for c in novel)
    out = {
        "base": base_miou,
        "novel": novel_miou,
        "mean": (base_miou + novel_miou) / 2.0,
        "harmonic": harmonic_mean(base_miou, novel_miou),
    }
    if convention == "capl":
        out["total"] = _nanmean(values[c] for c in base + novel)
    return out
