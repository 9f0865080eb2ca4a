import json

import numpy as np
import pytest

from gfss_hf.data.episodes import (
    EpisodeSpec,
    build_class_index,
    class_index_from_pixel_counts,
    compute_pixel_counts,
    episodes_from_dataset,
    episodes_to_dataset,
    load_episodes,
    sample_capl_run,
    sample_diam_run,
    sample_paper_episodes,
    save_episodes,
    scaled_pixel_threshold,
)
from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import DIAM_MIN_SUPPORT_PIXELS, SyntheticSegmentation

MIN_PIXELS = 64


@pytest.fixture(scope="module")
def synthetic_counts():
    val = SyntheticSegmentation("val", num_images=300)
    train = SyntheticSegmentation("train", num_images=300)
    return val.ids, val.pixel_counts(), train.ids, train.pixel_counts()


def test_pixel_counts_and_class_index():
    labels = [("a", np.array([[0, 1, 1], [2, 255, 255]], dtype=np.uint8)), ("b", np.array([[2, 2, 3]]))]
    counts = compute_pixel_counts(labels)
    assert counts == {"a": {1: 2, 2: 1}, "b": {2: 2, 3: 1}}
    assert class_index_from_pixel_counts(counts, 2, class_ids=[1, 2, 3, 4]) == {1: ["a"], 2: ["b"], 3: [], 4: []}
    assert build_class_index(labels, 1) == {1: ["a"], 2: ["a", "b"], 3: ["b"]}
    assert scaled_pixel_threshold(16384, 417, 96) == 868


def test_paper_sampler_rules_and_determinism(synthetic_counts):
    val_ids, val_counts, _, _ = synthetic_counts
    split = get_split("synthetic", 0)
    index = class_index_from_pixel_counts(val_counts, MIN_PIXELS)
    kwargs = dict(shots=5, num_episodes=1000, seed=42, dataset="synthetic", fold=0)
    episodes = sample_paper_episodes(index, val_ids, split.novel_ids, split.base_ids, **kwargs)
    again = sample_paper_episodes(index, val_ids, split.novel_ids, split.base_ids, **kwargs)
    assert [e.to_dict() for e in episodes] == [e.to_dict() for e in again]
    other = sample_paper_episodes(index, val_ids, split.novel_ids, split.base_ids, **{**kwargs, "seed": 0})
    assert [e.query_id for e in episodes] != [e.query_id for e in other]
    assert len(episodes) == 1000
    for e in episodes:
        (c,) = e.class_ids
        assert c in split.novel_ids and list(e.support_ids) == [c]
        sup = e.support_ids[c]
        assert len(sup) == 5 and len(set(sup)) == 5 and e.query_id not in sup
        for image_id in [e.query_id, *sup]:
            assert val_counts[image_id].get(c, 0) >= MIN_PIXELS
        assert e.base_class_id in split.base_ids
        assert val_counts[e.base_query_id].get(e.base_class_id, 0) >= MIN_PIXELS
        assert e.base_query_id != e.query_id
    assert {e.class_ids[0] for e in episodes} == set(split.novel_ids)


def test_paper_sampler_errors():
    with pytest.raises(ValueError, match="shots"):
        sample_paper_episodes({1: ["a", "b"]}, ["a", "b"], [1], [], shots=0, num_episodes=1, seed=0)
    with pytest.raises(ValueError, match="fewer|has 3 images|lower"):
        sample_paper_episodes({1: ["a", "b"]}, ["a", "b"], [1], [], shots=2, num_episodes=1, seed=0)


def test_diam_run_rules(synthetic_counts):
    val_ids, val_counts, _, _ = synthetic_counts
    split = get_split("synthetic", 2)
    threshold = DIAM_MIN_SUPPORT_PIXELS
    for run in range(3):
        episodes = sample_diam_run(
            val_counts,
            val_ids,
            split.novel_ids,
            2,
            seed=7,
            run=run,
            min_support_pixels=threshold,
            dataset="synthetic",
            fold=2,
        )
        supports = episodes[0].support_ids
        taken = [i for ids in supports.values() for i in ids]
        assert len(taken) == len(set(taken)) == 2 * len(split.novel_ids)
        for c, ids in supports.items():
            for image_id in ids:
                assert val_counts[image_id][c] >= threshold
                assert not any(val_counts[image_id].get(o, 0) for o in split.novel_ids if o != c)
        assert [e.query_id for e in episodes] == [q for q in val_ids if q not in set(taken)]
        assert all(e.support_ids == supports and e.class_ids == list(split.novel_ids) for e in episodes)
    again = sample_diam_run(val_counts, val_ids, split.novel_ids, 2, seed=7, run=2, min_support_pixels=threshold)
    assert again[0].support_ids == supports
    with pytest.raises(ValueError, match="min_support_pixels"):
        sample_diam_run(val_counts, val_ids, split.novel_ids, 2, seed=7, min_support_pixels=10**6)


def test_capl_run_draws_supports_from_train(synthetic_counts):
    val_ids, _, train_ids, train_counts = synthetic_counts
    split = get_split("synthetic", 3)
    episodes = sample_capl_run(train_counts, val_ids, split.novel_ids, 5, seed=1, min_support_pixels=MIN_PIXELS)
    assert [e.query_id for e in episodes] == list(val_ids)
    for c, ids in episodes[0].support_ids.items():
        assert len(ids) == 5 and set(ids) <= set(train_ids)
        assert all(train_counts[i][c] >= MIN_PIXELS for i in ids)


def test_episode_spec_round_trips(tmp_path, synthetic_counts):
    val_ids, val_counts, _, _ = synthetic_counts
    split = get_split("synthetic", 0)
    index = class_index_from_pixel_counts(val_counts, MIN_PIXELS)
    episodes = sample_paper_episodes(index, val_ids, split.novel_ids, split.base_ids, 2, 20, seed=3)
    episodes += sample_diam_run(val_counts, val_ids, split.novel_ids, 1, seed=3, min_support_pixels=500)[:5]
    path = tmp_path / "episodes.json"
    save_episodes(path, episodes)
    assert load_episodes(path) == episodes
    assert json.loads(path.read_text())["format"] == "gfss_hf.episodes"
    assert not [p for p in tmp_path.iterdir() if p.name != "episodes.json"]  # no temporary left behind
    assert episodes_from_dataset(episodes_to_dataset(episodes)) == episodes
    spec = episodes[0]
    assert EpisodeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="protocol='fss'"):
        EpisodeSpec("x", 0, "fss", 0, 0, "q", {1: ["s"]}, [1])
    with pytest.raises(FileNotFoundError, match="save_episodes"):
        load_episodes(tmp_path / "missing.json")


def test_paper_supports_from_a_train_index():
    from gfss_hf.data.episodes import EpisodeSpec, episodes_to_dataset, sample_paper_episodes

    val_index = {1: ["q1", "q2"], 2: ["q3"], 5: ["q1"]}
    train_index = {1: ["t1", "t2", "t3"], 2: ["t4", "t5"]}
    args = (val_index, ["q1", "q2", "q3"], [1, 2], [5], 2, 12, 7)
    episodes = sample_paper_episodes(*args, support_index=train_index)
    assert episodes == sample_paper_episodes(*args, support_index=train_index)  # seeded
    for e in episodes:
        assert e.support_split == "train" and e.support_list == "train"
        assert set(e.all_support_ids()) <= set(train_index[e.class_ids[0]]) and e.query_id.startswith("q")
        assert EpisodeSpec.from_dict(e.to_dict()) == e
    with pytest.raises(ValueError, match="save_episodes"):
        episodes_to_dataset(episodes)
    # Without the train index: the published protocol, whose episodes carry no support_split.
    published = sample_paper_episodes(val_index, ["q1", "q2", "q3"], [1, 2], [5], 1, 4, 7)
    assert all(e.support_split is None and e.support_list == "val" for e in published)
