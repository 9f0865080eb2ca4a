"""Episodic evaluation of GFSS models under the three protocols of the literature (`paper`, `diam`, `capl`).

The pieces, in the order an evaluation uses them:

- an image source per list (`val`, and `train` for `capl`): anything with `ids`, `get_by_id(id) -> {"image",
  "label"}` and `pixel_counts()` (`gfss_hf.data.sources.load_image_source`: the procedural `SyntheticSegmentation`,
  or a `DatasetImageSource` over a `datasets.Dataset` built by the PASCAL / COCO / folder builders);
- `gfss_hf.data.episodes.build_episodes`: the seeded samplers for a protocol, fold and shot count;
- [`FeatureCache`]: the frozen backbone + decoder features of every image, computed once per evaluation and kept on
  the device (optionally in half precision, under a memory bound beyond which features are recomputed);
- [`evaluate_episodes`]: the episodes in fixed batches, split over the processes of an `accelerate` launch, adapted
  with `gfss_hf.adaptation` (FSS 2-way and/or GFSS expanded classifier), scored with pooled IoU
  (`gfss_hf.metrics.PooledIoU`) and reduced across processes at the end.

The result ([`gfss_hf.results.EvaluationResult`]) is written, read back and published through the results schema
of `gfss_hf.results`; the metric names are those of `gfss_hf.metrics`.

Results do not depend on the number of processes or on the feature cache: work is cut into the same batches
whatever the process count, each image's features are computed alone (`feature_batch_size=1`), and the metric sums
are integers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .adaptation import AdaptationConfig, CarryOverState, adapt_classifier, predict
from .data.episodes import EpisodeSpec, episodes_hash
from .data.splits import IGNORE_INDEX, FoldSplit
from .metrics import PooledIoU, harmonic_mean
from .results import EvaluationResult

__all__ = [
    "EvaluationOptions",
    "FeatureCache",
    "check_episodes",
    "check_model_matches_split",
    "episode_seed",
    "estimate_evaluation_seconds",
    "evaluate_episodes",
    "score_binary_episodes",
    "summarise_accumulators",
]

logger = logging.get_logger(__name__)

_FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- feature cache --------------------------------------------------------------------------------------------------
@dataclass
class _Record:
    label: np.ndarray  # (S, S) uint8 dataset ids on the canvas, padding = ignore
    original_size: tuple[int, int]


class FeatureCache:
    r"""
    Frozen dense features (`model.extract_features`) of images by (source, id), computed once and kept on the
    model's device.

    Args:
        model ([`GFSSModel`]): in eval mode; only `extract_features` is used.
        processor ([`GFSSImageProcessor`]): prepares images and label maps.
        sources (`dict[str, source]`): image sources by name (`"val"`, `"train"`).
        dtype (`str`, *optional*, defaults to `"float32"`): precision features are kept in (`"float16"` halves the
            memory). Features are rounded to it whether cached or recomputed, so caching never changes a result.
        enabled (`bool`, *optional*, defaults to `True`): keep features; `False` recomputes them at every request
            (the reference code's behaviour).
        max_bytes (`int`, *optional*): memory bound of the kept features; once reached, features of further images
            are recomputed at each request. Default: 60% of the free device memory on CUDA, 25% of the RAM on CPU.
        batch_size (`int`, *optional*, defaults to 1): images per forward pass. With 1, an image's features do not
            depend on which other images are computed with it (convolutions are not batch-invariant to the last
            bit), which keeps results identical across process counts and with / without the cache.

    Example:

    ```python
    >>> cache = FeatureCache(model, processor, {"val": val_source})  # doctest: +SKIP
    >>> feats = cache.features("val", ["val-000000", "val-000001"])  # (2, D, h, w)  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        model,
        processor,
        sources: Mapping[str, Any],
        *,
        dtype: str = "float32",
        enabled: bool = True,
        max_bytes: int | None = None,
        batch_size: int = 1,
    ):
        if dtype not in _FEATURE_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {list(_FEATURE_DTYPES)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.model = model
        self.processor = processor
        self.sources = dict(sources)
        self.dtype = _FEATURE_DTYPES[dtype]
        self.enabled = enabled
        self.batch_size = int(batch_size)
        self.device = next(model.parameters()).device
        self.max_bytes = int(max_bytes) if max_bytes is not None else _default_cache_bytes(self.device)
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._records: dict[tuple[str, str], _Record] = {}
        self.bytes = 0
        self.stats = {"requests": 0, "hits": 0, "computed": 0, "stored": 0, "full": 0}

    def _source(self, name: str):
        if name not in self.sources:
            raise KeyError(f"no image source named {name!r}; known: {sorted(self.sources)}.")
        return self.sources[name]

    def _prepare(self, name: str, image_id: str, need_pixels: bool):
        sample = self._source(name).get_by_id(image_id)
        batch = self.processor(sample["image"], segmentation_maps=np.asarray(sample["label"]), return_tensors="pt")
        key = (name, image_id)
        if key not in self._records:
            label = batch["labels"][0].numpy()
            if label.max() > 255:
                raise ValueError(f"label of {image_id!r} holds {label.max()}, above 255; dataset ids must fit uint8.")
            size = tuple(int(v) for v in batch["original_sizes"][0].tolist())
            self._records[key] = _Record(label.astype(np.uint8), size)
        return batch["pixel_values"] if need_pixels else None

    def record(self, name: str, image_id: str) -> _Record:
        """The canvas label (dataset ids, uint8 `(S, S)`) and original size of an image."""
        key = (name, str(image_id))
        if key not in self._records:
            self._prepare(name, key[1], need_pixels=False)
        return self._records[key]

    def labels(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """`(n, S, S)` uint8 canvas labels (dataset ids, ignore padding) of `ids`."""
        return np.stack([self.record(name, i).label for i in ids])

    def original_label(self, name: str, image_id: str) -> np.ndarray:
        """The label map of an image at its original size (read from the source, not kept)."""
        return np.asarray(self._source(name).get_by_id(image_id)["label"])

    @torch.no_grad()
    def features(self, name: str, ids: Sequence[str]) -> torch.Tensor:
        """`(n, D, h, w)` float32 features of `ids` (repeats allowed) on the model's device."""
        ids = [str(i) for i in ids]
        self.stats["requests"] += len(ids)
        found: dict[str, torch.Tensor] = {}
        missing = []
        for image_id in ids:
            cached = self._features.get((name, image_id))
            if cached is not None:
                found[image_id] = cached
                self.stats["hits"] += 1
            elif image_id not in missing:
                missing.append(image_id)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            pixels = torch.cat([self._prepare(name, i, need_pixels=True) for i in chunk]).to(self.device)
            computed = self.model.extract_features(pixels).to(self.dtype)
            self.stats["computed"] += len(chunk)
            for image_id, feats in zip(chunk, computed):
                feats = feats.clone()
                found[image_id] = feats
                self._store(name, image_id, feats)
        return torch.stack([found[i] for i in ids]).float()

    def _store(self, name: str, image_id: str, feats: torch.Tensor) -> None:
        if not self.enabled:
            return
        size = feats.numel() * feats.element_size()
        if self.bytes + size > self.max_bytes:
            if self.stats["full"] == 0:
                logger.warning(
                    f"feature cache full ({self.bytes / 2**20:.0f} MiB of {self.max_bytes / 2**20:.0f} MiB); further "
                    "images are recomputed at each use. Raise the bound or use dtype='float16' to keep more."
                )
            self.stats["full"] += 1
            return
        self._features[(name, image_id)] = feats
        self.bytes += size
        self.stats["stored"] += 1


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(0.25 * total)


# -- options and result ---------------------------------------------------------------------------------------------
@dataclass
class EvaluationOptions:
    r"""
    How an evaluation runs (the method's hyper-parameters live in `adaptation`).

    Args:
        adaptation ([`AdaptationConfig`], *optional*): fine-tuning hyper-parameters; `method` is ignored (the
            `paper` protocol runs both heads, `diam` / `capl` the GFSS head).
        episode_batch_size (`int`, *optional*): episodes adapted together (`paper`), or queries predicted together
            (`diam`, `capl`). The batches are the same whatever the number of processes. Default: 8, except 1 on CPU
            with the input-resolution loss, where a batch of 8 was measured 35% slower per episode than one at a
            time (the upsampled logits of 8 episodes outgrow the CPU caches) and one at a time computes exactly what
            the reference-style loop computes.
        feature_batch_size (`int`, *optional*, defaults to 1): images per feature forward pass (see
            [`FeatureCache`]).
        cache_features (`bool`, *optional*, defaults to `True`): keep every image's features for the whole
            evaluation.
        feature_dtype (`str`, *optional*, defaults to `"float32"`): `"float32"`, `"float16"` or `"bfloat16"`.
        cache_max_bytes (`int`, *optional*): memory bound of the cache (see [`FeatureCache`]).
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar on the main process (episodes/s, running
            mIoU).
    """

    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    episode_batch_size: int | None = None
    feature_batch_size: int = 1
    cache_features: bool = True
    feature_dtype: str = "float32"
    cache_max_bytes: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.episode_batch_size is not None and self.episode_batch_size < 1:
            raise ValueError(f"episode_batch_size={self.episode_batch_size} must be >= 1 (or None for the default).")
        if self.feature_dtype not in _FEATURE_DTYPES:
            raise ValueError(f"feature_dtype={self.feature_dtype!r} is not supported; use {list(_FEATURE_DTYPES)}.")

    def to_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("episode_batch_size", "feature_batch_size", "cache_features", "feature_dtype", "cache_max_bytes")
        }
        out["adaptation"] = self.adaptation.to_dict()
        return out


# -- evaluation -----------------------------------------------------------------------------------------------------
def episode_seed(adaptation_seed: int, spec: EpisodeSpec, per_query: bool = True) -> int:
    """
    The initialisation seed of an episode's fine-tuning (or, with `per_query=False`, of a `diam` / `capl` run's
    shared classifier): a function of the episode alone, so that batching and the process count do not change it.
    Pass it as `seed=` to the pipeline to replay an evaluated episode exactly.

    Args:
        adaptation_seed (`int`): `AdaptationConfig.seed`.
        spec ([`EpisodeSpec`]): the episode.
        per_query (`bool`, *optional*, defaults to `True`): include the episode index.
    """
    entropy = [int(adaptation_seed), spec.seed, spec.run] + ([spec.index] if per_query else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


class _Context:
    """What every protocol needs: model rows, label maps, the cache and the split."""

    def __init__(self, model, split: FoldSplit, cache: FeatureCache, options: EvaluationOptions):
        self.model = model
        self.split = split
        self.cache = cache
        self.options = options
        self.size = (cache.processor.image_size, cache.processor.image_size)
        self.align_corners = bool(model.config.logits_align_corners)
        base = len(split.base_ids)
        self.num_base_rows = base + 1
        self.num_rows = base + 1 + len(split.novel_ids)
        self.row = {cid: r + 1 for r, cid in enumerate(split.base_ids)}
        self.row.update({cid: base + 1 + r for r, cid in enumerate(split.novel_ids)})
        self.novel_rank = {cid: r for r, cid in enumerate(split.novel_ids)}
        self.fss_config = options.adaptation.replace(method="fss")
        self.gfss_config = options.adaptation.replace(method="gfss")
        self.device = cache.device

    def binary(self, labels: np.ndarray, class_id: int, value: int = 1) -> torch.Tensor:
        """Dataset-id labels -> `value` on `class_id`, 0 elsewhere, ignore kept."""
        out = np.where(labels == class_id, value, 0)
        out = np.where(labels == IGNORE_INDEX, IGNORE_INDEX, out)
        return torch.from_numpy(out.astype(np.int64)).to(self.device)

    def gfss_labels(self, labels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.split.to_gfss_labels(labels).astype(np.int64)).to(self.device)


def check_model_matches_split(model, split: FoldSplit) -> None:
    """
    Refuse a model whose base classes (or recorded dataset / fold) are not those of `split`, spelling out the
    difference: its pre-trained rows would be scored against the wrong classes.
    """
    base_names = tuple(model.config.base_class_names)
    where = f"{split.dataset} fold {split.fold}"
    if base_names != tuple(split.base_names):
        extra = [n for n in base_names if n not in split.base_names]
        missing = [n for n in split.base_names if n not in base_names]
        detail = []
        if extra:
            detail.append(f"the model has base classes {extra} that {where} does not (novel there, or unknown)")
        if missing:
            detail.append(f"{where} has base classes {missing} that the model lacks")
        if not extra and not missing:
            detail.append("the same names in another order (classifier rows would be misread)")
        raise ValueError(
            f"the model's base classes do not match {where}: {'; '.join(detail)}. Model: {list(base_names)}; "
            f"split: {list(split.base_names)}. Evaluate a model pre-trained on that fold, or pass the matching "
            "--fold / --dataset."
        )
    model_dataset, model_fold = getattr(model.config, "dataset", None), getattr(model.config, "fold", None)
    if model_dataset not in (None, "", split.dataset) or model_fold not in (None, split.fold):
        logger.warning(
            f"the model was pre-trained on {model_dataset} fold {model_fold} and is evaluated on {where}; its base "
            "classes are the same, so the numbers are valid, but say so when you report them."
        )


def check_episodes(episodes: Sequence[EpisodeSpec], split: FoldSplit, sources: Mapping[str, Any]) -> None:
    """
    Refuse episodes that do not belong to this evaluation, naming the episode and the rule it breaks: another
    dataset, fold or protocol mix; a "novel" class that is not a novel class of the split (e.g. a base class of the
    model); a base image of a class that is not a base class; a query among its own supports; image ids that are
    not in the image source (`sources["val"]`, and `sources["train"]` for `capl` supports).
    """
    novel, base = set(split.novel_ids), set(split.base_ids)
    names = {**dict(zip(split.base_ids, split.base_names)), **dict(zip(split.novel_ids, split.novel_names))}
    known = {name: set(getattr(source, "ids", ())) for name, source in sources.items()}
    fix = "Sample the episodes for this run (drop --episodes) or pass the run settings the file was made with."
    for k, spec in enumerate(episodes):
        where = f"episode {k} (index {spec.index}, run {spec.run})"
        if (spec.dataset, spec.fold) != (split.dataset, split.fold):
            raise ValueError(
                f"{where} is from {spec.dataset!r} fold {spec.fold}, this evaluation is {split.dataset!r} fold "
                f"{split.fold}. {fix}"
            )
        bad = [c for c in spec.class_ids if c not in novel]
        if bad:
            what = [f"{c} ({names[c]}, a base class of the model)" if c in base else str(c) for c in bad]
            raise ValueError(
                f"{where} treats {what} as novel; the novel classes of this fold are {sorted(novel)}. {fix}"
            )
        if spec.base_class_id is not None and spec.base_class_id not in base:
            raise ValueError(
                f"{where} scores base class {spec.base_class_id}, which is not a base class of this fold. {fix}"
            )
        support_source = spec.support_list
        supports = spec.all_support_ids()
        if support_source == "val" and spec.query_id in supports:
            raise ValueError(
                f"{where} has its query {spec.query_id!r} among its supports; a query is never a support."
            )
        for source, ids in (
            ("val", [spec.query_id] + ([spec.base_query_id] if spec.base_query_id else [])),
            (support_source, supports),
        ):
            if source not in known:
                continue
            missing = [i for i in ids if i not in known[source]]
            if missing:
                raise ValueError(
                    f"{where} names image(s) {missing[:3]} that are not in the {source} list of this dataset "
                    f"({len(known[source])} images). {fix}"
                )


def score_binary_episodes(
    acc: PooledIoU, foreground: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | Sequence[int]
) -> None:
    r"""
    Add episodes to `acc` as the `paper` protocol scores them: per episode, the BINARY IoU of that episode's class.

    Episode `e` contributes to class `classes[e]` alone: its predicted foreground counts as that class, everything
    else as background (row 0). Summed over episodes, the intersection and union of class `c` come from the
    episodes of class `c` only, so predictions of other classes on an episode's image are never counted as false
    positives of those classes (which a multi-class confusion matrix of the same maps would do).

    Args:
        acc ([`PooledIoU`]): the accumulator (rows: background 0, then the split's classes).
        foreground (`torch.Tensor` of shape `(E, H, W)`, bool): pixels predicted as the episode's class.
        target (`torch.Tensor` of shape `(E, H, W)`, integer): ground truth, `classes[e]` on the class,
            0 elsewhere, `acc.ignore_index` ignored.
        classes (`torch.Tensor` broadcastable to `(E, 1, 1)`, or a sequence of `E` ints): each episode's row.
    """
    if foreground.dtype != torch.bool:
        raise TypeError(f"foreground must be a bool mask, got {foreground.dtype}; compare the argmax to a row first.")
    rows = torch.as_tensor(classes, device=foreground.device).reshape(-1, 1, 1)
    acc.update(torch.where(foreground, rows, torch.zeros_like(rows)), target)


def _paper_unit(ctx: _Context, specs: list[EpisodeSpec], accs: dict[str, PooledIoU], carry) -> None:
    cache, e = ctx.cache, len(specs)
    shots = {len(s.support_ids[s.class_ids[0]]) for s in specs}
    if len(shots) != 1:
        raise ValueError(f"episodes of one batch have different shot counts {sorted(shots)}; use one K per run.")
    k = shots.pop()
    classes = [s.class_ids[0] for s in specs]
    support_ids = [i for s, c in zip(specs, classes) for i in s.support_ids[c]]
    lists = {s.support_list for s in specs}
    if len(lists) != 1:
        raise ValueError(f"episodes of one batch read supports from different lists {sorted(lists)}; use one.")
    support_list = lists.pop()
    sup_feat = cache.features(support_list, support_ids)
    sup_feat = sup_feat.view(e, k, *sup_feat.shape[1:])
    sup_labels = cache.labels(support_list, support_ids).reshape(e, k, *ctx.size)
    sup_masks = torch.stack([ctx.binary(sup_labels[j], c) for j, c in enumerate(classes)])
    query_ids = [s.query_id for s in specs]
    q_feat = cache.features("val", query_ids)[:, None]  # (E, 1, D, h, w)
    q_labels = cache.labels("val", query_ids)
    q_rows = torch.stack([ctx.binary(q_labels[j], c, ctx.row[c]) for j, c in enumerate(classes)])
    novel_rows = torch.tensor([ctx.row[c] for c in classes], device=ctx.device)[:, None, None]
    seeds = [episode_seed(ctx.options.adaptation.seed, s) for s in specs]

    fss = adapt_classifier(ctx.model, sup_feat, sup_masks, ctx.fss_config, seeds=seeds)
    fss_pred = predict(q_feat, fss, size=ctx.size, align_corners=ctx.align_corners)[:, 0].argmax(1)
    score_binary_episodes(accs["fss"], fss_pred == 1, q_rows, novel_rows)

    gfss = adapt_classifier(
        ctx.model,
        sup_feat,
        sup_masks,
        ctx.gfss_config,
        num_teacher_rows=ctx.num_base_rows,
        support_classes=torch.zeros(e, k, dtype=torch.long),
        num_novel_classes=1,
        seeds=seeds,
        query_features=q_feat if ctx.gfss_config.transductive else None,
        state=carry,
    )
    g_pred = predict(q_feat, gfss, size=ctx.size, align_corners=ctx.align_corners)[:, 0].argmax(1)
    # The novel class is the one row appended after the B + 1 pre-trained rows.
    score_binary_episodes(accs["gfss_novel"], g_pred == ctx.num_base_rows, q_rows, novel_rows)

    with_base = [j for j, s in enumerate(specs) if s.base_query_id is not None]
    if with_base:
        base_ids = [specs[j].base_query_id for j in with_base]
        b_feat = cache.features("val", base_ids)[:, None]
        b_labels = cache.labels("val", base_ids)
        b_rows = torch.stack(
            [
                ctx.binary(b_labels[n], specs[j].base_class_id, ctx.row[specs[j].base_class_id])
                for n, j in enumerate(with_base)
            ]
        )
        b_pred = predict(b_feat, gfss.select(with_base), size=ctx.size, align_corners=ctx.align_corners)
        b_pred = b_pred[:, 0].argmax(1)
        base_rows = torch.tensor([ctx.row[specs[j].base_class_id] for j in with_base], device=ctx.device)
        # Foreground iff the episode's base class wins over all B + 2 rows; other base classes predicted on that
        # image are "not b", never false positives of their own class (METHOD.md section 5).
        score_binary_episodes(accs["gfss_base"], b_pred == base_rows[:, None, None], b_rows, base_rows[:, None, None])


class _RunSupport:
    """
    The support set of one `diam` / `capl` run: features, novel label maps and annotated classes of each support.

    A support image drawn for class c is annotated for c and for every other novel class of the run that it holds.
    With exclusive supports (DIaM's rule) that is c alone: its binary mask. Without (`capl`, and `diam` on datasets
    such as CamVid where no image holds one novel class without the others), the other novel classes' pixels would
    otherwise be "background" of that support, and the distillation, whose teacher's background takes every novel
    row, would teach them to be no novel class at all: on CamVid fold 0 no novel pixel was ever predicted with
    gamma = 10.
    """

    def __init__(self, ctx: _Context, spec: EpisodeSpec, source: str):
        ids, classes = [], []
        for c in sorted(spec.support_ids):
            for image_id in spec.support_ids[c]:
                ids.append(image_id)
                classes.append(c)
        self.features = ctx.cache.features(source, ids)  # (K * N, D, h, w)
        labels = ctx.cache.labels(source, ids)
        maps = np.zeros(labels.shape, np.int64)
        annotated = np.zeros((len(ids), len(ctx.novel_rank)), bool)
        for k, (lab, c) in enumerate(zip(labels, classes)):
            for novel, rank in ctx.novel_rank.items():
                on = lab == novel
                if novel == c or on.any():
                    maps[k][on] = rank + 1
                    annotated[k, rank] = True
        maps[labels == IGNORE_INDEX] = IGNORE_INDEX
        self.labels = torch.from_numpy(maps).to(ctx.device)  # 0 background, rank + 1 novel class, 255 ignored
        self.annotated = torch.from_numpy(annotated).to(ctx.device)  # (K * N, N)
        self.classifier = None


def _run_unit(
    ctx: _Context, specs: list[EpisodeSpec], support: _RunSupport, acc: PooledIoU, protocol: str, carry
) -> None:
    cache, config = ctx.cache, ctx.gfss_config
    query_ids = [s.query_id for s in specs]
    q_feat = cache.features("val", query_ids)
    num_novel = len(ctx.split.novel_ids)
    if config.transductive:
        # DIaM-style transduction adapts on each query: one episode per query, the run's supports shared.
        e = len(specs)
        clf = adapt_classifier(
            ctx.model,
            support.features.expand(e, *support.features.shape),
            support.labels.expand(e, *support.labels.shape),
            config,
            num_teacher_rows=ctx.num_base_rows,
            annotated=support.annotated,
            num_novel_classes=num_novel,
            query_features=q_feat[:, None],
            seeds=[episode_seed(ctx.options.adaptation.seed, s) for s in specs],
        )
        logits = predict(q_feat[:, None], clf, size=ctx.size, align_corners=ctx.align_corners)[:, 0]
    else:
        if support.classifier is None:
            support.classifier = adapt_classifier(
                ctx.model,
                support.features,
                support.labels,
                config,
                num_teacher_rows=ctx.num_base_rows,
                annotated=support.annotated,
                num_novel_classes=num_novel,
                state=carry,
                seeds=episode_seed(ctx.options.adaptation.seed, specs[0], per_query=False),
            )
        logits = predict(q_feat, support.classifier, size=ctx.size, align_corners=ctx.align_corners)
    if protocol == "diam":
        labels = cache.labels("val", query_ids)
        acc.update(logits.argmax(1), torch.stack([ctx.gfss_labels(lab) for lab in labels]))
        return
    # capl: scored at each query's original resolution.
    sizes = [cache.record("val", i).original_size for i in query_ids]
    # Label maps band by band: all classes' logits at full resolution are never needed at once.
    for image_id, label_map in zip(query_ids, cache.processor.post_process_semantic_segmentation(logits, sizes)):
        labels = ctx.gfss_labels(cache.original_label("val", image_id))
        acc.update(label_map.to(labels.device), labels)


def _work_units(episodes: Sequence[EpisodeSpec], batch_size: int) -> list[list[int]]:
    """Fixed batches of episode indices (never across runs), independent of the process count."""
    units: list[list[int]] = []
    current: list[int] = []
    for i, spec in enumerate(episodes):
        if current and (len(current) == batch_size or episodes[current[-1]].run != spec.run):
            units.append(current)
            current = []
        current.append(i)
    if current:
        units.append(current)
    return units


def evaluate_episodes(
    model,
    episodes: Sequence[EpisodeSpec],
    *,
    split: FoldSplit,
    val_source,
    train_source=None,
    processor=None,
    options: EvaluationOptions | None = None,
    accelerator=None,
) -> EvaluationResult:
    r"""
    Evaluate a pre-trained model on episodes of one protocol.

    Args:
        model ([`GFSSModel`]): pre-trained on `split`'s base classes (its first `B + 1` classifier rows are
            `[background, base...]` in `split.base_ids` order). Put in eval mode; moved to the accelerator's
            device.
        episodes (`Sequence[EpisodeSpec]`): from [`build_episodes`] or `gfss_hf.data.episodes.load_episodes`; one
            protocol.
        split ([`FoldSplit`]): the fold.
        val_source: image source of the val list (queries; supports of `paper` and `diam`).
        train_source (*optional*): image source of the train list (supports of `capl` episodes and of `paper`
            episodes sampled with `support_split="train"`).
        processor ([`GFSSImageProcessor`], *optional*): defaults to `GFSSImageProcessor.from_config(model.config)`.
        options ([`EvaluationOptions`], *optional*): batching, cache and adaptation hyper-parameters.
        accelerator (`accelerate.Accelerator`, *optional*): splits the batches of episodes round-robin over its
            processes and sums the metric accumulators at the end; every process returns the same result.

    Returns:
        [`EvaluationResult`].

    Protocols:

    - `paper`: per episode the FSS 2-way classifier and the GFSS (B+2)-way classifier are adapted on the K
      supports; both predict the query (IoU of the episode's novel class, binary ground truth), the GFSS classifier
      also predicts the extra base image (IoU of its base class). Labels at the canvas resolution.
    - `diam`: per run one GFSS (B+1+N)-way classifier from the run's supports (binary masks, one novel class per
      support; a support that also holds other novel classes of the run, allowed with `exclusive=False`, is
      annotated for them too); every query predicted over all classes on the canvas; base mIoU without background.
    - `capl`: as `diam` with supports from the train list and queries scored at their original resolution; base
      mIoU with background, plus the total.

    Example:

    ```python
    >>> split = get_split("synthetic", 0)  # doctest: +SKIP
    >>> val = SyntheticSegmentation("val", num_images=50, image_size=96)  # doctest: +SKIP
    >>> episodes = build_episodes("paper", split, val, shots=1, num_episodes=100, seed=42)  # doctest: +SKIP
    >>> result = evaluate_episodes(model, episodes, split=split, val_source=val)  # doctest: +SKIP
    >>> result.metrics["gfss_novel_miou"]  # doctest: +SKIP
    ```
    """
    options = options if options is not None else EvaluationOptions()
    episodes = list(episodes)
    if not episodes:
        raise ValueError("no episodes to evaluate; sample some with build_episodes.")
    protocols = sorted({e.protocol for e in episodes})
    if len(protocols) != 1:
        raise ValueError(f"the episodes mix protocols {protocols}; evaluate one protocol at a time.")
    protocol = protocols[0]
    check_model_matches_split(model, split)
    if train_source is None and any(e.support_list == "train" for e in episodes):
        raise ValueError("these episodes take their supports from the train list: pass train_source.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    adaptation = options.adaptation
    if adaptation.legacy_carry_over:
        if world > 1:
            raise ValueError(
                "legacy_carry_over=True reproduces a drift that runs through all episodes in order; evaluate it in "
                "one process (drop --multi_gpu / --num_processes)."
            )
        if adaptation.transductive and protocol != "paper":
            raise ValueError("legacy_carry_over with transductive adaptation of diam/capl queries is not supported.")
    if processor is None:
        from .image_processing_gfss import GFSSImageProcessor

        processor = GFSSImageProcessor.from_config(model.config)
    if accelerator is not None:
        model = model.to(accelerator.device)
    model.eval()

    sources = {"val": val_source}
    if train_source is not None:
        sources["train"] = train_source
    check_episodes(episodes, split, sources)
    cache = FeatureCache(
        model,
        processor,
        sources,
        dtype=options.feature_dtype,
        enabled=options.cache_features,
        max_bytes=options.cache_max_bytes,
        batch_size=options.feature_batch_size,
    )
    ctx = _Context(model, split, cache, options)
    batch = options.episode_batch_size
    if batch is None:
        batch = 1 if cache.device.type == "cpu" and adaptation.loss_resolution == "input" else 8
    if adaptation.legacy_carry_over and protocol == "paper":
        batch = 1  # the drift runs through the episodes one after another
    units = _work_units(episodes, batch)
    mine = units[rank::world]
    carry = CarryOverState() if adaptation.legacy_carry_over else None

    accs: dict[str, PooledIoU] = {}
    if protocol == "paper":
        for name in ("fss", "gfss_novel", "gfss_base"):
            accs[name] = PooledIoU(ctx.num_rows, device=ctx.device)
    else:
        for run in sorted({e.run for e in episodes}):
            accs[f"run{run}"] = PooledIoU(ctx.num_rows, device=ctx.device)
    novel_rows = list(range(ctx.num_base_rows, ctx.num_rows))
    supports: dict[int, _RunSupport] = {}

    bar = None
    if options.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(episodes), unit="episode", desc=f"{protocol} evaluation", dynamic_ncols=True)
    start = time.perf_counter()
    with torch.no_grad():
        for unit in mine:
            specs = [episodes[i] for i in unit]
            if protocol == "paper":
                _paper_unit(ctx, specs, accs, carry)
                running = accs["gfss_novel"]
            else:
                run = specs[0].run
                if run not in supports:
                    supports.clear()  # one run's support features at a time
                    supports[run] = _RunSupport(ctx, specs[0], specs[0].support_list)
                _run_unit(ctx, specs, supports[run], accs[f"run{run}"], protocol, carry)
                running = accs[f"run{run}"]
            if bar is not None:
                bar.update(min(len(unit) * world, bar.total - bar.n))
                bar.set_postfix(novel_miou=f"{100 * running.mean_iou(novel_rows):.1f}", refresh=False)
    for acc in accs.values():
        acc.reduce(accelerator)
    seconds = time.perf_counter() - start
    if accelerator is not None and world > 1:
        seconds = float(accelerator.reduce(torch.tensor([seconds], device=accelerator.device), "max").item())
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()

    id2label = {r: n for r, n in enumerate(["background", *split.base_names, *split.novel_names])}
    metrics, runs = summarise_accumulators(protocol, accs, ctx.num_base_rows)
    return EvaluationResult(
        protocol=protocol,
        metrics=metrics,
        per_class={name: acc.per_class(id2label) for name, acc in accs.items()},
        runs=runs,
        accumulators=accs,
        num_episodes=len(episodes),
        episodes_hash=episodes_hash(episodes),
        timing={
            "episode_batch_size": batch,
            "seconds": seconds,
            "episodes_per_second": len(episodes) / seconds if seconds > 0 else float("inf"),
            "num_processes": world,
        },
        cache={**cache.stats, "bytes": cache.bytes},
    )


def estimate_evaluation_seconds(
    model, processor, episodes: Sequence[EpisodeSpec], options: EvaluationOptions | None = None, repeats: int = 1
) -> float:
    """
    Projected wall time of [`evaluate_episodes`] on this machine, from one timed feature forward pass and one timed
    adaptation (FSS + GFSS for `paper`) on random features of the real shapes. Conservative: it ignores episode
    batching, which is faster per episode on a GPU and with `loss_resolution="feature"`.

    Returns:
        `float`: seconds (features of every distinct image once + every adaptation).
    """
    options = options if options is not None else EvaluationOptions()
    episodes = list(episodes)
    if not episodes:
        return 0.0
    param = next(model.parameters())
    size = processor.image_size
    pixels = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    protocol = episodes[0].protocol
    images = {(e.support_list, i) for e in episodes for i in e.all_support_ids()}
    images |= {("val", e.query_id) for e in episodes} | {("val", e.base_query_id) for e in episodes if e.base_query_id}
    config = options.adaptation
    shots = len(episodes[0].support_ids[episodes[0].class_ids[0]])
    num_classes = len(episodes[0].class_ids)
    with torch.no_grad():
        model.extract_features(pixels)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            feats = model.extract_features(pixels)
        t_feature = (time.perf_counter() - start) / repeats
    sup = feats.expand(shots * num_classes, *feats.shape[1:]).contiguous()
    masks = torch.zeros(shots * num_classes, size, size, dtype=torch.long, device=param.device)
    masks[:, : size // 2, : size // 2] = 1
    base_rows = len(model.config.base_class_names) + 1
    classes = torch.arange(num_classes).repeat_interleave(shots)
    start = time.perf_counter()
    for _ in range(repeats):
        adapt_classifier(
            model,
            sup,
            masks,
            config.replace(method="gfss", transductive=False),
            support_classes=classes,
            num_novel_classes=num_classes,
            num_teacher_rows=base_rows,
            seeds=0,
        )
        if protocol == "paper":
            adapt_classifier(model, sup[:shots], masks[:shots], config.replace(method="fss"), seeds=0)
    t_adapt = (time.perf_counter() - start) / repeats
    if protocol == "paper" or config.transductive:
        adaptations = len(episodes)
    else:
        adaptations = len({e.run for e in episodes})
    return len(images) * t_feature + adaptations * t_adapt


def summarise_accumulators(
    protocol: str, accs: Mapping[str, PooledIoU], num_base_rows: int
) -> tuple[dict[str, float], list[dict]]:
    """
    The metrics of [`gfss_hf.metrics.metric_keys`] (and, for `diam` / `capl`, the per-run summaries) from reduced accumulators.

    Args:
        protocol (`str`): `"paper"`, `"diam"` or `"capl"`.
        accs (`Mapping[str, PooledIoU]`): `paper`: `fss`, `gfss_novel`, `gfss_base`; `diam` / `capl`: `run0`, ...
        num_base_rows (`int`): `B + 1` (background and base rows come first; novel rows follow up to the end).
    """
    num_rows = next(iter(accs.values())).num_classes
    base_rows = list(range(1, num_base_rows))
    novel_rows = list(range(num_base_rows, num_rows))
    if protocol == "paper":
        fss, novel, base = accs["fss"], accs["gfss_novel"], accs["gfss_base"]
        # Base and novel scores come from different images (the extra base image, the query): two accumulators.
        base_miou, novel_miou = base.mean_iou(base_rows), novel.mean_iou(novel_rows)
        metrics = {
            "fss_novel_miou": fss.mean_iou(novel_rows),
            "fss_fb_iou": fss.fb_iou(),
            "gfss_novel_miou": novel_miou,
            "gfss_base_miou": base_miou,
            "gfss_mean_miou": (base_miou + novel_miou) / 2,
            "gfss_harmonic_miou": harmonic_mean(base_miou, novel_miou),
            "gfss_fb_iou": novel.fb_iou(foreground_classes=novel_rows),
            "fss_novel_episode_miou": fss.episode_mean_iou(novel_rows),
            "gfss_novel_episode_miou": novel.episode_mean_iou(novel_rows),
            "gfss_base_episode_miou": base.episode_mean_iou(base_rows),
        }
        return metrics, []
    runs = []
    for name in sorted(accs, key=lambda n: int(n[3:])):
        acc = accs[name]
        summary = acc.summary(base_rows, novel_rows, convention=protocol)
        entry = {f"{k}_miou": v for k, v in summary.items()}
        entry["novel_episode_miou"] = acc.episode_mean_iou(novel_rows)
        entry["run"] = int(name[3:])
        entry["num_queries"] = int(acc.num_updates)
        runs.append(entry)
    metrics = {}
    for key in [k for k in runs[0] if k.endswith("miou")]:
        values = [r[key] for r in runs]
        metrics[key] = float(np.mean(values))
        metrics[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    for key, value in metrics.items():
        if isinstance(value, float) and math.isnan(value):
            logger.warning(f"{key} is nan: no class of that group occurred in the evaluated episodes.")
    return metrics, runs
