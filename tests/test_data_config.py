"""Dataset yaml resolution: search order, bare names, required keys, missing data and download."""
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from utils import data_config
from utils.data_config import DatasetError, check_dataset


def make_dataset(root: Path, n_images: int = 1) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(n_images):
        (root / "images" / "train" / f"{i}.jpg").write_bytes(b"x")
    return root


def write_yaml(file: Path, **keys) -> Path:
    file.write_text(yaml.safe_dump(keys))
    return file


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A repository root at tmp/repo, so ROOT.parent/'datasets' and ROOT.parent/'shared'/'datasets' are in tmp."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    monkeypatch.setattr(data_config, "ROOT", repo)
    monkeypatch.setattr(data_config, "DATA_DIR", repo / "data")
    monkeypatch.delenv("DATASETS_DIR", raising=False)
    return repo


def test_relative_path_search_order(fake_repo, tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a", "b"])
    shared = make_dataset(tmp_path / "shared" / "datasets" / "toy")
    assert check_dataset(cfg)["path"] == str(shared)  # only the last candidate exists

    sibling = make_dataset(tmp_path / "datasets" / "toy")
    d = check_dataset(cfg)
    assert d["path"] == str(sibling)  # ../datasets beats ../shared/datasets
    assert d["train"] == str(sibling / "images" / "train") and d["val"] == d["train"]

    env = make_dataset(tmp_path / "env" / "toy")
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "env"))
    assert check_dataset(cfg)["path"] == str(env)  # $DATASETS_DIR beats both


def test_absolute_path_names_dict_and_lists(tmp_path):
    root = make_dataset(tmp_path / "abs")
    (root / "images" / "val").mkdir()
    (root / "val.txt").write_text("images/val/0.jpg\n")
    cfg = write_yaml(tmp_path / "abs.yaml", path=str(root), train=["images/train", "images/val"],
                     val="val.txt", names={0: "cat", 1: "dog", 2: "bird"}, nc=3)
    d = check_dataset(cfg)
    assert d["path"] == str(root)
    assert d["train"] == [str(root / "images" / "train"), str(root / "images" / "val")]
    assert d["val"] == str(root / "val.txt")
    assert d["names"] == ["cat", "dog", "bird"] and d["nc"] == 3
    assert d["yaml_file"] == str(cfg) and "test" not in d
    assert check_dataset(d) == d  # an already checked dict passes through unchanged


def test_bare_name_found_in_data_folder(coco128, monkeypatch):
    monkeypatch.delenv("DATASETS_DIR", raising=False)
    for name in ("coco128.yaml", "coco128"):
        d = check_dataset(name)
        assert d["yaml_file"] == str(data_config.ROOT / "data" / "coco128.yaml")
        assert Path(d["train"]) == coco128 / "images" / "train2017"
        assert d["nc"] == 80 and d["names"][0] == "person" and d["names"][79] == "toothbrush"


@pytest.mark.parametrize("key", ["train", "val", "names"])
def test_missing_key_named_with_file(tmp_path, key):
    root = make_dataset(tmp_path / "ds")
    keys = dict(path=str(root), train="images/train", val="images/train", names=["a"])
    del keys[key]
    cfg = write_yaml(tmp_path / "bad.yaml", **keys)
    with pytest.raises(DatasetError) as e:
        check_dataset(cfg)
    assert f"'{key}'" in str(e.value) and str(cfg) in str(e.value)


def test_nc_must_agree_with_names(tmp_path):
    root = make_dataset(tmp_path / "ds")
    cfg = write_yaml(tmp_path / "nc.yaml", path=str(root), train="images/train", val="images/train",
                     names=["a", "b"], nc=3)
    with pytest.raises(DatasetError, match="nc=3 disagrees"):
        check_dataset(cfg)


def test_missing_image_folder_named(tmp_path):
    root = make_dataset(tmp_path / "ds")
    cfg = write_yaml(tmp_path / "v.yaml", path=str(root), train="images/train", val="images/val", names=["a"])
    with pytest.raises(DatasetError) as e:
        check_dataset(cfg)
    assert str(root / "images" / "val") in str(e.value) and "'val'" in str(e.value)


def test_missing_dataset_lists_searched_paths_and_failed_download(fake_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "env"))
    missing_archive = tmp_path / "nowhere" / "toy.zip"
    cfg = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                     download=missing_archive.as_uri())
    with pytest.raises(DatasetError) as e:
        check_dataset(cfg)
    msg = str(e.value)
    for searched in (tmp_path / "env" / "toy", tmp_path / "datasets" / "toy", tmp_path / "shared" / "datasets" / "toy"):
        assert str(searched) in msg
    assert "download of" in msg and "failed" in msg and missing_archive.as_uri() in msg

    with pytest.raises(DatasetError, match="download .* is disabled"):
        check_dataset(cfg, autodownload=False)

    script = write_yaml(tmp_path / "script.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                        download="import os; os.remove('x')")
    with pytest.raises(DatasetError, match="not a URL .* scripts are not run"):
        check_dataset(script)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_unpacks_into_first_writable_candidate(fake_repo, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "env"))
    archive = tmp_path / f"toy.{kind}"
    members = {"toy/images/train/0.jpg": b"x", "toy/labels/train/0.txt": b"0 0.5 0.5 0.1 0.1\n"}
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(archive, "w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    cfg = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                     download=archive.as_uri())
    d = check_dataset(cfg)
    assert d["path"] == str(tmp_path / "env" / "toy")
    assert (tmp_path / "env" / "toy" / "labels" / "train" / "0.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"
    assert not list((tmp_path / "env").glob("*.part"))  # the temporary archive is cleaned up


def test_unknown_yaml_and_invalid_yaml(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        check_dataset(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(DatasetError, match="mapping"):
        check_dataset(bad)
