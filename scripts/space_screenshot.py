"""Take the README's picture of the Space (`docs/space_screenshot.png`) from a given model, on an example it gets
right.

The Space (`spaces/app.py`) is built in-process on `--model`; every example of `spaces/examples/` is segmented
through the app's own `segment` (GFSS, the page's defaults), and the new class's predicted mask is scored against
the example's ground truth (IoU, from `scripts/render_space_examples.py`). The chosen example (`--pick best`: the
highest IoU; or `--example N`) must reach `--min_iou`; headless Chromium then opens the page, clicks that example,
presses Segment, checks that the page shows the prediction that was scored, and the full page is written to
`--output` atomically (a temporary file, then `os.replace`).

Usage:
    python scripts/space_screenshot.py --model demo_output/model_ce --output docs/space_screenshot.png
    python scripts/space_screenshot.py --model demo_output/model_ce --output /tmp/shot.png --example 1

Needs Chromium (`apt-get install chromium`) and Playwright (`pip install playwright`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gfss_hf._io import atomic_write_bytes, ensure_writable_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_FILE = REPO_ROOT / "spaces" / "app.py"
EXAMPLES_SCRIPT = REPO_ROOT / "scripts" / "render_space_examples.py"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "space_screenshot.png"
# Headless Chromium as root in a container, without network side channels.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 1000}
MIN_IOU = 0.5
STEPS = 100  # the page's default number of adaptation steps


def load_script(name: str, path: Path):
    """A module from a file that is not part of the package (the app, the examples script)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# checks made before any work
# ---------------------------------------------------------------------------------------------------------------
def check_model(model: str | os.PathLike) -> Path:
    """The model folder, or `SystemExit` naming the path, the rule (a `save_pretrained` folder) and the fix."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        state = "has no config.json" if folder.is_dir() else "does not exist"
        raise SystemExit(
            f"--model {str(folder)!r} {state}; the screenshot needs a model folder written by save_pretrained "
            "(config.json, weights, preprocessor_config.json). Run `make demo` to write demo_output/model_ce, or "
            "pass such a folder."
        )
    return folder


def find_chromium(executable: str | os.PathLike | None = None) -> str:
    """
    The Chromium that Playwright drives: `executable` if given, else `chromium` / `chromium-browser` on the PATH or
    `/usr/bin/chromium`.

    Raises:
        `SystemExit`: Playwright or Chromium is missing, with what to install.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise SystemExit(
            "Playwright is not installed; the screenshot drives headless Chromium through it: pip install playwright "
            "(and apt-get install chromium)."
        ) from None
    if executable is not None:
        path = Path(executable)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise SystemExit(
            f"--chromium {str(path)!r} is not an executable file; give the path of a Chromium binary, or omit "
            "--chromium to use the one on the PATH (apt-get install chromium)."
        )
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(
        "No Chromium found (looked for chromium and chromium-browser on the PATH and /usr/bin/chromium); the "
        "screenshot needs a headless Chromium: apt-get install chromium, or pass --chromium PATH."
    )


# ---------------------------------------------------------------------------------------------------------------
# which example the model gets right
# ---------------------------------------------------------------------------------------------------------------
def _editor(paths: dict[str, Path]) -> dict:
    """The value the page's painted support holds for an example (what clicking its row fills in)."""
    return {
        "background": Image.open(paths["support"]),
        "layers": [Image.open(paths["layer"])],
        "composite": Image.open(paths["composite"]),
    }


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def score_examples(app, segmenter, steps: int = STEPS, gamma: float = 10.0) -> list[dict]:
    """
    Segment every example of the Space with the app's `segment` (GFSS) and score the new class's mask.

    Returns:
        `list[dict]`: per example `index`, `class_name`, `iou` (predicted vs true mask of the new class),
        `predicted_share` and `true_share` (percent of the query), and `labels` (the classes predicted).
    """
    examples_script = load_script("render_space_examples", EXAMPLES_SCRIPT)
    examples = app.load_examples()
    if not examples:
        raise SystemExit(
            f"{app.EXAMPLES_DIR} has no complete set of examples; run `python scripts/render_space_examples.py`."
        )
    results = []
    for index, (name, paths) in enumerate(examples):
        query = Image.open(paths["query"])
        truth = examples_script.example_truth(name)
        if truth.shape != (query.height, query.width):
            raise SystemExit(
                f"example {index} ({name}): the query is {query.width}x{query.height} but its ground truth is "
                f"{truth.shape[1]}x{truth.shape[0]}; the shipped examples are out of date: run "
                "`python scripts/render_space_examples.py`."
            )
        (_, annotations), _, _ = app.segment(segmenter, query, [_editor(paths)], name, "GFSS", gamma, steps)
        predicted = np.zeros(truth.shape, dtype=bool)
        for mask, label in annotations:
            if label == name:
                predicted |= np.asarray(mask) > 0
        results.append(
            {
                "index": index,
                "class_name": name,
                "iou": iou(predicted, truth),
                "predicted_share": 100.0 * predicted.mean(),
                "true_share": 100.0 * truth.mean(),
                "labels": sorted(label for _, label in annotations),
            }
        )
    return results


def pick_example(results: list[dict], example: int | None = None, min_iou: float = MIN_IOU) -> dict:
    """
    The example to show: `example` if given, else the one with the highest IoU; it must reach `min_iou`.

    Raises:
        `SystemExit`: `example` out of range, or the chosen example below `min_iou` (the picture would show a wrong
        prediction).
    """
    if example is not None:
        if not 0 <= example < len(results):
            raise SystemExit(
                f"--example {example} is out of range: the Space has {len(results)} examples (0 to "
                f"{len(results) - 1})."
            )
        chosen = results[example]
    else:
        chosen = max(results, key=lambda r: r["iou"])
    if chosen["iou"] < min_iou:
        which = f"example {chosen['index']}" if example is not None else f"the best example ({chosen['index']})"
        raise SystemExit(
            f"{which}, class {chosen['class_name']!r}: the model's mask of the new class has IoU {chosen['iou']:.2f} "
            f"with the truth, below --min_iou {min_iou}: the picture would show a wrong prediction. "
            + ("Try --pick best, use" if example is not None else "Use")
            + " a better-trained model, or lower --min_iou."
        )
    return chosen


def describe(result: dict) -> str:
    return (
        f"example {result['index']} ({result['class_name']}): IoU {result['iou']:.3f} of the new class "
        f"(predicted {result['predicted_share']:.1f} % of the query, true {result['true_share']:.1f} %); "
        f"classes predicted: {', '.join(result['labels']) or 'none'}"
    )


# ---------------------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------------------
def launch_browser(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)


def open_page(browser, url: str):
    """A page of the app at `url`, once its Segment button is there."""
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector("#run", timeout=120_000)
    return page


def run_example(page, index: int, class_name: str, timeout_ms: int = 300_000) -> str:
    """
    Click example row `index` (it fills the query, the painted support and the class name), press Segment and wait
    for the overlay and the legend.

    Returns:
        `str`: the legend's text.
    """
    page.locator("#examples tbody tr").nth(index).click()
    name_box = "document.querySelector('#class-name textarea, #class-name input')"
    page.wait_for_function(f"{name_box}.value === {json.dumps(class_name)}", timeout=60_000)
    page.wait_for_selector("#query img", timeout=60_000)
    page.locator("#run").click()
    page.wait_for_selector("#overlay img", timeout=timeout_ms)
    page.wait_for_selector("#legend >> text=Novel class", timeout=60_000)
    page.wait_for_timeout(500)  # let the overlay finish fading in before a screenshot
    return page.locator("#legend").inner_text()


def shown_share(legend: str, class_name: str) -> str | None:
    """The share of the query the page's legend gives the new class (`"4.1 %"`), or None if it lists none."""
    for line in legend.splitlines():
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) >= 3 and cells[0].endswith(class_name) and cells[1] == "novel":
            return cells[2]
    return None


def take_screenshot(demo, chosen: dict, output: str | os.PathLike, executable: str) -> Path:
    """Launch `demo` on 127.0.0.1, run the chosen example in headless Chromium and write the page to `output`."""
    from playwright.sync_api import sync_playwright

    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = launch_browser(playwright, executable)
            try:
                page = open_page(browser, demo.local_url)
                legend = run_example(page, chosen["index"], chosen["class_name"])
                expected = f"{chosen['predicted_share']:.1f} %"
                if shown_share(legend, chosen["class_name"]) != expected:
                    raise SystemExit(
                        f"the page shows {chosen['class_name']!r} on {shown_share(legend, chosen['class_name'])} of "
                        f"the query, but scoring the example gave {expected}: the picture would not show the scored "
                        f"prediction. Legend:\n{legend}"
                    )
                png = page.screenshot(full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    atomic_write_bytes(output, png)
    return Path(output)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a save_pretrained folder (e.g. demo_output/model_ce)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="the PNG to write (default: %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--example", type=int, default=None, help="show this example (0-based row of the Space)")
    which.add_argument(
        "--pick", choices=["best"], default="best", help="best: the example with the highest IoU (the default)"
    )
    parser.add_argument(
        "--min_iou", type=float, default=MIN_IOU, help="the chosen example's least IoU (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="adaptation steps (default: %(default)s)")
    parser.add_argument("--chromium", default=None, help="path of the Chromium binary (default: found on the PATH)")
    args = parser.parse_args(argv)

    model = check_model(args.model)
    executable = find_chromium(args.chromium)
    output = Path(args.output)
    try:
        ensure_writable_dir(output.parent, "the folder of --output")
    except OSError as err:
        raise SystemExit(str(err)) from err

    app = load_script("gfss_space_app", APP_FILE)
    demo = app.build_app(model, default_steps=args.steps)
    results = score_examples(app, demo.segmenter, steps=args.steps)
    for result in results:
        print(describe(result))
    chosen = pick_example(results, args.example, args.min_iou)
    print(f"showing {describe(chosen)}")
    take_screenshot(demo, chosen, output, executable)
    print(f"wrote {output}")
    return {"chosen": chosen, "results": results, "output": str(output)}


if __name__ == "__main__":
    main(sys.argv[1:])
