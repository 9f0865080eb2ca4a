import math

import numpy as np
import pytest
import torch

from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.data.episodes import build_episodes, episodes_hash
from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import SyntheticSegmentation
from gfss_hf.evaluation import EvaluationOptions, FeatureCache, evaluate_episodes
from gfss_hf.metrics import metric_keys

NUM_IMAGES = 60
# diam / capl: a support needs a novel object of this area and no other novel class; 60 images hold enough at 100 px.
RUN_MIN_PIXELS = 100


@pytest.fixture(scope="module")
def setup(pretrained_tiny_dir):
    model = GFSSModel.from_pretrained(pretrained_tiny_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(pretrained_tiny_dir)
    size = model.config.image_size
    split = get_split("synthetic", 0)
    val = SyntheticSegmentation("val", num_images=NUM_IMAGES, image_size=size)
    train = SyntheticSegmentation("train", num_images=NUM_IMAGES, image_size=size)
    return model, processor, split, val, train


def episodes_for(protocol, split, val, train, seed=42):
    min_pixels = None if protocol == "paper" else RUN_MIN_PIXELS
    return build_episodes(
        protocol, split, val, shots=1, num_episodes=10, seed=seed, runs=2, train_source=train, min_pixels=min_pixels
    )


def run(setup, episodes, **option_changes):
    model, processor, split, val, train = setup
    adaptation = option_changes.pop("adaptation", AdaptationConfig(steps=8))
    option_changes.setdefault("episode_batch_size", 4)
    options = EvaluationOptions(adaptation=adaptation, progress=False, **option_changes)
    return evaluate_episodes(
        model, episodes, split=split, val_source=val, train_source=train, processor=processor, options=options
    )


def states(result):
    return {name: acc.state_dict() for name, acc in result.accumulators.items()}


@pytest.mark.parametrize("protocol", ["paper", "diam", "capl"])
def test_protocol_keys_determinism_and_cache(setup, protocol):
    _, _, split, val, train = setup
    episodes = episodes_for(protocol, split, val, train)
    assert {e.protocol for e in episodes} == {protocol}
    first = run(setup, episodes)
    assert set(first.metrics) == set(metric_keys(protocol))
    for key, value in first.metrics.items():
        assert math.isnan(value) or 0.0 <= value <= 1.0, (key, value)
    assert first.num_episodes == len(episodes)
    assert first.episodes_hash == episodes_hash(episodes)

    # Something was actually scored: every query pixel that is not ignored lands in a confusion matrix.
    total_pixels = sum(int(acc.confusion.sum()) for acc in first.accumulators.values())
    assert total_pixels > 0

    # Same seed, same episodes -> bit-identical sums; without the cache -> identical too.
    again = run(setup, episodes_for(protocol, split, val, train))
    assert states(again) == states(first)
    uncached = run(setup, episodes, cache_features=False)
    assert states(uncached) == states(first)
    assert uncached.cache["stored"] == 0
    assert uncached.cache["hits"] == 0
    distinct = {e.query_id for e in episodes}
    assert first.cache["computed"] >= len(distinct)
    assert first.cache["computed"] < uncached.cache["computed"]  # each image computed once

    if protocol == "paper":
        assert first.runs == []
        assert set(first.accumulators) == {"fss", "gfss_novel", "gfss_base"}
    else:
        assert [r["run"] for r in first.runs] == [0, 1]
        for key in ("base_miou", "novel_miou"):
            values = [r[key] for r in first.runs]
            assert first.metrics[key] == pytest.approx(sum(values) / 2)
        # Runs draw different support sets.
        supports = {e.run: tuple(e.all_support_ids()) for e in episodes}
        assert supports[0] != supports[1]


def test_capl_scores_original_resolution_and_conventions_differ(setup):
    model, processor, split, _, train = setup
    # Val images rendered larger than the model's canvas: capl scores them at their own (original) size.
    original = model.config.image_size + 32
    val = SyntheticSegmentation("val", num_images=NUM_IMAGES, image_size=original)
    episodes = [e for e in episodes_for("capl", split, val, train) if e.run == 0]
    options = EvaluationOptions(adaptation=AdaptationConfig(steps=4), progress=False)
    capl = evaluate_episodes(
        model, episodes, split=split, val_source=val, train_source=train, processor=processor, options=options
    )
    acc = capl.accumulators["run0"]
    labelled = sum(int((val.get_by_id(e.query_id)["label"] != 255).sum()) for e in episodes)
    assert labelled == len(episodes) * original**2  # the procedural labels have no ignore pixel
    assert int(acc.confusion.sum()) == labelled
    # capl counts background in base; diam does not: the same accumulator gives different base scores.
    base_rows, novel_rows = list(range(1, 16)), list(range(16, 21))
    diam_view = acc.summary(base_rows, novel_rows, convention="diam")
    capl_view = acc.summary(base_rows, novel_rows, convention="capl")
    assert capl_view["base"] != diam_view["base"]
    assert capl.runs[0]["base_miou"] == pytest.approx(capl_view["base"])
    assert capl.metrics["total_miou"] == pytest.approx(capl_view["total"])


def test_memory_bound_and_half_precision_cache(setup):
    _, _, split, val, train = setup
    episodes = episodes_for("paper", split, val, train)
    full = run(setup, episodes)
    one_image = full.cache["bytes"] // full.cache["stored"]
    bounded = run(setup, episodes, cache_max_bytes=3 * one_image)
    assert bounded.cache["stored"] == 3 and bounded.cache["full"] > 0
    assert states(bounded) == states(full)  # recomputation falls back to the same numbers

    half = run(setup, episodes, feature_dtype="float16")
    assert half.cache["bytes"] == full.cache["bytes"] // 2
    assert states(run(setup, episodes, feature_dtype="float16", cache_features=False)) == states(half)


def test_default_episode_batch_depends_on_loss_resolution(setup):
    _, _, split, val, train = setup
    episodes = episodes_for("paper", split, val, train)[:2]
    for resolution, expected in (("input", 1), ("feature", 8)):
        adaptation = AdaptationConfig(steps=2, loss_resolution=resolution)
        result = run(setup, episodes, adaptation=adaptation, episode_batch_size=None)
        assert result.timing["episode_batch_size"] == expected  # on CPU


def test_feature_cache_computes_each_image_once(setup):
    model, processor, _, val, _ = setup
    cache = FeatureCache(model, processor, {"val": val})
    ids = [val.ids[0], val.ids[1], val.ids[0]]
    feats = cache.features("val", ids)
    assert feats.shape[0] == 3 and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[2])
    assert cache.stats["computed"] == 2
    again = cache.features("val", ids[:2])
    assert torch.equal(again, feats[:2]) and cache.stats["computed"] == 2
    with torch.no_grad():
        pixels = processor(val.get_by_id(ids[1])["image"], return_tensors="pt")["pixel_values"]
        direct = model.extract_features(pixels)[0]
    assert torch.equal(direct, feats[1])
    labels = cache.labels("val", ids[:1])
    assert labels.shape == (1, model.config.image_size, model.config.image_size)
    with pytest.raises(KeyError, match="no image source"):
        cache.features("train", ids)


def test_transductive_and_legacy_options_run(setup):
    _, _, split, val, train = setup
    episodes = episodes_for("paper", split, val, train)[:4]
    base = run(setup, episodes)
    legacy = run(setup, episodes, adaptation=AdaptationConfig(steps=8, legacy_carry_over=True))
    # Carry-over only touches the GFSS head; the FSS head is the same.
    assert legacy.accumulators["fss"].state_dict() == base.accumulators["fss"].state_dict()
    assert set(legacy.metrics) == set(base.metrics)
    diam = [e for e in episodes_for("diam", split, val, train) if e.run == 0][:6]
    transductive = run(setup, diam, adaptation=AdaptationConfig(steps=4, transductive=True))
    assert int(transductive.accumulators["run0"].num_updates) == len(diam)


def test_errors(setup):
    model, processor, split, val, train = setup
    episodes = episodes_for("paper", split, val, train)

    class TwoProcesses:
        process_index, num_processes, device = 0, 2, torch.device("cpu")

    with pytest.raises(ValueError, match="one process"):
        evaluate_episodes(
            model,
            episodes,
            split=split,
            val_source=val,
            accelerator=TwoProcesses(),
            options=EvaluationOptions(adaptation=AdaptationConfig(legacy_carry_over=True), progress=False),
        )
    with pytest.raises(ValueError, match="base classes"):
        evaluate_episodes(model, episodes, split=get_split("synthetic", 1), val_source=val)
    with pytest.raises(ValueError, match="mix protocols"):
        evaluate_episodes(model, episodes + episodes_for("diam", split, val, train), split=split, val_source=val)
    with pytest.raises(ValueError, match="train_source"):
        build_episodes("capl", split, val, runs=1)
    changed = [e for e in episodes]
    changed[0] = type(changed[0]).from_dict({**changed[0].to_dict(), "query_id": val.ids[-1]})
    assert episodes_hash(changed) != episodes_hash(episodes)


# -- the protocols' pooling, checked against brute-force recomputations written from METHOD.md section 5 -----------
B, N = 3, 2  # rows: background 0, base 1..3, novel 4..5
NUM_BASE_ROWS, NUM_ROWS = B + 1, B + 1 + N


def brute_iou(pairs):
    """pairs: (predicted foreground, ground-truth foreground, valid) boolean maps of one class -> pooled IoU."""
    inter = sum(int((p & g & v).sum()) for p, g, v in pairs)
    union = sum(int(((p | g) & v).sum()) for p, g, v in pairs)
    return inter / union if union else float("nan")


def brute_mean(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept)


def hand_built_paper_episodes(rng, count=12, size=16):
    """Episodes whose base images hold several base classes, predicted mostly right: the case where pooling the
    multi-class prediction into one confusion matrix (the old bug) counts other base classes as false positives."""
    episodes = []
    for e in range(count):
        novel_row = NUM_BASE_ROWS + e % N
        valid = rng.random((size, size)) > 0.1  # some ignored pixels
        q_gt = rng.random((size, size)) < 0.3
        fss_fg = np.where(rng.random((size, size)) < 0.8, q_gt, ~q_gt)
        gfss_map = rng.integers(0, NUM_BASE_ROWS, (size, size))  # base predictions on the query
        gfss_map[np.where(rng.random((size, size)) < 0.75, q_gt, ~q_gt)] = NUM_BASE_ROWS  # the novel row
        base_row = 1 + e % B
        b_gt = rng.integers(0, NUM_BASE_ROWS, (size, size))  # every base class present on the base image
        b_map = np.where(rng.random((size, size)) < 0.85, b_gt, rng.integers(0, NUM_BASE_ROWS + 1, (size, size)))
        b_valid = rng.random((size, size)) > 0.1
        episodes.append(
            dict(
                novel_row=novel_row,
                valid=valid,
                q_gt=q_gt,
                fss_fg=fss_fg,
                gfss_map=gfss_map,
                base_row=base_row,
                b_gt=b_gt,
                b_map=b_map,
                b_valid=b_valid,
            )
        )
    return episodes


def test_paper_protocol_pooling_matches_its_definition():
    from gfss_hf.evaluation import score_binary_episodes, summarise_accumulators
    from gfss_hf.metrics import PooledIoU

    episodes = hand_built_paper_episodes(np.random.default_rng(0))
    # Brute force, from the protocol's text: binary IoU of the episode's class, pooled over that class's episodes.
    fss = {
        c: brute_iou([(e["fss_fg"], e["q_gt"], e["valid"]) for e in episodes if e["novel_row"] == c])
        for c in range(NUM_BASE_ROWS, NUM_ROWS)
    }
    novel = {
        c: brute_iou(
            [(e["gfss_map"] == NUM_BASE_ROWS, e["q_gt"], e["valid"]) for e in episodes if e["novel_row"] == c]
        )
        for c in range(NUM_BASE_ROWS, NUM_ROWS)
    }
    base = {
        b: brute_iou([(e["b_map"] == b, e["b_gt"] == b, e["b_valid"]) for e in episodes if e["base_row"] == b])
        for b in range(1, NUM_BASE_ROWS)
    }
    fb = [
        brute_iou([(~e["fss_fg"], ~e["q_gt"], e["valid"]) for e in episodes]),
        brute_iou([(e["fss_fg"], e["q_gt"], e["valid"]) for e in episodes]),
    ]
    expected = {
        "fss_novel_miou": brute_mean(fss.values()),
        "gfss_novel_miou": brute_mean(novel.values()),
        "gfss_base_miou": brute_mean(base.values()),
        "fss_fb_iou": brute_mean(fb),
    }
    expected["gfss_mean_miou"] = (expected["gfss_base_miou"] + expected["gfss_novel_miou"]) / 2

    # The package, fed the same maps the way `_paper_unit` feeds it (targets: row on the class, 0 elsewhere, 255).
    accs = {name: PooledIoU(NUM_ROWS) for name in ("fss", "gfss_novel", "gfss_base")}
    t = torch.as_tensor
    q_target = t(np.stack([np.where(e["valid"], e["q_gt"] * e["novel_row"], 255) for e in episodes]))
    novel_rows = t([e["novel_row"] for e in episodes])[:, None, None]
    score_binary_episodes(accs["fss"], t(np.stack([e["fss_fg"] for e in episodes])), q_target, novel_rows)
    g_pred = t(np.stack([e["gfss_map"] for e in episodes]))
    score_binary_episodes(accs["gfss_novel"], g_pred == NUM_BASE_ROWS, q_target, novel_rows)
    base_rows = t([e["base_row"] for e in episodes])[:, None, None]
    b_target = t(
        np.stack([np.where(e["b_valid"], (e["b_gt"] == e["base_row"]) * e["base_row"], 255) for e in episodes])
    )
    b_pred = t(np.stack([e["b_map"] for e in episodes]))
    score_binary_episodes(accs["gfss_base"], b_pred == base_rows, b_target, base_rows)
    metrics, runs = summarise_accumulators("paper", accs, NUM_BASE_ROWS)
    assert runs == []
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key

    # The old wiring (the multi-class base prediction pooled into one confusion matrix) gives a different, lower
    # number on these maps: the test can tell the two apart.
    wrong = PooledIoU(NUM_ROWS)
    wrong.update(torch.where(b_pred == NUM_BASE_ROWS, novel_rows, b_pred), b_target)
    assert wrong.mean_iou(range(1, NUM_BASE_ROWS)) < expected["gfss_base_miou"] - 0.2


@pytest.mark.parametrize("protocol", ["diam", "capl"])
def test_run_protocols_pooling_matches_their_definition(protocol):
    from gfss_hf.evaluation import summarise_accumulators
    from gfss_hf.metrics import PooledIoU

    rng = np.random.default_rng(1)
    runs, accs = [], {}
    for run in range(3):
        gt = rng.integers(0, NUM_ROWS, (5, 12, 12))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, NUM_ROWS, gt.shape))
        pred[pred == 255] = 0
        valid = gt != 255
        iou = [brute_iou([(pred == c, gt == c, valid)]) for c in range(NUM_ROWS)]
        base = brute_mean(iou[0 if protocol == "capl" else 1 : NUM_BASE_ROWS])  # capl counts background in base
        novel = brute_mean(iou[NUM_BASE_ROWS:])
        runs.append(
            {"base_miou": base, "novel_miou": novel, "mean_miou": (base + novel) / 2, "total_miou": brute_mean(iou)}
        )
        accs[f"run{run}"] = PooledIoU(NUM_ROWS)
        for q in range(len(gt)):  # one query at a time, as the protocol predicts them
            accs[f"run{run}"].update(torch.as_tensor(pred[q]), torch.as_tensor(gt[q]))
    metrics, summaries = summarise_accumulators(protocol, accs, NUM_BASE_ROWS)
    keys = ["base_miou", "novel_miou", "mean_miou"] + (["total_miou"] if protocol == "capl" else [])
    for key in keys:
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in runs]), abs=1e-12), key
        assert metrics[f"{key}_std"] == pytest.approx(np.std([r[key] for r in runs], ddof=1), abs=1e-12), key
        assert [s[key] for s in summaries] == pytest.approx([r[key] for r in runs], abs=1e-12)


def test_run_supports_annotate_every_novel_class_they_hold(setup, monkeypatch):
    """A `diam` / `capl` support image of class c that also holds another novel class of the run is annotated for
    both: left as background, the other class's pixels are taught "no novel class" by the distillation (whose
    teacher's background takes every novel row), and on CamVid, where no image holds one novel class alone, gamma = 10
    then never predicted a novel pixel. A support that holds its class alone keeps its binary mask."""
    import gfss_hf.evaluation as evaluation
    from gfss_hf.data.episodes import EpisodeSpec

    model, processor, split, val, train = setup
    novel = list(split.novel_ids)
    holds = {i: {c for c in novel if (np.asarray(val.get_by_id(i)["label"]) == c).any()} for i in val.ids}
    shared = next(i for i, classes in holds.items() if len(classes) >= 2)
    first, second = sorted(holds[shared])[:2]
    alone = next(i for i, classes in holds.items() if classes == {second} and i != shared)
    queries = [i for i in val.ids if i not in (shared, alone)][:3]
    support_ids = {first: [shared], second: [alone]}
    episodes = [
        EpisodeSpec("synthetic", 0, "diam", k, 42, q, support_ids, sorted(support_ids), run=0)
        for k, q in enumerate(queries)
    ]
    calls = []
    real = evaluation.adapt_classifier

    def spy(model, features, labels, config, **kwargs):
        calls.append((labels.clone(), kwargs))
        return real(model, features, labels, config, **kwargs)

    monkeypatch.setattr(evaluation, "adapt_classifier", spy)
    options = EvaluationOptions(adaptation=AdaptationConfig(steps=2, gamma=10.0), progress=False)
    evaluate_episodes(model, episodes, split=split, val_source=val, processor=processor, options=options)
    assert len(calls) == 1  # one classifier per run
    labels, kwargs = calls[0]
    rank = {c: r for r, c in enumerate(novel)}
    assert kwargs["num_novel_classes"] == len(novel)
    labels = labels.cpu()
    if kwargs.get("support_classes") is not None:  # binary masks + the class of each: the same, written as maps
        classes = torch.as_tensor(kwargs["support_classes"]).cpu()
        labels = torch.where(labels == 1, classes[:, None, None] + 1, labels)
        annotated = torch.nn.functional.one_hot(classes, len(novel)).bool()
    else:
        annotated = kwargs["annotated"].cpu()
    canvas = {i: processor(val.get_by_id(i)["image"], segmentation_maps=np.asarray(val.get_by_id(i)["label"])) for i in (shared, alone)}  # fmt: skip
    for k, image_id in enumerate([shared, alone]):  # supports in class order: first, then second
        truth = canvas[image_id]["labels"][0]
        expected = torch.zeros_like(truth)
        for c in holds[image_id]:
            expected[truth == c] = rank[c] + 1
        expected[truth == 255] = 255
        assert torch.equal(labels[k], expected), image_id
        assert annotated[k].tolist() == [c in holds[image_id] for c in novel]
    assert annotated[0, rank[first]] and annotated[0, rank[second]]  # the shared image: both classes
    assert set(torch.unique(labels[1]).tolist()) <= {0, rank[second] + 1, 255}  # alone: its binary mask
