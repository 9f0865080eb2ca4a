"""`gfss_hf.learning.one_shot_predictions` and `episode_figure_row`: the episode predictions the qualitative figures of scripts/demo.py and
scripts/camvid_benchmark.py show."""

import numpy as np
import pytest
import torch

from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf.adaptation import AdaptationConfig, adapt_classifier, predict
from gfss_hf.data.episodes import build_episodes
from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import SyntheticSegmentation
from gfss_hf.learning import episode_figure_row, one_shot_predictions


@pytest.fixture
def episode(pretrained_tiny_dir):
    """The tiny model, its processor, and one 1-shot `paper` episode of fold 0 with a 5-step fine-tuning config."""
    model = GFSSModel.from_pretrained(pretrained_tiny_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(pretrained_tiny_dir)
    split = get_split("synthetic", 0)
    val = SyntheticSegmentation("val", num_images=20, image_size=model.config.image_size)
    spec = build_episodes("paper", split, val, shots=1, num_episodes=1, seed=3)[0]
    novel = spec.class_ids[0]
    support, query = val.get_by_id(spec.support_ids[novel][0]), val.get_by_id(spec.query_id)
    config = AdaptationConfig(steps=5, seed=7)
    return model, processor, split, novel, support, query, config


def test_one_shot_predictions_are_the_fss_and_gfss_maps_of_the_episode(episode):
    model, processor, split, novel, support, query, config = episode
    maps = one_shot_predictions(
        model, processor, support["image"], support["label"], query["image"], query["label"], novel, split.base_ids,
        config, gammas=(0.0, 10.0),
    )  # fmt: skip

    # The same episode written out: FSS rows {0: background, 1: the class}, GFSS rows [background, base..., novel].
    batch = processor(
        [support["image"], query["image"]],
        segmentation_maps=[np.asarray(support["label"]), np.asarray(query["label"])],
    )
    with torch.no_grad():
        features = model.extract_features(batch["pixel_values"])
    label = batch["labels"][0]
    mask = torch.where(label == 255, 255, (label == novel).long())[None]
    size = batch["pixel_values"].shape[-2:]
    h, w = (int(v) for v in batch["resized_sizes"][1])
    fss = adapt_classifier(model, features[:1], mask, AdaptationConfig(method="fss", steps=5, seed=7))
    rows = predict(features[1:], fss, size=size)[0].argmax(0).numpy()[:h, :w]
    expected = [np.where(rows == 1, novel, 0)]
    to_dataset = np.array([0, *split.base_ids, novel])
    for gamma in (0.0, 10.0):
        gfss = adapt_classifier(model, features[:1], mask, AdaptationConfig(gamma=gamma, steps=5, seed=7))
        expected.append(to_dataset[predict(features[1:], gfss, size=size)[0].argmax(0).numpy()[:h, :w]])

    assert len(maps) == 3
    for got, want in zip(maps, expected):
        assert got.dtype == np.int64 and got.shape == (h, w) == np.asarray(query["label"]).shape
        np.testing.assert_array_equal(got, want)
    assert set(np.unique(maps[0])) <= {0, novel}
    assert set(np.unique(maps[1])) <= {0, novel, *split.base_ids}
    # Only the requested GFSS maps are made.
    assert len(one_shot_predictions(
        model, processor, support["image"], support["label"], query["image"], query["label"], novel, split.base_ids,
        config, gammas=(),
    )) == 1  # fmt: skip


def test_episode_figure_row_holds_the_support_mask_truth_and_predictions(episode):
    model, processor, split, novel, support, query, config = episode
    row = episode_figure_row(model, processor, support, query, novel, split.base_ids, "the class", config)
    label = np.asarray(support["label"])
    np.testing.assert_array_equal(row.support_mask, np.where(label == novel, novel, 0))
    assert (row.support_mask == novel).any() and row.name == "the class"
    np.testing.assert_array_equal(row.truth, np.asarray(query["label"]))
    expected = one_shot_predictions(
        model, processor, support["image"], support["label"], query["image"], query["label"], novel, split.base_ids,
        config,
    )  # fmt: skip
    assert len(row.predictions) == len(expected) == 3
    for got, want in zip(row.predictions, expected):
        np.testing.assert_array_equal(got, want)
