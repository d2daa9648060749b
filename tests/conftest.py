import os

import numpy as np
import pytest

os.environ.setdefault("CI", "1")  # no progress bars in tests


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
