"""Learning classes from annotated images: supports given as images (validated and encoded by
`GFSSImageProcessor.preprocess_supports`) -> frozen features -> the adaptation engine's model-aware entry
(`gfss_hf.adaptation.adapt_classifier`) -> an adapted classifier, or new rows kept in a [`GFSSModel`].

- [`extract_support_features`]: the frozen features of encoded supports, at the resolution the loss needs.
- [`adapt_to_supports`]: images -> adapted classifier, one episode (the pipeline's `learn` and [`learn_classes`]).
- [`learn_classes`]: adapt novel rows from images and write them into the model with `expand_classifier`, so that
  `save_pretrained` publishes a model that segments base + learned classes with a plain forward pass.
- [`one_shot_predictions`]: the FSS and GFSS label maps of one support / query pair, as the qualitative figures of
  `scripts/demo.py` and `scripts/camvid_benchmark.py` show them.

Like `adaptation`, this module needs only torch and its siblings at import time (the image processor lazily), so that
it travels with a Hub export of the pipeline.
"""

from __future__ import annotations

import torch

from ._solver import downsample_labels
from .adaptation import AdaptationConfig, AdaptedClassifier, adapt_classifier, predict

__all__ = [
    "adapt_to_supports",
    "episode_figure_row",
    "extract_support_features",
    "learn_classes",
    "one_shot_predictions",
]


def extract_support_features(model, supports, loss_resolution: str = "input") -> torch.Tensor:
    r"""
    Frozen features of preprocessed supports (the model must be in eval mode).

    Args:
        model ([`GFSSModel`]): gives the features.
        supports ([`EncodedSupports`]): from [`GFSSImageProcessor.preprocess_supports`].
        loss_resolution (`str`, *optional*, defaults to `"input"`): with `"feature"`, also checks that every support
            keeps a foreground pixel at the feature size (the labels are downsampled there).

    Returns:
        `torch.Tensor` of shape `(K, D, h, w)`, on the model's device.
    """
    param = next(model.parameters())
    with torch.no_grad():
        features = model.extract_features(supports.pixel_values.to(device=param.device, dtype=param.dtype))
    if loss_resolution == "feature":
        ignore = model.config.ignore_index
        small = downsample_labels(supports.labels[None], features.shape[-2:])[0]
        for i in range(small.shape[0]):
            if not ((small[i] >= 1) & (small[i] != ignore)).any():
                raise ValueError(
                    f"support_masks[{i}] keeps no foreground pixel at the feature size {features.shape[-1]}x"
                    f"{features.shape[-2]}; use loss_resolution='input' or a larger object."
                )
    return features


# -- learning classes into a model --------------------------------------------------------------------------------
def learn_classes(
    model,
    support_images,
    support_masks,
    class_names,
    image_processor=None,
    config: AdaptationConfig | None = None,
    mask_type: str = "binary",
    **config_overrides,
):
    r"""
    Teach a [`GFSSModel`] new classes from a few annotated images and keep them: the novel rows adapted by
    [`adapt_gfss`] are appended with `model.expand_classifier`, so `model.save_pretrained(...)` publishes a model
    that segments base + learned classes with a plain forward pass. Calling it again appends more classes (the
    current classifier, learned classes included, acts as the frozen teacher).

    Args:
        model ([`GFSSModel`]): the model; only its classifier changes.
        support_images (`list`): PIL images, numpy arrays, tensors or paths (grayscale, RGBA, 16-bit accepted).
        support_masks (`list`): one mask per image, see `mask_type`.
        class_names (`str` or `list[str]`): with `mask_type="binary"`, the class of each support (one name per
            image; a name may repeat for K shots of one class, a single string applies to all); with
            `mask_type="label_map"`, the classes of values `1..N` of the label maps.
        image_processor ([`GFSSImageProcessor`], *optional*): defaults to `GFSSImageProcessor.from_config`.
        config ([`AdaptationConfig`], *optional*): fine-tuning hyper-parameters (GFSS).
        mask_type (`str`, *optional*, defaults to `"binary"`): `"binary"`: values {0, 1, 255} (1 foreground, 255
            ignored) or {0, 255} (a white-on-black PNG: 255 foreground), or bool; `"label_map"`: 0 background,
            `k` = `class_names[k - 1]`, 255 ignored.
        **config_overrides: fields of [`AdaptationConfig`] (e.g. `steps=50`, `gamma=0`).

    Returns:
        `list[str]`: the names of the learned classes, in the order of their new rows.

    Example:

    ```python
    >>> learn_classes(model, [image], [mask], ["my-object"])  # doctest: +SKIP
    >>> model.save_pretrained("my-model")  # doctest: +SKIP
    ```
    """
    config = (config if config is not None else AdaptationConfig()).replace(**config_overrides)
    if config.method != "gfss":
        raise ValueError(
            f"learn_classes keeps classes in the expanded classifier; got method={config.method!r}, use 'gfss'."
        )
    if config.normalize_features:
        raise ValueError(
            "normalize_features=True fits rows to L2-normalised features, but the model's classifier reads raw "
            "features: the learned rows cannot be kept in it. Learn them with normalize_features=False."
        )
    was_training = model.training
    model.eval()
    try:
        if image_processor is None:
            from .image_processing_gfss import GFSSImageProcessor  # lazy: only when no processor is given

            image_processor = GFSSImageProcessor.from_config(model.config)
        names, clf = adapt_to_supports(
            model, image_processor, support_images, support_masks, class_names, config, mask_type
        )
    finally:
        model.train(was_training)
    model.expand_classifier(names, weights=clf.novel_weight, bias=clf.novel_bias)
    return list(names)


def adapt_to_supports(
    model, image_processor, support_images, support_masks, class_names, config: AdaptationConfig, mask_type="binary"
) -> tuple[list[str], AdaptedClassifier]:
    """
    Supports given as images -> the adapted classifier, in one episode: validate and encode them with
    `image_processor.preprocess_supports`, extract their frozen features once, and fine-tune with
    [`adapt_classifier`] (under `torch.enable_grad()`, so that it also works inside a pipeline's `no_grad`). The model
    must already be in eval mode. Shared by [`learn_classes`] and the pipeline.

    Returns:
        `tuple(list[str], AdaptedClassifier)`: the names of the new classes, in row order, and the classifier.
    """
    supports = image_processor.preprocess_supports(
        support_images, support_masks, class_names, mask_type, existing_class_names=model.config.class_names
    )
    features = extract_support_features(model, supports, config.loss_resolution)
    with torch.enable_grad():  # the engine's autograd parts (solver="autograd", transduction) need it
        classifier = adapt_classifier(
            model,
            features,
            supports.labels.to(features.device),
            config,
            num_novel_classes=len(supports.class_names),
            annotated=supports.annotated.to(features.device),
        )
    return list(supports.class_names), classifier


# -- one episode, for figures -------------------------------------------------------------------------------------
def one_shot_predictions(
    model,
    image_processor,
    support_image,
    support_label,
    query_image,
    query_label,
    class_id: int,
    base_ids,
    config: AdaptationConfig | None = None,
    gammas=(0.0, 10.0),
) -> list:
    r"""
    Predictions of a one-shot episode (one support, one query) by FSS 2-way and by GFSS for each gamma, as dataset
    ids: what a qualitative figure shows next to the ground truth.

    Args:
        model ([`GFSSModel`]): pre-trained on the base classes `base_ids` (its classifier rows are
            `[background, base_ids...]`), in eval mode; left unchanged.
        image_processor ([`GFSSImageProcessor`]): encodes both images (one batch of two).
        support_image, query_image: images as the processor takes them (PIL, arrays).
        support_label, query_label (`np.ndarray` of shape `(H, W)`): dataset-id label maps at the images' sizes
            (the support's says where `class_id` is; the query's is encoded alongside, as in an evaluation).
        class_id (`int`): the novel dataset id of the episode.
        base_ids (`Sequence[int]`): the dataset ids of the pre-trained rows `1..B`.
        config ([`AdaptationConfig`], *optional*): steps, lr, seed, loss resolution...; `method` and `gamma` are set
            per prediction (FSS, then GFSS with each of `gammas`).
        gammas (`Sequence[float]`, *optional*, defaults to `(0.0, 10.0)`): the GFSS predictions to make.

    Returns:
        `list[np.ndarray]`: `1 + len(gammas)` int64 maps of the query's resized size (the canvas without its
        padding): FSS (`class_id` or 0), then GFSS per gamma (`class_id`, a base id, or 0 for the background row).
    """
    import numpy as np  # lazy: the module's import needs torch only

    config = config if config is not None else AdaptationConfig()
    batch = image_processor(
        [support_image, query_image], segmentation_maps=[np.asarray(support_label), np.asarray(query_label)]
    )
    size = batch["pixel_values"].shape[-2:]
    with torch.no_grad():
        features = model.extract_features(batch["pixel_values"])
    support = batch["labels"][0]
    mask = torch.where(support == 255, 255, (support == class_id).long())[None]
    align = model.config.logits_align_corners
    height, width = (int(v) for v in batch["resized_sizes"][1])
    fss = adapt_classifier(model, features[:1], mask, config.replace(method="fss"))
    rows = predict(features[1:], fss, size=size, align_corners=align)[0].argmax(0)
    maps = [torch.where(rows == 1, class_id, 0)]
    num_base_rows = len(base_ids) + 1
    row_to_dataset = torch.tensor([0, *base_ids], dtype=torch.long)
    for gamma in gammas:
        gfss = adapt_classifier(model, features[:1], mask, config.replace(method="gfss", gamma=gamma))
        rows = predict(features[1:], gfss, size=size, align_corners=align)[0].argmax(0)
        maps.append(torch.where(rows == num_base_rows, class_id, row_to_dataset[rows.clamp(max=num_base_rows - 1)]))
    return [m[:height, :width].numpy().astype(np.int64) for m in maps]


def episode_figure_row(
    model, image_processor, support: dict, query: dict, class_id: int, base_ids, name: str, config=None
):
    """
    One row of a qualitative figure ([`gfss_hf.visualization.episode_figure`]): the support with its mask of
    `class_id`, the query with its ground truth, and the [`one_shot_predictions`] of the episode.

    Args:
        model, image_processor, class_id, base_ids, config: as for [`one_shot_predictions`].
        support, query (`dict`): dataset items with `"image"` and `"label"` (dataset ids).
        name (`str`): the row's class name.

    Returns:
        [`gfss_hf.visualization.EpisodeRow`].
    """
    import numpy as np

    from gfss_hf.visualization import EpisodeRow  # absolute: Hub exports scan relative imports

    predictions = one_shot_predictions(
        model,
        image_processor,
        support["image"],
        support["label"],
        query["image"],
        query["label"],
        class_id,
        base_ids,
        config,
    )
    mask = np.where(np.asarray(support["label"]) == class_id, class_id, 0)
    return EpisodeRow(support["image"], mask, query["image"], np.asarray(query["label"]), predictions, name)
