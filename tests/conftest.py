"""Shared fixtures: a small model pre-trained on the procedural dataset (fold 0 base classes)."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from fixtures.make_tiny_model import pretrain_tiny  # noqa: E402

FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "gfss-tiny-synthetic-fold0"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Root of the real-format sample data (`$GFSS_SAMPLE_DATA`); skips the test when it is not set."""
    root = os.environ.get("GFSS_SAMPLE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("GFSS_SAMPLE_DATA is not set (or not a folder); real-format data tests skipped")
    return Path(root)


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory):
    """Path of a `save_pretrained` folder (model + image processor): the small model pre-trained on the synthetic
    dataset's fold-0 base classes (96 px), shared by the adaptation, pipeline, evaluation and Space tests.

    It is the committed folder `tests/fixtures/gfss-tiny-synthetic-fold0` (3.5 MB, written by
    `tests/fixtures/make_tiny_model.py`; pre-training it for features worth adapting takes minutes of CPU, too long
    to repeat in every test run), copied so that tests may write into it. Set `GFSS_TEST_RETRAIN_FIXTURE=1` to
    pre-train it afresh with `pretrain_tiny` instead (1,000 steps)."""
    target = tmp_path_factory.mktemp("pretrained_tiny")
    if os.environ.get("GFSS_TEST_RETRAIN_FIXTURE") == "1":
        return pretrain_tiny(target)
    for item in FIXTURE_MODEL.iterdir():
        shutil.copy2(item, target / item.name)
    return target


@pytest.fixture
def umask_027():
    """Run the test under umask 027 (group may read, others nothing), restored afterwards: files written like
    `open()` then have mode 0640 and folders 0750."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)
