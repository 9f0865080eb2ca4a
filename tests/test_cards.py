"""Model cards: Hub YAML + model-index from results.json (read through the results schema of gfss_hf.results),
the planned cards in model_cards/, scripts/make_cards.py."""

import importlib.util
import json
import stat
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from gfss_hf import GFSSConfig
from gfss_hf.cards import (
    PLANNED_CHECKPOINTS,
    load_training_config,
    planned_model_card,
    render_model_card,
    save_model_card,
)
from gfss_hf.data.splits import get_split
from gfss_hf.results import eval_results_to_entries, load_results

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv):
    """scripts/make_cards.py's entry point."""
    spec = importlib.util.spec_from_file_location("make_cards", REPO_ROOT / "scripts" / "make_cards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


# The payload of scripts/evaluate.py (gfss_hf.results.save_results): settings under `config`, fractions in [0, 1].
EVALUATE_PAYLOAD = {
    "gfss_hf_version": "0.1.0",
    "config": {
        "model": "/somewhere/model",
        "dataset": "synthetic",
        "fold": 0,
        "split_kind": "default",
        "protocol": "paper",
        "shots": 1,
        "seed": 42,
        "options": {"episode_batch_size": 8, "adaptation": {"steps": 100, "gamma": 10.0, "lr": 0.1}},
    },
    "protocol": "paper",
    "metrics": {
        "fss_novel_miou": 0.559,
        "fss_fb_iou": 0.7123,
        "gfss_novel_miou": 0.577,
        "gfss_base_miou": 0.696,
        "gfss_mean_miou": 0.6365,
        "gfss_harmonic_miou": 0.631,
        "gfss_fb_iou": 0.70,
        "fss_novel_episode_miou": 0.61,
    },
    "per_class": {"fss": {"star-plain": 0.5}},
    "runs": [],
    "num_episodes": 200,
    "episodes_hash": "abc123",
}
# Several evaluations gathered by hand in the results schema (gfss_hf.results.load_results).
HAND_WRITTEN = {
    "results": [
        {
            "protocol": "diam",
            "dataset": "synthetic",
            "fold": 0,
            "shots": 5,
            "metrics": {
                "base_miou": 0.7089,
                "base_miou_std": 0.004,
                "novel_miou": 0.3511,
                "mean_miou": 0.53,
                "harmonic_miou": None,
            },
            "runs": [{"run": 0}],  # nested data stays in results.json, out of the card
        },
    ]
}


def _config(**kwargs):
    split = get_split("synthetic", 0)
    return GFSSConfig(base_class_names=split.base_names, dataset="synthetic", fold=0, **kwargs)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_model_index_round_trip_matches_results(tmp_path, umask_027):
    (tmp_path / "paper").mkdir()
    results_paths = [tmp_path / "paper" / "results.json", tmp_path / "diam.json"]
    results_paths[0].write_text(json.dumps(EVALUATE_PAYLOAD))
    results_paths[1].write_text(json.dumps(HAND_WRITTEN))
    card = render_model_card(_config(), results_paths, repo_id="someone/gfss-synthetic-fold0")
    path = save_model_card(card, tmp_path / "README.md")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a plain write's mode under umask 027, not mkstemp's 0600

    loaded = ModelCard.load(path)
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "image-segmentation"
    assert {"few-shot-segmentation", "generalized-few-shot-segmentation", "pspnet"} <= set(loaded.data.tags)
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.model_name == "gfss-synthetic-fold0"

    # Every headline number of results.json is in model-index, in percent, under its results.json key (one
    # vocabulary); per-episode means and standard deviations are not.
    got = {e.dataset_config: e.metrics for e in eval_results_to_entries(loaded.data.eval_results)}
    assert got == {
        "fold0-1shot-paper": {
            "fss_novel_miou": 55.9,
            "fss_fb_iou": 71.23,
            "gfss_novel_miou": 57.7,
            "gfss_base_miou": 69.6,
            "gfss_mean_miou": 63.65,
            "gfss_harmonic_miou": 63.1,
            "gfss_fb_iou": 70.0,
        },
        "fold0-5shot-diam": {"base_miou": 70.89, "novel_miou": 35.11, "mean_miou": 53.0},
    }
    assert got == {e.dataset_config: e.metrics for e in load_results(results_paths)}
    raw = _front_matter(path.read_text())["model-index"][0]["results"]
    first = raw[0]
    assert first["task"]["type"] == "image-segmentation"
    assert first["dataset"]["type"] == "synthetic" and first["dataset"]["split"] == "val"
    assert first["dataset"]["args"] == {
        "fold": 0,
        "shots": 1,
        "protocol": "paper",
        "split_kind": "default",
        "seed": 42,
        "steps": 100,
        "gamma": 10.0,
        "lr": 0.1,
        "gfss_hf_version": "0.1.0",
        "num_episodes": 200,
        "episodes_hash": "abc123",
    }

    text = path.read_text()
    assert (
        "| synthetic shapes (gfss_hf) | 0 | 1 | `paper` | 55.90 | 57.70 | 69.60 | 63.65 | 63.10 | 71.23 | 70.00 |"
        in text
    )
    # One table per protocol (their metrics differ).
    assert "| synthetic shapes (gfss_hf) | 0 | 5 | `diam` | 70.89 ± 0.40 | 35.11 | 53.00 |" in text
    assert "someone/gfss-synthetic-fold0" in text and "trust_remote_code=True" in text
    for heading in (
        "## Model",
        "## Intended use",
        "## How to use",
        "## Training recipe",
        "## Evaluation",
        "## Limitations",
        "## Citation",
    ):
        assert heading in text
    assert "Liu, Haoming and Zhang, Chengyu and Lu, Xiaochen" in text
    # The held-out (novel) classes of fold 0 are named for the user.
    assert "star-plain" in text and "not trained yet" not in text


def test_results_schema_is_tolerant_but_strict_on_ambiguity(caplog):
    entry = {
        "protocol": "capl",
        "dataset": "pascal5i",
        "fold": 2,
        "shots": 1,
        "metrics": {"base_miou": 0.5, "total_miou": 0.25, "harmonic_miou": "n/a"},
    }
    (parsed,) = load_results(entry)  # a single entry, a non-numeric metric
    assert parsed.metrics == {"base_miou": 50.0, "total_miou": 25.0}
    assert parsed.shots == 1 and parsed.dataset_config == "fold2-1shot-capl"
    assert load_results([entry]) == [parsed]
    percent = load_results({"metrics_unit": "percent", "results": [{**entry, "metrics": {"base_miou": 50.0}}]})
    assert percent[0].metrics == {"base_miou": 50.0}
    # dataset / fold may come from the model's config.
    (defaulted,) = load_results(
        {"protocol": "paper", "shots": 5, "metrics": {"gfss_base_miou": 0.1}},
        defaults={"dataset": "coco20i", "fold": 3},
    )
    assert (defaulted.dataset, defaulted.fold) == ("coco20i", 3)

    with pytest.raises(ValueError, match="metrics_unit"):
        load_results({**entry, "metrics": {"base_miou": 55.9}})
    with pytest.raises(ValueError, match="'shots'"):
        load_results({"protocol": "paper", "dataset": "pascal5i", "fold": 0, "metrics": {"base_miou": 0.5}})
    with pytest.raises(ValueError, match="repeats"):
        load_results([entry, entry])
    # One vocabulary: a key results.json never holds (an old card name, a typo) is refused, naming the keys.
    with pytest.raises(ValueError, match="unknown metric.*fss_novel_miou"):
        load_results({**entry, "metrics": {"novel_miou_2way": 0.5}})
    with pytest.raises(ValueError, match="planned"):
        render_model_card(_config(), entry, planned=True)
    with pytest.raises(FileNotFoundError, match="evaluate.py"):
        load_results("/nonexistent/results.json")


def test_planned_cards_are_generated_and_in_sync(tmp_path):
    assert sorted(PLANNED_CHECKPOINTS) == sorted([(d, f) for d in ("pascal5i", "coco20i") for f in range(4)])
    for dataset, fold in PLANNED_CHECKPOINTS:
        path = REPO_ROOT / "model_cards" / f"gfss-{dataset}-fold{fold}.md"
        text = path.read_text()
        assert text == str(planned_model_card(dataset, fold)), (
            f"{path} is stale: run python scripts/make_cards.py --planned model_cards/"
        )
        card = ModelCard.load(path)
        assert card.data.eval_results is None and "model-index" not in _front_matter(text)  # no invented numbers
        assert "not trained yet" in text and "No evaluation results yet" in text
        assert f"accelerate launch scripts/pretrain.py --config scripts/configs/{dataset}.yaml --fold {fold}" in text
        assert f"scripts/evaluate.py outputs/{dataset}-fold{fold} --dataset {dataset} --fold {fold}" in text
        assert f"--repo_id gfss-hf/gfss-{dataset}-fold{fold}" in text
        split = get_split(dataset, fold)
        assert ", ".join(split.novel_names) in " ".join(text.split())
        # The recipe is the one of the training YAML the command uses.
        assert (
            f"| num_epochs | {100 if dataset == 'pascal5i' else 20} |" in text
            and "| contrastive_weight | 0.1 |" in text
        )
        assert f"| fold | {fold} |" in text
    written = main(["--planned", str(tmp_path)])
    assert written == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"gfss-{d}-fold{f}.md" for d, f in PLANNED_CHECKPOINTS)


def test_card_from_output_folder_lists_the_recorded_recipe(tmp_path):
    config = _config(backbone="test_resnet", hidden_size=32, image_size=64)
    config.save_pretrained(tmp_path)
    (tmp_path / "training_config.yaml").write_text(
        yaml.safe_dump(
            {
                "dataset": "synthetic",
                "fold": 0,
                "num_epochs": 4,
                "contrastive_weight": 0.2,
                "learning_rate": 0.02,
                "backbone_weights": "/secret/place/resnet.safetensors",
                "output_dir": "/tmp/x",
                "num_workers": 2,
            }
        )
    )
    recipe = load_training_config(tmp_path)
    assert recipe["contrastive_weight"] == 0.2 and recipe["backbone_weights"] == "resnet.safetensors"
    assert "output_dir" not in recipe and "num_workers" not in recipe
    out = tmp_path / "card.md"
    assert main(["--model_dir", str(tmp_path), "--output", str(out), "--repo_id", "me/tiny"]) == 0
    text = out.read_text()
    assert "| contrastive_weight | 0.2 |" in text and "/secret/place" not in text
    assert "| Backbone | `test_resnet`, output stride 8 |" in text
    assert "No evaluation results yet." in text
    assert load_training_config(tmp_path / "missing") is None
