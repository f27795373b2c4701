import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Image fingerprints (duplicate detection) are cached per user; tests (and the runs they start) keep theirs apart.
os.environ["COVIDX_CACHE_DIR"] = tempfile.mkdtemp(prefix="covidx-test-cache-")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Fixed seeds for every test (NumPy, Python, TF through keras.utils)."""
    import keras

    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.backend.clear_session()
