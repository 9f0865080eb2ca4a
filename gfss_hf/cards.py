"""Model cards of GFSS checkpoints, generated from code so that every card stays consistent: Hub YAML metadata,
`model-index` results read through the results schema of `gfss_hf.results` (`load_results`,
`results_to_eval_results`), the recipe of the training YAML, and the prose of `templates/model_card.md`.

`scripts/make_cards.py` writes the planned cards (`model_cards/`) and the card of a trained folder;
`gfss_hf.hub.publish` writes the card of every export; `gfss_hf.conversion` the card of a converted checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import logging

from ._io import atomic_write_text
from .configuration_gfss import GFSSConfig
from .metrics import METRIC_NAMES
from .results import ResultEntry, load_results, results_to_eval_results

__all__ = [
    "DATASETS",
    "DEFAULT_NAMESPACE",
    "PLANNED_CHECKPOINTS",
    "PROTOCOLS",
    "TEMPLATE_PATH",
    "load_training_config",
    "planned_model_card",
    "render_model_card",
    "save_model_card",
    "training_config_path",
    "write_planned_cards",
]

logger = logging.get_logger(__name__)

DEFAULT_NAMESPACE = "gfss-hf"
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
# The training YAMLs of a source checkout; an installed package has none, and its cards then list only what a
# training run recorded (`training_config.yaml`).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "scripts" / "configs"
# "transformers": the exported folder is a transformers repository (config.json with `auto_map`, the model code,
# safetensors weights) that loads with `AutoModel` / `pipeline(..., trust_remote_code=True)` and no other package.
# The Hub then shows the transformers snippet and counts downloads through config.json; "gfss_hf" is not a library
# the Hub knows, so it would get neither.
LIBRARY_NAME = "transformers"
LICENSE = "apache-2.0"
TAGS = (
    "few-shot-segmentation",
    "generalized-few-shot-segmentation",
    "semantic-segmentation",
    "pspnet",
    "gfss_hf",
    "custom_code",
    "vision",
)

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

# Per dataset: display name, the card's `datasets` (descriptive identifiers: the benchmarks are not hosted on the Hub
# under an official id), the data folder of the example commands and a description of the data. The recipe (epochs,
# batch, optimiser, ...) is NOT here: it is read from `scripts/configs/{dataset}.yaml`.
DATASETS: dict[str, dict[str, Any]] = {
    "pascal5i": {
        "pretty": "PASCAL-5i",
        "card_datasets": ["pascal-voc-2012", "sbd"],
        "data_dir": "/data/VOCdevkit/VOC2012",
        "source": "PASCAL VOC 2012 with the SBD augmented annotations (train 5,953 / val 1,449 images)",
    },
    "pascal10i": {
        "pretty": "PASCAL-10i",
        "card_datasets": ["pascal-voc-2012", "sbd"],
        "data_dir": "/data/VOCdevkit/VOC2012",
        "source": "PASCAL VOC 2012 with the SBD augmented annotations (train 5,953 / val 1,449 images)",
    },
    "coco20i": {
        "pretty": "COCO-20i",
        "card_datasets": ["coco-2014"],
        "data_dir": "/data/coco",
        "source": "MS COCO 2014 (semantic masks from non-crowd instances; val list of 40,137 images)",
    },
    "synthetic": {
        "pretty": "synthetic shapes (gfss_hf)",
        "card_datasets": ["gfss_hf-synthetic"],
        "source": "the procedural dataset embedded in gfss_hf (20 shape x texture classes, no download)",
    },
}

# The checkpoints this project plans to publish; `write_planned_cards` writes one card each.
PLANNED_CHECKPOINTS: tuple[tuple[str, int], ...] = tuple(
    (dataset, fold) for dataset in ("pascal5i", "coco20i") for fold in range(4)
)

# Keys of a training YAML / `training_config.yaml` that describe the recipe, in card order; paths, logging and
# infrastructure settings are left out.
_RECIPE_KEYS = (
    "dataset",
    "fold",
    "split_kind",
    "min_pixels",
    "novel_to_background",
    "backbone",
    "backbone_weights",
    "backbone_pretrained",
    "freeze_backbone",
    "image_size",
    "num_epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "learning_rate",
    "momentum",
    "weight_decay",
    "lr_schedule",
    "label_smoothing",
    "contrastive_weight",
    "temperature",
    "base_temperature",
    "max_samples",
    "max_views",
    "background_anchors",
    "hflip",
    "scale_range",
    "color_jitter",
    "seed",
    "mixed_precision",
)


def _dataset_pretty(dataset: str | None) -> str:
    return DATASETS.get(dataset or "", {}).get("pretty", dataset or "custom data")


def training_config_path(dataset: str | None) -> Path:
    """The training YAML of `dataset` in a source checkout (`scripts/configs/{dataset}.yaml`; may not exist)."""
    return CONFIGS_DIR / f"{dataset}.yaml"


def load_training_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """
    The recipe settings of a training YAML (`scripts/configs/*.yaml`) or of a run's `training_config.yaml`.

    Args:
        path (`str` or `os.PathLike`): the YAML file, or the training output folder holding `training_config.yaml`.

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
    # Model fields may sit under a `model:` mapping; the card lists them among the other settings.
    flat = {**raw, **(raw["model"] if isinstance(raw.get("model"), Mapping) else {})}
    return {key: _public_setting(key, flat[key]) for key in _RECIPE_KEYS if flat.get(key) is not None}


def _public_setting(key: str, value):
    # A local weights file is named by its file name only: a card must not publish the trainer's folders. A timm
    # tag or Hub id (`timm/...`) is kept whole.
    if key == "backbone_weights":
        return Path(value).name
    if key == "backbone_pretrained" and isinstance(value, str) and (os.path.isabs(value) or value.count("/") > 1):
        return Path(value).name
    return value


def _stride_words(config) -> str:
    if config.output_stride is None:
        return "its native stride (a ViT's patch size)"
    return f"output stride {config.output_stride}"


def _rows(settings: Mapping | None) -> list[tuple[str, str]]:
    rows = []
    for key, value in (settings or {}).items():
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
        ("Backbone", f"`{config.backbone}`, {_stride_words(config)}"),
        ("Pyramid bins", ", ".join(str(s) for s in config.pool_scales)),
        ("Feature channels", str(config.hidden_size)),
        (
            "Classes",
            f"{config.num_labels} (background + {config.num_base_classes} base"
            + (f" + {config.num_novel_classes} novel)" if config.num_novel_classes else ")"),
        ),
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


def _results_table(entries: Sequence[ResultEntry]) -> str:
    """One Markdown table per protocol (their metrics differ), columns in the order of `METRIC_NAMES`."""
    tables = []
    for protocol in dict.fromkeys(e.protocol for e in entries):
        group = [e for e in entries if e.protocol == protocol]
        columns = [k for k in METRIC_NAMES if any(k in e.metrics for e in group)]
        lines = [
            "| " + " | ".join(["Dataset", "Fold", "Shots", "Protocol", *(METRIC_NAMES[k] for k in columns)]) + " |",
            "|" + "---|" * 4 + "---:|" * len(columns),
        ]
        for e in group:
            cells = [_dataset_pretty(e.dataset), str(e.fold), str(e.shots), f"`{e.protocol}`"]
            for key in columns:
                std = e.stds.get(key)
                cell = f"{e.metrics[key]:.2f}" if key in e.metrics else "-"
                cells.append(cell + (f" ± {std:.2f}" if std is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


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
    source: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike = TEMPLATE_PATH,
) -> ModelCard:
    """
    Render the model card of a GFSS checkpoint (trained, planned or converted).

    Args:
        config (`GFSSConfig`, `str` or `os.PathLike`):
            The model's configuration, or a `save_pretrained` folder to read it (and its `training_config.yaml`)
            from.
        results (*optional*):
            Evaluation results in the schema of [`gfss_hf.results.load_results`] (a `results.json` path, several,
            or parsed content). They fill the results tables and the `model-index`; without them the card says that
            no numbers exist.
        repo_id (`str`, *optional*):
            Hub id used in the code examples; defaults to `gfss-hf/gfss-{dataset}-fold{fold}`.
        model_name (`str`, *optional*):
            Title, and name of the model in `model-index`; defaults to the last part of `repo_id`.
        training (`Mapping`, *optional*):
            Training settings to list (name -> value), e.g. [`load_training_config`]`(output_dir)`. Without it the
            card lists the settings of `scripts/configs/{dataset}.yaml` (when this is a source checkout).
        commands (`Sequence[str]`, *optional*):
            Shell lines that reproduce the checkpoint; defaults to the pretrain/evaluate/push commands of the
            config's dataset and fold (when the dataset is a known one).
        planned (`bool`, *optional*, defaults to `False`):
            A card for a checkpoint that is not trained yet: it says so, and results are refused.
        license (`str`, *optional*, defaults to `"apache-2.0"`): Hub licence id of the weights.
        source (`Mapping`, *optional*):
            Converted weights (see `gfss_hf.conversion.build_model_card`): `repo`, `link`, `commit`, `layout`,
            `license_note`, `unlicensed`, `rows` (name, value) and `report` (text); optional `card_data` (extra
            `ModelCardData` fields), `title` and `summary`.
        template_path (`str` or `os.PathLike`, *optional*): the Jinja template (defaults to the package's
            `templates/model_card.md`; another one receives the same variables).

    Returns:
        `huggingface_hub.ModelCard`.

    Example:

    ```python
    >>> from gfss_hf import GFSSConfig
    >>> from gfss_hf.cards import render_model_card
    >>> config = GFSSConfig(base_class_names=("cat", "dog"), dataset="synthetic", fold=0)
    >>> card = render_model_card(config, {"protocol": "paper", "dataset": "synthetic", "fold": 0, "shots": 1,
    ...                                   "metrics": {"fss_novel_miou": 0.5}}, repo_id="me/gfss-demo")
    >>> card.data.eval_results[0].metric_value
    50.0
    ```
    """
    if not isinstance(config, GFSSConfig):
        folder = os.fspath(config)
        config = GFSSConfig.from_pretrained(folder)
        if training is None:
            training = load_training_config(folder)
    dataset, fold = config.dataset, config.fold
    entries = load_results(results, defaults={"dataset": dataset, "fold": fold})
    if planned and entries:
        raise ValueError("planned=True describes an untrained checkpoint and cannot carry results; drop `results`.")
    for entry in entries:
        if (dataset and entry.dataset != dataset) or (fold is not None and entry.fold != fold):
            logger.warning(
                f"results of dataset={entry.dataset!r} fold={entry.fold} on a model of dataset={dataset!r} "
                f"fold={fold}; check that results.json belongs to this checkpoint."
            )
    if repo_id is None:
        repo_id = (
            f"{DEFAULT_NAMESPACE}/gfss"
            + (f"-{dataset}" if dataset else "")
            + (f"-fold{fold}" if fold is not None else "")
        )
    model_name = model_name or repo_id.split("/")[-1]
    source = dict(source or {})
    tags = [*TAGS, *([dataset] if dataset else []), *(["converted", f"layout-{source['layout']}"] if source else [])]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="image-segmentation",
        license=license,
        tags=tags,
        datasets=DATASETS.get(dataset or "", {}).get("card_datasets"),
        metrics=["mean_iou"],
        # model_name only exists in the YAML as the name of the model-index.
        model_name=model_name if entries else None,
        eval_results=results_to_eval_results(entries, {k: v["pretty"] for k, v in DATASETS.items()}) or None,
        **source.pop("card_data", {}),
    )
    if commands is None and dataset in DATASETS and fold is not None:
        commands = _commands(dataset, int(fold), repo_id)
    if training:
        recipe_intro = (
            "Settings of the training configuration that produces this checkpoint (`batch_size` is per process):"
            if planned
            else "Settings recorded with this checkpoint (`training_config.yaml`; `batch_size` is per process):"
        )
    elif source:
        recipe_intro = f"Trained by {source['repo']} with its own recipe (see its code at the commit above)."
    else:
        training = load_training_config(training_config_path(dataset)) if dataset else None
        recipe_intro = (
            f"Pre-training on the base classes with `scripts/configs/{dataset}.yaml` (`batch_size` is per process"
            + ("" if planned else "; the training run did not record its own settings")
            + "):"
            if training
            else "The training run did not record its settings."
        )
    summary = source.get("summary") or (
        f"A PSPNet ({config.backbone}) pre-trained on the {config.num_base_classes} base classes of "
        f"{_dataset_pretty(dataset)}"
        + (f" (fold {fold})" if fold is not None else "")
        + ", for generalized few-shot semantic segmentation: it segments its base classes and learns new classes "
        'from a few annotated examples at inference time, following "Towards Generalized Few-shot Segmentation: On '
        'Contrastive Learning and Background Information Modeling" (Liu, Zhang and Lu, 2022).'
    )
    variables = dict(
        title=source.get("title") or model_name,
        planned=planned,
        summary=summary,
        source=source,
        model_facts=_model_facts(config),
        background_name=config.background_name,
        num_base=config.num_base_classes,
        base_names=list(config.base_class_names),
        novel_names=list(config.novel_class_names),
        held_out_names=_held_out(config),
        repo_id=repo_id,
        default_steps=_default_steps(),
        recipe_intro=recipe_intro,
        recipe=_rows(training),
        commands=list(commands or []),
        protocols=[(p, PROTOCOLS[p]) for p in PROTOCOLS if not entries or p in {e.protocol for e in entries}],
        results_table=_results_table(entries),
        output_stride=config.output_stride or "native (a ViT's patch size)",
        image_size=config.image_size,
        dataset_source=DATASETS.get(dataset or "", {}).get("source", "the data described above"),
    )
    return ModelCard.from_template(card_data, template_path=os.fspath(template_path), **variables)


def planned_model_card(
    dataset: str, fold: int, namespace: str = DEFAULT_NAMESPACE, config_file: str | os.PathLike | None = None
) -> ModelCard:
    """
    The card of a planned (not yet trained) checkpoint: the fold's class lists, the recipe of its training YAML and
    the commands that produce it, and no numbers.

    Args:
        dataset (`str`): `"pascal5i"`, `"pascal10i"`, `"coco20i"` or `"synthetic"`.
        fold (`int`): the fold.
        namespace (`str`, *optional*, defaults to `"gfss-hf"`): Hub namespace of the repo id.
        config_file (`str` or `os.PathLike`, *optional*): the training YAML whose recipe the card lists; defaults
            to `scripts/configs/{dataset}.yaml` of this source checkout.

    Returns:
        `huggingface_hub.ModelCard` (no `model-index`).
    """
    from .data.splits import get_split

    split = get_split(dataset, fold)
    config = GFSSConfig(base_class_names=split.base_names, dataset=dataset, fold=fold, split_kind=split.split_kind)
    training = load_training_config(config_file or training_config_path(dataset))
    if training is not None:
        # The YAML holds fold 0; the command line sets the card's fold.
        head = {"dataset": dataset, "fold": fold, "split_kind": split.split_kind}
        training = {**head, **{k: v for k, v in training.items() if k not in head}}
    return render_model_card(config, repo_id=f"{namespace}/gfss-{dataset}-fold{fold}", planned=True, training=training)


def save_model_card(card: ModelCard, path: str | os.PathLike) -> Path:
    """Write a card atomically (temporary file in the same folder, then `os.replace`). Returns the path."""
    path = Path(path)
    atomic_write_text(path, str(card))
    return path


def write_planned_cards(
    output_dir: str | os.PathLike, checkpoints: Iterable[tuple[str, int]] = PLANNED_CHECKPOINTS
) -> list[Path]:
    """Write `gfss-{dataset}-fold{fold}.md` for every planned checkpoint into `output_dir`. Returns the paths."""
    return [
        save_model_card(planned_model_card(dataset, fold), Path(output_dir) / f"gfss-{dataset}-fold{fold}.md")
        for dataset, fold in checkpoints
    ]
