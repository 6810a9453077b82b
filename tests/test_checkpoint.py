"""utils/checkpoint.py: atomic writes, weights-only loads, refusal of hostile pickles, YOLOv5 import."""
import argparse
import copy
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import Model
from utils.checkpoint import (
    CheckpointError,
    check_checkpoint_classes,
    half_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    strip_resume_state,
)

# Two output levels (strides 4 and 8) at width 0.25: a real YOLOv5 layout that builds in milliseconds.
TINY_YAML = {
    "nc": 3,
    "depth_multiple": 0.33,
    "width_multiple": 0.25,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "C3", [32]],
                 [-1, 1, "Conv", [64, 3, 2]]],
    "head": [[[2, 3], 1, "Detect", ["nc", "anchors"]]],
}


def tiny_model(seed=0, yaml=TINY_YAML):
    torch.manual_seed(seed)
    model = Model(copy.deepcopy(yaml), ch=3, verbose=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a lost buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return model


def our_checkpoint(model, **extra):
    ckpt = {
        "format": "yolo-ema", "version": 1, "epoch": 2, "best_fitness": 0.25,
        "model": half_state_dict(model.state_dict()), "ema": half_state_dict(model.state_dict()),
        "updates": 5, "optimizer": None, "opt": {}, "hyp": {"lr0": 0.01}, "yaml": model.yaml,
        "nc": model.nc, "names": ["cat", "dog", "bird"], "date": "2026-01-01T00:00:00",
    }
    ckpt.update(extra)
    return ckpt


# ------------------------------------------------------------------------------------------- saving
def test_save_converts_paths_and_numpy_and_loads_weights_only(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint({"format": "yolo-ema", "opt": {"save_dir": PosixPath("runs/exp"), "fit": np.float64(0.5),
                                                   "n": np.int64(3), "t": (1, "a")}, "x": torch.arange(3)}, path)
    raw = torch.load(path, weights_only=True)
    assert raw["opt"] == {"save_dir": "runs/exp", "fit": 0.5, "n": 3, "t": (1, "a")}
    assert type(raw["opt"]["fit"]) is float and type(raw["opt"]["n"]) is int
    assert torch.equal(raw["x"], torch.arange(3))


def test_save_refuses_objects_naming_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint\['opt'\]\['act'\]: torch.nn.modules.activation.SiLU"):
        save_checkpoint({"opt": {"act": nn.SiLU()}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"numpy.ndarray is not a plain value"):
        save_checkpoint({"best_fitness": np.zeros(1)}, tmp_path / "w.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_previous_file_whole(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a complete payload went to the temp file...
        f.write(b"partial")
        raise error  # ...then the process was interrupted before the rename

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(CheckpointError if isinstance(error, Exception) else KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_save_replaces_and_keeps_permissions(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(path, 0o640)
    save_checkpoint({"epoch": 2}, path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert torch.load(path, weights_only=True) == {"epoch": 2}


def test_half_state_dict():
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    sd = {"w": base.t(), "n": torch.tensor(7), "p": nn.Parameter(torch.ones(2))}
    out = half_state_dict(sd)
    assert out["w"].dtype == torch.float16 and out["w"].is_contiguous()
    assert torch.equal(out["w"].float(), base.t())
    assert out["n"].dtype == torch.int64 and out["n"].item() == 7
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    out["n"] += 1  # a copy, not a view of the caller's tensor
    assert sd["n"].item() == 7


def test_strip_resume_state(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(our_checkpoint(tiny_model(), resume={"model": {"a": torch.ones(2)}, "rng": [1, 2]}), path)
    assert strip_resume_state(path) is True
    ckpt = load_checkpoint(path)
    assert "resume" not in ckpt and ckpt["updates"] == 5
    assert strip_resume_state(path) is False


# ------------------------------------------------------------------------------------------ loading
def test_roundtrip_and_model_from_checkpoint(tmp_path):
    model = tiny_model()
    ema = tiny_model(seed=1)
    ckpt = our_checkpoint(model, ema=half_state_dict(ema.state_dict()))
    save_checkpoint(ckpt, tmp_path / "best.pt")
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert loaded["names"] == ["cat", "dog", "bird"] and loaded["best_fitness"] == 0.25

    for use_ema, source in ((True, ema), (False, model)):
        built = model_from_checkpoint(loaded, use_ema=use_ema)
        assert not built.training and built.names == ["cat", "dog", "bird"] and built.nc == 3
        assert torch.equal(built.stride, torch.tensor([4.0, 8.0]))
        for name, value in built.state_dict().items():
            expected = source.state_dict()[name]
            expected = expected.half().float() if expected.is_floating_point() else expected
            assert value.dtype == expected.dtype and torch.equal(value, expected), name
    x = torch.rand(1, 3, 64, 64)
    pred, _ = built(x)
    assert pred.shape == (1, 3 * (16 * 16 + 8 * 8), 8) and torch.isfinite(pred).all()


def test_missing_text_and_foreign_files_fail_with_one_line(tmp_path):
    cases = {}
    cases["missing.pt"] = "not found"
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    cases["notes.pt"] = "is not a checkpoint \\(not a torch file\\)"
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases["tensor.pt"] = "it holds a Tensor, not a dict"
    torch.save(tiny_model().state_dict(), tmp_path / "bare.pt")
    cases["bare.pt"] = "not a checkpoint of this project: no format 'yolo-ema' \\(it looks like a bare state dict\\)"
    save_checkpoint(our_checkpoint(tiny_model()), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    cases["cut.pt"] = "is a truncated or damaged checkpoint"
    damaged = bytearray((tmp_path / "good.pt").read_bytes())
    start = damaged.index(b"data.pkl") + 40  # corrupt the pickle inside an intact archive
    damaged[start:start + 64] = bytes(64)
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    cases["damaged.pt"] = "is not a"
    save_checkpoint(our_checkpoint(tiny_model(), version=2), tmp_path / "future.pt")
    cases["future.pt"] = "version 2; this code reads up to 1"
    save_checkpoint(our_checkpoint(tiny_model(), nc="3"), tmp_path / "nc_text.pt")
    cases["nc_text.pt"] = "malformed: 'nc' is '3', not a positive int"
    save_checkpoint(our_checkpoint(tiny_model(), ema={"model.0.conv.weight": [1.0]}), tmp_path / "ema_list.pt")
    cases["ema_list.pt"] = "malformed: 'ema' is not a state dict of tensors"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_class_count_mismatch_message():
    check_checkpoint_classes({"nc": 3}, 3)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_classes({"nc": 80}, 3, weights="yolov5s.pt", data="coco3.yaml")
    assert str(info.value) == "weights yolov5s.pt were trained on 80 classes but data coco3.yaml has 3"


def test_shape_mismatch_names_the_first_key_and_both_shapes():
    narrow = tiny_model()
    wide_yaml = dict(TINY_YAML, width_multiple=0.5)
    ckpt = our_checkpoint(narrow, yaml=wide_yaml)  # weights of a 0.25-wide model, yaml of a 0.5-wide one
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(ckpt)
    # Channels round up to multiples of 8: layer 0 has 8 at both widths (16*0.25 and 16*0.5), layer 1 has
    # 32*0.25 = 8 against 32*0.5 = 16, so model.1 is the first tensor that differs.
    assert str(info.value) == ("checkpoint of another shape: 'model.1.conv.weight' is (8, 8, 3, 3) in the "
                               "checkpoint but (16, 8, 3, 3) in the model built from its yaml")


# ------------------------------------------------------------------------------- hostile pickles
def _write_marker(path):
    Path(path).write_text("code ran")
    return {}


class _RunsCodeOnLoad:
    def __init__(self, action, arg):
        self.action, self.arg = action, arg

    def __reduce__(self):
        return self.action, (self.arg,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("via", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("action", ["function", "os.system"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, via, action):
    marker = tmp_path / "marker"
    payload = (_RunsCodeOnLoad(_write_marker, str(marker)) if action == "function"
               else _RunsCodeOnLoad(os.system, f"touch {marker}"))
    path = tmp_path / "evil.pt"
    obj = {"format": "yolo-ema", "model": payload}
    if via == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "evil.pt" in str(info.value)
    # Both loaders name what they refused, and never suggest weights_only=False.
    assert "refused" in str(info.value) and "weights_only" not in str(info.value)
    assert ("_write_marker" if action == "function" else "system") in str(info.value)
    assert not marker.exists()
    if action == "function":  # control: an unrestricted load of the same file does run the payload
        if via == "torch.save":
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as f:
                pickle.load(f)
        assert marker.exists()


# ------------------------------------------------------------------------------------ YOLOv5 import
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


def test_zip_without_torch_pickle_is_refused(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="archive.pt"):
        load_checkpoint(path)


def test_save_removes_temp_files_left_by_a_killed_writer(tmp_path):
    target = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.k1ll3d.tmp"  # what a SIGKILL during an earlier save leaves behind
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1_000_000, 1_000_000))
    other = tmp_path / ".best.pt.k1ll3d.tmp"  # another checkpoint's temp file is not ours to remove
    other.write_bytes(b"x")
    os.utime(other, (1_000_000, 1_000_000))
    save_checkpoint({"epoch": 1}, target)
    assert not stale.exists()
    assert other.exists()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
