import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Root of the real-format sample data (`$GFSS_SAMPLE_DATA`); skips the test when it is not set."""
    root = os.environ.get("GFSS_SAMPLE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("GFSS_SAMPLE_DATA is not set (or not a folder); real-format data tests skipped")
    return Path(root)
