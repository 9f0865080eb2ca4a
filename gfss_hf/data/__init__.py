"""Datasets, fold splits and episodes of gfss_hf.

- `splits`: fold tables (PASCAL-5i, PASCAL-10i, COCO-20i, synthetic, CamVid) and label remapping (`FoldSplit`).
- `synthetic`: the embedded procedural dataset (the default everywhere; no download).
- `pascal`, `coco`, `camvid`, `folder`: `datasets` builders over local PASCAL VOC, COCO, CamVid and user folders.
- `episodes`: `EpisodeSpec`, per-class indexes, the seeded samplers of the `paper`, `diam` and `capl` protocols and
  `build_episodes`.
- `sources`: the dataset registry (name -> fold table, layout check, builder views, evaluation image source).
- `convert`: COCO JSON, YOLO polygons and index masks (CamVid, Cityscapes) -> the `folder` layout
  (`scripts/convert_dataset.py`, docs/README_own_data.md).
"""

from ._builder import GFSSBuilderConfig
from .camvid import CamVid, CamVidConfig, camvid_class_statistics, camvid_pixel_counts
from .coco import Coco20i, Coco20iConfig, CocoSemanticMasks, coco_class_index, coco_pixel_counts
from .episodes import (
    PROTOCOLS,
    EpisodeSpec,
    build_class_index,
    build_episodes,
    class_index_from_pixel_counts,
    compute_pixel_counts,
    episodes_from_dataset,
    episodes_hash,
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
from .sources import DATASET_NAMES, DatasetImageSource, check_data_dir, load_fold_split, load_image_source
from .splits import (
    CAMVID_CLASSES,
    CAMVID_FOLDS,
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
    "CAMVID_CLASSES",
    "CAMVID_FOLDS",
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
    "build_episodes",
    "class_index_from_pixel_counts",
    "compute_pixel_counts",
    "episodes_hash",
    "episodes_from_dataset",
    "episodes_to_dataset",
    "load_episodes",
    "sample_capl_run",
    "sample_diam_run",
    "sample_paper_episodes",
    "save_episodes",
    "scaled_pixel_threshold",
    # registry
    "DATASET_NAMES",
    "DatasetImageSource",
    "check_data_dir",
    "load_fold_split",
    "load_image_source",
    # builders
    "GFSSBuilderConfig",
    "CamVid",
    "CamVidConfig",
    "camvid_class_statistics",
    "camvid_pixel_counts",
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
