"""utils/checkpoint.py: atomic writes, weights-only loads, validation, refusal of hostile pickles.
The import of original YOLOv5 files is tested in test_yolov5_import.py."""
import copy
import os
import pickle
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
    CheckpointWriter,
    pack_state_dict,
    pack_tree,
    unpacked_state_dict,
    unpacked_tree,
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
    save_checkpoint(our_checkpoint(tiny_model(), version=3), tmp_path / "future.pt")
    cases["future.pt"] = "version 3; this code reads up to 2"
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


def test_packed_state_dict_round_trip(tmp_path):
    """The resume state's weights are stored as one buffer per dtype: every tensor comes back bitwise, in its
    shape and in the standard layout, integer buffers included; a plain state dict passes through as it is."""
    model = tiny_model().to(memory_format=torch.channels_last)
    sd = model.state_dict()
    assert sd["model.0.conv.weight"].is_contiguous(memory_format=torch.channels_last)
    packed = pack_state_dict(sd)
    assert sorted(packed["packed"]) == ["float32", "int64"]
    assert packed["packed"]["float32"].numel() == sum(v.numel() for v in sd.values() if v.dtype == torch.float32)
    save_checkpoint({"resume": packed}, tmp_path / "p.pt")
    back = unpacked_state_dict(torch.load(tmp_path / "p.pt", weights_only=True)["resume"])
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
        assert back[k].is_contiguous(), k
    assert unpacked_state_dict(sd) is sd  # version 1: already a state dict


def test_packed_optimizer_state_round_trip_is_a_copy(tmp_path):
    """The optimizer's state goes into last.pt packed: a copy taken now (training goes on while the writer
    thread saves it), restored bitwise into a fresh optimizer, 0-dim tensors (Adam's step) included."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = opt.state_dict()
    expected = copy.deepcopy(state)
    packed = pack_tree(state)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()  # moves the live state on; the packed copy keeps the old values
    save_checkpoint({"optimizer": packed}, tmp_path / "o.pt")
    back = unpacked_tree(torch.load(tmp_path / "o.pt", weights_only=True)["optimizer"])
    assert back["param_groups"] == state["param_groups"]
    for i, s in back["state"].items():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["step"].shape == () and int(s["step"]) == 1
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], expected["state"][i][k]) and s[k].dtype == torch.float32
        assert not torch.equal(s["exp_avg"], opt.state_dict()["state"][i]["exp_avg"])  # the live state moved on
    fresh = torch.optim.Adam(net.parameters(), lr=0.1)
    fresh.load_state_dict(back)
    assert unpacked_tree(state) is state  # not packed (version 1): as it is


def test_packing_mixed_devices_gives_one_cpu_buffer_per_dtype(monkeypatch):
    """An optimizer's state can mix devices: Adam keeps `step` on the CPU beside CUDA momenta (torch.cat of the two
    raises). Both are copied into one CPU buffer per dtype, in the order taken; meta (values made ones by the
    recorded copy) stands in for CUDA here."""
    DeviceMoves(monkeypatch)
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3, device="meta")},
                      1: {"step": torch.tensor(4.0), "exp_avg": torch.ones(5, device="meta")}}}
    packed = pack_tree(tree)
    assert list(packed["packed"]) == ["float32"] and packed["packed"]["float32"].device.type == "cpu"
    assert packed["packed"]["float32"].tolist() == [3.0] + [1.0] * 6 + [4.0] + [1.0] * 5
    back = unpacked_tree(packed)
    assert [float(back["state"][i]["step"]) for i in (0, 1)] == [3.0, 4.0]
    assert [back["state"][i]["exp_avg"].device.type for i in (0, 1)] == ["cpu", "cpu"]
    assert [back["state"][i]["exp_avg"].shape for i in (0, 1)] == [(2, 3), (5,)]
    sd = {"a": torch.arange(3.0), "b": torch.zeros(4, device="meta")}
    back_sd = unpacked_state_dict(pack_state_dict(sd))
    assert back_sd["a"].tolist() == [0.0, 1.0, 2.0] and back_sd["b"].device.type == "cpu"


def test_checkpoint_writer_keeps_order_and_reports_a_failed_write(tmp_path, monkeypatch):
    writer = CheckpointWriter()
    saved = []
    for k in range(3):
        writer.submit({"epoch": k, "w": torch.full((1000,), float(k))}, tmp_path / "last.pt",
                      on_saved=lambda k=k: saved.append(k))
    writer.wait()
    assert saved == [0, 1, 2] and torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2

    real_save = torch.save

    def no_space(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    writer.submit({"epoch": 3}, tmp_path / "last.pt", on_saved=lambda: saved.append(3))
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    monkeypatch.setattr(torch, "save", real_save)
    assert saved == [0, 1, 2] and torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2  # whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    writer.close()


class DeviceMoves:
    """A stand-in for a CUDA device: the run's tensors live on the meta device, which holds no values, and every
    copy of a meta tensor to the CPU (Tensor.copy_ into a CPU tensor, Tensor.to("cpu"), Tensor.cpu()) is recorded
    as (shape, dtype) and made of ones, as a transfer from the GPU would bring values over."""

    def __init__(self, monkeypatch):
        self.moves = []
        copy_, to, cpu = torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu

        def patched_copy_(dst, src, non_blocking=False):
            if isinstance(src, torch.Tensor) and src.is_meta and not dst.is_meta:
                self.moves.append((tuple(src.shape), src.dtype))
                return dst.fill_(1)
            return copy_(dst, src, non_blocking)

        def patched_to(t, *args, **kwargs):
            kwargs.pop("copy", None)
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
            if t.is_meta and device is not None and device.type == "cpu":
                self.moves.append((tuple(t.shape), t.dtype))
                return torch.ones(t.shape, dtype=dtype or t.dtype)
            return to(t, *args, **kwargs)

        def patched_cpu(t, *args, **kwargs):
            if t.is_meta:
                self.moves.append((tuple(t.shape), t.dtype))
                return torch.ones(t.shape, dtype=t.dtype)
            return cpu(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", patched_copy_)
        monkeypatch.setattr(torch.Tensor, "to", patched_to)
        monkeypatch.setattr(torch.Tensor, "cpu", patched_cpu)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_build_checkpoint_copies_every_device_tensor_to_the_cpu_once(tmp_path, monkeypatch):
    """A run on a device (meta standing in for CUDA) with BEMA, a post-hoc bank and companion EMAs: every tensor of last.pt's
    contents is on the CPU (a bare torch.load(weights_only=True) then reads the file without CUDA), and each device
    tensor behind them (model, EMA, BEMA's two copies, the post-hoc and companion EMAs, the optimizer's momenta) is copied to the
    CPU exactly once: the FP16 weights are made on the CPU from the FP32 copies, not moved a second time."""
    import types

    from train import build_checkpoint
    from utils.bema import BEMA
    from utils.early_stopping import EarlyStopping
    from utils.ema_companions import CompanionEMAs
    from utils.posthoc import PosthocEMA

    model = Model(copy.deepcopy(TINY_YAML), ch=3, nc=3, verbose=False).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers, on the device like their parameters
    ema = BEMA(model)
    posthoc = PosthocEMA(model, [0.05, 0.1], total_steps=10, folder=tmp_path / "posthoc")
    companions = CompanionEMAs.from_hyp(model, {"ema_companion_taus": [200, 500]}, total_steps=10)
    run = types.SimpleNamespace(
        model=model, ema=ema, optimizer=optimizer, best_fitness=0.0, opt=types.SimpleNamespace(epochs=1),
        hyp={}, names=["a", "b", "c"], step=types.SimpleNamespace(last_opt_step=1, distiller=None), accumulate=1,
        stopper=EarlyStopping(), scaler=torch.amp.GradScaler("cpu", enabled=False),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0), posthoc=posthoc, tracker=None,
        companions=companions)
    sources = [*model.state_dict().values(), *ema.ema.state_dict().values(),
               *ema.average.shadow.state_dict().values(), *ema.anchor.shadow.state_dict().values(),
               *(t for e in posthoc.emas for t in e.ema.state_dict().values()),
               *(t for e in companions.emas.values() for t in e.ema.state_dict().values()),
               *(s["momentum_buffer"] for s in optimizer.state.values())]
    assert all(t.is_meta for t in sources)
    moves = DeviceMoves(monkeypatch)

    ckpt = build_checkpoint(run, epoch=0)

    saved = list(_tensors(ckpt))
    assert saved and {t.device.type for t in saved} == {"cpu"}
    assert sorted(moves.moves, key=str) == sorted(((tuple(t.shape), t.dtype) for t in sources), key=str)
    # a post-hoc snapshot file is made on the CPU the same way, as its tensors are cast to its dtype
    moves.moves.clear()
    snapshot = posthoc._snapshot(0)["ema"]
    assert {t.device.type for t in snapshot.values()} == {"cpu"} and len(moves.moves) == len(snapshot)
    monkeypatch.undo()
    file = save_checkpoint(ckpt, tmp_path / "last.pt")
    assert torch.load(file, weights_only=True)["resume"]["ema"]["bema_anchor"].keys() == ema.ema.state_dict().keys()


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                            lambda ps: torch.optim.Adam(ps, lr=0.1)], ids=["SGD", "Adam"])
def test_resumed_optimizer_state_is_laid_out_like_its_parameters(make_optimizer):
    """--resume: the packed optimizer state comes back as contiguous views into the packed buffers, while the
    model trains channels_last; every state tensor of a parameter's shape must get its parameter's strides (the
    foreach kernels on CUDA otherwise go one tensor at a time), the same values, and memory of its own (a view would
    keep the whole packed buffer alive)."""
    import argparse

    from train import restore_training_state
    from utils.early_stopping import EarlyStopping

    model = Model(copy.deepcopy(TINY_YAML), ch=3, nc=3, verbose=False).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    ckpt = {"epoch": 0, "optimizer": pack_tree(optimizer.state_dict()), "opt": {"epochs": 3}, "updates": 1,
            "best_fitness": 0.0}
    resumed = make_optimizer(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, lambda e: 1.0)
    restore_training_state(ckpt, argparse.Namespace(epochs=3, resume="last.pt"), resumed, scheduler,
                           torch.amp.GradScaler("cpu", enabled=False), EarlyStopping(), None, lambda e: 1.0, 1)
    four_d = [p for p in params if p.dim() == 4]
    assert any(not p.is_contiguous() for p in four_d)  # channels_last weights (3x3 kernels), as training has them
    for i, p in enumerate(params):
        for key, value in resumed.state[p].items():
            assert torch.equal(value, saved["state"][i][key])
            if value.shape == p.shape:
                assert value.stride() == p.stride(), (i, key)
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), (i, key)
