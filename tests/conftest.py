import os

import pytest
import torch



@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated data goes to a per-session temp cache, never the user's ~/.cache; no hub access."""
    os.environ["LAVIS_POINT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

