"""Render the examples of the Gradio Space (`spaces/examples/`) from the procedural dataset.

Each example is a class that is novel in fold 0, so the `make demo` model (pre-trained on the base classes of fold 0)
never saw it: a query, a support, the support's paint layer (RGBA, alpha = the class mask, as `gr.ImageMask` gives
it), the support with the paint on top, and `examples.json` naming the class and the files. The PNGs are committed
so that a Space without `gfss_hf` shows them; `tests/spaces/test_app.py` checks that they are what this script
renders.

Usage: python scripts/render_space_examples.py [--out spaces/examples]
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from gfss_hf._io import atomic_write_bytes, atomic_write_text
from gfss_hf.data.splits import SYNTHETIC_CLASSES, get_split
from gfss_hf.data.synthetic import VAL_INDEX_OFFSET, render_sample

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "spaces" / "examples"
# The support is the first val image where the class covers >= 5 % of the image, the query the next one where it
# covers >= 3 % next to at least one base class: a query where base and novel classes compete.
EXAMPLE_CLASSES = ("star-plain", "cross-dotted", "circle-plain")
EXAMPLE_SEED = 0
EXAMPLE_SIZE = 160
EXAMPLE_FOLD = 0
# The Space's brush colour, so that an example looks as if painted in the app (only the alpha is the mask).
PAINT_COLOUR = (0xFF, 0x2D, 0x7A)
_SUPPORT_SHARE, _QUERY_SHARE, _SEARCH_LIMIT = 0.05, 0.03, 500


def find_example_indices(class_name: str, fold: int = EXAMPLE_FOLD) -> tuple[int, int]:
    """(support, query) val indices of the procedural dataset for one example class."""
    class_id = SYNTHETIC_CLASSES.index(class_name) + 1
    base_ids = set(get_split("synthetic", fold).base_ids)
    support = None
    for i in range(_SEARCH_LIMIT):
        _, label = render_sample(EXAMPLE_SEED, VAL_INDEX_OFFSET + i, EXAMPLE_SIZE)
        share = np.bincount(label.ravel(), minlength=256) / label.size
        if support is None and share[class_id] >= _SUPPORT_SHARE:
            support = i
        elif (
            support is not None and share[class_id] >= _QUERY_SHARE and any(share[b] >= _QUERY_SHARE for b in base_ids)
        ):
            return support, i
    raise RuntimeError(f"no support/query pair for {class_name!r} in the first {_SEARCH_LIMIT} val images.")


def example_truth(class_name: str) -> np.ndarray:
    """
    The ground truth of an example: the pixels of `class_name` in its query, what segmenting the example should
    find (`scripts/space_screenshot.py` scores the model's prediction against it).

    Returns:
        `np.ndarray` of bool `(EXAMPLE_SIZE, EXAMPLE_SIZE)`.
    """
    _, query_index = find_example_indices(class_name)
    _, label = render_sample(EXAMPLE_SEED, VAL_INDEX_OFFSET + query_index, EXAMPLE_SIZE)
    return label == SYNTHETIC_CLASSES.index(class_name) + 1


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def render_examples(folder: str | os.PathLike = EXAMPLES_DIR) -> list[dict[str, Path]]:
    """
    Write the example PNGs and `examples.json` into `folder` (each file atomically).

    Returns:
        `list[dict[str, Path]]`: per example, the paths of `query`, `support`, `layer` and `composite`.
    """
    folder = Path(folder)
    manifest, out = [], []
    for i, name in enumerate(EXAMPLE_CLASSES):
        support_index, query_index = find_example_indices(name)
        query, _ = render_sample(EXAMPLE_SEED, VAL_INDEX_OFFSET + query_index, EXAMPLE_SIZE)
        support, label = render_sample(EXAMPLE_SEED, VAL_INDEX_OFFSET + support_index, EXAMPLE_SIZE)
        mask = label == SYNTHETIC_CLASSES.index(name) + 1
        layer = np.zeros((*mask.shape, 4), dtype=np.uint8)
        layer[mask] = (*PAINT_COLOUR, 255)
        composite = support.copy()
        composite[mask] = PAINT_COLOUR
        files = {
            "query": f"example{i}_query.png",
            "support": f"example{i}_support.png",
            "layer": f"example{i}_support_paint.png",
            "composite": f"example{i}_support_composite.png",
        }
        for key, array in (("query", query), ("support", support), ("layer", layer), ("composite", composite)):
            atomic_write_bytes(folder / files[key], _png(array))
        manifest.append({"class_name": name, **files})
        out.append({key: folder / file for key, file in files.items()})
    atomic_write_text(folder / "examples.json", json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(EXAMPLES_DIR), help="folder of the examples (default: spaces/examples)")
    args = parser.parse_args(argv)
    for paths in render_examples(args.out):
        print(*(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
