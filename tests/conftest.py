import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def digits_model():
    """A TinyCNN trained on digits once per session: (model, train, val)."""
    from tiny import trained_tiny_cnn

    return trained_tiny_cnn()
