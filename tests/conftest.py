import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Image fingerprints (duplicate detection) are cached per user; tests (and the runs they start) keep theirs apart.
os.environ["COVIDX_CACHE_DIR"] = tempfile.mkdtemp(prefix="covidx-test-cache-")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Under xdist each worker (and every process or notebook kernel it starts, which inherit this) gets one TensorFlow
# thread per pool: two workers with two threads each on two cores spend time fighting for them (measured on 2 cores:
# four heavy files in 162 s instead of 176 s). Read by TensorFlow when its first context is made, after this.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

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


# Longest files first: under --dist loadfile a worker takes the next file when it is free, so a long file started
# last leaves the other worker idle at the end (longest-processing-time-first keeps the two finishing together).
# Order from `pytest --durations` on 2 cores; it changes how long the suite takes, never what it tests.
LONGEST_FIRST = ("notebooks/", "test_multiworker.py", "test_export_families.py", "test_train_cli.py", "test_export.py",
                 "test_default_run.py", "test_list_models.py", "test_source_confounding.py", "test_resume.py",
                 "test_jit_train_steps.py", "test_distributed_steps.py", "test_ensemble.py", "test_systems_cascade.py",
                 "test_leakproof.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        return next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other file keeps its collection order
