"""Dataset yaml resolution: search order, bare names, required keys, missing data and download."""
import io
import os
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


def test_bare_name_found_in_data_folder(coco128):
    for name in ("coco128.yaml", "coco128"):
        d = check_dataset(name)
        assert Path(d["yaml_file"]).resolve() == (data_config.ROOT / "data" / "coco128.yaml").resolve()
        assert Path(d["train"]).resolve() == (coco128 / "images" / "train2017").resolve()
        assert d["nc"] == 80 and d["names"][0] == "person" and d["names"][79] == "toothbrush"


def test_tests_find_coco128_where_the_code_does(tmp_path, monkeypatch):
    """The coco128 fixture follows $DATASETS_DIR through symlinks, as check_dataset does, and with coco128
    nowhere it fails in one line naming every folder searched."""
    from tests.conftest import find_coco128

    real = find_coco128()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "coco128").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "linked"))
    assert find_coco128() == real.resolve() == Path(check_dataset("coco128.yaml")["path"])

    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(data_config, "ROOT", tmp_path / "repo")  # no ../datasets, no ../shared/datasets
    with pytest.raises(DatasetError) as e:
        find_coco128()
    msg = str(e.value)
    assert "\n" not in msg and "dataset path 'coco128' not found" in msg
    for place in (tmp_path / "env", tmp_path / "datasets", tmp_path / "shared" / "datasets"):
        assert str(place / "coco128") in msg


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


def test_missing_dataset_says_how_to_fix_it(fake_repo, tmp_path):
    """A fresh clone without a datasets folder beside it: the error names the three ways out, DATASETS_DIR, the
    ../datasets folder (the repository's sibling) and, for a yaml with a download URL, running online."""
    plain = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a"])
    with pytest.raises(DatasetError) as e:
        check_dataset(plain)
    msg = str(e.value)
    assert "\n" not in msg
    fix = msg[msg.index("to fix: "):]
    assert "DATASETS_DIR=" in fix and f"put toy in {tmp_path / 'datasets'}" in fix
    assert "download" not in fix  # this yaml has none to offer
    url = (tmp_path / "nowhere" / "toy.zip").as_uri()
    online = write_yaml(tmp_path / "online.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                        download=url)
    with pytest.raises(DatasetError) as e:
        check_dataset(online, autodownload=False)
    assert "run online, so that the yaml's download fetches it" in str(e.value).split("to fix: ")[1]
    absolute = write_yaml(tmp_path / "abs.yaml", path=str(tmp_path / "gone"), train="a", val="a", names=["a"])
    with pytest.raises(DatasetError, match=f"to fix: put the dataset at {tmp_path / 'gone'}, or edit the yaml's 'path'"):
        check_dataset(absolute)


def test_readme_says_where_datasets_go_before_the_quick_start_command():
    """The quick start's command fails without coco128 in reach: the README says where it must be first."""
    text = (Path(data_config.__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    quick = text[text.index("## Quick start"):]
    command = quick.index("train.py --data coco128.yaml")
    assert "DATASETS_DIR" in quick[:command] and "../datasets" in quick[:command]


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


def listing(root: Path) -> list[str]:
    """Every path under root (files and folders), relative: what is on disk, not just what is non-empty."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def zip_archive(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


class BrokenStream(io.BytesIO):
    """A download that delivers some bytes and then fails (a dropped connection, or Ctrl-C)."""

    def __init__(self, error):
        super().__init__(b"PK\x03\x04" + b"x" * 100_000)
        self.error = error

    def read(self, n=-1):
        if self.tell() > 50_000:
            raise self.error
        return super().read(min(n, 16_384) if n and n > 0 else 16_384)


GOOD_MEMBERS = {"toy/images/train/0.jpg": b"x", "toy/labels/train/0.txt": b"0 0.5 0.5 0.1 0.1\n"}


@pytest.mark.parametrize("failure", ["missing_url", "dropped_connection", "damaged_archive", "wrong_folder",
                                     "not_an_archive"])
def test_failed_download_leaves_nothing_behind(fake_repo, tmp_path, monkeypatch, failure):
    """../datasets did not exist: a failed attempt must not leave it (or anything in it) behind."""
    source = tmp_path / "source"
    source.mkdir()
    url = (source / "toy.zip").as_uri()
    if failure == "dropped_connection":
        monkeypatch.setattr(data_config.urllib.request, "urlopen",
                            lambda *a, **k: BrokenStream(ConnectionResetError("connection reset by peer")))
    elif failure == "damaged_archive":  # the first member unpacks, the second fails its CRC check
        data = zip_archive(source / "toy.zip", {**GOOD_MEMBERS, "toy/images/train/1.jpg": b"y" * 1000}).read_bytes()
        cut = data.rindex(b"y" * 1000)
        (source / "toy.zip").write_bytes(data[:cut] + b"z" * 10 + data[cut + 10:])
    elif failure == "wrong_folder":
        zip_archive(source / "toy.zip", {"other/images/0.jpg": b"x"})
    elif failure == "not_an_archive":
        (source / "toy.zip").write_bytes(b"<html>not found</html>")
    cfg = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                     download=url)
    before = listing(tmp_path)
    with pytest.raises(DatasetError) as e:
        check_dataset(cfg)
    assert listing(tmp_path) == before and not (tmp_path / "datasets").exists()
    msg = str(e.value)
    assert f"download of {url} into {tmp_path / 'datasets'} failed (nothing left behind)" in msg
    assert {"dropped_connection": "connection reset", "damaged_archive": "CRC", "not_an_archive": "neither a zip",
            "wrong_folder": "does not hold a folder toy/ (it holds: other)"}.get(failure, "") in msg


def test_failed_download_keeps_what_existed_and_removes_only_its_own_folders(fake_repo, tmp_path, monkeypatch):
    env = tmp_path / "env"  # $DATASETS_DIR exists and holds other datasets
    (env / "other" / "images").mkdir(parents=True)
    (env / "other" / "images" / "0.jpg").write_bytes(b"kept")
    (env / "notes.txt").write_text("kept")
    monkeypatch.setenv("DATASETS_DIR", str(env))
    source = tmp_path / "source"
    source.mkdir()
    damaged = zip_archive(source / "toy.zip", {**GOOD_MEMBERS, "other/images/1.jpg": b"y" * 1000,
                                               "toy/images/train/1.jpg": b"w" * 1000})
    data = damaged.read_bytes()
    cut = data.rindex(b"w" * 1000)
    damaged.write_bytes(data[:cut] + b"v" * 10 + data[cut + 10:])
    cfg = write_yaml(tmp_path / "toy.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                     download=damaged.as_uri())
    before = listing(tmp_path)
    with pytest.raises(DatasetError, match="failed"):
        check_dataset(cfg)
    assert listing(tmp_path) == before and (env / "notes.txt").read_text() == "kept"

    # Ctrl-C during the download ends the attempt at once, and cleanly
    monkeypatch.setenv("DATASETS_DIR", str(env / "a" / "b"))  # two folders to make, then remove
    monkeypatch.setattr(data_config.urllib.request, "urlopen", lambda *a, **k: BrokenStream(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        check_dataset(cfg)
    assert listing(tmp_path) == before

    # a good archive that also holds a folder already there: new files join it, old ones stay as they were
    monkeypatch.undo()
    monkeypatch.setattr(data_config, "ROOT", fake_repo)
    monkeypatch.setenv("DATASETS_DIR", str(env))
    good = zip_archive(source / "good.zip", {**GOOD_MEMBERS, "other/images/0.jpg": b"new", "other/images/1.jpg": b"1"})
    cfg = write_yaml(tmp_path / "good.yaml", path="toy", train="images/train", val="images/train", names=["a"],
                     download=good.as_uri())
    assert check_dataset(cfg)["path"] == str(env / "toy")
    assert (env / "other" / "images" / "0.jpg").read_bytes() == b"kept"
    assert (env / "other" / "images" / "1.jpg").read_bytes() == b"1"
    assert sorted(p.name for p in env.iterdir()) == ["notes.txt", "other", "toy"]  # no temporary files left


def test_unknown_yaml_and_invalid_yaml(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        check_dataset(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(DatasetError, match="mapping"):
        check_dataset(bad)


@pytest.mark.parametrize("in_the_way", ["file", "broken_symlink"])
def test_download_blocked_by_a_non_folder_fails_and_cleans_up(fake_repo, tmp_path, monkeypatch, in_the_way):
    """A file or dangling link where the dataset folder belongs: the unpacked folder cannot be moved there, so
    the download must fail in one line (not report success) and take back the other entries it placed."""
    env = tmp_path / "env"
    env.mkdir()
    target = env / "toy"
    if in_the_way == "file":
        target.write_text("not a dataset")
    else:
        target.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("DATASETS_DIR", str(env))
    archive = zip_archive(tmp_path / "toy.zip", {**GOOD_MEMBERS, "extra/readme.txt": b"beside the dataset"})
    before = listing(tmp_path)
    with pytest.raises(DatasetError) as e:
        data_config.resolve_dataset_root("toy", None, archive.as_uri(), autodownload=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"download of {archive.as_uri()} into {env} failed (nothing left behind)" in msg
    assert f"{target} is not a folder" in msg
    assert listing(tmp_path) == before  # 'extra/' and the temporary files are gone, the blocker is untouched
    assert os.path.lexists(target) and not target.is_dir()
