"""Save a grid of procedural-dataset samples (image above, coloured label below) to docs/synthetic_examples.png.

Usage: python scripts/render_synthetic_examples.py [--out docs/synthetic_examples.png] [--seed 0] [--num 8]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gfss_hf.data.synthetic import DEFAULT_IMAGE_SIZE, SYNTHETIC_CLASSES, render_sample  # noqa: E402


def label_to_colour(label: np.ndarray) -> np.ndarray:
    """A fixed colour per class id (0 black, 255 white)."""
    palette = (plt.get_cmap("tab20")(np.arange(20))[:, :3] * 255).astype(np.uint8)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[1:21] = palette
    lut[255] = 255
    return lut[label]


def render_grid(out: str, seed: int = 0, num: int = 8, image_size: int = DEFAULT_IMAGE_SIZE) -> None:
    fig, axes = plt.subplots(2, num, figsize=(2.0 * num, 5.0))
    for i in range(num):
        image, label = render_sample(seed, i, image_size)
        names = sorted({SYNTHETIC_CLASSES[c - 1] for c in np.unique(label) if 0 < c < 255})
        axes[0, i].imshow(image)
        axes[1, i].imshow(label_to_colour(label))
        axes[1, i].set_title("\n".join(names), fontsize=7)
        axes[0, i].set_title(f"train-{i:06d}", fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/synthetic_examples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    args = parser.parse_args()
    render_grid(args.out, args.seed, args.num, args.image_size)


if __name__ == "__main__":
    main()
