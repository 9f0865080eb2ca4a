"""The `few-shot-segmentation` pipeline: segment query images into the model's classes plus classes learned on the
spot from a few annotated support images.

This file imports the model, the image processor and the adaptation engine relatively, so that
`pipe.save_pretrained(dir)` exports a folder that `pipeline(model=dir, trust_remote_code=True)` loads without the
`gfss_hf` package.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.utils import logging

from .adaptation import AdaptationConfig, predict
from .image_processing_gfss import GFSSImageProcessor, load_image
from .learning import adapt_to_supports

__all__ = ["FewShotSegmentationPipeline", "register_pipeline"]

logger = logging.get_logger(__name__)

TASK = "few-shot-segmentation"
_SUPPORT_KEYS = ("support_images", "support_masks", "class_names", "mask_type", "mode", "persist", "seed")
_ADAPTATION_KEYS = tuple(
    name for name in AdaptationConfig.__dataclass_fields__ if name != "method" and name not in _SUPPORT_KEYS
)
# Arguments of the call itself, read by `_sanitize_parameters` and `Pipeline.__call__`.
_CALL_KEYS = ("return_label_map", "batch_size", "num_workers")


def _unknown_arguments_error(name: str, unknown) -> TypeError:
    known = sorted(set(_SUPPORT_KEYS + _ADAPTATION_KEYS + _CALL_KEYS))
    return TypeError(f"{name} got unexpected arguments {sorted(unknown)}; known arguments are {known}.")


class FewShotSegmentationPipeline(Pipeline):
    r"""
    Few-shot semantic segmentation: learn new classes from a few annotated support images (the classifier is
    fine-tuned on frozen features, see `gfss_hf.adaptation`) and segment query images into the model's classes
    plus the new ones.

    Call it as `pipe(query_images, support_images=[...], support_masks=[...], class_names=[...], ...)`:

    - `query_images`: one image or a list (PIL, numpy, tensor, path or URL-free file path; grayscale, RGBA and
      16-bit images are converted). Every image and mask is read by `load_image`, which applies the EXIF
      orientation of phone photos: masks are drawn on, and returned at, the image as it is displayed.
    - `support_images`, `support_masks`: lists of the same length. By default (`mask_type="binary"`) a mask is a
      binary mask of ITS image's class: values 0 (background) / 1 (object) / 255 (ignored), or a white-on-black
      image with values 0 / 255 (255 = object), or a boolean array. With `mask_type="label_map"` a mask holds
      0 background, `k` for `class_names[k - 1]`, 255 ignored, and annotates every listed class.
    - `class_names`: with binary masks, the class of each support (repeat a name for K shots of one class, or give
      one string for all); with label maps, the names of the values `1..N` (unique).
    - `mode`: `"gfss"` (default: all classes of the model + the new ones, CE' + gamma * KD) or `"fss"` (each new
      class against background only, a fresh 2-way classifier per class).
    - Fine-tuning options: `steps` (100), `lr` (0.1), `gamma` (10.0), `seed`, and any other field of
      [`AdaptationConfig`] (`kd_scale`, `kd_skip_novel`, `novel_init`, `ce_weighting`, `loss_resolution`, ...).
    - `persist=True` (GFSS only): append the learned rows to the model (`model.expand_classifier`), so that later
      calls without supports, and `pipe.save_pretrained(dir)`, include the new classes. The model keeps its
      pre-trained base rows; only the new rows are added.
    - `return_label_map=True`: return `{"segments": [...], "label_map": np.ndarray (H, W) int64, "id2label": {...}}`
      instead of the list of segments.

    Without any support argument the pipeline segments the model's own classes (base + classes persisted before).

    To segment many queries with one fine-tuning, learn once and pass the result: `state = pipe.learn(
    support_images=..., support_masks=..., class_names=...)`, then `pipe(query, learned=state)` for each query.

    Each query gives a list of `{"label": str, "score": float, "mask": PIL.Image (mode "L", 255 = class)}`, one per
    class present in the prediction, at the query's original size (like the `image-segmentation` pipeline);
    `score` is the mean probability of the class over its mask.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import gfss_hf  # registers the task
    >>> pipe = pipeline("few-shot-segmentation", model="path/to/gfss-model")  # doctest: +SKIP
    >>> segments = pipe(query, support_images=[img], support_masks=[mask], class_names=["zebra"])  # doctest: +SKIP
    >>> [s["label"] for s in segments]  # doctest: +SKIP
    ['background', 'horse', 'zebra']
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    # Rows per post-processing band; None sizes bands to `POSTPROCESS_BAND_BYTES`, 0 selects the former untiled path
    # (every class's logits and probabilities at full resolution), kept for `bench/postprocess_memory.py`.
    postprocess_band_rows: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = GFSSImageProcessor.from_config(self.model.config)

    # -- parameters ------------------------------------------------------------------------------------------------
    def _sanitize_parameters(self, return_label_map=None, _learned=None, **kwargs):
        if kwargs:
            raise _unknown_arguments_error(type(self).__name__, kwargs)
        forward, post = {}, {}
        if _learned is not None:
            forward["_learned"] = _learned
            post["_learned"] = _learned
        if return_label_map is not None:
            post["return_label_map"] = bool(return_label_map)
        return {}, forward, post

    def __call__(self, images, learned: dict | None = None, **kwargs):
        """Segment `images` (one or a list); see the class docstring for the arguments.

        `learned` (the dict returned by [`~FewShotSegmentationPipeline.learn`]) reuses classes learned before
        instead of fine-tuning again: learn once, then segment any number of queries, call by call.
        """
        # Checked before fine-tuning: a typo must not cost a whole adaptation before it is reported.
        unknown = set(kwargs) - set(_SUPPORT_KEYS + _ADAPTATION_KEYS + _CALL_KEYS) - {"_learned"}
        if unknown:
            raise _unknown_arguments_error(type(self).__name__, unknown)
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("no query image: images is an empty list; pass one image or a list of images to segment.")
        support_kwargs = {k: kwargs.pop(k) for k in _SUPPORT_KEYS if k in kwargs}
        adaptation_kwargs = {k: kwargs.pop(k) for k in _ADAPTATION_KEYS if k in kwargs}
        if learned is not None:
            if support_kwargs or adaptation_kwargs:
                raise ValueError(
                    f"learned=... reuses classes learned before, but supports / fine-tuning options "
                    f"{sorted({**support_kwargs, **adaptation_kwargs})} were given too; pass one or the other."
                )
            if not isinstance(learned, dict) or not {"mode", "classifier", "base_names", "class_names"} <= set(
                learned
            ):
                raise TypeError(
                    f"learned must be the dict returned by pipe.learn(...), got {type(learned).__name__}; call "
                    "state = pipe.learn(support_images=..., support_masks=..., class_names=...) first."
                )
        else:
            learned = (
                self.learn(**support_kwargs, **adaptation_kwargs) if (support_kwargs or adaptation_kwargs) else None
            )
        if learned is not None:
            kwargs["_learned"] = learned
        if isinstance(images, tuple):
            images = list(images)
        return super().__call__(images, **kwargs)

    # -- learning --------------------------------------------------------------------------------------------------
    def learn(
        self,
        support_images=None,
        support_masks=None,
        class_names=None,
        mask_type: str = "binary",
        mode: str = "gfss",
        persist: bool = False,
        **adaptation_kwargs,
    ) -> dict:
        """
        Adapt the classifier to the supports (once per call, shared by all queries). Returns the adapted classifier
        with its class names; with `persist=True` the new rows are also written into the model.
        """
        if mode not in ("gfss", "fss"):
            raise ValueError(f"mode={mode!r} is invalid; use 'gfss' (all classes) or 'fss' (new class vs background).")
        if persist and mode != "gfss":
            raise ValueError("persist=True keeps classes in the model's classifier, which needs mode='gfss'.")
        if support_images is None or (isinstance(support_images, (list, tuple)) and len(support_images) == 0):
            raise ValueError(
                "no supports: pass support_images=[...] with support_masks=[...] and class_names=[...] (at least one "
                "annotated image), or call the pipeline with none of the support arguments to segment the model's "
                "own classes."
            )
        config = AdaptationConfig(method=mode, **adaptation_kwargs)
        if persist and config.normalize_features:
            raise ValueError(
                "persist=True keeps the learned rows in the model, whose classifier reads raw features; they were "
                "fitted to L2-normalised ones (normalize_features=True). Drop one of the two."
            )
        model = self.model
        model.eval()
        base_names = list(model.config.class_names)
        names, classifier = adapt_to_supports(
            model, self.image_processor, support_images, support_masks, class_names, config, mask_type
        )
        if persist:
            model.expand_classifier(names, weights=classifier.novel_weight, bias=classifier.novel_bias)
            logger.info(f"persisted classes {names} into the model")
        return {"mode": mode, "classifier": classifier, "base_names": base_names, "class_names": names}

    # -- the three stages ------------------------------------------------------------------------------------------
    def preprocess(self, image):
        pil = load_image(image, name="query image")
        inputs = self.image_processor(pil, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "original_size": (pil.height, pil.width)}

    def _forward(self, model_inputs, _learned=None):
        model = self.model
        param = next(model.parameters())
        pixel_values = model_inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
        size = pixel_values.shape[-2:]
        align = model.config.logits_align_corners
        features = model.extract_features(pixel_values)
        if _learned is None:
            logits = model.upsample_logits(model.classifier(features), size)
        elif _learned["mode"] == "gfss":
            logits = predict(features, _learned["classifier"], size=size, align_corners=align)
        else:
            # One 2-way classifier per class: P(class n) from its own classifier, P(background) = 1 - the best one;
            # returned as log-probabilities so that post-processing treats every mode alike.
            per_class = predict(
                features[None].expand(len(_learned["class_names"]), *features.shape),
                _learned["classifier"],
                size=size,
                align_corners=align,
            )
            fg = per_class.float().softmax(dim=2)[:, :, 1].permute(1, 0, 2, 3)  # (Q, N, S, S)
            probs = torch.cat([1.0 - fg.amax(dim=1, keepdim=True), fg], dim=1)
            logits = probs.clamp_min(1e-12).log()
        return {"logits": logits, "original_size": model_inputs["original_size"]}

    def postprocess(self, model_outputs, return_label_map: bool = False, _learned=None):
        if _learned is None:
            names = list(self.model.config.class_names)
        elif _learned["mode"] == "gfss":
            names = _learned["base_names"] + list(_learned["class_names"])
        else:
            names = [self.model.config.background_name] + list(_learned["class_names"])
        original = model_outputs["original_size"]
        original = tuple(int(v) for v in (original.tolist() if isinstance(original, torch.Tensor) else original))
        fss = _learned is not None and _learned["mode"] == "fss"
        if self.postprocess_band_rows == 0:
            label_map, scores = self._label_map_untiled(model_outputs["logits"], original, fss)
        else:
            label_map, scores = self._label_map_banded(model_outputs["logits"][0], original, fss)
        segments = []
        for index, score in scores.items():
            # uint8 0/255 built in place: one byte per pixel per present class, the size of the output itself.
            mask = np.equal(label_map, index).view(np.uint8)
            mask *= 255
            segments.append({"label": names[index], "score": score, "mask": Image.fromarray(mask)})
        if return_label_map:
            return {"segments": segments, "label_map": label_map.astype(np.int64), "id2label": dict(enumerate(names))}
        return segments

    def _label_map_banded(self, logits, original, fss: bool) -> tuple[np.ndarray, dict]:
        """Label map and per-class scores (mean probability over the class's pixels), band of rows by band: logits
        are resized to the original size (as `post_process_semantic_segmentation` does), then turned into
        probabilities, with peak memory of one band plus the label map."""
        num = logits.shape[0]
        label_map = np.empty(original, dtype=np.uint8 if num <= 256 else np.int32)
        sums = torch.zeros(num, dtype=torch.float64)
        counts = torch.zeros(num, dtype=torch.int64)
        bands = self.image_processor.resized_logit_bands(logits, original, band_rows=self.postprocess_band_rows)
        for row, band in bands:
            probs = band.softmax(dim=0)
            label = self._labels(probs, fss)
            label_map[row : row + label.shape[0]] = label.numpy()
            flat = label.flatten()
            sums.index_add_(0, flat, probs.gather(0, label[None]).flatten().double())
            counts += torch.bincount(flat, minlength=num)
        present = torch.nonzero(counts).flatten().tolist()
        return label_map, {i: round(float(sums[i] / counts[i]), 4) for i in present}

    def _label_map_untiled(self, logits, original, fss: bool) -> tuple[np.ndarray, dict]:
        """The former path: every class at full resolution at once (`C x H x W` float32, several times)."""
        import torch.nn.functional as F

        new_h, new_w = self.image_processor.resized_size(*original)
        scale = logits.shape[-1] / self.image_processor.image_size
        crop = logits[:, :, : max(1, int(round(new_h * scale))), : max(1, int(round(new_w * scale)))]
        probs = F.interpolate(crop.float(), size=original, mode="bilinear", align_corners=False)[0].softmax(dim=0)
        label = self._labels(probs, fss)
        scores = {i: round(float(probs[i][label == i].mean()), 4) for i in torch.unique(label).tolist()}
        return label.numpy().astype(np.int64), scores

    @staticmethod
    def _labels(probs: torch.Tensor, fss: bool) -> torch.Tensor:
        if fss:
            # Background wins unless a class is more likely than not.
            best, label = probs[1:].max(dim=0)
            return torch.where(best > 0.5, label + 1, torch.zeros_like(label))
        return probs.argmax(dim=0)


def register_pipeline() -> None:
    """Register the `few-shot-segmentation` task with transformers' `pipeline()` (idempotent)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK in PIPELINE_REGISTRY.get_supported_tasks():
        _, impl, _ = PIPELINE_REGISTRY.check_task(TASK)
        if impl.get("impl") is FewShotSegmentationPipeline:
            return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=FewShotSegmentationPipeline, pt_model=AutoModel, type="image"
    )
