"""Model cards of GFSS checkpoints: Hub YAML metadata, `model-index` results read from an evaluation's
`results.json`, and the prose sections (model, intended use, how to use, training recipe, evaluation, limitations,
citation).

The card of every published configuration is generated from code, so that all cards stay consistent:

```bash
python -m gfss_hf.cards --planned model_cards/                         # the planned PASCAL-5i / COCO-20i cards
python -m gfss_hf.cards --model_dir OUT --results OUT/results.json \\
    --repo_id gfss-hf/gfss-pascal5i-fold0 --output OUT/README.md       # the card of a trained checkpoint
```

## `results.json` schema (version 1)

`scripts/evaluate.py` writes one `results.json` per evaluation (one protocol, one number of shots): the settings
under `config` (`dataset`, `fold`, `shots`, `protocol`, `seed`, `options.adaptation`), the numbers under `metrics`
(keys of `gfss_hf.evaluation.metric_keys`), plus `num_episodes`, `episodes_hash`, per-class and per-run details.
Cards take one or several such files. A hand-written file may also list entries directly:

```json
{
  "results": [
    {
      "protocol": "paper",          // "paper" | "diam" | "capl" (see METHOD.md section 5)
      "dataset": "pascal5i",        // "pascal5i" | "pascal10i" | "coco20i" | "synthetic"
      "fold": 0,
      "shots": 1,
      "split": "val",               // optional, defaults to "val"
      "metrics": {"fss_novel_miou": 0.559, "gfss_novel_miou": 0.577, "gfss_base_miou": 0.696},
      "num_episodes": 20000,        // optional details: extra scalar keys are kept as model-index dataset args
      "seed": 42
    }
  ]
}
```

A bare list of entries, or a single entry, is accepted too; an entry's missing keys are looked up in its `config`
object, then in the model's config (`dataset`, `fold`). Metric values are fractions in `[0, 1]` (what
`gfss_hf.metrics` returns); the card reports them in percent, rounded to 2 decimals (`"metrics_unit": "percent"` at
the top level or in an entry says they already are percent). Metric keys are mapped to canonical names (`METRICS`,
`METRIC_ALIASES`: `fss_novel_miou` -> `novel_miou_2way`, `gfss_base_miou` / `base_miou` -> `base_miou`, ...);
`*_episode_miou` (means of per-episode IoUs) stay out of the card, `<key>_std` is shown as "value ± std", unknown
numeric metrics are kept under their own name, `null` / non-numeric values are skipped with a warning. Each entry
becomes one `model-index` result whose dataset config is `fold{fold}-{shots}shot-{protocol}` (the Hub groups
results by dataset config, so entries stay separate) and whose metric `type` is the canonical key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from ._io import apply_umask
from .configuration_gfss import GFSSConfig

__all__ = [
    "CITATION",
    "DATASETS",
    "DEFAULT_NAMESPACE",
    "METRICS",
    "METRIC_ALIASES",
    "MODEL_CARD_TEMPLATE",
    "PLANNED_CHECKPOINTS",
    "PROTOCOLS",
    "ResultEntry",
    "eval_results_to_entries",
    "load_results",
    "load_training_config",
    "main",
    "planned_model_card",
    "render_model_card",
    "results_to_eval_results",
    "save_model_card",
    "write_planned_cards",
]

logger = logging.get_logger(__name__)

DEFAULT_NAMESPACE = "gfss-hf"
TASK_TYPE = "image-segmentation"
TASK_NAME = "Generalized Few-Shot Semantic Segmentation"
# "transformers": the exported folder is a transformers repository (config.json with `auto_map`, the model code,
# safetensors weights) that loads with `AutoModel` / `pipeline(..., trust_remote_code=True)` and no other package.
# The Hub then shows the transformers snippet and counts downloads through config.json; "gfss_hf" is not a library
# the Hub knows, so it would get neither.
LIBRARY_NAME = "transformers"
LICENSE = "apache-2.0"

# Canonical metric key -> display name. Order = column order of the results table.
METRICS: dict[str, str] = {
    "novel_miou_2way": "Novel mIoU (2-way)",
    "novel_miou_gfss": "Novel mIoU (GFSS)",
    "base_miou": "Base mIoU",
    "mean_miou": "Mean mIoU",
    "harmonic_miou": "Harmonic mIoU",
    "total_miou": "Total mIoU",
    "fb_iou_2way": "FB-IoU (2-way)",
    "fb_iou_gfss": "FB-IoU (GFSS)",
}

# Other spellings -> canonical key: the keys of `gfss_hf.evaluation.metric_keys` (`paper`: `fss_*` / `gfss_*`;
# `diam` / `capl`: `base_miou`, `novel_miou`, ...) and those of `gfss_hf.metrics.gfss_summary`.
METRIC_ALIASES: dict[str, str] = {
    "fss_novel_miou": "novel_miou_2way",
    "fss_fb_iou": "fb_iou_2way",
    "gfss_novel_miou": "novel_miou_gfss",
    "gfss_base_miou": "base_miou",
    "gfss_mean_miou": "mean_miou",
    "gfss_harmonic_miou": "harmonic_miou",
    "gfss_fb_iou": "fb_iou_gfss",
    "novel_miou": "novel_miou_gfss",
    "fb_iou": "fb_iou_2way",
    "novel": "novel_miou_gfss",
    "base": "base_miou",
    "mean": "mean_miou",
    "harmonic": "harmonic_miou",
    "total": "total_miou",
}
# Not headline numbers: the mean of per-episode IoUs (reported by the evaluation for comparison only) stays in
# results.json but out of the card; `<key>_std` (spread over runs) is shown as "value ± std" in the table.
_SKIPPED_SUFFIXES = ("_episode_miou",)
_STD_SUFFIX = "_std"

PROTOCOLS: dict[str, str] = {
    "paper": (
        "the protocol of the paper (RePRI-style): 20,000 episodes with seed 42, one novel class per episode, query "
        "and K supports from the val list, binary support masks, IoU pooled over episodes on the 473x473 resized "
        "labels. Base mIoU: per episode an extra val image of a random base class b; a pixel is b iff b has the largest "
        "of the B+2 logits; binary IoU of b pooled over the episodes of b only (other base classes predicted there "
        "are never false positives of their own class)."
    ),
    "diam": (
        "the DIaM protocol: one support set per run (K val images per novel class), every val image a query "
        "predicted over all B+1+N classes at 417x417; base mIoU excludes background; mean = (base + novel) / 2; "
        "5 runs."
    ),
    "capl": (
        "the CAPL protocol: supports from the train list, every val image evaluated at its original resolution, "
        "base mIoU includes background, total = mean over all classes; several support seeds."
    ),
}

# Per dataset: display name, the `datasets` entries of the card (descriptive identifiers: the benchmarks are not
# hosted on the Hub under an official id), the pre-training epochs of the recipe, the evaluation image list and the
# number of folds.
DATASETS: dict[str, dict[str, Any]] = {
    "pascal5i": {
        "pretty": "PASCAL-5i",
        "card_datasets": ["pascal-voc-2012", "sbd"],
        "epochs": 100,
        "folds": 4,
        "config_file": "scripts/configs/pascal5i.yaml",
        "data_dir": "/data/VOCdevkit/VOC2012",
        "source": "PASCAL VOC 2012 with the SBD augmented annotations (train 5,953 / val 1,449 images)",
    },
    "pascal10i": {
        "pretty": "PASCAL-10i",
        "card_datasets": ["pascal-voc-2012", "sbd"],
        "epochs": 100,
        "folds": 2,
        "config_file": "scripts/configs/pascal10i.yaml",
        "data_dir": "/data/VOCdevkit/VOC2012",
        "source": "PASCAL VOC 2012 with the SBD augmented annotations",
    },
    "coco20i": {
        "pretty": "COCO-20i",
        "card_datasets": ["coco-2014"],
        "epochs": 20,
        "folds": 4,
        "config_file": "scripts/configs/coco20i.yaml",
        "data_dir": "/data/coco",
        "source": "MS COCO 2014 (semantic masks from non-crowd instances; val list of 40,137 images)",
    },
    "synthetic": {
        "pretty": "synthetic shapes (gfss_hf)",
        "card_datasets": ["gfss_hf-synthetic"],
        "epochs": None,
        "folds": 4,
        "config_file": "scripts/configs/synthetic.yaml",
        "source": "the procedural dataset embedded in gfss_hf (20 shape x texture classes, no download)",
    },
}

# The checkpoints this project plans to publish; `write_planned_cards` writes one card each.
PLANNED_CHECKPOINTS: tuple[tuple[str, int], ...] = tuple(
    (dataset, fold) for dataset in ("pascal5i", "coco20i") for fold in range(4)
)

CITATION = """@techreport{liu2022gfss,
  title       = {Towards Generalized Few-shot Segmentation: On Contrastive Learning and Background Information
                 Modeling},
  author      = {Liu, Haoming and Zhang, Chengyu and Lu, Xiaochen},
  institution = {New York University},
  type        = {Computer Science and Data Science Capstone Report},
  year        = {2022},
  note        = {Supervised by Li Guo. Code: https://github.com/hmdlju/GFSS-Capstone}
}"""

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{% if planned -%}
> **Status: planned, not trained yet.** This card describes a checkpoint that the recipe below produces. No
> evaluation numbers exist for it until it is trained and evaluated; the card is then regenerated from the
> evaluation's `results.json`.

{% endif -%}
{{ summary }}

## Model

| | |
|---|---|
{% for key, value in model_facts -%}
| {{ key }} | {{ value }} |
{% endfor %}
Classifier rows (`config.id2label`), in order: `{{ background_name }}` (0), the {{ num_base }} base classes
(1..{{ num_base }}){% if novel_names %}, then the {{ novel_names | length }} novel classes learned from supports{% endif %}.

- **Base classes** (seen in pre-training): {{ base_names | join(", ") }}
{% if novel_names -%}
- **Novel classes already in the classifier**: {{ novel_names | join(", ") }}
{% endif -%}
{% if held_out_names -%}
- **Held-out classes of this fold** (never seen in pre-training; learn them from a few examples):
  {{ held_out_names | join(", ") }}
{% endif %}
## Intended use

Segment every base class of the model in an image and, from K annotated examples (an image and a binary mask of
the new class), add new classes at inference time: generalized few-shot segmentation (GFSS, all classes at once) or
plain few-shot segmentation (FSS, the new class versus background). Intended for research on few-shot and
incremental segmentation and for prototyping with a handful of labelled images. Not intended for safety-critical
decisions (medical, surveillance, driving) or for identifying people.

## How to use

The repository holds its own code: it loads with `trust_remote_code=True` and needs only `transformers`, `torch`
and `timm`.

Few-shot segmentation with the pipeline (fine-tunes only the classifier on the supports, {{ default_steps }} SGD
steps; backbone and decoder stay frozen):

```python
from PIL import Image
from transformers import pipeline

segmenter = pipeline("few-shot-segmentation", model="{{ repo_id }}", trust_remote_code=True)
query = Image.open("query.jpg")
support = Image.open("support.jpg")
support_mask = Image.open("support_mask.png")  # white on black: white = the new class
segments = segmenter(
    query,
    support_images=[support],
    support_masks=[support_mask],
    class_names=["my new class"],
    mode="gfss",  # "gfss": base classes + the new class; "fss": the new class vs background
)
for segment in segments:
    print(segment["label"], segment["score"], segment["mask"].size)  # one PIL mask per class, query size
```

Base-class segmentation with the model and its image processor:

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{{ repo_id }}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{{ repo_id }}", trust_remote_code=True)
inputs = processor(Image.open("query.jpg"), return_tensors="pt")
with torch.no_grad():
    outputs = model(pixel_values=inputs["pixel_values"])
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=inputs["original_sizes"])[0]
print(sorted(model.config.id2label[int(i)] for i in label_map.unique()))
```

## Training recipe

{{ recipe_intro }}

| Setting | Value |
|---|---|
{% for key, value in recipe -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% if commands -%}
Commands that produce {% if planned %}this checkpoint{% else %}a checkpoint like this one{% endif %} and its
evaluation:

```bash
{{ commands | join("\\n") }}
```
{%- endif %}

## Evaluation

IoU is pooled over episodes (per class, intersections and unions are summed over all episodes before dividing), never
averaged per episode. The three protocols of the literature give numbers that cannot be compared with each other:

{% for name, text in protocols -%}
- `{{ name }}`: {{ text }}
{% endfor %}
{% if results_table -%}
Results (percent; also in the `model-index` metadata of this card):

{{ results_table }}

2-way: the novel class against background (FSS). GFSS: predicted among all classes. Mean and harmonic mIoU combine
base and novel mIoU; total mIoU averages all classes (`capl`); FB-IoU averages background and foreground IoU.
"value ± x": standard deviation over runs.
{% else -%}
No evaluation results yet{% if planned %}: this checkpoint has not been trained{% endif %}. Numbers appear here
(and in the `model-index` metadata) once `scripts/evaluate.py` has written a `results.json` for it.
{% endif %}
## Limitations

- Novel classes are learned from a few examples by fine-tuning a linear classifier on frozen features: classes
  that look unlike anything in the base training data, thin structures, and objects smaller than one feature cell
  (stride {{ output_stride }} at {{ image_size }}x{{ image_size }}) are segmented poorly.
- In GFSS mode the distillation term protects the base classes; with a large `gamma` it can also pull novel pixels
  back to a similar base class (the teacher never saw the novel class). Lower `gamma` when the new class
  resembles a base class.
- The support masks are binary: pixels outside the mask count as "not the new class", including base objects.
- Images are resized so that the longer side is {{ image_size }} px; predictions are upsampled back.
- Trained on {{ dataset_source }}; the data's licence terms and biases (object categories, photographic style)
  carry over to the model. ImageNet pre-training of the backbone has its own terms.

## Citation

```bibtex
{{ citation }}
```

This checkpoint was produced with `gfss_hf`, a reimplementation on the Hugging Face stack (PSPNet by Zhao et al.,
CVPR 2017, as the segmentation network).
"""


# ----------------------------------------------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultEntry:
    """
    One normalised entry of a `results.json`: a protocol on one fold at one number of shots.

    Args:
        protocol (`str`): `"paper"`, `"diam"` or `"capl"` (other names are kept as given).
        dataset (`str`): dataset key (`"pascal5i"`, `"coco20i"`, ...).
        fold (`int`): fold index.
        shots (`int`): supports per novel class (K).
        split (`str`, *optional*, defaults to `"val"`): evaluation split.
        metrics (`dict[str, float]`): canonical metric key -> value in percent.
        details (`dict[str, Any]`): extra scalar settings (episodes, seed, runs, ...), kept as dataset args.
        stds (`dict[str, float]`): standard deviation over runs (percent) of some metrics, shown in the table.
    """

    protocol: str
    dataset: str
    fold: int
    shots: int
    split: str = "val"
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)

    @property
    def dataset_config(self) -> str:
        """The `model-index` dataset config of this entry: `fold{fold}-{shots}shot-{protocol}`."""
        return f"fold{self.fold}-{self.shots}shot-{self.protocol}"


_ENTRY_KEYS = {"protocol", "dataset", "dataset_name", "fold", "shots", "shot", "k_shot", "split", "metrics", "config"}
# Settings of an evaluation's `config` object worth showing next to its numbers.
_CONFIG_KEYS = ("dataset", "fold", "shots", "protocol", "split_kind", "seed")
_ADAPTATION_KEYS = ("steps", "gamma", "lr")


def _from_config(raw: Mapping) -> dict:
    """The entry-level view of an evaluation's nested `config` (see the schema)."""
    config = raw.get("config")
    if not isinstance(config, Mapping):
        return {}
    out = {k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None}
    adaptation = (config.get("options") or {}).get("adaptation") if isinstance(config.get("options"), Mapping) else None
    if isinstance(adaptation, Mapping):
        out.update({k: adaptation[k] for k in _ADAPTATION_KEYS if isinstance(adaptation.get(k), (int, float))})
    return out


def _first(entry: Mapping, names: Sequence[str], where: str, required: bool = True):
    for name in names:
        if name in entry and entry[name] is not None:
            return entry[name]
    if required:
        raise ValueError(
            f"{where} has no {names[0]!r} (keys: {sorted(entry)}); every result entry needs protocol, dataset, "
            "fold, shots and metrics (see the schema in gfss_hf/cards.py)."
        )
    return None


def _as_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: {name}={value!r} is not an integer; write it as a number, e.g. 0.")
    try:
        number = float(value)
    except ValueError as err:
        raise ValueError(f"{where}: {name}={value!r} is not an integer; write it as a number, e.g. 0.") from err
    if not number.is_integer() or number < 0:
        raise ValueError(f"{where}: {name}={value!r} must be a non-negative integer.")
    return int(number)


def _canonical(key) -> str:
    key = str(key).strip().lower().replace(" ", "_").replace("-", "_")
    return METRIC_ALIASES.get(key, key)


def _normalise_metrics(metrics, percent: bool, where: str) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stds) in percent, canonical keys; stds are the `<key>_std` entries of metrics that exist."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}: 'metrics' must be an object of name -> number, got {type(metrics).__name__}.")
    values: dict[str, float] = {}
    stds: dict[str, float] = {}
    for raw_key, value in metrics.items():
        raw = str(raw_key).strip().lower()
        if raw.endswith(_SKIPPED_SUFFIXES):
            continue
        is_std = raw.endswith(_STD_SUFFIX)
        key = _canonical(raw[: -len(_STD_SUFFIX)] if is_std else raw)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            logger.warning(f"{where}: metric {raw_key!r}={value!r} is not a finite number; left out of the card.")
            continue
        value = float(value)
        if not percent and not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{where}: metric {raw_key!r}={value} is outside [0, 1]; results.json stores fractions. If the file "
                'holds percentages, add "metrics_unit": "percent".'
            )
        if percent and not 0.0 <= value <= 100.0:
            raise ValueError(f"{where}: metric {raw_key!r}={value} is outside [0, 100] although marked as percent.")
        target = stds if is_std else values
        if key in target:
            raise ValueError(f"{where}: metric {raw_key!r} duplicates {key!r} (an alias); keep one of them.")
        target[key] = round(value if percent else 100.0 * value, 2)
    return values, {k: v for k, v in stds.items() if k in values}


def _read_json(path) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file {path!r} does not exist; run scripts/evaluate.py first.")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON ({err}).") from err


def _raw_entries(results, source: str) -> list[tuple[Mapping, bool, str]]:
    """Flatten any accepted layout into (entry, metrics are percent, where) triples."""
    if isinstance(results, (str, os.PathLike)):
        return _raw_entries(_read_json(results), os.fspath(results))
    if isinstance(results, Mapping) and "results" in results:
        percent = str(results.get("metrics_unit", "fraction")).lower() == "percent"
        items = results["results"]
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise ValueError(f"{source}: 'results' must be a list of entries, got {type(items).__name__}.")
        return [(item, percent, f"{source} entry {i}") for i, item in enumerate(items)]
    if isinstance(results, Mapping):
        return [(results, False, source)]
    if isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        out = []
        for i, item in enumerate(results):
            if isinstance(item, (str, os.PathLike)) or (isinstance(item, Mapping) and "results" in item):
                out.extend(_raw_entries(item, source))
            else:
                out.append((item, False, f"{source} entry {i}"))
        return out
    raise ValueError(f"{source}: expected a path, an object or a list of result entries, got {type(results).__name__}.")


def load_results(
    results: str | os.PathLike | Mapping | Sequence | None, defaults: Mapping[str, Any] | None = None
) -> list[ResultEntry]:
    """
    Read and normalise evaluation results (the `results.json` schema of this module).

    Args:
        results (`str`, `os.PathLike`, `dict` or `list`, *optional*):
            A path to a `results.json` (of `scripts/evaluate.py` or hand-written), a list of such paths, or parsed
            content: `{"results": [...]}`, a list of entries, or one entry. `None` gives an empty list.
        defaults (`Mapping`, *optional*):
            Values for entries that omit `dataset` / `fold` (e.g. those of the model's config).

    Returns:
        `list[ResultEntry]`, in file order, metrics in percent.

    Example:

    ```python
    >>> entries = load_results({"protocol": "paper", "dataset": "pascal5i", "fold": 0, "shots": 1,
    ...                         "metrics": {"novel_miou_2way": 0.559, "base": 0.696}})
    >>> entries[0].metrics
    {'novel_miou_2way': 55.9, 'base_miou': 69.6}
    ```
    """
    if results is None:
        return []
    entries: list[ResultEntry] = []
    seen: dict[tuple, str] = {}
    for raw, top_percent, where in _raw_entries(results, "results"):
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} is a {type(raw).__name__}, not an object.")
        raw = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **_from_config(raw), **raw}
        percent = top_percent or str(raw.get("metrics_unit", "")).lower() == "percent"
        protocol = str(_first(raw, ("protocol",), where))
        dataset = str(_first(raw, ("dataset", "dataset_name"), where))
        fold = _as_int(_first(raw, ("fold",), where), "fold", where)
        shots = _as_int(_first(raw, ("shots", "k_shot", "shot"), where), "shots", where)
        split = str(raw.get("split") or "val")
        metrics, stds = _normalise_metrics(_first(raw, ("metrics",), where), percent, where)
        if not metrics:
            logger.warning(f"{where} has no numeric metric; it is left out of the card.")
            continue
        details = {
            k: v
            for k, v in raw.items()
            if k not in _ENTRY_KEYS and k != "metrics_unit" and isinstance(v, (str, int, float, bool))
        }
        entry = ResultEntry(protocol, dataset, fold, shots, split, metrics, details, stds)
        ident = (entry.dataset, entry.dataset_config, entry.split)
        if ident in seen:
            raise ValueError(
                f"{where} repeats dataset={dataset!r}, fold={fold}, shots={shots}, protocol={protocol!r} of "
                f"{seen[ident]}; keep one of the two evaluations."
            )
        seen[ident] = where
        entries.append(entry)
    return entries


def _dataset_pretty(dataset: str) -> str:
    return DATASETS.get(dataset, {}).get("pretty", dataset)


def results_to_eval_results(entries: Sequence[ResultEntry]) -> list[EvalResult]:
    """
    `huggingface_hub.EvalResult`s (the `model-index` of a card) of normalised result entries: one dataset config
    per entry (`fold{fold}-{shots}shot-{protocol}`), one metric per key, `type` = canonical key, values in percent.
    """
    out = []
    for entry in entries:
        args = {"fold": entry.fold, "shots": entry.shots, "protocol": entry.protocol, **entry.details}
        for key, value in entry.metrics.items():
            out.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=entry.dataset,
                    dataset_name=f"{_dataset_pretty(entry.dataset)} fold {entry.fold} ({entry.shots}-shot)",
                    dataset_config=entry.dataset_config,
                    dataset_split=entry.split,
                    dataset_args=args,
                    metric_type=key,
                    metric_name=METRICS.get(key, key),
                    metric_value=value,
                )
            )
    return out


def eval_results_to_entries(eval_results: Sequence[EvalResult] | None) -> list[ResultEntry]:
    """The inverse of [`results_to_eval_results`]: group `EvalResult`s (e.g. of `ModelCard.load(...).data`) back
    into result entries, to compare a card with the `results.json` it was made from."""
    groups: dict[tuple, dict] = {}
    for result in eval_results or []:
        args = dict(result.dataset_args or {})
        key = (result.dataset_type, result.dataset_config, result.dataset_split)
        if key not in groups:
            details = {k: v for k, v in args.items() if k not in ("fold", "shots", "protocol")}
            groups[key] = dict(
                protocol=str(args.get("protocol")),
                dataset=result.dataset_type,
                fold=int(args.get("fold", -1)),
                shots=int(args.get("shots", -1)),
                split=result.dataset_split or "val",
                metrics={},
                details=details,
            )
        groups[key]["metrics"][result.metric_type] = float(result.metric_value)
    return [ResultEntry(**g) for g in groups.values()]


def _cell(entry: ResultEntry, key: str) -> str:
    if key not in entry.metrics:
        return "-"
    std = entry.stds.get(key)
    return f"{entry.metrics[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _results_table(entries: Sequence[ResultEntry]) -> str:
    if not entries:
        return ""
    known = [k for k in METRICS if any(k in e.metrics for e in entries)]
    extra = sorted({k for e in entries for k in e.metrics if k not in METRICS})
    columns = known + extra
    header = ["Dataset", "Fold", "Shots", "Protocol", *[METRICS.get(k, k) for k in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * len(columns)]
    for e in entries:
        cells = [_dataset_pretty(e.dataset), str(e.fold), str(e.shots), f"`{e.protocol}`"]
        cells += [_cell(e, k) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# card rendering
# ----------------------------------------------------------------------------------------------------------------
def _default_recipe(dataset: str | None, contrastive: bool = True) -> list[tuple[str, str]]:
    epochs = DATASETS.get(dataset or "", {}).get("epochs")
    rows = [
        ("Pre-training data", "base classes only; novel pixels ignored (label 255)"),
        ("Loss", "label-smoothed cross-entropy (eps 0.1)" + (" + 0.1 x pixel contrastive InfoNCE (tau 0.1)"
                                                            if contrastive else "")),
        ("Optimiser", "SGD, momentum 0.9, weight decay 1e-4, lr 2.5e-3, cosine decay"),
        ("Batch / input", "12 images, 473x473, random horizontal flip"),
    ]
    if epochs:
        rows.append(("Epochs", str(epochs)))
    rows.append(("Adaptation (per episode)", "classifier only, SGD lr 0.1, 100 steps; GFSS: CE' + gamma x KD, "
                                             "gamma 10"))
    return rows


# Keys of `training_config.yaml` (written by `gfss_hf.training.pretrain`) that describe the recipe, in card order;
# paths, logging and infrastructure settings are left out.
_RECIPE_KEYS = (
    "dataset", "fold", "split_kind", "min_pixels", "novel_to_background", "backbone", "backbone_weights",
    "image_size", "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "optimizer",
    "learning_rate", "momentum",
    "weight_decay", "lr_schedule", "label_smoothing", "contrastive_weight", "temperature", "base_temperature",
    "max_samples", "max_views", "background_anchors", "hflip", "seed", "mixed_precision",
)  # fmt: skip


def load_training_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """
    The recipe settings of a training run, from its `training_config.yaml` (or the output folder holding it).

    Args:
        path (`str` or `os.PathLike`): the YAML file or the training output folder.

    Returns:
        `dict` of the recipe keys that are set (file paths reduced to their file name), or `None` when there is no
        such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "training_config.yaml"
    if not path.is_file():
        return None
    import yaml

    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{str(path)!r} does not hold a mapping of settings; is it a training_config.yaml?")
    out = {}
    for key in _RECIPE_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        out[key] = Path(value).name if key == "backbone_weights" else value
    return out


def _recipe_rows(training: Mapping | None) -> list[tuple[str, str]]:
    rows = []
    for key, value in (training or {}).items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        rows.append((str(key), str(value).replace("|", "\\|")))
    return rows


def _commands(dataset: str, fold: int, repo_id: str, output_dir: str | None = None) -> list[str]:
    info = DATASETS.get(dataset, {})
    config_file = info.get("config_file", f"scripts/configs/{dataset}.yaml")
    out = output_dir or f"outputs/{dataset}-fold{fold}"
    # The procedural dataset needs neither data nor ImageNet weights.
    data = f" --data_dir {info['data_dir']}" if info.get("data_dir") else ""
    weights = " --backbone_weights resnet50s.safetensors" if info.get("data_dir") else ""
    lines = [
        f"accelerate launch scripts/pretrain.py --config {config_file} --fold {fold} \\",
        f"   {data}{weights} --output_dir {out}",
    ]
    for shots in (1, 5):
        lines += [
            f"accelerate launch scripts/evaluate.py {out} --dataset {dataset} --fold {fold}{data} \\",
            f"    --protocol paper --shots {shots} --output_dir {out}/eval-paper-{shots}shot",
        ]
    lines += [
        f"python scripts/push_to_hub.py --model_dir {out} --repo_id {repo_id} \\",
        f"    --results {out}/eval-paper-1shot/results.json {out}/eval-paper-5shot/results.json",
    ]
    return lines


def _held_out(config: GFSSConfig) -> list[str]:
    if not config.dataset or config.fold is None:
        return []
    try:
        from .data.splits import get_split

        split = get_split(config.dataset, int(config.fold), config.split_kind)
    except Exception as err:  # an unknown or custom dataset: the card simply omits the list
        logger.info(f"no fold table for dataset={config.dataset!r} fold={config.fold!r} ({err}).")
        return []
    return [n for n in split.novel_names if n not in config.novel_class_names]


def _model_facts(config: GFSSConfig) -> list[tuple[str, str]]:
    facts = [
        ("Architecture", "PSPNet: timm backbone + pyramid pooling decoder + 1x1 classifier"),
        ("Backbone", f"`{config.backbone}`, output stride {config.output_stride}"),
        ("Pyramid bins", ", ".join(str(s) for s in config.pool_scales)),
        ("Feature channels", str(config.hidden_size)),
        ("Classes", f"{config.num_labels} (background + {config.num_base_classes} base"
                    + (f" + {config.num_novel_classes} novel)" if config.num_novel_classes else ")")),
        ("Input", f"{config.image_size}x{config.image_size} canvas, longer side resized, {config.pad_mode} padding"),
    ]
    if config.use_projection:
        facts.append(("Contrastive head", f"{config.projection_source} feature -> {config.projection_dim}-d"))
    if config.dataset:
        fold = f", fold {config.fold}" if config.fold is not None else ""
        facts.append(("Base-class data", f"{_dataset_pretty(config.dataset)}{fold}"))
    if config.source_checkpoint:
        facts.append(("Converted from", f"`{config.source_checkpoint}`"))
    return facts


def _default_steps() -> int:
    from .adaptation import AdaptationConfig

    return AdaptationConfig().steps


def render_model_card(
    config: GFSSConfig | str | os.PathLike,
    results: str | os.PathLike | Mapping | Sequence | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    training: Mapping | None = None,
    commands: Sequence[str] | None = None,
    planned: bool = False,
    license: str = LICENSE,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """
    Render the model card of a GFSS checkpoint.

    Args:
        config (`GFSSConfig`, `str` or `os.PathLike`):
            The model's configuration, or a `save_pretrained` folder to read it from.
        results (*optional*):
            Evaluation results: a path to `results.json` or its content (see [`load_results`]). They fill the
            results table and the `model-index` metadata. Without results the card says that no numbers exist.
        repo_id (`str`, *optional*):
            Hub id used in the code examples; defaults to `gfss-hf/gfss-{dataset}-fold{fold}`.
        model_name (`str`, *optional*):
            Name of the model in `model-index`; defaults to the last part of `repo_id`.
        training (`Mapping`, *optional*):
            Training settings to list (name -> value), e.g. [`load_training_config`]`(output_dir)`; read from the
            folder's `training_config.yaml` when `config` is a folder. Without it the card lists the paper's recipe.
        commands (`Sequence[str]`, *optional*):
            Shell lines that reproduce the checkpoint; defaults to the pretrain/evaluate/push commands for the
            config's dataset and fold (when known).
        planned (`bool`, *optional*, defaults to `False`):
            A card for a checkpoint that is not trained yet: it says so, and results are refused.
        license (`str`, *optional*, defaults to `"apache-2.0"`): Hub licence id of the weights.
        template_path (`str` or `os.PathLike`, *optional*): a Jinja template to use instead of
            `MODEL_CARD_TEMPLATE` (it receives the same variables).

    Returns:
        `huggingface_hub.ModelCard`.

    Example:

    ```python
    >>> from gfss_hf import GFSSConfig
    >>> from gfss_hf.cards import render_model_card
    >>> config = GFSSConfig(base_class_names=("cat", "dog"), dataset="synthetic", fold=0)
    >>> card = render_model_card(config, {"protocol": "paper", "dataset": "synthetic", "fold": 0, "shots": 1,
    ...                                   "metrics": {"novel_miou_2way": 0.5}}, repo_id="me/gfss-demo")
    >>> card.data.eval_results[0].metric_value
    50.0
    ```
    """
    if not isinstance(config, GFSSConfig):
        folder = os.fspath(config)
        config = GFSSConfig.from_pretrained(folder)
        if training is None:
            training = load_training_config(folder)
    entries = load_results(results, defaults={"dataset": config.dataset, "fold": config.fold})
    if planned and entries:
        raise ValueError("planned=True describes an untrained checkpoint and cannot carry results; drop `results`.")
    dataset = config.dataset
    fold = config.fold
    if repo_id is None:
        suffix = f"-{dataset}" if dataset else ""
        suffix += f"-fold{fold}" if fold is not None else ""
        repo_id = f"{DEFAULT_NAMESPACE}/gfss{suffix}"
    model_name = model_name or repo_id.split("/")[-1]
    for entry in entries:
        if dataset and entry.dataset != dataset:
            logger.warning(
                f"results for dataset {entry.dataset!r} on a model whose config says dataset={dataset!r}; check "
                "that results.json belongs to this checkpoint."
            )
        if fold is not None and entry.fold != fold:
            logger.warning(f"results for fold {entry.fold} on a model of fold {fold}; check results.json.")

    pretty = _dataset_pretty(dataset) if dataset else "custom data"
    tags = ["few-shot-segmentation", "generalized-few-shot-segmentation", "semantic-segmentation", "pspnet",
            "gfss_hf", "custom_code", "vision"]
    if dataset:
        tags.append(dataset)
    card_datasets = DATASETS.get(dataset or "", {}).get("card_datasets")
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=TASK_TYPE,
        license=license,
        tags=tags,
        datasets=card_datasets,
        metrics=["mean_iou"],
        # model_name only exists in the YAML as the name of the model-index.
        model_name=model_name if entries else None,
        eval_results=results_to_eval_results(entries) or None,
    )
    if commands is None and dataset in DATASETS and fold is not None:
        commands = _commands(dataset, int(fold), repo_id)
    if training:
        recipe_intro = (
            "Settings of the training configuration that produces this checkpoint (`batch_size` is per process):"
            if planned
            else "Settings recorded with this checkpoint (`training_config.yaml`; `batch_size` is per process):"
        )
        recipe = _recipe_rows(training)
    else:
        recipe_intro = (
            "Pre-training on the base classes as in the paper (the settings below are the recipe's defaults"
            + ("" if planned else "; the training run did not record its own") + "):"
        )
        recipe = _default_recipe(dataset, contrastive=config.use_projection)
    summary = (
        f"A PSPNet ({config.backbone}) pre-trained on the {config.num_base_classes} base classes of {pretty}"
        + (f" (fold {fold})" if fold is not None else "")
        + ", for generalized few-shot semantic segmentation: it segments its base classes and learns new classes "
        "from a few annotated examples at inference time, following \"Towards Generalized Few-shot Segmentation: On "
        "Contrastive Learning and Background Information Modeling\" (Liu, Zhang and Lu, 2022)."
    )
    variables = dict(
        title=model_name,
        planned=planned,
        summary=summary,
        model_facts=_model_facts(config),
        background_name=config.background_name,
        num_base=config.num_base_classes,
        base_names=list(config.base_class_names),
        novel_names=list(config.novel_class_names),
        held_out_names=_held_out(config),
        repo_id=repo_id,
        default_steps=_default_steps(),
        recipe_intro=recipe_intro,
        recipe=recipe,
        commands=list(commands or []),
        protocols=[(p, PROTOCOLS[p]) for p in PROTOCOLS if not entries or p in {e.protocol for e in entries}],
        results_table=_results_table(entries),
        output_stride=config.output_stride,
        image_size=config.image_size,
        dataset_source=DATASETS.get(dataset or "", {}).get("source", "the data described above"),
        citation=CITATION,
    )
    if template_path is not None:
        return ModelCard.from_template(card_data, template_path=os.fspath(template_path), **variables)
    return ModelCard.from_template(card_data, template_str=MODEL_CARD_TEMPLATE, **variables)


def planned_model_card(
    dataset: str, fold: int, namespace: str = DEFAULT_NAMESPACE, config_file: str | os.PathLike | None = None
) -> ModelCard:
    """
    The card of a planned (not yet trained) checkpoint: the fold's class lists, the recipe and the commands that
    produce it, and no numbers.

    Args:
        dataset (`str`): `"pascal5i"`, `"pascal10i"`, `"coco20i"` or `"synthetic"`.
        fold (`int`): the fold.
        namespace (`str`, *optional*, defaults to `"gfss-hf"`): Hub namespace of the repo id.
        config_file (`str` or `os.PathLike`, *optional*): the training YAML whose recipe the card lists; defaults
            to the project's `scripts/configs/{dataset}.yaml` when this is a source checkout (else the paper's
            recipe is listed).

    Returns:
        `huggingface_hub.ModelCard` (no `model-index`).
    """
    from .data.splits import get_split

    split = get_split(dataset, fold)
    config = GFSSConfig(base_class_names=split.base_names, dataset=dataset, fold=fold, split_kind=split.split_kind)
    if config_file is None:
        config_file = Path(__file__).resolve().parents[1] / DATASETS.get(dataset, {}).get("config_file", "")
    training = load_training_config(config_file) if Path(config_file).is_file() else None
    if training is not None:
        # The YAML holds fold 0; the command line sets the card's fold.
        head = {"dataset": dataset, "fold": fold, "split_kind": split.split_kind}
        training = {**head, **{k: v for k, v in training.items() if k not in head}}
    return render_model_card(
        config, repo_id=f"{namespace}/gfss-{dataset}-fold{fold}", planned=True, training=training
    )


def save_model_card(card: ModelCard, path: str | os.PathLike) -> Path:
    """Write a card atomically (temporary file in the same folder, then `os.replace`). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        apply_umask(tmp)  # mkstemp creates 0600; the card gets the mode of a plain write
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(str(card))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_planned_cards(
    output_dir: str | os.PathLike, checkpoints: Iterable[tuple[str, int]] = PLANNED_CHECKPOINTS
) -> list[Path]:
    """Write `gfss-{dataset}-fold{fold}.md` for every planned checkpoint into `output_dir`. Returns the paths."""
    return [
        save_model_card(planned_model_card(dataset, fold), Path(output_dir) / f"gfss-{dataset}-fold{fold}.md")
        for dataset, fold in checkpoints
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m gfss_hf.cards --planned DIR` or `--model_dir DIR [--results FILE] --output FILE`."""
    parser = argparse.ArgumentParser(prog="python -m gfss_hf.cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--planned", metavar="DIR", help="write the cards of all planned checkpoints into DIR")
    parser.add_argument("--model_dir", help="a save_pretrained folder whose card to render")
    parser.add_argument("--results", help="results.json written by scripts/evaluate.py")
    parser.add_argument("--repo_id", help="Hub repo id used in the card's code examples")
    parser.add_argument("--output", help="where to write the card (default: MODEL_DIR/README.md)")
    args = parser.parse_args(argv)
    # A command line run reports what it wrote; the library itself stays quiet unless asked.
    import logging as std_logging

    std_logging.basicConfig(format="%(message)s")
    logger.setLevel(std_logging.INFO)
    if bool(args.planned) == bool(args.model_dir):
        parser.error("give exactly one of --planned DIR and --model_dir DIR.")
    if args.planned:
        for path in write_planned_cards(args.planned):
            logger.info(f"wrote {path}")
        return 0
    card = render_model_card(args.model_dir, args.results, repo_id=args.repo_id)
    path = save_model_card(card, args.output or Path(args.model_dir) / "README.md")
    logger.info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
