"""`gfss_miou`: pooled mIoU of (generalized) few-shot segmentation as an `evaluate` metric.

Self-contained (numpy + datasets + evaluate only) so the folder can be published as a Hub metric as it is; it
computes the same numbers as `gfss_hf.metrics.PooledIoU`, which the package's tests check.
"""

import math

import datasets
import evaluate
import numpy as np

__all__ = ["GFSSMeanIoU"]

_DESCRIPTION = """
Pooled intersection-over-union of segmentation episodes, the convention of the few-shot segmentation literature:
for every class, intersections and unions are SUMMED over all given label maps (episodes or images) and divided at
the end; mIoU is the mean over classes that occurred. The mean of per-episode IoUs is returned separately
(`episode_mean_iou`) because it is a different, larger-variance number. With `base_classes` and `novel_classes`
the GFSS scores are added: `diam` convention (base mIoU without background) or `capl` (base mIoU with background,
and `total` over all classes).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D integer arrays): predicted class per pixel, one map per episode (or image).
    references (`list` of 2D integer arrays): ground truth of the same sizes; `ignore_index` pixels are skipped.
    num_labels (`int`): size of the label space (classes 0..num_labels-1).
    ignore_index (`int`, *optional*, defaults to 255): label of pixels that are not scored.
    background_index (`int`, *optional*, defaults to 0): class merged as "background" for FB-IoU.
    base_classes (`list[int]`, *optional*): base class indices (without background), for the GFSS scores.
    novel_classes (`list[int]`, *optional*): novel class indices, for the GFSS scores.
    convention (`str`, *optional*, defaults to `"diam"`): `"diam"` or `"capl"`.
Returns:
    `mean_iou`, `per_class_iou` (list, nan for classes that never occurred), `episode_mean_iou`, `fb_iou`,
    `intersection` and `union` (lists of pixel counts), and with base/novel classes `base`, `novel`, `mean`,
    `harmonic` (+ `total` for capl).
Examples:
    >>> metric = evaluate.load("path/to/gfss_hf/evaluate_metrics/gfss_miou")
    >>> out = metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2)
    >>> round(out["mean_iou"], 3)
    0.5
"""

_CITATION = """
@techreport{liu2022gfss,
  title={Towards Generalized Few-shot Segmentation: On Contrastive Learning and Background Information Modeling},
  author={Liu, Haoming and Zhang, Chengyu and Lu, Xiaochen},
  institution={NYU Shanghai, Computer Science and Data Science Capstone Report},
  year={2022}
}
"""


def _nanmean(values):
    kept = [float(v) for v in values if not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GFSSMeanIoU(evaluate.Metric):
    """Pooled mIoU, FB-IoU and GFSS base/novel/mean/harmonic scores (see the module description)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.List(datasets.Value("int64"))),
                    "references": datasets.List(datasets.List(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels,
        ignore_index=255,
        background_index=0,
        base_classes=None,
        novel_classes=None,
        convention="diam",
    ):
        num_labels = int(num_labels)
        if convention not in ("diam", "capl"):
            raise ValueError(f"convention={convention!r} is not known; use 'diam' or 'capl'.")
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        episode_sum = np.zeros(num_labels, dtype=np.float64)
        episode_count = np.zeros(num_labels, dtype=np.int64)
        for pred, ref in zip(predictions, references):
            pred, ref = np.asarray(pred, dtype=np.int64), np.asarray(ref, dtype=np.int64)
            if pred.shape != ref.shape:
                raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape.")
            valid = ref != ignore_index
            target, guess = ref[valid], pred[valid]
            for name, values in (("reference", target), ("prediction", guess)):
                if values.size and (values.min() < 0 or values.max() >= num_labels):
                    raise ValueError(f"a {name} value is outside [0, {num_labels}) and is not {ignore_index}.")
            conf = np.bincount(target * num_labels + guess, minlength=num_labels**2).reshape(num_labels, num_labels)
            confusion += conf
            inter = np.diag(conf)
            union = conf.sum(0) + conf.sum(1) - inter
            present = union > 0
            episode_sum[present] += inter[present] / union[present]
            episode_count[present] += 1
        inter = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        per_episode = np.where(episode_count > 0, episode_sum / np.maximum(episode_count, 1), np.nan)
        b = background_index
        total = confusion.sum()
        tn = confusion[b, b]
        label_bg, pred_bg = confusion[b].sum(), confusion[:, b].sum()
        union_bg, union_fg = label_bg + pred_bg - tn, total - tn
        fg_fg = total - label_bg - pred_bg + tn
        fb = _nanmean([tn / union_bg if union_bg else float("nan"), fg_fg / union_fg if union_fg else float("nan")])
        out = {
            "mean_iou": _nanmean(iou),
            "per_class_iou": iou.tolist(),
            "episode_mean_iou": _nanmean(per_episode),
            "fb_iou": fb,
            "intersection": inter.tolist(),
            "union": union.tolist(),
        }
        if base_classes is not None and novel_classes is not None:
            base = [int(c) for c in base_classes]
            if convention == "capl":
                base = [b, *base]
            base_score = _nanmean(iou[c] for c in base)
            novel_score = _nanmean(iou[int(c)] for c in novel_classes)
            out["base"], out["novel"] = base_score, novel_score
            out["mean"] = (base_score + novel_score) / 2
            both = base_score + novel_score
            out["harmonic"] = 0.0 if both == 0 else 2 * base_score * novel_score / both
            if convention == "capl":
                out["total"] = _nanmean(iou[c] for c in base + [int(c) for c in novel_classes])
        return out
