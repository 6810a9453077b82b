"""Shared test fixtures: the project root on sys.path and the real coco128 dataset, found as the code finds it."""
import signal
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.data_config import DatasetError, find_data_yaml, resolve_dataset_root  # noqa: E402


def find_coco128() -> Path:
    """The coco128 root that `--data coco128.yaml` uses: data/coco128.yaml's `path` looked up like every
    dataset ($DATASETS_DIR, ../datasets, ../shared/datasets), without downloading. Raises DatasetError
    naming every place searched when it is nowhere, or the folder when it lacks images/train2017."""
    yaml_file = find_data_yaml("coco128.yaml")
    path = yaml.safe_load(yaml_file.read_text(encoding="utf-8")).get("path")
    root = resolve_dataset_root(path, yaml_file, download=None, autodownload=False)
    if not (root / "images" / "train2017").is_dir():
        raise DatasetError(f"coco128 at {root} has no images/train2017 folder")
    return root


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_delivered():
    """Ctrl-C reaches the tests' runs however the suite was started. A shell starts background jobs (`bash .ci/run &`)
    with SIGINT ignored, Python keeps it ignored, and so does every process it starts; the Ctrl-C tests need it."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def coco128() -> Path:
    """Path of the real coco128 dataset (resolved, as the code returns it). The tests that need it fail with
    one line naming the places searched when it is absent."""
    try:
        return find_coco128()
    except DatasetError as e:
        reason = str(e)
    pytest.fail(f"these tests need coco128: {reason}", pytrace=False)  # outside except: no chained report


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, loopback port) for the tests that track runs; its http:// URI.
    Started once, when the first test asks, and stopped at the end of the session whatever happened."""
    from tests.services import mlflow_server as server

    with server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri
