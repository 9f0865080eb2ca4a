"""The `few-shot-segmentation` pipeline and `learn_classes`: end to end on PIL inputs, persistence across
save/load, loading through `trust_remote_code` in a fresh process, and input validation."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import SyntheticSegmentation
from gfss_hf.learning import learn_classes
from gfss_hf.pipeline_few_shot_segmentation import FewShotSegmentationPipeline, register_pipeline

register_pipeline()

FAST = {"steps": 30}


@pytest.fixture(scope="module")
def samples(pretrained_tiny_dir):
    """Val images of the procedural dataset with their novel-class masks (fold 0)."""
    split = get_split("synthetic", 0)
    size = GFSSModel.from_pretrained(pretrained_tiny_dir).config.image_size
    data = SyntheticSegmentation("val", num_images=60, image_size=size, seed=0)
    novel_id = split.novel_ids[0]
    rich = [i for i in range(len(data)) if (data[i]["label"] == novel_id).sum() >= 300]
    other_id = split.novel_ids[1]
    rich_other = [i for i in range(len(data)) if (data[i]["label"] == other_id).sum() >= 300]
    assert len(rich) >= 3 and len(rich_other) >= 1
    return {
        "data": data,
        "novel_id": novel_id,
        "rich": rich,
        "other_id": other_id,
        "rich_other": rich_other,
        "novel_name": split.novel_names[0],
        "other_name": split.novel_names[1],
    }


def _pil(sample):
    return Image.fromarray(sample["image"], "RGB")


def _mask(sample, class_id, white=True):
    m = (sample["label"] == class_id).astype(np.uint8)
    return Image.fromarray(m * (255 if white else 1), "L")


@pytest.fixture()
def pipe(pretrained_tiny_dir):
    # The package is imported: the locally registered classes are used, not the folder's copied code.
    return pipeline("few-shot-segmentation", model=str(pretrained_tiny_dir), device="cpu", trust_remote_code=False)


def test_pipeline_end_to_end_with_pil_inputs(pipe, samples):
    assert isinstance(pipe, FewShotSegmentationPipeline)
    data, cid = samples["data"], samples["novel_id"]
    support, query = data[samples["rich"][0]], data[samples["rich"][1]]
    # A non-square query: masks must come back at its original size.
    query_image = _pil(query).resize((80, 64))
    out = pipe(
        [query_image, _pil(query)],
        support_images=[_pil(support)],
        support_masks=[_mask(support, cid)],
        class_names=[samples["novel_name"]],
        return_label_map=True,
        **FAST,
    )
    assert len(out) == 2
    first = out[0]
    assert first["label_map"].shape == (64, 80)
    names = list(pipe.model.config.class_names) + [samples["novel_name"]]
    assert first["id2label"] == dict(enumerate(names))
    for segment in first["segments"]:
        assert segment["mask"].mode == "L" and segment["mask"].size == (80, 64)
        assert segment["label"] in names and 0.0 < segment["score"] <= 1.0
        assert set(np.unique(np.asarray(segment["mask"]))) <= {0, 255}
    # The learned class is found where it was annotated (the support itself, class-balanced loss as the reference).
    fit = pipe(
        _pil(support),
        support_images=[_pil(support)],
        support_masks=[_mask(support, cid)],
        class_names=[samples["novel_name"]],
        return_label_map=True,
        ce_weighting="reference",
    )
    novel_row = names.index(samples["novel_name"])
    pred = fit["label_map"] == novel_row
    target = support["label"] == cid
    iou = (pred & target).sum() / max((pred | target).sum(), 1)
    assert iou > 0.2, iou
    # The model itself is untouched without persist=True.
    assert samples["novel_name"] not in pipe.model.config.class_names
    # Plain list output by default.
    segments = pipe(
        _pil(query),
        support_images=[_pil(support)],
        support_masks=[_mask(support, cid, white=False)],
        class_names=samples["novel_name"],
        **FAST,
    )
    assert isinstance(segments, list) and {"label", "score", "mask"} <= set(segments[0])
    assert samples["novel_name"] in [s["label"] for s in segments]


def test_exif_rotated_phone_jpegs(pipe, samples, tmp_path):
    """A phone JPEG stores its pixels sideways with EXIF orientation 6; the user sees (and draws on) the rotated
    image. Masks drawn on the displayed image must be honoured and output masks come back at the displayed size."""
    data, cid = samples["data"], samples["novel_id"]
    support, query = data[samples["rich"][0]], data[samples["rich"][1]]

    def phone_jpeg(sample, path):
        displayed = np.pad(sample["image"], ((0, 0), (0, 32), (0, 0)), constant_values=128)  # 96 x 128: not square
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated 90 degrees counter-clockwise; viewers rotate it back clockwise
        Image.fromarray(np.ascontiguousarray(np.rot90(displayed, 1))).save(path, exif=exif, quality=95)
        # What a viewer shows: the decoded stored pixels rotated clockwise (numpy, independent of the loader).
        with Image.open(path) as stored:
            return np.ascontiguousarray(np.rot90(np.asarray(stored), -1))

    support_shown = phone_jpeg(support, tmp_path / "support.jpg")
    query_shown = phone_jpeg(query, tmp_path / "query.jpg")
    drawn = np.pad((support["label"] == cid).astype(np.uint8), ((0, 0), (0, 32)))  # drawn on the displayed image
    assert support_shown.shape[:2] == drawn.shape == (96, 128)
    kwargs = dict(support_masks=[drawn], class_names=[samples["novel_name"]], return_label_map=True, **FAST)
    from_files = pipe(
        [str(tmp_path / "query.jpg"), Image.open(tmp_path / "query.jpg")],
        support_images=[str(tmp_path / "support.jpg")],
        **kwargs,
    )
    shown = pipe(query_shown, support_images=[support_shown], **kwargs)
    for out in from_files:
        assert out["label_map"].shape == (96, 128)
        assert all(segment["mask"].size == (128, 96) for segment in out["segments"])
        np.testing.assert_array_equal(out["label_map"], shown["label_map"])


@pytest.mark.parametrize("mode", ["gfss", "fss"])
def test_banded_post_processing_gives_the_untiled_result(pipe, samples, mode):
    """Post-processing in row bands (bounded memory on huge queries) returns what one band and the former untiled
    path (all classes at full resolution) return: label maps, masks and scores."""
    data, cid = samples["data"], samples["novel_id"]
    support, query = data[samples["rich"][0]], data[samples["rich"][1]]
    learned = pipe.learn([_pil(support)], [_mask(support, cid)], [samples["novel_name"]], mode=mode, steps=5)
    queries = [_pil(query).resize((83, 61)), _pil(query).resize((150, 211))]
    results = {}
    for rows in (0, 1, 7, None):
        pipe.postprocess_band_rows = rows
        results[rows] = pipe(queries, _learned=learned, return_label_map=True)
    pipe.postprocess_band_rows = None
    for rows in (1, 7, 0):
        for got, want in zip(results[rows], results[None]):
            np.testing.assert_array_equal(got["label_map"], want["label_map"])
            assert [(s["label"], s["score"]) for s in got["segments"]] == [
                (s["label"], s["score"]) for s in want["segments"]
            ]
            for a, b in zip(got["segments"], want["segments"]):
                assert a["mask"].mode == b["mask"].mode == "L" and np.array_equal(np.asarray(a["mask"]), b["mask"])


def test_fss_mode_and_label_maps(pipe, samples):
    data, cid, oid = samples["data"], samples["novel_id"], samples["other_id"]
    a, b = data[samples["rich"][0]], data[samples["rich_other"][0]]
    # Two classes at once from label maps: value 1 = first class, 2 = second class.
    maps = []
    for sample in (a, b):
        m = np.zeros(sample["label"].shape, np.uint8)
        m[sample["label"] == cid] = 1
        m[sample["label"] == oid] = 2
        maps.append(m)
    names = [samples["novel_name"], samples["other_name"]]
    out = pipe(
        _pil(a),
        support_images=[_pil(a), _pil(b)],
        support_masks=maps,
        class_names=names,
        mask_type="label_map",
        return_label_map=True,
        **FAST,
    )
    assert out["id2label"][len(out["id2label"]) - 1] == names[1]
    fss = pipe(
        _pil(a),
        support_images=[_pil(a), _pil(b)],
        support_masks=[_mask(a, cid), _mask(b, oid)],
        class_names=names,
        mode="fss",
        return_label_map=True,
        ce_weighting="reference",
    )
    assert fss["id2label"] == {0: "background", 1: names[0], 2: names[1]}
    pred, target = fss["label_map"] == 1, a["label"] == cid
    assert (pred & target).sum() / max((pred | target).sum(), 1) > 0.3


@pytest.mark.parametrize("mode", ["gfss", "fss"])
def test_learn_once_then_reuse_for_many_queries(pipe, samples, mode, monkeypatch):
    data, cid = samples["data"], samples["novel_id"]
    support = data[samples["rich"][0]]
    queries = [_pil(data[i]) for i in samples["rich"][1:3]]
    supports = dict(
        support_images=[_pil(support)],
        support_masks=[_mask(support, cid)],
        class_names=[samples["novel_name"]],
        mode=mode,
        **FAST,
    )
    state = pipe.learn(**supports)
    # The same classifier as learning inside the call (same seed): reuse changes no prediction.
    expected = pipe(queries, **supports, return_label_map=True)

    def must_not_learn(*args, **kwargs):
        raise AssertionError("pipe(..., learned=state) fine-tuned again")

    monkeypatch.setattr(pipe, "learn", must_not_learn)
    reused = [pipe(q, learned=state, return_label_map=True) for q in queries]
    for got, want in zip(reused, expected):
        assert got["id2label"] == want["id2label"] and samples["novel_name"] in got["id2label"].values()
        assert (got["label_map"] == want["label_map"]).all()
    with pytest.raises(ValueError, match="pass one or the other"):
        pipe(queries[0], learned=state, steps=3)
    with pytest.raises(TypeError, match=r"returned by pipe.learn"):
        pipe(queries[0], learned={"classifier": None})


def test_persist_save_load_and_learn_more(pipe, samples, tmp_path):
    data, cid = samples["data"], samples["novel_id"]
    support, query = data[samples["rich"][0]], data[samples["rich"][2]]
    adapted = pipe(
        _pil(query),
        support_images=[_pil(support)],
        support_masks=[_mask(support, cid)],
        class_names=[samples["novel_name"]],
        persist=True,
        return_label_map=True,
        ce_weighting="reference",
    )
    model = pipe.model
    assert model.config.novel_class_names == (samples["novel_name"],)
    plain = pipe(_pil(query), return_label_map=True)
    assert plain["id2label"] == adapted["id2label"]
    # The persisted model segments the new class with a plain forward pass, no support set needed (only the novel
    # rows are written; the base rows stay the pre-trained ones, so other pixels may differ from `adapted`).
    fit = pipe(_pil(support), return_label_map=True)
    assert (fit["label_map"] == len(plain["id2label"]) - 1).sum() > 0
    pipe.save_pretrained(tmp_path / "learned")
    # A folder saved by the pipeline declares `custom_pipelines` (for trust_remote_code users); with gfss_hf installed,
    # name the class to use the local code.
    reloaded = pipeline(
        "few-shot-segmentation",
        model=str(tmp_path / "learned"),
        device="cpu",
        pipeline_class=FewShotSegmentationPipeline,
    )
    again = reloaded(_pil(query), return_label_map=True)
    assert again["id2label"] == plain["id2label"]
    np.testing.assert_array_equal(again["label_map"], plain["label_map"])
    config = json.loads((tmp_path / "learned" / "config.json").read_text())
    assert "few-shot-segmentation" in config["custom_pipelines"]
    # Learning one more class appends a row after the first learned one.
    other = data[samples["rich_other"][0]]
    reloaded(
        _pil(query),
        support_images=[_pil(other)],
        support_masks=[_mask(other, samples["other_id"])],
        class_names=[samples["other_name"]],
        persist=True,
        **FAST,
    )
    assert reloaded.model.config.novel_class_names == (samples["novel_name"], samples["other_name"])
    torch.testing.assert_close(
        reloaded.model.classifier.weight[: model.classifier.weight.shape[0]],
        model.classifier.weight,
        rtol=1e-6,
        atol=0,
    )
    with pytest.raises(ValueError, match="already a class"):
        reloaded(
            _pil(query),
            support_images=[_pil(other)],
            support_masks=[_mask(other, samples["other_id"])],
            class_names=[samples["other_name"]],
            **FAST,
        )


def test_learn_classes_writes_rows_into_the_model(pretrained_tiny_dir, samples, tmp_path):
    model = GFSSModel.from_pretrained(pretrained_tiny_dir).eval()
    rows_before = model.classifier.weight.detach().clone()
    data, cid = samples["data"], samples["novel_id"]
    shots = [data[i] for i in samples["rich"][:2]]
    learned = learn_classes(
        model, [_pil(s) for s in shots], [_mask(s, cid) for s in shots], samples["novel_name"], steps=20
    )
    assert learned == [samples["novel_name"]]
    assert torch.equal(model.classifier.weight[: rows_before.shape[0]], rows_before)
    assert model.config.id2label[len(rows_before)] == samples["novel_name"]
    model.save_pretrained(tmp_path / "m")
    back = GFSSModel.from_pretrained(tmp_path / "m").eval()
    x = GFSSImageProcessor.from_config(model.config)(_pil(data[samples["rich"][2]]))["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_trust_remote_code_in_a_fresh_process(pipe, samples, tmp_path):
    data, cid = samples["data"], samples["novel_id"]
    support = data[samples["rich"][0]]
    export = tmp_path / "export"
    pipe.save_pretrained(export)
    assert (export / "pipeline_few_shot_segmentation.py").is_file()
    assert (export / "adaptation.py").is_file() and (export / "_solver.py").is_file()
    _pil(support).save(tmp_path / "support.png")
    _mask(support, cid).save(tmp_path / "mask.png")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["gfss_hf"] = None  # the package must not be importable: only the exported files are used
        from transformers import pipeline
        pipe = pipeline(model={str(export)!r}, trust_remote_code=True, device="cpu")
        assert type(pipe).__name__ == "FewShotSegmentationPipeline", type(pipe)
        assert "gfss_hf" not in type(pipe).__module__
        out = pipe({str(tmp_path / "support.png")!r}, support_images=[{str(tmp_path / "support.png")!r}],
                   support_masks=[{str(tmp_path / "mask.png")!r}], class_names=["new"], steps=5,
                   return_label_map=True)
        print("LABELS", sorted(s["label"] for s in out["segments"]))
        print("NEW", out["id2label"][len(out["id2label"]) - 1])
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NEW new" in result.stdout
    # The exported model file carries the quiet loading too.
    assert "Loading weights" not in result.stderr


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box_mask(h, w):
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return m


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"support_images": [], "support_masks": [], "class_names": []}, "no supports"),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 40)] * 2, "class_names": ["x"]},
            "one mask per image",
        ),
        (
            {"support_images": [_rgb(40, 40)] * 2, "support_masks": [_box_mask(40, 40)] * 2, "class_names": ["x"] * 3},
            "class_names",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 30)], "class_names": ["x"]},
            "size of its image",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [np.zeros((40, 40), np.uint8)], "class_names": ["x"]},
            "no foreground",
        ),
        (
            {
                "support_images": [_rgb(40, 2000)],
                "support_masks": [np.pad(np.ones((1, 1), np.uint8), ((20, 19), (0, 1999)))],
                "class_names": ["x"],
            },
            "after resizing",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 40) * 7], "class_names": ["x"]},
            "besides 0/1/255",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 40)], "class_names": ["background"]},
            "already a class",
        ),
        (
            {
                "support_images": [_rgb(40, 40)] * 2,
                "support_masks": [_box_mask(40, 40)] * 2,
                "class_names": ["x", "x"],
                "mask_type": "label_map",
            },
            "repeats",
        ),
        ({"support_images": [_rgb(0, 40)], "support_masks": [np.zeros((0, 40), np.uint8)], "class_names": ["x"]}, "0"),
        (
            {
                "support_images": [np.zeros((20000, 4, 3), np.uint8)],
                "support_masks": [np.ones((20000, 4), np.uint8)],
                "class_names": ["x"],
            },
            "4x20000",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "mode": "x",
            },
            "mode=",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "mode": "fss",
                "persist": True,
            },
            "persist",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "kd_scale": "printed",
            },
            "kd_scale",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "lr": np.inf,
            },
            "lr=inf .*finite",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "gamma": np.nan,
            },
            "gamma=nan .*finite",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [_box_mask(40, 40)],
                "class_names": ["x"],
                "steps": 2.7,
            },
            "steps=2.7 .*integer",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [np.ones((40, 40), np.uint8)], "class_names": ["x"]},
            "no background pixel",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [np.full((40, 40), 255, np.uint8)],
                "class_names": ["x"],
            },
            "no background pixel",
        ),
        (
            {
                "support_images": [_rgb(40, 40)] * 2,
                "support_masks": [np.ones((40, 40), np.uint8)] * 2,
                "class_names": ["x", "x"],
            },
            "no background pixel",
        ),
        (
            {
                "support_images": [_rgb(40, 40)],
                "support_masks": [np.ones((40, 40), np.uint8)],
                "class_names": ["x"],
                "mask_type": "label_map",
            },
            "no background pixel",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 40)], "class_names": [None]},
            "class_names.*string",
        ),
        (
            {"support_images": [_rgb(40, 40)], "support_masks": [_box_mask(40, 40)], "class_names": ["Star-Striped "]},
            "already a class",
        ),
    ],
    ids=[
        "no-supports",
        "mask-count",
        "name-count",
        "mask-size",
        "empty-mask",
        "empty-after-resize",
        "non-binary",
        "base-name",
        "repeated-name",
        "zero-size",
        "huge",
        "mode",
        "fss-persist",
        "bad-option",
        "lr-inf",
        "gamma-nan",
        "steps-fraction",
        "all-ones-mask",
        "all-255-mask",
        "all-foreground-k-shot",
        "all-foreground-label-map",
        "none-name",
        "base-name-variant",
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(_rgb(40, 40), **kwargs)


def test_unknown_argument_is_rejected(pipe):
    with pytest.raises(TypeError, match="unexpected arguments"):
        pipe(_rgb(40, 40), support_imgs=[_rgb(40, 40)])


def test_unknown_argument_is_rejected_before_fine_tuning(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fine-tuning ran before the arguments were checked")

    monkeypatch.setattr(pipe, "learn", fail)
    with pytest.raises(TypeError, match="unexpected arguments") as err:
        pipe(
            _rgb(40, 40), support_images=[_rgb(40, 40)], support_masks=[_box_mask(40, 40)], class_names=["x"], stpes=5
        )
    assert str(err.value).count("'seed'") == 1 and "stpes" in str(err.value)


@pytest.mark.parametrize(
    "query,error,match",
    [
        ([], ValueError, "no query image"),
        (np.full((40, 40, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.full((40, 40, 3), -5, np.int64), ValueError, r"\[0, 255\]"),
        (np.full((40, 40, 3), 300, np.int32), ValueError, r"\[0, 255\]"),
    ],
    ids=["empty-list", "nan-floats", "negative-ints", "ints-above-255"],
)
def test_bad_queries_raise_clear_errors(pipe, query, error, match):
    with pytest.raises(error, match=match):
        pipe(query, support_images=[_rgb(40, 40)], support_masks=[_box_mask(40, 40)], class_names=["x"], steps=1)


def test_grayscale_rgba_and_16_bit_images(pipe, samples):
    data, cid = samples["data"], samples["novel_id"]
    support = data[samples["rich"][0]]
    gray = _pil(support).convert("L")
    rgba = _pil(support).convert("RGBA")
    deep = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # mode "I;16"
    mask = _mask(support, cid)
    out = pipe(
        [gray, rgba, deep],
        support_images=[gray, rgba, deep],
        support_masks=[mask] * 3,
        class_names=samples["novel_name"],
        steps=3,
    )
    assert len(out) == 3 and all(seg["mask"].size == gray.size for seg in out[2])


def test_loading_says_nothing_about_image_processor_backends(pretrained_tiny_dir):
    """The processor needs no torchvision: loading the pipeline must not warn that it 'falls back to PIL' (it did on
    every load, for every user, with no action to take), nor draw transformers' "Loading weights" bar."""
    code = (
        "import gfss_hf\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('few-shot-segmentation', model={str(pretrained_tiny_dir)!r}, device='cpu')\n"
        "print(type(pipe.image_processor).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "GFSSImageProcessor"
    assert "backend is not available" not in done.stderr
    assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr


def test_loading_draws_no_weight_bar_and_restores_the_previous_hook(pretrained_tiny_dir, capsys):
    """GFSSModel.from_pretrained silences transformers' own bars for the load only: a hook set before is chained
    (with the bars disabled) and put back afterwards, and bars drawn after the load show again."""
    from transformers.utils import logging as hf_logging

    from gfss_hf.modeling_gfss import quiet_weight_loading

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("this transformers has no tqdm hook; loading draws its bar")
    if not hf_logging.is_progress_bar_enabled():
        pytest.skip("transformers' progress bars are disabled globally here")
    seen = []

    def recording_hook(factory, args, kwargs):
        seen.append(kwargs.get("desc"))
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(recording_hook)
    try:
        capsys.readouterr()
        pipe = pipeline("few-shot-segmentation", model=str(pretrained_tiny_dir), device="cpu")
        loading = capsys.readouterr().err
        assert hf_logging.set_tqdm_hook(recording_hook) is recording_hook  # restored after the load
        assert "Loading weights" in seen  # the bar was asked for, and silenced
        with quiet_weight_loading(), quiet_weight_loading():  # nested: the outer exit restores
            pass
        assert hf_logging.set_tqdm_hook(recording_hook) is recording_hook
        for _ in hf_logging.tqdm(range(2), desc="Loading weights"):
            pass
        after = capsys.readouterr().err
    finally:
        hf_logging.set_tqdm_hook(previous)
    assert isinstance(pipe, FewShotSegmentationPipeline)
    assert hf_logging.is_progress_bar_enabled()  # the global switch is not touched
    assert "Loading weights" not in loading
    assert "Loading weights" in after  # the capture sees a bar when one is drawn
