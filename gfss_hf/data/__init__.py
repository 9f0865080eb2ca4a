"""Datasets, fold splits and episodes of gfss_hf.

- `splits`: fold tables (PASCAL-5i, PASCAL-10i, COCO-20i, synthetic) and label remapping (`FoldSplit`).
- `synthetic`: the embedded procedural dataset (the default everywhere; no download).
- `pascal`, `coco`, `folder`: `datasets` builders over local PASCAL VOC, COCO and user folders.
- `episodes`: `EpisodeSpec`, per-class indexes and the seeded samplers of the `paper`, `diam` and `capl` protocols.
- `convert`: COCO JSON, YOLO polygons and index masks (CamVid, Cityscapes) -> the `folder` layout
  (`scripts/convert_dataset.py`, docs/README_own_data.md).
"""

from ._builder import GFSSBuilderConfig
from .coco import Coco20i, Coco20iConfig, CocoSemanticMasks, coco_class_index, coco_pixel_counts
from .episodes import (
    PROTOCOLS,
    EpisodeSpec,
    build_class_index,
    class_index_from_pixel_counts,
    compute_pixel_counts,
    episodes_from_dataset,
    episodes_to_dataset,
    load_episodes,
    sample_capl_run,
    sample_diam_run,
    sample_paper_episodes,
    save_episodes,
    scaled_pixel_threshold,
)
from .folder import FolderSegmentation, FolderSegmentationConfig, folder_class_index, folder_pixel_counts, folder_split
from .pascal import Pascal5i, Pascal5iConfig, pascal_class_index, pascal_pixel_counts, standard_list_path
from .splits import (
    COCO_CLASSES,
    IGNORE_INDEX,
    SPLIT_DATASETS,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    FoldSplit,
    get_split,
)
from .synthetic import (
    DIAM_MIN_SUPPORT_PIXELS,
    SyntheticGFSS,
    SyntheticGFSSConfig,
    SyntheticSegmentation,
    render_sample,
)

__all__ = [
    # splits
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "SPLIT_DATASETS",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "FoldSplit",
    "get_split",
    # episodes
    "PROTOCOLS",
    "EpisodeSpec",
    "build_class_index",
    "class_index_from_pixel_counts",
    "compute_pixel_counts",
    "episodes_from_dataset",
    "episodes_to_dataset",
    "load_episodes",
    "sample_capl_run",
    "sample_diam_run",
    "sample_paper_episodes",
    "save_episodes",
    "scaled_pixel_threshold",
    # builders
    "GFSSBuilderConfig",
    "Coco20i",
    "Coco20iConfig",
    "CocoSemanticMasks",
    "coco_class_index",
    "coco_pixel_counts",
    "FolderSegmentation",
    "FolderSegmentationConfig",
    "folder_class_index",
    "folder_pixel_counts",
    "folder_split",
    "Pascal5i",
    "Pascal5iConfig",
    "pascal_class_index",
    "pascal_pixel_counts",
    "standard_list_path",
    # synthetic
    "DIAM_MIN_SUPPORT_PIXELS",
    "SyntheticGFSS",
    "SyntheticGFSSConfig",
    "SyntheticSegmentation",
    "render_sample",
]
