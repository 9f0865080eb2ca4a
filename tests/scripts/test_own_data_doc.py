"""docs/README_own_data.md cannot rot: its ```bash walkthrough``` blocks run here, as written, in one bash process.

The doc's knobs are `${NAME:-default}` variables; this test sets them to tiny values (below, in TINY_ENV), on a few
real CamVid scenes when GFSS_SAMPLE_DATA is set, else on synthetic street-like scenes in the same layout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures.make_tiny_model import TINY_RECIPE
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "README_own_data.md"
# The tests' tiny training recipe (a 64-px test backbone), with the optimizer the doc's config uses.
TINY_CONFIG = {**TINY_RECIPE, "optimizer": "adamw"}
TINY_ENV = {"IMAGE_SIZE": "64", "EPOCHS": "1", "EPISODES": "4", "STEPS": "2"}


def walkthrough_blocks() -> list[str]:
    return re.findall(r"```bash walkthrough\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def camvid_layout(sample_data: Path | None, root: Path, num_train: int = 8, num_val: int = 12) -> str:
    """A CamVid-layout folder (train/ trainannot/ val/ valannot/); returns the id of a train image with cars."""
    for sub in ("train", "trainannot", "val", "valannot"):
        (root / sub).mkdir(parents=True)
    if sample_data is not None:
        src = sample_data / "camvid"
        for split, count in (("train", num_train), ("val", num_val)):
            for path in sorted((src / split).iterdir())[:count]:
                (root / split / path.name).symlink_to(path)
                (root / f"{split}annot" / path.name).symlink_to(src / f"{split}annot" / path.name)
        return sorted((root / "train").iterdir())[0].stem
    # Synthetic scenes: a 4x3 grid of the 11 classes + void, shuffled per image, each cell its own colour; cells of
    # 48 x 48 px pass pre-training's default 2,048-px filter.
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (12, 3))
    for split, count in (("train", num_train), ("val", num_val)):
        for k in range(count):
            cells = rng.permutation(12).reshape(3, 4)
            label = np.kron(cells, np.ones((48, 48), dtype=np.int64)).astype(np.uint8)
            image = colours[label] + rng.integers(-20, 20, (*label.shape, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / split / f"scene{k:03d}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"scene{k:03d}.png")
    return "scene000"


@pytest.fixture
def maybe_sample_data():
    root = os.environ.get("GFSS_SAMPLE_DATA")
    return Path(root) if root and Path(root).is_dir() else None


def test_doc_uses_variables_for_every_substituted_value():
    blocks = walkthrough_blocks()
    assert len(blocks) >= 4, "the walkthrough blocks are gone or renamed"
    text = "\n".join(blocks)
    for name in [*TINY_ENV, "CONFIG", "CAMVID", "WORK", "SUPPORT"]:
        assert f"${{{name}:-" in text, f"the doc no longer reads ${name}; the test would not shrink that step"
    for script in ("convert_dataset.py", "pretrain.py", "evaluate.py", "predict.py"):
        assert f"scripts/{script}" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_walkthrough_runs_as_written(maybe_sample_data, tmp_path):
    support = camvid_layout(maybe_sample_data, tmp_path / "camvid")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    work = tmp_path / "work"
    env = {
        **os.environ,
        **TINY_ENV,
        "CAMVID": str(tmp_path / "camvid"),
        "WORK": str(work),
        "SUPPORT": support,
        "CONFIG": str(config),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        # `python` in the doc is this interpreter; the package is this checkout's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = "set -euo pipefail\n" + "\n".join(walkthrough_blocks())
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    classes = json.loads((work / "camvid_folder" / "classes.json").read_text())
    assert classes["folds"] == [["Car", "Tree", "SignSymbol"]] and classes["has_background"] is False
    model_config = json.loads((work / "model" / "config.json").read_text())
    assert model_config["image_size"] == 64  # the tiny budget reached pretrain.py
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["num_episodes"] > 0 and results["config"]["options"]["adaptation"]["steps"] == 2
    predictions = json.loads((work / "predictions" / "predictions.json").read_text())
    assert len(predictions["queries"]) == 12 and "Car" in predictions["id2label"].values()
    for record in predictions["queries"]:
        assert (work / "predictions" / record["overlay"]).is_file()
    assert "Car" in json.loads((work / "model_with_car" / "config.json").read_text())["id2label"].values()
