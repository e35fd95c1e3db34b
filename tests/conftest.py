import os
from pathlib import Path

import pytest
import torch

from sd_plugin.storage.builtin_datasets import FASHION_MNIST_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``fashion_mnist`` skip, with the install line, where the dataset is not installed.

    CI runs ``make test`` before installing it (as a new user would), then ``make test-real-data``.
    """
    if Path(FASHION_MNIST_DIR).is_dir():
        return
    skip = pytest.mark.skip(reason=f"{FASHION_MNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
    for item in items:
        if "fashion_mnist" in item.keywords:
            item.add_marker(skip)
