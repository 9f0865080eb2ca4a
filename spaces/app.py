"""Gradio Space: generalized few-shot segmentation with a GFSS model.

Paint the new class on one to three support images, name it, and the model learns it in a few seconds (only its
classifier is fine-tuned on the painted pixels); the query is then segmented into the model's base classes plus the
new class (GFSS), or into the new class versus background (FSS).

The model comes from `GFSS_MODEL` (a local `save_pretrained` folder or a Hub id); without it, the folder written by
`make demo` (`demo_output/model_ce`) is used. With the `gfss_hf` package installed the model loads
through it; without (a Hub Space), through the repository's own code (`trust_remote_code=True`).

Run locally: `python spaces/app.py`. Import without launching: `from app import build_app` (or the module-level
`demo`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = [
    "FewShotSegmenter",
    "build_app",
    "default_model_source",
    "demo",
    "load_examples",
    "painted_mask",
    "segment",
]

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "demo_output" / "model_ce"
EXAMPLES_DIR = HERE / "examples"
TITLE = "GFSS: generalized few-shot segmentation"
MAX_SUPPORTS = 3
MAX_CLASS_NAME = 40
BRUSH_COLOUR = "#ff2d7a"


# ---------------------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------------------
def load_examples(folder: str | os.PathLike = EXAMPLES_DIR) -> list[tuple[str, dict[str, Path]]]:
    """
    The examples rendered by `scripts/render_space_examples.py` (classes the `make demo` model never saw), as
    listed by the folder's `examples.json`.

    Returns:
        `list[tuple[str, dict[str, Path]]]`: (class name, paths of `query`, `support`, `layer`, `composite`) per
        example; `[]` when the folder has no complete set (the app then shows no examples).
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "examples.json").read_text(encoding="utf-8"))
        examples = [
            (
                str(entry["class_name"]),
                {key: folder / entry[key] for key in ("query", "support", "layer", "composite")},
            )
            for entry in manifest
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return examples if all(p.is_file() for _, paths in examples for p in paths.values()) else []


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
def default_model_source() -> str | None:
    """`GFSS_MODEL` if set, else the `make demo` folder if it exists, else None."""
    source = os.environ.get("GFSS_MODEL", "").strip()
    if source:
        return source
    return str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def _no_model_message(source: str | None, reason: str | None = None) -> str:
    where = f"`{source}`" if source else f"`{DEFAULT_MODEL_DIR.relative_to(REPO_ROOT)}` (written by `make demo`)"
    text = (
        f"No model found at {where}. Run `make demo` to train the demo models, or set `GFSS_MODEL` to a "
        "`save_pretrained` folder or a Hub model id (e.g. `GFSS_MODEL=gfss-hf/gfss-pascal5i-fold0`), then restart."
    )
    return text + (f" ({reason})" if reason else "")


class FewShotSegmenter:
    """Loads the `few-shot-segmentation` pipeline on first use (thread-safe) and remembers why loading failed.

    Args:
        source (`str`, *optional*): local folder or Hub id; `None` means "no model".
    """

    def __init__(self, source: str | None):
        self.source = source
        self._pipe = None
        self._error: str | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """False when there is no source, a local folder without config.json, or loading failed."""
        if self.source is None or self._error is not None:
            return False
        local = Path(self.source)
        looks_local = local.is_absolute() or self.source.startswith(".") or local.exists()
        return not looks_local or (local / "config.json").is_file()

    @property
    def message(self) -> str:
        return _no_model_message(self.source, self._error)

    def class_names(self) -> tuple[str, list[str]]:
        """(background name, names of the model's classes): from a local folder's config.json, else from the loaded
        model."""
        config = self.config()
        names = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
        return names[0], names[1:]

    def config(self) -> dict:
        """The model's config as a dict: a local folder's config.json, else the loaded model's config."""
        local = Path(self.source) / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
        return self.pipeline().model.config.to_dict()

    @property
    def name(self) -> str:
        """A readable name: a Hub id as it is, a local folder by its name (not its full path)."""
        local = Path(self.source)
        return local.name if local.is_dir() else self.source

    def pipeline(self):
        if not self.available:
            raise gr.Error(self.message)
        with self._lock:
            if self._pipe is None:
                try:
                    self._pipe = _load_pipeline(self.source)
                except Exception as err:
                    self._error = f"{type(err).__name__}: {err}"
                    raise gr.Error(self.message) from err
        return self._pipe


def _load_pipeline(source: str):
    from transformers import pipeline

    try:
        from gfss_hf import pipeline_few_shot_segmentation
    except ImportError:
        # A Space without the package: the Hub repository ships the model and pipeline code.
        return pipeline("few-shot-segmentation", model=source, trust_remote_code=True)
    pipeline_few_shot_segmentation.register_pipeline()  # idempotent; importing gfss_hf registers it too
    # An exported repository names its own pipeline code in config.json (`custom_pipelines`); naming the installed
    # class runs the package's code instead of asking for trust_remote_code.
    return pipeline(
        "few-shot-segmentation",
        model=source,
        pipeline_class=pipeline_few_shot_segmentation.FewShotSegmentationPipeline,
    )


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
def _image_loader(segmenter: FewShotSegmenter | None = None):
    """The package's `load_image`, the one reader of every image (EXIF orientation of phone photos, modes, checks):
    from the installed package, else from the model repository's own copy of the image-processor code (a Space
    without the package), which is loaded with the pipeline."""
    try:
        from gfss_hf.image_processing_gfss import load_image
    except ImportError:
        if segmenter is None:
            raise
        return sys.modules[type(segmenter.pipeline().image_processor).__module__].load_image
    return load_image


def _to_rgb(image, name: str, loader=None) -> Image.Image:
    load = loader if loader is not None else _image_loader()
    try:
        # Transparent areas become white, as they look in the browser.
        image = load(image, name=name, background="white")
    except (ValueError, TypeError, OSError) as err:
        raise gr.Error(f"{name} could not be read: {err} Upload a PNG or JPEG.") from err
    if min(image.size) < 8:
        raise gr.Error(f"{name} is {image.width}x{image.height} px; use an image of at least 8x8 px.")
    return image


def painted_mask(editor_value, size: tuple[int, int] | None = None, loader=None) -> np.ndarray | None:
    """
    The painted pixels of a `gr.ImageMask` value: layer alpha > 0, over all layers.

    Args:
        editor_value (`dict` or `None`): `{"background", "layers", "composite"}` (numpy arrays, PIL images or paths).
        size (`tuple[int, int]`, *optional*): `(width, height)` of the background; layers of another size are
            resized (nearest) to it.
        loader (*optional*): the image reader (defaults to the package's `load_image`).

    Returns:
        `np.ndarray` of bool `(height, width)`, or `None` when nothing was painted.
    """
    if not editor_value:
        return None
    mask = None
    for layer in editor_value.get("layers") or []:
        if layer is None:
            continue
        if isinstance(layer, (str, os.PathLike, Image.Image)):
            # Kept in its stored mode: the alpha channel is the paint.
            image = (loader if loader is not None else _image_loader())(layer, name="paint layer", mode=None)
        else:
            image = Image.fromarray(np.asarray(layer).astype(np.uint8))
        if "A" not in image.getbands():
            continue
        alpha = image.getchannel("A")
        if size is not None and alpha.size != tuple(size):
            alpha = alpha.resize(tuple(size), Image.NEAREST)
        painted = np.asarray(alpha) > 0
        mask = painted if mask is None else (mask | painted)
    if mask is None or not mask.any():
        return None
    return mask


def _supports(editors, loader=None) -> tuple[list[Image.Image], list[np.ndarray]]:
    images, masks = [], []
    for i, value in enumerate(editors, start=1):
        if not value or value.get("background") is None:
            if value and any(layer is not None for layer in value.get("layers") or []):
                raise gr.Error(f"Support image {i} has paint but no image; upload the image first, then paint.")
            continue
        image = _to_rgb(value["background"], f"Support image {i}", loader)
        mask = painted_mask(value, image.size, loader)
        if mask is None:
            raise gr.Error(
                f"Support image {i} has no painted pixels: paint over the object of the new class with the brush "
                "(or remove the image)."
            )
        # A support painted everywhere is refused by the package's own check (one rule for every caller).
        images.append(image)
        masks.append(mask.astype(np.uint8))
    if not images:
        raise gr.Error("Add at least one support image and paint the new class on it.")
    return images, masks


def _check_class_name(class_name, known: list[str]) -> str:
    name = (class_name or "").strip()
    if not name:
        raise gr.Error("Type a name for the new class (e.g. 'star-plain').")
    if len(name) > MAX_CLASS_NAME:
        raise gr.Error(f"The class name has {len(name)} characters; use at most {MAX_CLASS_NAME}.")
    clash = [k for k in known if k.lower() == name.lower()]
    if clash:
        raise gr.Error(
            f"'{name}' is already a class of the model ({clash[0]}); choose a new name for the class you painted."
        )
    return name


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def _visualization():
    """The package's drawing helpers (`gfss_hf.visualization`), or None on a Space without the package."""
    try:
        from gfss_hf import visualization
    except ImportError:
        return None
    return visualization


def _class_ids(background: str, base: list[str], novel: str) -> dict[str, int]:
    """The id of each class in GFSS mode (background 0, base classes 1..B, the new class B + 1): a class keeps its
    colour in both modes, the colour `scripts/predict.py` gives it."""
    return {name: i for i, name in enumerate([background, *base, novel])}


def _colour_map(background: str, base: list[str], novel: str) -> dict[str, str]:
    """`{class name: "#rrggbb"}` from the package's palette; `{}` without the package (gradio picks colours)."""
    vis = _visualization()
    if vis is None:
        return {}
    return {
        name: "#{:02x}{:02x}{:02x}".format(*rgb) for _, name, rgb in vis.legend_entries([background, *base, novel])
    }


def _segments(output) -> list[dict]:
    """The `{"label", "score", "mask"}` list of one query (the pipeline returns a dict with `return_label_map`, and
    a list per query for a list of queries)."""
    if isinstance(output, dict):
        output = output["segments"]
    if output and isinstance(output[0], list):
        output = output[0]
    return list(output)


def _mask_tile(query: Image.Image, mask: np.ndarray, class_id: int) -> np.ndarray:
    """The query dimmed, with the class's pixels blended with its colour (`gfss_hf.visualization.overlay`; kept
    bright without the package): readable however the gallery crops it."""
    image = np.asarray(query, dtype=np.float32)
    vis = _visualization()
    shown = image if vis is None else np.asarray(vis.overlay(query, mask.astype(np.uint8) * class_id, alpha=0.65))
    return np.where(mask[..., None], shown, (image * 0.3).round()).astype(np.uint8)


def _swatch(colour: str | None) -> str:
    return f'<span style="color:{colour}">&#9632;</span> ' if colour else ""


def segment(segmenter: FewShotSegmenter, query, supports, class_name, mode="GFSS", gamma=10.0, steps=100):
    """
    Run one few-shot episode: validate the inputs, adapt, and build the outputs of the app.

    Args:
        segmenter ([`FewShotSegmenter`]): the model.
        query: the query image (PIL, numpy or path).
        supports (`list`): `gr.ImageMask` values (`None` for unused slots).
        class_name (`str`): name of the painted class.
        mode (`str`, *optional*, defaults to `"GFSS"`): `"GFSS"` or `"FSS"`.
        gamma (`float`, *optional*, defaults to 10): distillation weight (GFSS).
        steps (`int`, *optional*, defaults to 100): SGD steps of the classifier.

    Returns:
        `(annotated, gallery, legend)`: the `gr.AnnotatedImage` value, the per-class masks and the legend markdown.
    """
    if not segmenter.available:
        raise gr.Error(segmenter.message)
    if query is None:
        raise gr.Error("Upload or pick a query image.")
    loader = _image_loader(segmenter)
    query = _to_rgb(query, "The query image", loader)
    background, base = segmenter.class_names()
    name = _check_class_name(class_name, [background, *base])
    images, masks = _supports(supports, loader)
    mode = str(mode).lower()
    if mode not in ("gfss", "fss"):
        raise gr.Error(f"Mode {mode!r} is unknown; choose GFSS or FSS.")
    try:
        gamma = float(gamma)
        steps = int(steps)
    except (TypeError, ValueError) as err:
        raise gr.Error(f"gamma and steps must be numbers ({err}).") from err
    if not 0.0 <= gamma <= 100.0:
        raise gr.Error(f"gamma={gamma} is out of range; use a value between 0 and 100 (10 in the paper).")
    if not 1 <= steps <= 1000:
        raise gr.Error(f"steps={steps} is out of range; use 1 to 1000 (100 in the paper).")

    pipe = segmenter.pipeline()
    kwargs = dict(support_images=images, support_masks=masks, class_names=[name], mode=mode, steps=steps)
    if mode == "gfss":
        kwargs["gamma"] = gamma
    try:
        segments = _segments(pipe(query, **kwargs))
    except MemoryError as err:
        raise gr.Error(
            f"The server ran out of memory on the {query.width}x{query.height} query; upload a smaller image."
        ) from err
    except (ValueError, TypeError, RuntimeError) as err:
        # The package's messages name the bad input and the fix; a RuntimeError (e.g. torch failing to allocate)
        # is shown too rather than a raw traceback that the user never sees.
        raise gr.Error(f"{type(err).__name__ if isinstance(err, RuntimeError) else 'Invalid input'}: {err}") from err

    colours = _colour_map(background, base, name)
    ids = _class_ids(background, base, name)
    annotations, gallery, rows = [], [], []
    total = query.width * query.height
    for seg in segments:
        label = str(seg["label"])
        mask = np.asarray(seg["mask"].convert("L") if isinstance(seg["mask"], Image.Image) else seg["mask"]) > 0
        if label == background or not mask.any():
            continue
        kind = "novel" if label == name else "base"
        score = seg.get("score")
        annotations.append((mask.astype(np.float32), label))
        gallery.append((_mask_tile(query, mask, ids.get(label, 0)), f"{label} ({kind})"))
        share = 100.0 * mask.sum() / total
        score_text = f"{score:.2f}" if isinstance(score, (int, float)) else "-"
        cell = label.replace("|", "\\|")  # a class name must not split the table row
        rows.append(f"| {_swatch(colours.get(label))}{cell} | {kind} | {share:.1f} % | {score_text} |")
    novel_found = any(label == name for _, label in annotations)
    legend = [
        f"**Novel class:** {_swatch(colours.get(name))}{name} " + ("" if novel_found else "(not found in the query)"),
        "",
        f"**Base classes of the model:** {', '.join(base) if base else '(none)'}"
        + (" (not predicted in FSS mode)" if mode == "fss" else ""),
        "",
    ]
    if rows:
        legend += ["| Class | Kind | Share of the image | Score |", "|---|---|---:|---:|", *rows]
    else:
        legend.append("Nothing but background was found in the query.")
    annotated = (query, annotations)
    return annotated, gallery, "\n".join(legend)


# ---------------------------------------------------------------------------------------------------------------
# app
# ---------------------------------------------------------------------------------------------------------------
def _intro(segmenter: FewShotSegmenter, examples=()) -> str:
    """What the model knows, in a few lines: its name, the data it was pre-trained on, its base classes, and that the
    class you paint is the novel one (the examples' classes it never saw are named)."""
    if not segmenter.available:
        return f"> **{segmenter.message}**"
    try:
        config = segmenter.config()
        _, base = segmenter.class_names()
    except gr.Error:
        return f"> **{segmenter.message}**"
    except Exception:  # a Hub id whose config cannot be read yet: loaded at the first run
        return f"**Model:** `{segmenter.name}`."
    dataset, fold = config.get("dataset"), config.get("fold")
    trained = f", pre-trained on the `{dataset}` dataset" if dataset else ""
    trained += f", fold {fold}" if dataset and fold is not None else ""
    lines = [
        f"**Model:** `{segmenter.name}`{trained}.",
        f"**Base classes** (known, {len(base)}): {', '.join(base) if base else '(none)'}.",
        "**Novel class:** the one you paint and name.",
    ]
    unseen = [name for name, _ in examples if name.lower() not in {b.lower() for b in base}]
    if unseen:
        lines[-1] += f" The examples' classes ({', '.join(unseen)}) are novel to it."
    return "  \n".join(lines)


def build_app(
    model: str | os.PathLike | None = None, examples_dir: str | os.PathLike | None = None, default_steps: int = 100
) -> gr.Blocks:
    """
    Build the Gradio app without launching it.

    Args:
        model (`str` or `os.PathLike`, *optional*): a `save_pretrained` folder or a Hub id; defaults to
            [`default_model_source`].
        examples_dir (`str` or `os.PathLike`, *optional*): folder of the examples (default: `examples/` next to this
            file, written by `scripts/render_space_examples.py`).
        default_steps (`int`, *optional*, defaults to 100): initial value of the adaptation-steps slider.

    Returns:
        `gr.Blocks`; its `segment` endpoint takes (query, support 1, support 2, support 3, class name, mode, gamma,
        steps).

    Example:

    ```python
    >>> demo = build_app("demo_output/model_ce")  # doctest: +SKIP
    >>> demo.launch()  # doctest: +SKIP
    ```
    """
    source = os.fspath(model) if model is not None else default_model_source()
    segmenter = FewShotSegmenter(source)
    examples = load_examples(examples_dir if examples_dir is not None else EXAMPLES_DIR)
    brush = gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed", default_size=12)

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\n"
            "Paint a new class on one or more **support** images, give it a name, and segment the **query**: the "
            "model fine-tunes only its classifier on your painted pixels (a few seconds), then predicts its base "
            "classes plus your class (GFSS), or your class versus background (FSS). Method: *Towards Generalized "
            "Few-shot Segmentation: On Contrastive Learning and Background Information Modeling* (Liu, Zhang and "
            "Lu, 2022)."
        )
        gr.Markdown(_intro(segmenter, examples), elem_id="model-status")
        with gr.Row():
            with gr.Column():
                query = gr.Image(label="Query image", type="pil", sources=["upload", "clipboard"], elem_id="query")
                class_name = gr.Textbox(
                    label="New class name", placeholder="e.g. star-plain", max_lines=1, elem_id="class-name"
                )
                mode = gr.Radio(
                    ["GFSS", "FSS"],
                    value="GFSS",
                    label="Mode",
                    elem_id="mode",
                    info="GFSS: base classes + the new class. FSS: the new class vs background.",
                )
                gamma = gr.Slider(
                    0, 50, value=10, step=0.5, label="gamma (distillation weight, GFSS)", elem_id="gamma"
                )
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(
                        1, 300, value=default_steps, step=1, label="Adaptation steps (SGD)", elem_id="steps"
                    )
            with gr.Column():
                support_inputs = [
                    gr.ImageMask(
                        label="Support image 1: paint the new class",
                        type="pil",
                        brush=brush,
                        sources=["upload", "clipboard"],
                        elem_id="support-1",
                    )
                ]
                with gr.Accordion("More shots (optional)", open=False):
                    for i in range(2, MAX_SUPPORTS + 1):
                        support_inputs.append(
                            gr.ImageMask(
                                label=f"Support image {i}",
                                type="pil",
                                brush=brush,
                                sources=["upload", "clipboard"],
                                elem_id=f"support-{i}",
                            )
                        )
        if examples:
            gr.Examples(
                examples=[
                    [
                        str(p["query"]),
                        {
                            "background": str(p["support"]),
                            "layers": [str(p["layer"])],
                            "composite": str(p["composite"]),
                        },
                        name,
                        "GFSS",
                        10,
                    ]
                    for name, p in examples
                ],
                inputs=[query, support_inputs[0], class_name, mode, gamma],
                label="Examples from the procedural dataset (classes the demo model never saw)",
                elem_id="examples",
            )
        run = gr.Button("Segment", variant="primary", elem_id="run")
        with gr.Row():
            overlay = gr.AnnotatedImage(label="Prediction (hover the legend)", elem_id="overlay")
            masks = gr.Gallery(
                label="Per-class masks", columns=3, height="auto", object_fit="contain", preview=False, elem_id="masks"
            )
        legend = gr.Markdown(elem_id="legend")

        def _run(query_image, s1, s2, s3, name, mode_value, gamma_value, steps_value):
            annotated, gallery, text = segment(
                segmenter, query_image, [s1, s2, s3], name, mode_value, gamma_value, steps_value
            )
            colours = _colour_map(*segmenter.class_names(), (name or "").strip())
            return gr.AnnotatedImage(value=annotated, color_map=colours or None), gallery, text

        run.click(
            _run,
            inputs=[query, *support_inputs, class_name, mode, gamma, steps],
            outputs=[overlay, masks, legend],
            api_name="segment",
        )
    demo.segmenter = segmenter
    return demo


demo = build_app()

if __name__ == "__main__":
    demo.launch()
