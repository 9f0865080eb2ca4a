"""Episodes as data: the serialisable `EpisodeSpec`, per-class indexes, and seeded samplers of the three protocols.

Protocols (see the method notes, section 5):

- `paper`: one novel class per episode; query and K supports from the val list (query excluded), the class covers
  >= `min_pixels` in all of them (the caller's class index is built at that threshold); an extra val image of a
  random base class per episode for the base mIoU. -> `sample_paper_episodes`.
- `diam`: one support set per run (K val images per novel class, novel area >= `min_support_pixels`, one novel
  class per support image); every other val image is a query. -> `sample_diam_run`.
- `capl`: one support set per run drawn from the TRAIN list; every val image is a query. -> `sample_capl_run`.

`build_episodes` runs the sampler of a protocol over image sources (`gfss_hf.data.sources`) with the protocol's
default area threshold (`default_min_pixels`).

Runs of `diam`/`capl` are returned as one `EpisodeSpec` per query image, all sharing the run's `support_ids`, so
that every protocol is a list of episodes an evaluation can replay exactly. All randomness comes from
`np.random.default_rng([seed, index])` (`index` = episode index for `paper`, run index for `diam`/`capl`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from .._io import atomic_write_bytes
from .splits import SYNTHETIC_IMAGE_SIZE, SYNTHETIC_MIN_PIXELS, FoldSplit

logger = logging.get_logger(__name__)

__all__ = [
    "AREA_SHARES",
    "PROTOCOLS",
    "PUBLISHED_MIN_PIXELS",
    "build_episodes",
    "default_min_pixels",
    "episodes_hash",
    "EpisodeSpec",
    "compute_pixel_counts",
    "class_index_from_pixel_counts",
    "build_class_index",
    "scaled_pixel_threshold",
    "sample_paper_episodes",
    "sample_diam_run",
    "sample_capl_run",
    "save_episodes",
    "load_episodes",
    "episodes_to_dataset",
    "episodes_from_dataset",
]

PROTOCOLS = ("paper", "diam", "capl")
_FORMAT = "gfss_hf.episodes"
_FORMAT_VERSION = 1


@dataclass
class EpisodeSpec:
    """One evaluation episode, as plain data (JSON- and `datasets`-serialisable).

    Args:
        dataset (`str`): dataset name (`"pascal5i"`, `"coco20i"`, `"synthetic"`, ...).
        fold (`int`): fold index.
        protocol (`str`): `"paper"`, `"diam"` or `"capl"`.
        index (`int`): episode index (`paper`) or query index within the run (`diam`, `capl`).
        seed (`int`): sampler seed.
        query_id (`str`): image id of the query.
        support_ids (`dict[int, list[str]]`): novel dataset class id -> support image ids (K per class).
        class_ids (`list[int]`): novel dataset ids of this episode (one for `paper`, all novel classes otherwise).
        base_query_id (`str`, *optional*): `paper` protocol: the extra val image of a base class.
        base_class_id (`int`, *optional*): `paper` protocol: the base dataset id of `base_query_id`.
        run (`int`, *optional*, defaults to 0): run index (`diam`, `capl`: one support set per run).
        support_split (`str`, *optional*): the list the supports come from, when not the protocol's own (`paper` and
            `diam`: `"val"`, `capl`: `"train"`); `paper` episodes sampled with supports from the train list
            (`build_episodes(..., support_split="train")`) say `"train"`. See [`EpisodeSpec.support_list`].

    Example:

    ```python
    >>> spec = EpisodeSpec("pascal5i", 0, "paper", 0, 42, "2007_000033", {1: ["2007_000042"]}, [1])
    >>> EpisodeSpec.from_dict(spec.to_dict()) == spec
    True
    ```
    """

    dataset: str
    fold: int
    protocol: str
    index: int
    seed: int
    query_id: str
    support_ids: dict[int, list[str]]
    class_ids: list[int]
    base_query_id: str | None = None
    base_class_id: int | None = None
    run: int = 0
    support_split: str | None = None

    def __post_init__(self):
        self.fold, self.index, self.seed, self.run = int(self.fold), int(self.index), int(self.seed), int(self.run)
        self.query_id = str(self.query_id)
        self.support_ids = {int(c): [str(i) for i in ids] for c, ids in dict(self.support_ids).items()}
        self.class_ids = [int(c) for c in self.class_ids]
        self.base_query_id = None if self.base_query_id is None else str(self.base_query_id)
        self.base_class_id = None if self.base_class_id is None else int(self.base_class_id)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is not known; use one of {list(PROTOCOLS)}.")
        if self.support_split not in (None, "val", "train"):
            raise ValueError(f"support_split={self.support_split!r} is not a list; use 'val', 'train' or None.")
        missing = [c for c in self.class_ids if c not in self.support_ids]
        if missing:
            raise ValueError(f"class_ids {missing} have no entry in support_ids {sorted(self.support_ids)}.")

    @property
    def support_list(self) -> str:
        """The list (`"val"` or `"train"`) the support images are read from."""
        if self.support_split is not None:
            return self.support_split
        return "train" if self.protocol == "capl" else "val"

    @property
    def shots(self) -> int:
        """Smallest number of supports of a class of the episode."""
        return min((len(v) for v in self.support_ids.values()), default=0)

    def all_support_ids(self) -> list[str]:
        """Support image ids of all classes, in class order."""
        return [i for c in sorted(self.support_ids) for i in self.support_ids[c]]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (class ids of `support_ids` become strings, as JSON object keys must); `support_split`
        only when set, so that the episodes (and hashes) of the protocols' own lists are as before it existed."""
        out = {
            "dataset": self.dataset,
            "fold": self.fold,
            "protocol": self.protocol,
            "index": self.index,
            "seed": self.seed,
            "run": self.run,
            "query_id": self.query_id,
            "support_ids": {str(c): list(ids) for c, ids in sorted(self.support_ids.items())},
            "class_ids": list(self.class_ids),
            "base_query_id": self.base_query_id,
            "base_class_id": self.base_class_id,
        }
        if self.support_split is not None:
            out["support_split"] = self.support_split
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeSpec:
        """Inverse of `to_dict`."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EpisodeSpec fields {sorted(unknown)}; expected a subset of {sorted(known)}.")
        kwargs = dict(data)
        kwargs["support_ids"] = {int(c): list(v) for c, v in data["support_ids"].items()}
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ class indexes
def compute_pixel_counts(
    items: Iterable[tuple[str, np.ndarray]], ignore_index: int = 255
) -> dict[str, dict[int, int]]:
    """Pixel count of every object class present in each label map.

    Args:
        items (`Iterable[tuple[str, np.ndarray]]`): (image id, label) pairs; labels are integer arrays of shape
            `(H, W)` holding dataset ids (0 background, `ignore_index` ignored).
        ignore_index (`int`, *optional*, defaults to 255): label value that is not a class.

    Returns:
        `dict[str, dict[int, int]]`: image id -> {class id: pixel count} for the classes present (background and
        `ignore_index` excluded).
    """
    out: dict[str, dict[int, int]] = {}
    for image_id, label in items:
        arr = np.asarray(label)
        if arr.dtype != np.uint8:
            arr = arr.astype(np.int64)
            if arr.size and arr.min() < 0:
                raise ValueError(f"label of {image_id!r} has negative values; labels are class ids >= 0.")
        counts = np.bincount(arr.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        out[str(image_id)] = {int(c): int(counts[c]) for c in present if c != 0 and c != ignore_index}
    return out


def class_index_from_pixel_counts(
    pixel_counts: Mapping[str, Mapping[int, int]], min_pixels: int, class_ids: Iterable[int] | None = None
) -> dict[int, list[str]]:
    """Class id -> sorted image ids where the class covers >= `min_pixels` pixels.

    Args:
        pixel_counts (`Mapping[str, Mapping[int, int]]`): output of `compute_pixel_counts`.
        min_pixels (`int`): area threshold (inclusive).
        class_ids (`Iterable[int]`, *optional*): classes to include as keys even when no image qualifies.
    """
    index: dict[int, list[str]] = {int(c): [] for c in (class_ids or ())}
    for image_id, counts in pixel_counts.items():
        for c, n in counts.items():
            if n >= min_pixels:
                index.setdefault(int(c), []).append(str(image_id))
    return {c: sorted(ids) for c, ids in sorted(index.items())}


def build_class_index(
    items: Iterable[tuple[str, np.ndarray]],
    min_pixels: int,
    class_ids: Iterable[int] | None = None,
    ignore_index: int = 255,
) -> dict[int, list[str]]:
    """Per-class index straight from (image id, label) pairs: class id -> sorted ids with >= `min_pixels` px.

    Example:

    ```python
    >>> build_class_index([("a", np.array([[1, 1, 2]])), ("b", np.array([[2, 2, 0]]))], min_pixels=2)
    {1: ['a'], 2: ['b']}
    ```
    """
    return class_index_from_pixel_counts(compute_pixel_counts(items, ignore_index), min_pixels, class_ids)


def scaled_pixel_threshold(pixels: int, reference_size: int, image_size: int) -> int:
    """Scale an area threshold defined at `reference_size` x `reference_size` to `image_size` x `image_size`.

    Example: DIaM's 16,384 px at 417 px is `scaled_pixel_threshold(16384, 417, 96) == 868` for 96 px images.
    """
    return max(1, int(round(pixels * (image_size / reference_size) ** 2)))


# ------------------------------------------------------------------------------------------------ samplers
def _check_common(novel_ids: Sequence[int], shots: int) -> list[int]:
    if shots < 1:
        raise ValueError(f"shots={shots} must be >= 1.")
    novel = [int(c) for c in novel_ids]
    if not novel:
        raise ValueError("novel_ids is empty; give the novel dataset ids of the fold.")
    return novel


def sample_paper_episodes(
    class_index: Mapping[int, Sequence[str]],
    query_pool_ids: Sequence[str],
    novel_ids: Sequence[int],
    base_ids: Sequence[int],
    shots: int,
    num_episodes: int,
    seed: int,
    *,
    dataset: str = "",
    fold: int = 0,
    class_sampling: str = "pair",
    class_names: Mapping[int, str] | None = None,
    support_index: Mapping[int, Sequence[str]] | None = None,
) -> list[EpisodeSpec]:
    """Sample episodes of the `paper` protocol (one novel class per episode, everything from the val list, or the
    supports from the train list with `support_index`).

    Args:
        class_index (`Mapping[int, Sequence[str]]`): class id -> image ids where the class covers >= the protocol's
            area threshold (2,048 px for PASCAL/COCO), built over the val list.
        query_pool_ids (`Sequence[str]`): image ids of the val list; queries, supports and base images come from it.
        novel_ids (`Sequence[int]`): novel dataset ids of the fold.
        base_ids (`Sequence[int]`): base dataset ids of the fold (for the extra base image; may be empty).
        shots (`int`): K supports per episode.
        num_episodes (`int`): number of episodes (20,000 in the paper).
        seed (`int`): episode `i` draws from `np.random.default_rng([seed, i])` (42 in the paper).
        dataset (`str`, *optional*): stored in the specs.
        fold (`int`, *optional*): stored in the specs.
        class_sampling (`str`, *optional*, defaults to `"pair"`): `"pair"` draws a (query, class) pair uniformly,
            so classes appear in proportion to their images (the common implementation); `"class"` draws the
            class uniformly, then the query.
        class_names (`Mapping[int, str]`, *optional*): names of the class ids, for warnings and errors.
        support_index (`Mapping[int, Sequence[str]]`, *optional*): class id -> TRAIN image ids where the class
            covers the threshold: the supports are drawn from it (`support_split="train"` in the specs) instead of
            the query's list. For a val list shot in one sequence (CamVid: one drive), where val supports share the
            query's viewpoint and lighting. `None` (default): the published protocol, with the same draws as before.

    Returns:
        `list[EpisodeSpec]`: `num_episodes` specs; a query never appears among its supports, and query, supports
        and base image all come from `class_index` (so the class covers the threshold in each).
    """
    novel = _check_common(novel_ids, shots)
    if num_episodes < 0:
        raise ValueError(f"num_episodes={num_episodes} must be >= 0.")
    if class_sampling not in ("pair", "class"):
        raise ValueError(f"class_sampling={class_sampling!r} is not known; use 'pair' or 'class'.")
    pool = {str(i) for i in query_pool_ids}
    cand = {c: sorted(pool.intersection(map(str, class_index.get(c, ())))) for c in novel}
    if support_index is None:
        usable = [c for c in novel if len(cand[c]) >= shots + 1]
        need = f"{shots + 1} images (1 query + {shots} supports) in the pool"
    else:
        support_cand = {c: sorted(map(str, support_index.get(c, ()))) for c in novel}
        usable = [c for c in novel if cand[c] and len(support_cand[c]) >= shots]
        need = f"1 query image in the pool and {shots} support images in the train list"
    if not usable:
        raise ValueError(
            f"no novel class of {_named(novel, class_names)} has {need}; lower "
            "`shots` or the area threshold of the class index, or use a larger val list."
        )
    skipped = sorted(set(novel) - set(usable))
    if skipped:
        logger.warning(f"novel classes {_named(skipped, class_names)} do not have {need} and get no episode")
    pair_class = np.concatenate([np.full(len(cand[c]), c) for c in usable])
    pair_pos = np.concatenate([np.arange(len(cand[c])) for c in usable])
    base_cand = {int(b): sorted(pool.intersection(map(str, class_index.get(b, ())))) for b in base_ids}
    base_usable = [b for b in sorted(base_cand) if base_cand[b]]

    episodes = []
    for i in range(int(num_episodes)):
        rng = np.random.default_rng([int(seed), i])
        if class_sampling == "pair":
            k = int(rng.integers(len(pair_class)))
            c, qpos = int(pair_class[k]), int(pair_pos[k])
        else:
            c = usable[int(rng.integers(len(usable)))]
            qpos = int(rng.integers(len(cand[c])))
        images = cand[c]
        if support_index is None:
            picks = rng.choice(len(images) - 1, size=shots, replace=False)
            picks = picks + (picks >= qpos)  # skip the query's position
            supports = [images[int(p)] for p in picks]
        else:
            picks = rng.choice(len(support_cand[c]), size=shots, replace=False)
            supports = [support_cand[c][int(p)] for p in picks]
        base_query_id = base_class_id = None
        if base_usable:
            base_class_id = base_usable[int(rng.integers(len(base_usable)))]
            options = [x for x in base_cand[base_class_id] if x != images[qpos]] or base_cand[base_class_id]
            base_query_id = options[int(rng.integers(len(options)))]
        episodes.append(
            EpisodeSpec(
                dataset,
                fold,
                "paper",
                i,
                seed,
                images[qpos],
                {c: supports},
                [c],
                base_query_id,
                base_class_id,
                support_split=None if support_index is None else "train",
            )
        )
    return episodes


def _named(class_ids: Iterable[int], class_names: Mapping[int, str] | None) -> str:
    """'3 (cat), 7 (dog)': class ids with their names, for messages a user reads."""
    names = class_names or {}
    return ", ".join(f"{c} ({names[c]})" if c in names else str(c) for c in class_ids)


def _sample_run_supports(
    pixel_counts: Mapping[str, Mapping[int, int]],
    novel: list[int],
    shots: int,
    rng: np.random.Generator,
    min_support_pixels: int,
    exclusive: bool,
    source: str,
    class_names: Mapping[int, str] | None = None,
) -> dict[int, list[str]]:
    novel_set = set(novel)
    used: set[str] = set()
    supports: dict[int, list[str]] = {}
    ids = sorted(pixel_counts)
    for c in novel:
        options = []
        for image_id in ids:
            counts = pixel_counts[image_id]
            if counts.get(c, 0) < min_support_pixels or image_id in used:
                continue
            if exclusive and any(o != c and counts.get(o, 0) > 0 for o in novel_set):
                continue
            options.append(image_id)
        if len(options) < shots:
            rule = " and no other novel class" if exclusive else ""
            raise ValueError(
                f"novel class {_named([c], class_names)} has {len(options)} {source} images with >= "
                f"{min_support_pixels} px{rule}, fewer "
                f"than shots={shots}; lower `min_support_pixels`, `shots`, or give more images."
            )
        picks = rng.choice(len(options), size=shots, replace=False)
        supports[c] = [options[int(p)] for p in picks]
        used.update(supports[c])
    return supports


def sample_diam_run(
    pixel_counts: Mapping[str, Mapping[int, int]],
    query_ids: Sequence[str],
    novel_ids: Sequence[int],
    shots: int,
    seed: int,
    *,
    run: int = 0,
    min_support_pixels: int = 16384,
    exclusive: bool = True,
    dataset: str = "",
    fold: int = 0,
    class_names: Mapping[int, str] | None = None,
) -> list[EpisodeSpec]:
    """Sample one run of the `diam` protocol: one support set from the val list, all other val images as queries.

    Args:
        pixel_counts (`Mapping[str, Mapping[int, int]]`): image id -> {class id: pixel count} of the val images
            (`compute_pixel_counts`); supports are drawn from the ids of `query_ids` found here.
        query_ids (`Sequence[str]`): all val image ids, in evaluation order.
        novel_ids (`Sequence[int]`): novel dataset ids of the fold.
        shots (`int`): K support images per novel class.
        seed (`int`): the run draws from `np.random.default_rng([seed, run])`.
        run (`int`, *optional*, defaults to 0): run index (DIaM averages 5 runs).
        min_support_pixels (`int`, *optional*, defaults to 16384): minimum novel area of a support image (at the
            original resolution); scale it for small images with `scaled_pixel_threshold`.
        exclusive (`bool`, *optional*, defaults to `True`): a support image of class c holds no other novel class
            (one novel class per support image); support images are always distinct across classes.
        dataset (`str`, *optional*): stored in the specs.
        fold (`int`, *optional*): stored in the specs.
        class_names (`Mapping[int, str]`, *optional*): names of the class ids, for errors.

    Returns:
        `list[EpisodeSpec]`: one spec per remaining val image, all with the same `support_ids` and
        `class_ids = sorted(novel_ids)`.
    """
    novel = sorted(_check_common(novel_ids, shots))
    queries = [str(q) for q in query_ids]
    qset = set(queries)
    val_counts = {i: v for i, v in pixel_counts.items() if str(i) in qset}
    rng = np.random.default_rng([int(seed), int(run)])
    supports = _sample_run_supports(val_counts, novel, shots, rng, min_support_pixels, exclusive, "val", class_names)
    taken = {i for ids in supports.values() for i in ids}
    return [
        EpisodeSpec(dataset, fold, "diam", j, seed, q, supports, novel, run=run)
        for j, q in enumerate(q for q in queries if q not in taken)
    ]


def sample_capl_run(
    train_pixel_counts: Mapping[str, Mapping[int, int]],
    query_ids: Sequence[str],
    novel_ids: Sequence[int],
    shots: int,
    seed: int,
    *,
    run: int = 0,
    min_support_pixels: int = 2048,
    exclusive: bool = False,
    dataset: str = "",
    fold: int = 0,
    class_names: Mapping[int, str] | None = None,
) -> list[EpisodeSpec]:
    """Sample one run of the `capl` protocol: one support set from the TRAIN list, every val image as a query.

    Args:
        train_pixel_counts (`Mapping[str, Mapping[int, int]]`): image id -> {class id: pixel count} of the train
            list images (`compute_pixel_counts`).
        query_ids (`Sequence[str]`): all val image ids, in evaluation order (a val id that is also a support is
            dropped from the queries).
        novel_ids (`Sequence[int]`): novel dataset ids of the fold.
        shots (`int`): K support images per novel class.
        seed (`int`): the run draws from `np.random.default_rng([seed, run])`.
        run (`int`, *optional*, defaults to 0): run index (one per support seed).
        min_support_pixels (`int`, *optional*, defaults to 2048): minimum novel area of a support image.
        exclusive (`bool`, *optional*, defaults to `False`): require support images to hold no other novel class.
        dataset (`str`, *optional*): stored in the specs.
        fold (`int`, *optional*): stored in the specs.
        class_names (`Mapping[int, str]`, *optional*): names of the class ids, for errors.

    Returns:
        `list[EpisodeSpec]`: one spec per val image, all with the same `support_ids`.
    """
    novel = sorted(_check_common(novel_ids, shots))
    rng = np.random.default_rng([int(seed), int(run)])
    supports = _sample_run_supports(
        train_pixel_counts, novel, shots, rng, min_support_pixels, exclusive, "train", class_names
    )
    taken = {i for ids in supports.values() for i in ids}
    return [
        EpisodeSpec(dataset, fold, "capl", j, seed, q, supports, novel, run=run)
        for j, q in enumerate(str(q) for q in query_ids if str(q) not in taken)
    ]


# ------------------------------------------------------------------------------------------------ protocols
# The literature's thresholds (`paper`, `capl`: 2,048 px at 473 x 473; `diam`: 16,384 px at 417 x 417), used as
# published on PASCAL and COCO, and otherwise as a share of the canvas they were set
# for: datasets of other image sizes use the same share of their own (median) image area, so that a class counts as
# "present" for the same reason.
PUBLISHED_MIN_PIXELS = {"paper": 2048, "capl": 2048, "diam": 16384}
# The benchmarks whose papers publish those thresholds; CamVid has a fold table but no published threshold, so it
# scales the published share of the canvas to its images like any other dataset.
_PUBLISHED_DATASETS = ("pascal5i", "pascal10i", "coco20i")
AREA_SHARES = {"paper": 2048 / 473**2, "capl": 2048 / 473**2, "diam": 16384 / 417**2}
# The procedural dataset at its default size (scaled to other sizes): `paper` / `capl` use its base-training
# threshold; `diam` 300 px, because its objects cover 2-10 % of an image and DIaM's 9.4 % would leave one or two
# support candidates for some novel classes.
_SYNTHETIC_MIN_PIXELS = {"paper": SYNTHETIC_MIN_PIXELS, "capl": SYNTHETIC_MIN_PIXELS, "diam": 300}


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not known; use one of {list(PROTOCOLS)}.")


def default_min_pixels(
    protocol: str, dataset: str, image_size: int | None = None, image_area: float | None = None
) -> int:
    """
    Area threshold of a protocol's class index (`paper`: query/support/base images; `diam`, `capl`: supports).

    PASCAL / COCO (the benchmarks with a built-in fold table): 2,048 px (`paper`, `capl`), 16,384 px (`diam`, at
    417 px), as published ([`PUBLISHED_MIN_PIXELS`]). The procedural dataset (96 px by default, thresholds scaled to
    `image_size`): `paper` / `capl` use its 64 px base-training threshold; `diam` uses 300 px, because its objects
    cover 2-10 % of an image and DIaM's 9.4 % (16,384 / 417^2) would leave one or two support candidates for some
    novel classes. Any other dataset (a folder dataset, CamVid, ...): the published thresholds' share of the canvas
    ([`AREA_SHARES`]: 0.92 % for `paper` / `capl`, 9.4 % for `diam`) of `image_area`, the median image area of the
    list (e.g. 1,582 px for 480 x 360 street scenes, `paper`).

    Args:
        protocol (`str`): one of [`PROTOCOLS`].
        dataset (`str`): the dataset name (`FoldSplit.dataset`).
        image_size (`int`, *optional*): the procedural dataset's image side (default 96).
        image_area (`float`, *optional*): the median image area of the list, for datasets without a published
            threshold.

    Example:

    ```python
    >>> default_min_pixels("diam", "pascal5i"), default_min_pixels("paper", "synthetic", image_size=192)
    (16384, 256)
    ```
    """
    _check_protocol(protocol)
    if dataset == "synthetic":
        size = int(image_size or SYNTHETIC_IMAGE_SIZE)
        return scaled_pixel_threshold(_SYNTHETIC_MIN_PIXELS[protocol], SYNTHETIC_IMAGE_SIZE, size)
    if dataset in _PUBLISHED_DATASETS:
        return PUBLISHED_MIN_PIXELS[protocol]
    if image_area is None or not image_area > 0:
        raise ValueError(
            f"dataset={dataset!r} has no published area threshold: pass image_area (the median image area of the "
            "list, in pixels) to scale the protocol's share of the image, or give min_pixels."
        )
    return max(1, round(AREA_SHARES[protocol] * float(image_area)))


def build_episodes(
    protocol: str,
    split: FoldSplit,
    val_source,
    *,
    shots: int = 1,
    num_episodes: int = 20000,
    seed: int = 42,
    runs: int = 5,
    train_source=None,
    min_pixels: int | None = None,
    class_sampling: str = "pair",
    support_split: str | None = None,
    exclusive: bool | None = None,
) -> list[EpisodeSpec]:
    """
    Sample the episodes of a protocol with the seeded samplers above.

    Args:
        protocol (`str`): `"paper"`, `"diam"` or `"capl"`.
        split ([`FoldSplit`]): the fold (base / novel dataset ids).
        val_source: image source of the val list (`ids`, `pixel_counts()`; see `gfss_hf.data.sources`).
        shots (`int`, *optional*, defaults to 1): K.
        num_episodes (`int`, *optional*, defaults to 20000): `paper` only.
        seed (`int`, *optional*, defaults to 42): sampler seed.
        runs (`int`, *optional*, defaults to 5): `diam` / `capl`: support sets (runs) `0..runs-1`.
        train_source: image source of the train list (`capl` supports).
        min_pixels (`int`, *optional*): area threshold (default: [`default_min_pixels`] for `split.dataset`).
        class_sampling (`str`, *optional*, defaults to `"pair"`): `paper` only, see `sample_paper_episodes`.
        support_split (`str`, *optional*): `paper` only: `"train"` draws the supports from `train_source` (same
            area threshold), the queries still from the val list; `None` / `"val"`: the published protocol.
        exclusive (`bool`, *optional*): `diam` / `capl`: whether a support image of a class may hold no other novel
            class; `None` keeps each protocol's published rule (`diam`: exclusive, `capl`: not). `False` for datasets
            where no image qualifies (CamVid: every val image holds several novel classes of a fold).

    Returns:
        `list[EpisodeSpec]`: for `diam` / `capl`, one spec per (run, query), runs in order.

    Example:

    ```python
    >>> val = load_image_source("synthetic", "val")  # from gfss_hf.data.sources  # doctest: +SKIP
    >>> episodes = build_episodes("paper", get_split("synthetic", 0), val, num_episodes=100)  # doctest: +SKIP
    ```
    """
    _check_protocol(protocol)
    if min_pixels is None:
        source = train_source if protocol == "capl" and train_source is not None else val_source
        area = None
        if split.dataset not in _PUBLISHED_DATASETS and split.dataset != "synthetic":
            if not hasattr(source, "median_image_area"):
                raise ValueError(
                    f"dataset {split.dataset!r} needs min_pixels, or an image source with median_image_area() to "
                    "scale the protocol's area threshold to its images."
                )
            area = source.median_image_area()
        min_pixels = default_min_pixels(protocol, split.dataset, getattr(val_source, "image_size", None), area)
        if area is not None:
            logger.warning(
                f"{protocol} protocol on {split.dataset!r}: area threshold {min_pixels} px = "
                f"{100 * AREA_SHARES[protocol]:.2f} % of the median image area ({area:.0f} px); set min_pixels to "
                "override."
            )
    names = {**dict(zip(split.base_ids, split.base_names)), **dict(zip(split.novel_ids, split.novel_names))}
    common = {"dataset": split.dataset, "fold": split.fold, "class_names": names}
    if support_split not in (None, "val", "train"):
        raise ValueError(f"support_split={support_split!r} is not a list; use 'val', 'train' or None.")
    if support_split == "train" and protocol != "paper":
        raise ValueError(
            f"support_split='train' is an option of the paper protocol; {protocol!r} fixes its support list "
            "(diam: val, capl: train)."
        )
    if protocol == "paper":
        index = class_index_from_pixel_counts(val_source.pixel_counts(), min_pixels)
        support_index = None
        if support_split == "train":
            if train_source is None:
                raise ValueError("support_split='train' draws the supports from the train list: pass train_source.")
            support_index = class_index_from_pixel_counts(train_source.pixel_counts(), min_pixels)
        return sample_paper_episodes(
            index,
            val_source.ids,
            split.novel_ids,
            split.base_ids,
            shots,
            num_episodes,
            seed,
            class_sampling=class_sampling,
            support_index=support_index,
            **common,
        )
    if runs < 1:
        raise ValueError(f"runs={runs} must be >= 1 (DIaM uses 5 support sets).")
    episodes: list[EpisodeSpec] = []
    for run in range(runs):
        if protocol == "diam":
            episodes += sample_diam_run(
                val_source.pixel_counts(),
                val_source.ids,
                split.novel_ids,
                shots,
                seed,
                run=run,
                min_support_pixels=min_pixels,
                **({} if exclusive is None else {"exclusive": exclusive}),
                **common,
            )
        else:
            if train_source is None:
                raise ValueError("the 'capl' protocol draws supports from the train list: pass train_source.")
            episodes += sample_capl_run(
                train_source.pixel_counts(),
                val_source.ids,
                split.novel_ids,
                shots,
                seed,
                run=run,
                min_support_pixels=min_pixels,
                **({} if exclusive is None else {"exclusive": exclusive}),
                **common,
            )
    return episodes


def episodes_hash(episodes: Sequence[EpisodeSpec]) -> str:
    """SHA-256 of the episode list (its JSON form): two evaluations with the same hash saw the same episodes."""
    payload = json.dumps([e.to_dict() for e in episodes], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ serialisation
def save_episodes(path: str | os.PathLike, episodes: Iterable[EpisodeSpec]) -> None:
    """Write episodes as JSON, atomically (temporary file + `os.replace`).

    Args:
        path (`str` or `os.PathLike`): output file.
        episodes (`Iterable[EpisodeSpec]`): the episodes.
    """
    payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "episodes": [e.to_dict() for e in episodes]}
    atomic_write_bytes(path, json.dumps(payload).encode("utf-8"))


def load_episodes(path: str | os.PathLike) -> list[EpisodeSpec]:
    """Read episodes written by `save_episodes` (a bare JSON list of episode dicts is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"episode file {str(path)!r} does not exist; write it with `save_episodes`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"episode file {str(path)!r} is not valid JSON ({err}); it is probably truncated or was edited by hand. "
            "Write it again with `save_episodes` (scripts/evaluate.py --save_episodes)."
        ) from err
    if isinstance(data, dict):
        if data.get("format") != _FORMAT or "episodes" not in data:
            raise ValueError(
                f"{str(path)!r} is not an episode file (format {data.get('format')!r}, expected {_FORMAT!r} with an "
                "'episodes' list)."
            )
        data = data["episodes"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"episode file {str(path)!r} holds no list of episodes; write it with `save_episodes`.")
    required = {"dataset", "fold", "protocol", "index", "seed", "query_id", "support_ids", "class_ids"}
    episodes = []
    for k, item in enumerate(data):
        missing = sorted(required - set(item)) if isinstance(item, dict) else sorted(required)
        if missing:
            raise ValueError(
                f"episode {k} of {str(path)!r} lacks {missing}; every episode needs {sorted(required)}. The file "
                "is incomplete: write it again with `save_episodes`."
            )
        try:
            episodes.append(EpisodeSpec.from_dict(item))
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"episode {k} of {str(path)!r} is malformed: {err}") from err
    return episodes


def _episode_features():
    import datasets

    return datasets.Features(
        {
            "dataset": datasets.Value("string"),
            "fold": datasets.Value("int32"),
            "protocol": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "run": datasets.Value("int32"),
            "query_id": datasets.Value("string"),
            "support_class_ids": datasets.List(datasets.Value("int32")),
            "support_image_ids": datasets.List(datasets.List(datasets.Value("string"))),
            "class_ids": datasets.List(datasets.Value("int32")),
            "base_query_id": datasets.Value("string"),
            "base_class_id": datasets.Value("int32"),
        }
    )


def episodes_to_dataset(episodes: Sequence[EpisodeSpec]):
    """Episodes as a `datasets.Dataset` (support sets as parallel `support_class_ids` / `support_image_ids`)."""
    import datasets

    rows: dict[str, list] = {name: [] for name in _episode_features()}
    if any(e.support_split is not None for e in episodes):
        # The Hub format has no column for it; dropping it would silently read train supports from the val list.
        raise ValueError(
            "episodes with support_split set (supports from another list) cannot be stored as a datasets.Dataset; "
            "store them with save_episodes (JSON)."
        )
    for e in episodes:
        d = e.to_dict()
        for name in rows:  # the scalar columns; the support sets are stored as two parallel lists below
            if name in d:
                rows[name].append(d[name])
        classes = sorted(e.support_ids)
        rows["support_class_ids"].append(classes)
        rows["support_image_ids"].append([e.support_ids[c] for c in classes])
    return datasets.Dataset.from_dict(rows, features=_episode_features())


def episodes_from_dataset(dataset) -> list[EpisodeSpec]:
    """Inverse of `episodes_to_dataset`."""
    out = []
    for row in dataset:
        row = dict(row)
        classes = row.pop("support_class_ids")
        images = row.pop("support_image_ids")
        row["support_ids"] = dict(zip(classes, images))
        out.append(EpisodeSpec(**row))
    return out
