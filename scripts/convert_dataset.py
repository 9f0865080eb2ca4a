"""Convert an annotated dataset into the folder layout that `--dataset folder` reads (see docs/README_own_data.md).

    # COCO instance JSON (any year, any category set)
    python scripts/convert_dataset.py coco --data_dir /data/coco --year 2017 --output_dir my_data
    python scripts/convert_dataset.py coco --train_json ann/train.json --train_images imgs/train \
        --val_json ann/val.json --val_images imgs/val --output_dir my_data --classes cat dog --num_folds 2

    # Ultralytics YOLO segmentation polygons (images/<split>/ + labels/<split>/, names from data.yaml)
    python scripts/convert_dataset.py yolo --data_dir my_yolo --output_dir my_data

    # index label images: CamVid (no background class: class k -> k + 1, void 11 -> 255)
    python scripts/convert_dataset.py index --data_dir /data/CamVid --preset camvid --output_dir camvid_folder
    # Cityscapes labelIds with a mapping (values not listed -> 255)
    python scripts/convert_dataset.py index --data_dir /data/cityscapes --mapping 7=road 24=person 26=car \
        --output_dir city_folder

Common options: `--classes A B` keeps these classes (in this order; the others become background, or ignore with
`--unselected ignore`), `--rename old=new`, `--num_folds K` or `--folds "a,b" "c"` (novel classes per fold).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gfss_hf.data.convert import (
    CAMVID_CLASSES,
    CAMVID_VOID,
    coco_samples,
    index_mask_samples,
    write_folder_dataset,
    yolo_samples,
)


def _pairs(items, flag, value_type=str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{flag} {item!r} is not of the form key=value (e.g. {flag} 7=road).")
        out[value_type(key) if flag == "--mapping" else key] = value
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output_dir", required=True, help="the folder dataset to write (new or empty)")
    common.add_argument("--classes", nargs="+", default=None, help="source class names to keep, in output order")
    common.add_argument("--rename", nargs="+", default=None, metavar="OLD=NEW")
    common.add_argument(
        "--unselected", default="background", choices=["background", "ignore"], help="what the classes not kept become"
    )
    folds = common.add_mutually_exclusive_group()
    folds.add_argument("--num_folds", type=int, default=None, help="default: min(4, number of classes - 1)")
    folds.add_argument(
        "--folds",
        nargs="+",
        default=None,
        metavar="A,B",
        help="novel classes of each fold, comma-separated output names",
    )
    common.add_argument("--dataset_name", default=None, help="the 'dataset' entry of classes.json")
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    common.add_argument("--no_progress", action="store_true")

    coco = sub.add_parser("coco", parents=[common], help="COCO instance JSON")
    coco.add_argument("--data_dir", help="COCO root: annotations/instances_<split><year>.json + <split><year>/")
    coco.add_argument("--year", default=None, help="with --data_dir: 2014, 2017, ... (default: the one present)")
    for split in ("train", "val"):
        coco.add_argument(f"--{split}_json", default=None)
        coco.add_argument(f"--{split}_images", default=None)
    coco.add_argument("--crowd_to_ignore", action="store_true", help="crowd regions still background -> 255")

    yolo = sub.add_parser("yolo", parents=[common], help="Ultralytics YOLO segmentation labels")
    yolo.add_argument("--data_dir", required=True, help="folder with images/ + labels/ (and data.yaml)")
    yolo.add_argument("--data_yaml", default=None, help="default: DATA_DIR/data.yaml when present")
    yolo.add_argument("--names", nargs="+", default=None, help="class names in index order (without a data.yaml)")

    index = sub.add_parser("index", parents=[common], help="index label images (CamVid-like, Cityscapes-like)")
    index.add_argument("--data_dir", required=True)
    index.add_argument("--layout", default=None, choices=["camvid", "cityscapes"], help="default: detected")
    index.add_argument(
        "--preset", default=None, choices=["camvid"], help="camvid: the 11 class names, void 11, no background class"
    )
    index.add_argument("--names", nargs="+", default=None, help="class names by value")
    index.add_argument(
        "--no_background",
        action="store_true",
        help="with --names: value k is names[k] (written as k + 1); 0 never occurs in the output",
    )
    index.add_argument("--void", nargs="+", type=int, default=[], help="values that become 255 (ignore)")
    index.add_argument(
        "--mapping",
        nargs="+",
        default=None,
        metavar="VALUE=NAME",
        help="value -> class name (Cityscapes labelIds); 'background' maps to 0",
    )
    index.add_argument(
        "--unlisted",
        default="ignore",
        choices=["ignore", "background"],
        help="with --mapping: what values not listed become",
    )
    return parser.parse_args(sys.argv[1:] if argv is None else argv)


def _coco_splits(args) -> dict:
    splits = {}
    if args.data_dir:
        root = Path(args.data_dir)
        for split in ("train", "val"):
            pattern = f"instances_{split}{args.year or '*'}.json"
            found = sorted((root / "annotations").glob(pattern))
            if found:
                year = found[-1].stem[len(f"instances_{split}") :]
                splits[split] = (found[-1], root / f"{split}{year}")
        if not splits:
            raise SystemExit(
                f"no annotations/instances_<split><year>.json under {str(root)!r}; give the COCO root or "
                "--train_json/--train_images."
            )
    for split in ("train", "val"):
        ann, images = getattr(args, f"{split}_json"), getattr(args, f"{split}_images")
        if bool(ann) != bool(images):
            raise SystemExit(f"--{split}_json and --{split}_images go together: the JSON and its image folder.")
        if ann:
            splits[split] = (ann, images)
    if not splits:
        raise SystemExit("coco needs --data_dir, or --train_json with --train_images (and optionally val).")
    return splits


def main(argv=None):
    args = parse_args(argv)
    has_background = True
    if args.format == "coco":
        names, samples = coco_samples(_coco_splits(args), crowd_to_ignore=args.crowd_to_ignore)
    elif args.format == "yolo":
        names, samples = yolo_samples(args.data_dir, names=args.names, data_yaml=args.data_yaml)
    else:
        mapping = _pairs(args.mapping, "--mapping", int) if args.mapping else None
        class_names, void, has_background = args.names, args.void, not args.no_background
        if args.preset == "camvid":
            if args.names or args.mapping:
                raise SystemExit("--preset camvid sets the class names; drop --names / --mapping.")
            class_names, void, has_background = list(CAMVID_CLASSES), [CAMVID_VOID, *args.void], False
        names, samples = index_mask_samples(
            args.data_dir,
            names=class_names,
            mapping=mapping,
            has_background=has_background,
            void=void,
            unlisted=args.unlisted,
            layout=args.layout,
        )
    result = write_folder_dataset(
        args.output_dir,
        names,
        samples,
        classes=args.classes,
        rename=_pairs(args.rename, "--rename"),
        unselected=args.unselected,
        num_folds=args.num_folds,
        folds=[f.split(",") for f in args.folds] if args.folds else None,
        dataset_name=args.dataset_name,
        # A class left out becomes background: value 0 then occurs even in a dataset without a background class.
        has_background=has_background or (args.classes is not None and args.unselected == "background"),
        source_format=args.format,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    total = sum(sum(c.values()) for c in result.pixel_counts.values())
    print(
        f"wrote {result.output_dir}: {len(result.pixel_counts)} images ({len(result.train_ids)} train, "
        f"{len(result.val_ids)} val), {len(result.names)} classes"
    )
    for k, name in enumerate(result.names, start=1):
        pixels = sum(c.get(k, 0) for c in result.pixel_counts.values())
        print(f"  {k:3d} {name}: {100 * pixels / max(total, 1):.2f} % of pixels")
    for message in result.warnings:
        print(f"warning: {message}")
    return result


if __name__ == "__main__":
    main()
