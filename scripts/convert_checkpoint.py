"""Convert a released PSPNet checkpoint (semseg, PFENet, RePRI, CWT, BAM, DIaM, BCM, CAPL, POP) or a deep-stem
ImageNet ResNet-50 into a `save_pretrained` folder of gfss_hf: model + image processor (the source's input size and
padding) + a model card recording the source, its licence and the conversion report.

Usage:

```bash
# RePRI / DIaM / BCM / CWT base learner (layout "repri"), PASCAL-5i fold 0
python scripts/convert_checkpoint.py --checkpoint model_ckpt/pascal/split0/pspnet_resnet50/best.pth \\
    --dataset pascal5i --fold 0 --output_dir converted/repri-pascal5i-fold0
# a DIaM file (same layout, DIaM's licence and geometry in the card)
python scripts/convert_checkpoint.py --checkpoint model.pth --dataset coco20i --fold 2 --source diam \\
    --output_dir converted/diam-coco20i-fold2
# semseg's ImageNet backbone (no fold needed)
python scripts/convert_checkpoint.py --checkpoint initmodel/resnet50_v2.pth --output_dir converted/resnet50_v2
```

The layout is detected from the key names (`--layout` forces one); see docs/README_conversion.md for every source.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gfss_hf.conversion import LAYOUTS, SOURCES, convert_checkpoint, save_converted
from gfss_hf.data.splits import SPLIT_DATASETS
from gfss_hf.image_processing_gfss import MIN_IMAGE_SIZE

logger = logging.getLogger("convert_checkpoint")


def _image_size(text: str) -> int:
    # 0 used to fall through `image_size or default` and be ignored without a word.
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a usable canvas size: give an integer >= {MIN_IMAGE_SIZE} (e.g. 473), or omit "
            "--image_size to keep the source's evaluation size"
        )
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="the released file (.pth / .pt / .tar / .safetensors)")
    parser.add_argument(
        "--dataset",
        choices=SPLIT_DATASETS,
        help="fold table naming the classifier rows (required except for ImageNet backbones)",
    )
    parser.add_argument("--fold", type=int, help="the fold the checkpoint was trained on")
    parser.add_argument(
        "--split_kind", help="COCO-20i split: interleaved (default, every released file) or consecutive"
    )
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="key layout (default: detect)")
    parser.add_argument(
        "--source",
        choices=sorted(SOURCES),
        help="repository the file comes from (licence, input size and padding); default: the layout's main one",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--image_size", type=_image_size, help="override the source's evaluation size (>= 8)")
    parser.add_argument("--pad_mode", choices=("zero", "mean"), help="override the source's canvas padding")
    parser.add_argument("--dilation_style", choices=("pspnet", "timm"), help="override the layout's dilation")
    parser.add_argument(
        "--class_names", nargs="+", help="one name per classifier row, background first (full-dataset models)"
    )
    parser.add_argument(
        "--capl_prototype_classifier",
        action="store_true",
        help="CAPL only: initialise a biased linear classifier from CAPL's prototypes (lossy)",
    )
    parser.add_argument("--non_strict", action="store_true", help="list unknown tensors instead of refusing the file")
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="read files that need full unpickling (weights_only=False): can run code, only for trusted files",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, report = convert_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        fold=args.fold,
        layout=args.layout,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
        split_kind=args.split_kind,
        source=args.source,
        class_names=args.class_names,
        image_size=args.image_size,
        pad_mode=args.pad_mode,
        dilation_style=args.dilation_style,
        capl_prototype_classifier=args.capl_prototype_classifier,
        strict=not args.non_strict,
    )
    logger.info(report.summary())
    output_dir = save_converted(model, report, args.output_dir, overwrite=args.overwrite)
    logger.info(f"wrote {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
