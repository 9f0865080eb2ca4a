"""The Gradio Space (spaces/app.py): input handling, friendly errors, what the page says about the model, the
package's colours, the API through gradio_client with a painted mask, the page in a real headless Chromium, and
scripts/space_screenshot.py (the README's picture, taken here into a temporary folder only)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = 1
STEPS = 100  # adaptation steps (the default): the tiny model needs them to find the example class


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("gfss_space_app", REPO_ROOT / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples_script():
    """scripts/render_space_examples.py: the examples are rendered by a script, the app only shows them."""
    spec = importlib.util.spec_from_file_location(
        "render_space_examples", REPO_ROOT / "scripts" / "render_space_examples.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def screenshot_script():
    """scripts/space_screenshot.py: it owns the browser driving that the page test shares."""
    spec = importlib.util.spec_from_file_location("space_screenshot", REPO_ROOT / "scripts" / "space_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def segmenter(app, pretrained_tiny_dir):
    return app.FewShotSegmenter(str(pretrained_tiny_dir))


@pytest.fixture(scope="module")
def example(app):
    # Example 1: the small test model finds its class there in every mode (on example 0 it finds nothing).
    name, paths = app.load_examples()[EXAMPLE]
    return paths, name


def _editor(paths, layers=True):
    return {
        "background": Image.open(paths["support"]),
        "layers": [Image.open(paths["layer"])] if layers else [],
        "composite": Image.open(paths["composite"]),
    }


def test_painted_mask_reads_layer_alpha(app):
    layer = np.zeros((40, 60, 4), dtype=np.uint8)
    layer[5:15, 10:30, 3] = 255  # painted: alpha only, any colour
    layer[30:35, 0:5] = (255, 0, 0, 0)  # coloured but transparent: not painted
    second = np.zeros((40, 60, 4), dtype=np.uint8)
    second[20:22, 50:52, 3] = 10
    value = {
        "background": np.zeros((40, 60, 3), np.uint8),
        "layers": [Image.fromarray(layer), second],
        "composite": None,
    }
    mask = app.painted_mask(value)
    assert mask.shape == (40, 60) and mask.sum() == 10 * 20 + 4
    assert mask[5:15, 10:30].all() and not mask[30:35, 0:5].any() and mask[20:22, 50:52].all()
    # Layers of another size than the background (canvas scaling) are resized to it.
    assert app.painted_mask(value, size=(120, 80)).sum() == 4 * (10 * 20 + 4)
    assert app.painted_mask({"background": None, "layers": [np.zeros((4, 4, 4), np.uint8)]}) is None
    assert app.painted_mask(None) is None


def test_space_metadata_and_requirements():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(REPO_ROOT / "spaces" / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.sdk_version.split(".")[0] == gr.__version__.split(".")[0]
    assert "GFSS_MODEL" in card.text
    lines = (REPO_ROOT / "spaces" / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for package in ("torch>=2.4", "timm>=1.0", "transformers>=5"):
        assert package in requirements
    assert not any(line.startswith("gfss_hf") for line in requirements)  # the Hub repository carries the code


def test_examples_are_the_procedural_dataset(app, examples_script, example, tmp_path):
    """The shipped PNGs (used on a Space without gfss_hf) are exactly what the procedural dataset renders."""
    rendered = examples_script.render_examples(tmp_path)
    shipped = app.load_examples()
    assert [name for name, _ in shipped] == [name for name, _ in app.load_examples(tmp_path)]
    assert len(rendered) == len(shipped) == len(examples_script.EXAMPLE_CLASSES)
    assert app.load_examples(tmp_path / "missing") == []
    for fresh, (_, kept) in zip(rendered, shipped):
        for key in ("query", "support", "layer", "composite"):
            assert np.array_equal(np.asarray(Image.open(fresh[key])), np.asarray(Image.open(kept[key]))), kept[key]
    from gfss_hf.data.splits import SYNTHETIC_CLASSES
    from gfss_hf.data.synthetic import VAL_INDEX_OFFSET, render_sample

    paths, name = example
    support_index, query_index = examples_script.find_example_indices(name)
    _, label = render_sample(
        examples_script.EXAMPLE_SEED, VAL_INDEX_OFFSET + support_index, examples_script.EXAMPLE_SIZE
    )
    assert np.array_equal(app.painted_mask(_editor(paths)), label == SYNTHETIC_CLASSES.index(name) + 1)


def test_inputs_are_validated_with_friendly_errors(app, segmenter, example):
    paths, name = example
    query = Image.open(paths["query"])
    cases = [
        (dict(query=None), "query image"),
        (dict(supports=[None, None, None]), "at least one support"),
        (dict(supports=[_editor(paths, layers=False)]), "no painted pixels"),
        (dict(supports=[{"background": None, "layers": [Image.open(paths["layer"])], "composite": None}]), "no image"),
        (dict(class_name="  "), "name for the new class"),
        (dict(class_name="x" * 41), "at most 40"),
        (dict(class_name="Circle-Striped"), "already a class of the model"),
        (dict(gamma=-1), "gamma=-1.0 is out of range"),
        (dict(steps=0), "steps=0 is out of range"),
        (dict(mode="both"), "unknown"),
    ]
    for overrides, message in cases:
        kwargs = dict(query=query, supports=[_editor(paths)], class_name=name, mode="GFSS", gamma=10, steps=STEPS)
        kwargs.update(overrides)
        with pytest.raises(gr.Error, match=message):
            app.segment(segmenter, **kwargs)
    full = _editor(paths)
    full["layers"] = [Image.new("RGBA", full["background"].size, (0, 0, 0, 255))]
    with pytest.raises(gr.Error, match="no background pixel"):
        app.segment(segmenter, query, [full], name, steps=STEPS)


def test_rotated_phone_photo_is_segmented_as_displayed(app, segmenter, example, tmp_path):
    """A query stored sideways with EXIF orientation 6 (as phones do): overlay and masks have the displayed size."""
    paths, name = example
    displayed = np.pad(np.asarray(Image.open(paths["query"]).convert("RGB")), ((0, 0), (0, 40), (0, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(displayed, 1))).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    height, width = displayed.shape[:2]
    for query in (str(tmp_path / "phone.jpg"), Image.open(tmp_path / "phone.jpg")):
        (image, annotations), _, _ = app.segment(segmenter, query, [_editor(paths)], name, "GFSS", 10, 5)
        assert image.size == (width, height)
        assert all(mask.shape == (height, width) for mask, _ in annotations)


@pytest.mark.parametrize(
    "error,match",
    [
        (MemoryError(), "out of memory"),
        (RuntimeError("DefaultCPUAllocator: not enough memory"), "not enough memory"),
        (ValueError("support_masks[0] has no foreground pixel"), "no foreground pixel"),
    ],
    ids=["memory-error", "runtime-error", "value-error"],
)
def test_package_failures_become_gradio_errors(app, segmenter, example, monkeypatch, error, match):
    """A failure inside the pipeline (a huge query running out of memory, ...) reaches the user as a message."""
    paths, name = example
    segmenter.pipeline()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(segmenter, "_pipe", fail)
    with pytest.raises(gr.Error, match=match):
        app.segment(segmenter, Image.open(paths["query"]), [_editor(paths)], name, "GFSS", 10, 5)


def _status(demo):
    return [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-status"][0]


def test_page_says_what_the_model_knows(app, pretrained_tiny_dir):
    """The intro names the model (its folder's name, not a temporary path), the data it was pre-trained on, its
    base classes, and that the painted class is the novel one (the examples' classes it never saw)."""
    demo = app.build_app(pretrained_tiny_dir)
    text = _status(demo).value
    config = json.loads((pretrained_tiny_dir / "config.json").read_text())
    assert f"**Model:** `{pretrained_tiny_dir.name}`, pre-trained on the `{config['dataset']}` dataset, fold " in text
    assert str(pretrained_tiny_dir) not in text
    _, base = demo.segmenter.class_names()
    assert f"**Base classes** (known, {len(base)}): {', '.join(base)}." in text
    novel = text.split("**Novel class:**")[1]
    assert "paint and name" in novel
    assert all(name in novel for name, _ in app.load_examples())
    assert len(text.splitlines()) == 3


def test_missing_model_gives_a_clear_message(app, example, tmp_path, monkeypatch):
    monkeypatch.delenv("GFSS_MODEL", raising=False)
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", tmp_path / "demo_output" / "model_ce")
    assert app.default_model_source() is None
    monkeypatch.setenv("GFSS_MODEL", str(tmp_path / "nowhere"))
    assert app.default_model_source() == str(tmp_path / "nowhere")
    demo = app.build_app(tmp_path / "nowhere")
    assert not demo.segmenter.available
    status = _status(demo)
    assert "No model found" in status.value and "make demo" in status.value and "GFSS_MODEL" in status.value
    paths, name = example
    with pytest.raises(gr.Error, match="make demo"):
        app.segment(demo.segmenter, Image.open(paths["query"]), [_editor(paths)], name)


def test_segment_outputs_overlay_masks_and_legend(app, segmenter, example):
    paths, name = example
    query = Image.open(paths["query"])
    annotated, gallery, legend = app.segment(segmenter, query, [_editor(paths), None, None], name, "GFSS", 10, STEPS)
    image, annotations = annotated
    assert image.size == query.size
    labels = [label for _, label in annotations]
    _, base = segmenter.class_names()
    assert labels and set(labels) <= set(base) | {name}
    for mask, _ in annotations:
        assert mask.shape == (query.height, query.width) and mask.max() == 1.0
    assert len(gallery) == len(annotations) and all(c.endswith(("(base)", "(novel)")) for _, c in gallery)
    assert "**Novel class:**" in legend and "| Class | Kind |" in legend
    # The package's colours: a class by its GFSS id (the new class after the base classes), as scripts/predict.py.
    from gfss_hf.visualization import make_palette, overlay

    background, base = segmenter.class_names()
    colours = app._colour_map(background, base, name)
    ids = {label: i for i, label in enumerate([background, *base, name])}
    palette = make_palette()
    assert colours == {label: "#{:02x}{:02x}{:02x}".format(*palette[i]) for label, i in ids.items()}
    rgb = query.convert("RGB")
    for (mask, label), (tile, _) in zip(annotations, gallery):
        painted = mask > 0
        blended = np.asarray(overlay(rgb, painted.astype(np.uint8) * ids[label], alpha=0.65))
        assert np.array_equal(tile[painted], blended[painted])
        assert colours[label] in legend
    # FSS: only the new class (or nothing) besides background.
    annotated, _, legend = app.segment(segmenter, query, [_editor(paths)], name, "FSS", 10, STEPS)
    assert {label for _, label in annotated[1]} <= {name} and "not predicted in FSS mode" in legend


def test_without_the_package_gradio_picks_the_colours(app, segmenter, example, monkeypatch):
    """A Space without gfss_hf has no palette: no colour map (gradio's own colours), classes kept bright."""
    monkeypatch.setattr(app, "_visualization", lambda: None)
    paths, name = example
    query = Image.open(paths["query"])
    assert app._colour_map(*segmenter.class_names(), name) == {}
    (image, annotations), gallery, legend = app.segment(segmenter, query, [_editor(paths)], name, "GFSS", 10, 5)
    rgb = np.asarray(query.convert("RGB"))
    for (mask, _), (tile, _) in zip(annotations, gallery):
        assert np.array_equal(tile[mask > 0], rgb[mask > 0])
    assert "<span" not in legend and "**Novel class:**" in legend


@pytest.fixture(scope="module")
def launched(app, pretrained_tiny_dir):
    demo = app.build_app(pretrained_tiny_dir, default_steps=STEPS)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield demo
    finally:
        demo.close()


def test_api_answers_with_a_painted_mask(launched, app, example):
    from gradio_client import Client, handle_file

    paths, name = example
    client = Client(launched.local_url, verbose=False)
    support = {
        "background": handle_file(str(paths["support"])),
        "layers": [handle_file(str(paths["layer"]))],
        "composite": handle_file(str(paths["composite"])),
    }
    overlay, gallery, legend = client.predict(
        handle_file(str(paths["query"])), support, None, None, name, "GFSS", 10, STEPS, api_name="/segment"
    )
    value = overlay["value"] if "value" in overlay else overlay
    assert Image.open(value["image"]).size == Image.open(paths["query"]).size
    labels = [a["label"] for a in value["annotations"]]
    assert labels and name in overlay["color_map"]
    for annotation in value["annotations"]:
        assert Image.open(annotation["image"]).size == Image.open(paths["query"]).size
    assert len(gallery) == len(labels) and "**Novel class:**" in legend
    # The same support without paint is refused with the app's message.
    unpainted = dict(support, layers=[])
    with pytest.raises(Exception, match="no painted pixels"):
        client.predict(
            handle_file(str(paths["query"])), unpainted, None, None, name, "GFSS", 10, STEPS, api_name="/segment"
        )


def _chromium(screenshot_script) -> str:
    """The Chromium of the screenshot script; skips (fails with GFSS_REQUIRE_BROWSER=1) when it is missing."""
    try:
        return screenshot_script.find_chromium()
    except SystemExit as missing:
        if os.environ.get("GFSS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GFSS_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(str(missing))


@pytest.mark.browser
def test_page_in_headless_chromium(launched, app, screenshot_script, tmp_path):
    executable = _chromium(screenshot_script)
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "page.png"  # never into docs/: the README's picture is taken by scripts/space_screenshot.py
    with sync_playwright() as p:
        browser = screenshot_script.launch_browser(p, executable)
        try:
            page = screenshot_script.open_page(browser, launched.local_url)
            assert page.title() == app.TITLE
            assert page.get_by_role("heading", name=app.TITLE).is_visible()
            for selector in ("#query", "#support-1", "#class-name", "#mode", "#gamma", "#overlay", "#masks"):
                assert page.locator(selector).count() == 1, selector
            assert page.locator("#run").inner_text().strip() == "Segment"
            assert page.locator("#examples tbody tr").count() == len(app.load_examples())
            status = page.locator("#model-status").inner_text()
            assert launched.segmenter.name in status and "Base classes" in status and "Novel class" in status

            # An example row fills query, painted support and class name; running it shows the overlay.
            name = app.load_examples()[EXAMPLE][0]
            legend = screenshot_script.run_example(page, EXAMPLE, name)
            assert name in legend
            assert screenshot_script.shown_share(legend, name) is not None  # the new class is found
            assert page.locator("#masks img").count() >= 1
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    image = Image.open(shot)
    assert image.width == 1280 and image.height > 1000


def test_screenshot_script_refuses_without_a_model_or_chromium(screenshot_script, pretrained_tiny_dir, tmp_path):
    output = tmp_path / "shot.png"
    with pytest.raises(SystemExit, match="nowhere.*does not exist.*save_pretrained.*make demo"):
        screenshot_script.main(["--model", str(tmp_path / "nowhere"), "--output", str(output)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no config.json"):
        screenshot_script.main(["--model", str(tmp_path / "empty"), "--output", str(output)])
    if importlib.util.find_spec("playwright") is not None:
        with pytest.raises(SystemExit, match="no-chromium.*not an executable file.*apt-get install chromium"):
            screenshot_script.main(
                [
                    "--model",
                    str(pretrained_tiny_dir),
                    "--output",
                    str(output),
                    "--chromium",
                    str(tmp_path / "no-chromium"),
                ]
            )
    assert not output.exists()


def test_screenshot_script_shows_only_an_example_the_model_gets_right(screenshot_script):
    results = [
        {"index": 0, "class_name": "a", "iou": 0.1, "predicted_share": 1.0, "true_share": 3.0, "labels": []},
        {"index": 1, "class_name": "b", "iou": 0.8, "predicted_share": 5.0, "true_share": 5.2, "labels": ["b"]},
    ]
    assert screenshot_script.pick_example(results)["index"] == 1
    assert screenshot_script.pick_example(results, example=1)["class_name"] == "b"
    with pytest.raises(SystemExit, match="example 0, class 'a'.*IoU 0.10.*below --min_iou 0.5.*--pick best"):
        screenshot_script.pick_example(results, example=0)
    with pytest.raises(SystemExit, match="out of range.*2 examples"):
        screenshot_script.pick_example(results, example=2)
    with pytest.raises(SystemExit, match=r"best example \(1\).*IoU 0.80.*below --min_iou 0.9"):
        screenshot_script.pick_example(results, min_iou=0.9)
    truth = np.zeros((4, 4), bool)
    truth[:2] = True
    assert screenshot_script.iou(truth, truth) == 1.0 and screenshot_script.iou(~truth, truth) == 0.0


@pytest.mark.browser
def test_screenshot_script_on_a_model(app, screenshot_script, pretrained_tiny_dir, tmp_path, capsys):
    """The command of the README's picture, for real on the test model, into a temporary folder. The test model is
    too small to get an example right: with the default --min_iou it refuses (nothing written), with --min_iou 0 it
    shows its best example."""
    _chromium(screenshot_script)
    output = tmp_path / "docs" / "space_screenshot.png"
    command = ["--model", str(pretrained_tiny_dir), "--output", str(output), "--pick", "best"]
    with pytest.raises(SystemExit, match=r"the best example \(\d\).*below --min_iou 0.5.*Use a better-trained model"):
        screenshot_script.main(command)
    assert not output.exists()
    capsys.readouterr()
    done = screenshot_script.main([*command, "--min_iou", "0"])
    printed = capsys.readouterr().out
    chosen = done["chosen"]
    assert len(done["results"]) == len(app.load_examples())
    assert chosen["iou"] == max(r["iou"] for r in done["results"])
    for result in done["results"]:
        assert f"example {result['index']} ({result['class_name']}): IoU {result['iou']:.3f}" in printed
    assert f"showing example {chosen['index']} ({chosen['class_name']}): IoU {chosen['iou']:.3f}" in printed
    image = Image.open(output)
    assert image.width == 1280 and image.height > 1000
    assert [p.name for p in output.parent.iterdir()] == ["space_screenshot.png"]  # no temporary file left


@pytest.mark.slow
def test_space_runs_from_a_hub_export_without_the_package(app, example, pretrained_tiny_dir, tmp_path):
    """On a Space gfss_hf is not installed: the app loads the exported repository with trust_remote_code."""
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("push_to_hub", REPO_ROOT / "scripts" / "push_to_hub.py")
    push = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(push)
    export = push.stage_export(pretrained_tiny_dir, tmp_path / "export", "someone/gfss-synthetic-fold0")
    # With the package installed, the export's own pipeline code (custom_pipelines) is not needed either.
    assert type(app._load_pipeline(str(export))).__module__ == "gfss_hf.pipeline_few_shot_segmentation"
    paths, name = example
    script = f"""
import importlib.util, sys
sys.modules["gfss_hf"] = None
from PIL import Image
spec = importlib.util.spec_from_file_location("space_app", {str(REPO_ROOT / "spaces" / "app.py")!r})
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)
segmenter = app.demo.segmenter
editor = {{"background": Image.open({str(paths["support"])!r}), "layers": [Image.open({str(paths["layer"])!r})]}}
annotated, gallery, legend = app.segment(segmenter, Image.open({str(paths["query"])!r}), [editor], {name!r})
print("SOURCE", segmenter.source)
print("MODULE", type(segmenter.pipeline()).__module__)
print("LABELS", sorted(label for _, label in annotated[1]))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GFSS_MODEL=str(export), HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SOURCE {export}" in proc.stdout
    assert "MODULE transformers_modules." in proc.stdout
    assert "LABELS [" in proc.stdout
