"""utils/yolov5_import.py and load_checkpoint's import of original YOLOv5 files: tensors taken by name from a
restricted unpickle that instantiates nothing, hostile or malformed files refused in one line."""
import argparse
import ast
import collections
import copy
import os
import pickle
import sys
import types
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.test_checkpoint import _RunsCodeOnLoad, _write_marker, tiny_model
from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.yolov5_import import YOLOv5ImportError, first_refused_global, read_yolov5_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _Trap:
    """Mixed into the stand-ins: if a loader unpickled them for real, the marker file would appear."""

    marker = None  # armed once the checkpoint is written (deepcopy goes through __setstate__ too)

    def __setstate__(self, state):
        if self.marker is not None:
            self.marker.write_text("a YOLOv5 class was instantiated")
        super().__setstate__(state)


def _yolov5_standins():
    """Classes named and shaped like YOLOv5 v7's (models.yolo.DetectionModel, models.common.Conv, ...)
    with real nn.Module internals, living in fake modules registered under YOLOv5's module names."""

    class Conv(_Trap, nn.Module):
        def __init__(self, c1, c2, k=1, s=1):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(c2)
            self.act = nn.SiLU()

    class Detect(_Trap, nn.Module):
        def __init__(self, nc, anchors, ch):
            super().__init__()
            self.nc, self.no, self.nl, self.na = nc, nc + 5, len(anchors), len(anchors[0]) // 2
            self.grid = [torch.empty(0)] * self.nl
            self.anchor_grid = [torch.empty(0)] * self.nl
            self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
            self.register_buffer("cache", torch.ones(2), persistent=False)  # not in a state dict
            self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
            self.inplace = True
            self.stride = torch.tensor([8.0])

    class DetectionModel(_Trap, nn.Module):
        def __init__(self):
            super().__init__()
            layers = [Conv(3, 4, 3, 2), Conv(4, 8, 3, 2), Detect(3, [[10, 13, 16, 30, 33, 23]], (8,))]
            for i, m in enumerate(layers):
                m.i, m.f, m.type, m.np = i, -1, type(m).__name__, sum(p.numel() for p in m.parameters())
            self.model = nn.Sequential(*layers)
            self.yaml = {"nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
                         "backbone": [[-1, 1, "Conv", [4, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]],
                         "head": [[-1, 1, "Detect", ["nc", "anchors"]]], "ch": 3}
            self.save, self.stride, self.inplace = [], torch.tensor([4.0]), True
            self.names = {0: "red", 1: "green", 2: "blue"}
            self.nc = 3
            self.hyp = {"lr0": 0.01, "box": 0.05}
            self.class_weights = torch.tensor([0.2, 0.3, 0.5])

    common, yolo = types.ModuleType("models.common"), types.ModuleType("models.yolo")
    for module, classes in ((common, (Conv,)), (yolo, (Detect, DetectionModel))):
        for cls in classes:
            cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
            setattr(module, cls.__name__, cls)
    return common, yolo, DetectionModel


def _yolov5_like_checkpoint(monkeypatch, tmp_path, stripped):
    marker = tmp_path / "executed"
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    torch.manual_seed(0)
    model = DetectionModel()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(11)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    half = copy.deepcopy(model).half()
    if stripped:  # what YOLOv5's strip_optimizer leaves in a released yolov5s.pt
        raw = {"epoch": -1, "best_fitness": None, "model": half, "ema": None, "updates": None,
               "optimizer": None, "opt": argparse.Namespace(weights=PosixPath("yolov5s.pt")), "git": None,
               "date": "2022-11-22"}
    else:  # YOLOv5 v7's last.pt during a run
        raw = {"epoch": 4, "best_fitness": np.array([0.4125]), "model": None, "ema": half, "updates": 12,
               "optimizer": optimizer.state_dict(), "opt": {"weights": PosixPath("yolov5s.pt"), "epochs": 5,
                                                            "img_size": [640, 640], "ns": np.float64(1.5)},
               "git": {"remote": "x", "commit": "abc"}, "date": "2022-11-22T10:00:00"}
    path = tmp_path / "yolov5.pt"
    torch.save(raw, path)
    monkeypatch.setattr(_Trap, "marker", marker)  # undone by monkeypatch after the test
    with pytest.raises(pickle.UnpicklingError):  # the ordinary weights-only loader refuses this file
        torch.load(path, weights_only=True)
    return path, model, marker


@pytest.mark.parametrize("stripped", [False, True])
def test_yolov5_import_takes_tensors_by_name_without_running_anything(tmp_path, monkeypatch, stripped):
    path, original, marker = _yolov5_like_checkpoint(monkeypatch, tmp_path, stripped)
    # The stand-in classes stay importable under YOLOv5's names: only the placeholders may be used.
    ckpt = load_checkpoint(path)
    assert not marker.exists()

    expected = original.state_dict()
    assert "model.2.cache" not in expected and "model.2.anchors" in expected
    for key in ("model",) + (() if stripped else ("ema",)):
        sd = ckpt[key]
        assert list(sd) == list(expected)
        for name, tensor in expected.items():
            want = tensor.half() if tensor.is_floating_point() else tensor
            assert sd[name].dtype == want.dtype and torch.equal(sd[name], want), name
    if stripped:
        assert ckpt["ema"] is None
    assert ckpt["names"] == ["red", "green", "blue"] and ckpt["nc"] == 3
    assert ckpt["yaml"]["head"] == [[-1, 1, "Detect", ["nc", "anchors"]]]
    assert ckpt["hyp"] == {"lr0": 0.01, "box": 0.05}
    assert ckpt["opt"]["weights"] == "yolov5s.pt" and ckpt["imported_from"] == "yolov5"
    if stripped:
        assert (ckpt["epoch"], ckpt["best_fitness"], ckpt["updates"]) == (-1, 0.0, 0)
    else:
        assert (ckpt["epoch"], ckpt["best_fitness"], ckpt["updates"]) == (4, 0.4125, 12)
        assert type(ckpt["best_fitness"]) is float and ckpt["opt"]["ns"] == 1.5
    # The import is in our format: it saves and reloads with weights_only=True.
    save_checkpoint(ckpt, tmp_path / "ours.pt")
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["names"] == ["red", "green", "blue"]
    # Control: the stand-ins are live traps, so an unrestricted load would have instantiated them.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_yolov5_file_with_a_hostile_entry_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    hostile = tmp_path / "hostile"
    torch.save({"model": DetectionModel().half(), "opt": _RunsCodeOnLoad(_write_marker, str(hostile))},
               tmp_path / "y.pt")
    monkeypatch.setattr(_Trap, "marker", marker)
    with pytest.raises(CheckpointError, match=r"refused: its pickle references tests.test_checkpoint._write_marker"):
        load_checkpoint(tmp_path / "y.pt")
    assert not hostile.exists() and not marker.exists()


def test_yolov5_file_with_malformed_attributes_fails_with_one_line(tmp_path, monkeypatch):
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    model = DetectionModel()
    model.nc = "three"  # readable by the restricted unpickler, meaningless as a class count
    torch.save({"model": model.half(), "ema": None}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd.pt is not a usable YOLOv5 checkpoint \(ValueError") as info:
        load_checkpoint(tmp_path / "odd.pt")
    assert "\n" not in str(info.value)


def test_yolov5_file_with_an_overlapping_tensor_view_is_refused(tmp_path, monkeypatch):
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    model = DetectionModel()
    # torch.save keeps views: one stored float, shown 2**40 times (stride 0); a copy would need 4 TiB
    model.model[2].register_buffer("huge", torch.zeros(1).expand(2**40))
    torch.save({"model": model, "ema": None}, tmp_path / "bomb.pt")
    with pytest.raises(CheckpointError, match=r"bomb.pt is not a usable checkpoint: tensor larger than its storage"):
        load_checkpoint(tmp_path / "bomb.pt")


def test_pickled_model_of_ours_imports_and_runs(tmp_path, monkeypatch):
    """Our layer classes carry YOLOv5's module paths (models.yolo, models.common), so a whole pickled model
    is a faithful YOLOv5 file; it must import with those modules made unimportable."""
    model = tiny_model(seed=3).eval()
    x = torch.rand(1, 3, 64, 64)
    model(x)  # populate Detect's grid cache, as YOLOv5 files carry grids
    torch.save({"epoch": -1, "model": copy.deepcopy(model).half(), "ema": None, "best_fitness": None,
                "date": "2022-01-01"}, tmp_path / "yolov5n.pt")
    for name in ("models.yolo", "models.common"):
        monkeypatch.setitem(sys.modules, name, None)  # any import attempt now raises ImportError
    ckpt = load_checkpoint(tmp_path / "yolov5n.pt")
    monkeypatch.undo()

    built = model_from_checkpoint(ckpt)
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
    for name, value in built.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    assert torch.equal(built(x)[0], reference(x)[0])
    assert built.names == ["0", "1", "2"]


# ------------------------------------------------------------------------- the importer on its own
def test_reader_returns_the_tensors_as_stored_and_plain_options(tmp_path, monkeypatch):
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    torch.manual_seed(1)
    model = DetectionModel()  # FP32, as a user's own pickled model may be
    del model.model[2].anchor_grid
    model.model[2].register_buffer("anchor_grid", torch.ones(1, 3, 1, 1, 2))  # YOLOv5 <= v5.0 kept it as a buffer
    opt = {"keep": 3, "device": torch.device("cpu"), "blob": b"\x00\x01", "arr": np.array([1.5, 2.5]),
           "nested": {"save_dir": PosixPath("runs/train/exp"), "act": nn.SiLU()}, "epochs": np.int64(5)}
    torch.save({"model": model, "ema": None, "opt": opt}, tmp_path / "fp32.pt")

    read = read_yolov5_checkpoint(tmp_path / "fp32.pt")
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("anchor_grid")}
    assert "model.2.anchor_grid" in model.state_dict() and list(read.model) == list(expected)
    for name, tensor in expected.items():
        assert read.model[name].dtype == tensor.dtype and torch.equal(read.model[name], tensor), name
    assert read.model["model.0.conv.weight"].dtype == torch.float32  # not halved here: that is the format's choice
    assert read.ema is None and read.date is None
    # Plain values kept (numpy numbers and arrays as Python ones, paths as text), everything else dropped.
    assert read.opt == {"keep": 3, "arr": [1.5, 2.5], "nested": {"save_dir": "runs/train/exp"}, "epochs": 5}
    assert type(read.opt["epochs"]) is int
    assert (read.epoch, read.best_fitness, read.updates, read.nc) == (-1, 0.0, 0, 3)

    ckpt = load_checkpoint(tmp_path / "fp32.pt")  # our format: FP16 weights, the time of import as date
    assert ckpt["model"]["model.0.conv.weight"].dtype == torch.float16 and ckpt["ema"] is None
    assert torch.equal(ckpt["model"]["model.0.conv.weight"], expected["model.0.conv.weight"].half())
    assert ckpt["date"][:2] == "20" and ckpt["opt"] == read.opt


def test_reader_raises_its_own_error_with_the_loaders_message(tmp_path, monkeypatch):
    common, yolo, DetectionModel = _yolov5_standins()
    monkeypatch.setitem(sys.modules, "models.common", common)
    monkeypatch.setitem(sys.modules, "models.yolo", yolo)
    torch.save({"model": DetectionModel(), "opt": _RunsCodeOnLoad(os.system, "true")}, tmp_path / "y.pt")
    expected = (f"{tmp_path / 'y.pt'} refused: its pickle references posix.system, which is neither a tensor "
                "nor a known YOLOv5 class (nothing was executed)")
    with pytest.raises(YOLOv5ImportError) as info:
        read_yolov5_checkpoint(tmp_path / "y.pt")
    assert str(info.value) == expected and not isinstance(info.value, CheckpointError)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "y.pt")
    assert str(info.value) == expected


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_first_refused_global_names_what_the_pickle_would_call(tmp_path, protocol):
    allowed = tmp_path / "allowed.pkl"  # only globals a YOLOv5 file may name: OrderedDict, a set, a path
    with open(allowed, "wb") as f:
        pickle.dump({"a": collections.OrderedDict(x=1), "s": {1, 2}, "p": PosixPath("a/b")}, f, protocol=protocol)
    assert first_refused_global(allowed) is None
    hostile = tmp_path / "hostile.pkl"
    with open(hostile, "wb") as f:
        pickle.dump({"ok": PosixPath("a"), "x": _RunsCodeOnLoad(_write_marker, str(tmp_path / "m"))}, f,
                    protocol=protocol)
    assert first_refused_global(hostile) == "tests.test_checkpoint._write_marker"
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format: several pickles in a row, the data one after
    torch.save({"w": torch.ones(2), "run": _RunsCodeOnLoad(os.system, "true")}, legacy,
               _use_new_zipfile_serialization=False)
    assert first_refused_global(legacy) == "posix.system"
    assert not (tmp_path / "m").exists()


def test_importer_is_a_leaf_module():
    # One-way imports: utils.checkpoint uses the importer, never the reverse, and the importer needs no
    # other module of this project (so it can never close a circle).
    tree = ast.parse((ROOT / "utils" / "yolov5_import.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "collections", "contextlib", "io", "math", "pathlib", "pickle", "pickletools",
                        "zipfile", "dataclasses", "typing", "numpy", "torch", "torch.nn"}
    checkpoint_tree = ast.parse((ROOT / "utils" / "checkpoint.py").read_text())
    assert "utils.yolov5_import" in {n.module for n in ast.walk(checkpoint_tree) if isinstance(n, ast.ImportFrom)}
