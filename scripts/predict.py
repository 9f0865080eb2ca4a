"""Segment query images with a GFSS model, after learning new classes ONCE from a few annotated supports.

    # new classes from supports (binary masks: 0 background, 1 or 255 object), then every image of a folder
    python scripts/predict.py MODEL --support_images a.jpg b.jpg --support_masks a.png b.png \
        --class_names zebra zebra --queries photos/ --output_dir predictions/

    # the model's own classes (base + classes persisted before): no support arguments
    python scripts/predict.py MODEL --queries "photos/*.jpg" --output_dir predictions/

Per query `<name>_label.png` (palette PNG: its pixel values are the class ids of `predictions.json`, and viewers
show the colours of `gfss_hf.visualization`) and `<name>_overlay.png` (the image with the classes blended in and
a legend), plus one `predictions.json`: per query the classes present with their pixel areas and mean scores, the
id -> name table, and the settings. Fine-tuning options are the fields of `gfss_hf.adaptation.AdaptationConfig`
(`--steps`, `--lr`, `--gamma`, `--seed`, ...). `--persist_to DIR` saves a model that keeps the learned classes
(GFSS mode), which this script and `pipeline("few-shot-segmentation")` then use without supports.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import pipeline

import gfss_hf
from gfss_hf import FewShotSegmentationPipeline
from gfss_hf._io import atomic_folder, atomic_write_bytes, ensure_writable_dir
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.data.folder import IMAGE_EXTENSIONS
from gfss_hf.image_processing_gfss import load_image
from gfss_hf.visualization import draw_legend, overlay, palette_image

# The field of AdaptationConfig that is not a fine-tuning option: the method is --mode.
_NOT_OPTIONS = ("method",)
_GLOB_CHARS = set("*?[")


def adaptation_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(AdaptationConfig) if f.name not in _NOT_OPTIONS]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a save_pretrained folder or a Hub id (model + image processor)")
    parser.add_argument(
        "--queries",
        nargs="+",
        required=True,
        help="query images: files, folders (every image in them) or quoted glob patterns",
    )
    parser.add_argument("--output_dir", required=True, help="where the PNGs and predictions.json are written")
    sup = parser.add_argument_group("supports (omit all three to segment the model's own classes)")
    sup.add_argument("--support_images", nargs="+", default=None)
    sup.add_argument("--support_masks", nargs="+", default=None, help="one mask per support image, same order")
    sup.add_argument(
        "--class_names",
        nargs="+",
        default=None,
        help="binary masks: the class of each support (or one name for all); label maps: the names of the values 1..N",
    )
    sup.add_argument("--mask_type", default="binary", choices=["binary", "label_map"])
    sup.add_argument(
        "--mode",
        default="gfss",
        choices=["gfss", "fss"],
        help="gfss: the model's classes + the new ones; fss: each new class against background",
    )
    sup.add_argument(
        "--persist_to",
        default=None,
        help="save a model that keeps the learned classes here (gfss; a new or empty folder)",
    )
    tune = parser.add_argument_group("fine-tuning (fields of gfss_hf.adaptation.AdaptationConfig)")
    for field in adaptation_fields():
        default = field.default
        flag = f"--{field.name}"
        if isinstance(default, bool):
            tune.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=f"(default: {default})"
            )
        else:
            kind = type(default) if default is not None else str
            tune.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    out = parser.add_argument_group("output")
    out.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlays")
    out.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the pipeline's choice)")
    out.add_argument("--no_progress", action="store_true")
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def find_queries(patterns: list[str]) -> list[Path]:
    """Files named by `patterns` (a file, a folder = its images, or a glob), in order, each once."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            hits = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            hits = [path]
        elif _GLOB_CHARS & set(pattern):
            hits = sorted(
                Path(p)
                for p in glob.glob(str(path), recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS
            )
        else:
            raise SystemExit(f"--queries {pattern!r} is neither a file, a folder nor a glob pattern; check the path.")
        if not hits:
            raise SystemExit(
                f"no query image found for --queries {pattern!r} (looked for {', '.join(IMAGE_EXTENSIONS)}); give a "
                "folder of images, an image file or a glob such as 'photos/*.jpg' (quoted)."
            )
        found.extend(hits)
    # Each file once (a folder and a glob may both name it), under the path it was given by.
    seen, unique = set(), []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path.absolute())
    return unique


def output_names(queries: list[Path]) -> list[str]:
    """A distinct output stem per query: the file's stem, numbered when two queries share one."""
    seen: dict[str, int] = {}
    names = []
    for query in queries:
        stem = query.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}_{count}")
    return names


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before the model is loaded, arguments that cannot work together."""
    given = {k: getattr(args, k) for k in ("support_images", "support_masks", "class_names")}
    if any(v is not None for v in given.values()) and not all(v is not None for v in given.values()):
        missing = [f"--{k}" for k, v in given.items() if v is None]
        raise SystemExit(
            f"{', '.join(missing)} missing: learning classes needs --support_images, --support_masks and "
            "--class_names together (or none of them, to segment the model's own classes)."
        )
    if args.support_images is not None:
        images, masks, names = args.support_images, args.support_masks, args.class_names
        if len(images) != len(masks):
            raise SystemExit(
                f"{len(images)} --support_images but {len(masks)} --support_masks; give one mask per "
                "image, in the same order."
            )
        if args.mask_type == "binary" and len(names) not in (1, len(images)):
            raise SystemExit(
                f"{len(names)} --class_names for {len(images)} supports; with binary masks give one class name per "
                "support (repeat a name for several shots of a class) or a single name for all."
            )
        for path in [*images, *masks]:
            if not Path(path).is_file():
                raise SystemExit(f"support file {path!r} does not exist; check the path.")
    elif args.persist_to:
        raise SystemExit(
            "--persist_to saves learned classes, but no supports were given; add --support_images, "
            "--support_masks and --class_names."
        )
    if args.persist_to and args.mode != "gfss":
        raise SystemExit("--persist_to keeps learned classes in the model's classifier, which needs --mode gfss.")
    if args.persist_to:
        target = Path(args.persist_to)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise SystemExit(
                f"--persist_to {str(target)!r} exists and is not an empty folder; give a new folder so "
                "that no model is overwritten."
            )
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"--alpha {args.alpha} must be in [0, 1].")
    try:
        ensure_writable_dir(args.output_dir, "--output_dir")
    except OSError as err:
        raise SystemExit(str(err)) from err


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_model_atomically(pipe, target: Path) -> None:
    """`pipe.save_pretrained` into a temporary sibling folder renamed into place: never a half-written model."""
    with atomic_folder(target) as tmp:
        pipe.save_pretrained(tmp)


def predict_function(args: argparse.Namespace) -> dict:
    check_args(args)
    queries = find_queries(args.queries)
    options = {f.name: getattr(args, f.name) for f in adaptation_fields()}
    adaptation = AdaptationConfig(method=args.mode, **options)  # validates the options before the model is loaded
    kwargs = {"device": args.device} if args.device else {}
    pipe = pipeline("few-shot-segmentation", model=args.model, pipeline_class=FewShotSegmentationPipeline, **kwargs)
    learned = None
    if args.support_images is not None:
        names = args.class_names[0] if args.mask_type == "binary" and len(args.class_names) == 1 else args.class_names
        learned = pipe.learn(
            support_images=args.support_images,
            support_masks=args.support_masks,
            class_names=names,
            mask_type=args.mask_type,
            mode=args.mode,
            persist=bool(args.persist_to),
            **options,
        )
        if args.persist_to:
            save_model_atomically(pipe, Path(args.persist_to))

    out = Path(args.output_dir)
    records, id2label = [], None
    for query, name in zip(tqdm(queries, desc="queries", disable=args.no_progress), output_names(queries)):
        image = load_image(query, name=f"query {str(query)!r}")  # read once, EXIF applied, for both uses
        result = pipe(image, learned=learned, return_label_map=True)
        label_map, id2label = result["label_map"], result["id2label"]
        label_file, overlay_file = f"{name}_label.png", f"{name}_overlay.png"
        atomic_write_bytes(out / label_file, _png_bytes(palette_image(label_map)))
        picture = draw_legend(overlay(image, label_map, alpha=args.alpha), id2label, label_map)
        atomic_write_bytes(out / overlay_file, _png_bytes(picture))
        scores = {s["label"]: s["score"] for s in result["segments"]}
        ids, counts = (v.tolist() for v in np.unique(label_map, return_counts=True))
        records.append(
            {
                "file": str(query),
                "label_map": label_file,
                "overlay": overlay_file,
                "height": int(label_map.shape[0]),
                "width": int(label_map.shape[1]),
                "classes": [
                    {
                        "id": i,
                        "label": id2label[i],
                        "pixels": n,
                        "area": round(n / label_map.size, 6),
                        "score": scores.get(id2label[i]),
                    }
                    for i, n in zip(ids, counts)
                ],
            }
        )
    payload = {
        "gfss_hf_version": gfss_hf.__version__,
        "model": args.model,
        "id2label": {str(k): v for k, v in id2label.items()},
        "settings": {
            "mode": args.mode if learned is not None else "model",
            "supports": None
            if learned is None
            else [{"image": i, "mask": m} for i, m in zip(args.support_images, args.support_masks)],
            "class_names": args.class_names,
            "mask_type": args.mask_type,
            "adaptation": dataclasses.asdict(adaptation) if learned is not None else None,
            "persist_to": args.persist_to,
            "alpha": args.alpha,
        },
        "queries": records,
    }
    atomic_write_bytes(out / "predictions.json", (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    return payload


def main(argv=None) -> dict:
    args = parse_args(argv)
    payload = predict_function(args)
    print(
        f"{len(payload['queries'])} queries segmented into {len(payload['id2label'])} classes; "
        f"wrote {args.output_dir}/predictions.json"
    )
    return payload


if __name__ == "__main__":
    main()
