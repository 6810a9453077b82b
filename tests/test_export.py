"""export.py: ONNX (torch.onnx's exporter, onnx.checker) and TorchScript files whose outputs equal the PyTorch
model's on real coco128 images, a --dynamic ONNX at other batch sizes and image sizes, val.py's mAP on the
exported files equal to the checkpoint's, and one-line refusals."""
import ast
import re
import logging
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml

import detect
import export
import val
from models.yolo import Model
from tests.test_detect import coco128_images, one_thread, read_labels  # noqa: F401  (one_thread: autouse fixture)
from tests.train_helpers import make_dataset, tiny_model_yaml
from utils.checkpoint import half_state_dict, save_checkpoint
from utils.dataloaders import create_dataloader
from utils.inference import Detector, OnnxModel, TorchScriptModel, letterbox_batch, load_model
from utils.loss import ComputeLoss

ROOT = export.ROOT
FIXED = (64, 64)  # the fixed-size export's input: the size the model was trained at, so val's mAP means something
FIXED_BATCH = 3  # its batch size: val's batches of 8 run as chunks of 3, 3 and a padded 2
TRAIN_SIZE = 64
STEPS = 150  # about 8 s on one CPU core; val mAP50-95 about 0.4 after it (rect batches at 64 px)
FLOAT32_EPS = 2.0**-23  # spacing of float32 numbers in [1, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(best.pt, data yaml): a tiny yolov5n-layout model trained for a few seconds on coloured rectangles, so
    its mAP is well above zero and val's figures for two backends could differ."""
    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "data", n=8, size=TRAIN_SIZE)
    torch.manual_seed(0)
    model = Model(tiny_model_yaml(root), nc=2, verbose=False)
    hyp = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text())
    model.hyp = hyp
    compute_loss = ComputeLoss(model, hyp)
    loader, _ = create_dataloader(str(root / "data" / "images" / "train"), TRAIN_SIZE, 8, 32, workers=0, nc=2)
    batch = next(iter(loader))  # all 8 images, letterboxed without augmentation: the same batch every step
    images, targets = batch[0].float() / 255, batch[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(STEPS):
        loss, _ = compute_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sd = half_state_dict(model.state_dict())
    ckpt = dict(format="yolo-ema", version=1, epoch=STEPS - 1, best_fitness=0.0, model=sd, ema=sd, updates=STEPS,
                opt={"imgsz": TRAIN_SIZE, "data": str(data)}, hyp=hyp, yaml=model.yaml, nc=2, names=["c0", "c1"], date="2026-01-01T00:00:00")  # fmt: skip
    return save_checkpoint(ckpt, root / "weights" / "best.pt"), data


@pytest.fixture(scope="module")
def fixed(trained, tmp_path_factory):
    """export.py --include onnx torchscript at a fixed 64x64, batch 3: (best.pt, best.onnx, best.torchscript)."""
    weights = trained[0]
    argv = ["--weights", str(weights), "--include", "onnx", "torchscript", "--img", str(FIXED[0]),
            "--batch-size", str(FIXED_BATCH)]  # fmt: skip
    assert export.main(argv) == 0
    return weights, weights.with_suffix(".onnx"), weights.with_suffix(".torchscript")


@pytest.fixture(scope="module")
def dynamic(trained, tmp_path_factory):
    """export.py --include onnx --dynamic, from a copy of best.pt in its own folder: (best.pt, best.onnx)."""
    folder = tmp_path_factory.mktemp("dynamic")
    weights = copy_into(trained[0], folder)
    assert export.main(["--weights", str(weights), "--include", "onnx", "--dynamic", "--img", "64"]) == 0
    return weights, weights.with_suffix(".onnx")


def copy_into(file, folder):
    shutil.copy(file, folder / file.name)
    return folder / file.name


@pytest.fixture(scope="module")
def coco_batch(coco128):
    """Four real coco128 images letterboxed into one float batch of the fixed export's size."""
    images = [cv2.imread(str(f)) for f in coco128_images()]
    batch, _ = letterbox_batch(images, FIXED, 32, fixed_shape=FIXED)
    return images, batch.float() / 255


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, image_size: int) -> None:
    """actual == expected within a relative 1e-4, with an absolute floor for values near zero.

    Columns 0-3 are pixels: the graph computes them from terms as large as the image, which float32 holds only
    to image_size * 2^-23 (2e-5 px at 160); summing in another order moves the result by a few such steps, so
    the floor is 8 of them (1.5e-4 px at 160, far below a pixel). Columns 4+ are probabilities, whose
    rounding steps are 2^-24 near 1 and smaller below: a floor of 1e-6 is still a thousand times under the
    lowest threshold in use (val's 0.001).
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    floor = torch.full((expected.shape[-1],), 1e-6)
    floor[:4] = 8 * image_size * FLOAT32_EPS
    excess = (actual - expected).abs() - (1e-4 * expected.abs() + floor)
    worst = excess.argmax()
    assert excess.max() <= 0, (f"largest miss at {np.unravel_index(int(worst), excess.shape)}: {float(actual.flatten()[worst])} "
                               f"vs {float(expected.flatten()[worst])}")  # fmt: skip


def test_fixed_exports_match_pytorch_on_coco128(fixed, coco_batch):
    weights, onnx_file, ts_file = fixed
    x = coco_batch[1]
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)  # the written file, metadata included
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["output0"]
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    n = 3 * sum((FIXED[0] // s) * (FIXED[1] // s) for s in (8, 16, 32))
    assert dims == [FIXED_BATCH, n, 7]  # one output: boxes, objectness, 2 class scores
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) >= {"names", "stride", "shape", "dynamic"}

    pt = load_model(weights)
    with torch.no_grad():
        expected = pt(x)[0]
    obj = expected[..., 4]
    assert expected.shape == (4, n, 7) and obj.max() > 100 * obj.median()  # outputs that follow the picture
    onnx_model = load_model(onnx_file)
    assert isinstance(onnx_model, OnnxModel) and onnx_model.fixed_shape == FIXED and onnx_model.batch == FIXED_BATCH
    assert onnx_model.names == ["c0", "c1"] and onnx_model.stride.tolist() == [32.0]
    assert_parity(onnx_model(x)[0], expected, FIXED[0])  # 4 images: a batch of 3 and a padded one
    ts_model = load_model(ts_file)
    assert isinstance(ts_model, TorchScriptModel) and ts_model.names == ["c0", "c1"] and ts_model.stride.tolist() == [32.0]
    assert_parity(ts_model(x)[0], expected, FIXED[0])
    images, _ = coco_batch
    other, _ = letterbox_batch(images[:2], (160, 224), 32, fixed_shape=(160, 224))  # a traced graph takes any size
    other = other.float() / 255
    with torch.no_grad():
        assert_parity(ts_model(other)[0], pt(other)[0], 224)
    with pytest.raises(ValueError, match="exported for 64x64 images, got 160x224"):
        onnx_model(other)


def test_yolov5_loader_reads_the_onnx_metadata(fixed):
    """YOLOv5's DetectMultiBackend (ONNX Runtime branch) reads custom_metadata_map, takes int(meta['stride']) and
    ast.literal_eval(meta['names']), and its val.py and detect.py then look class i up as names[i] with an int."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(fixed[1]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert "stride" in meta  # the loader's test before it reads either key
    stride, names = int(meta["stride"]), ast.literal_eval(meta["names"])
    assert stride == 32 and names[0] == "c0" and names[1] == "c1" and len(names) == 2


def test_onnx_loader_reads_files_written_with_json_metadata(fixed, tmp_path):
    """Files exported before the metadata took YOLOv5's form hold JSON: names with string keys, per-level strides."""
    proto = onnx.load(str(fixed[1]))
    del proto.metadata_props[:]
    for key, value in {"names": '{"0": "c0", "1": "c1"}', "stride": "[8.0, 16.0, 32.0]", "dynamic": "false"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    model = load_model(old)
    assert model.names == ["c0", "c1"] and model.stride.tolist() == [8.0, 16.0, 32.0] and model.fixed_shape == FIXED


def test_dynamic_onnx_at_two_batch_sizes_and_image_sizes(dynamic, coco_batch):
    weights, onnx_file = dynamic
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)
    in_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in in_dims][:2] == ["batch", 3] and all(d.dim_param for d in in_dims[2:])
    images, _ = coco_batch
    pt, onnx_model = load_model(weights), load_model(onnx_file)
    assert onnx_model.fixed_shape is None and onnx_model.batch is None
    for n, size in ((1, (96, 128)), (3, (160, 224))):
        batch, _ = letterbox_batch(images[:n], size, 32, fixed_shape=size)
        x = batch.float() / 255
        with torch.no_grad():
            expected = pt(x)[0]
        got = onnx_model(x)[0]
        assert got.shape == (n, 3 * sum((size[0] // s) * (size[1] // s) for s in (8, 16, 32)), 7)
        assert_parity(got, expected, max(size))


def test_val_on_exported_models_equals_pytorch(trained, fixed, dynamic, tmp_path, caplog):
    weights, data = trained
    caplog.set_level(logging.INFO, logger="yolo")
    fixed_size_line = ("best.onnx is a fixed-size export: validating with 64x64 squares (no rectangular batches), "
                       f"{FIXED_BATCH} images per run, as it was exported; its figures can differ from its .pt's")
    common = dict(batch_size=8, workers=0, plots=False, project=tmp_path, exist_ok=True)
    # rect batches at 64 px: the checkpoint, and the files that take any size on the same letterbox
    pt_map = val.run(data, weights=str(weights), imgsz=TRAIN_SIZE, name="pt", **common)[0][3]
    assert pt_map > 0.2  # a model that really detects: a wrong export would show
    for exported in (dynamic[1], fixed[2]):  # the --dynamic ONNX, the TorchScript file
        exported_map = val.run(data, weights=str(exported), imgsz=TRAIN_SIZE, name=exported.parent.name, **common)[0][3]
        assert abs(exported_map - pt_map) <= 0.001, exported
    assert "fixed-size export" not in caplog.text  # validated as the .pt is: nothing to say
    # the fixed 64x64 ONNX: every image letterboxed to that square (no rect batches), as the PyTorch model sees it here
    loader, _ = create_dataloader(str(data.parent / "images" / "train"), FIXED[0], 8, 32, rect=False, pad=0.0,
                                  workers=0, nc=2)  # fmt: skip
    square_map = val.run(data, model=load_model(weights), dataloader=loader, plots=False)[0][3]
    assert square_map > 0.2 and abs(square_map - pt_map) > 0.01  # the square letterbox really is another one
    onnx_map = val.run(data, weights=str(fixed[1]), name="fixed", **common)[0][3]  # no --img: the file's own size
    assert abs(onnx_map - square_map) <= 0.001
    assert [r.getMessage() for r in caplog.records].count(fixed_size_line) == 1  # and it says so, once


def test_detect_runs_the_onnx_file(fixed, coco128, tmp_path):
    weights, onnx_file, _ = fixed
    image = coco128_images()[0]
    save_dir = detect.run(source=image, weights=onnx_file, imgsz=640, conf_thres=0.01, save_txt=True, save_conf=True,
                          project=tmp_path, name="onnx")  # fmt: skip
    rows = read_labels(save_dir / "labels" / f"{image.stem}.txt")
    pt = Detector(load_model(weights))
    pt.conf = 0.01
    pt.model.fixed_shape = FIXED  # the PyTorch weights letterboxed as the fixed-size file (not 640) needs
    expected = pt.detect([cv2.imread(str(image))], [image.name]).xywhn[0]
    assert len(rows) == len(expected) > 0
    np.testing.assert_allclose(rows[:, 1:], expected[:, :5].numpy(), rtol=1e-4, atol=2e-6)
    hub = torch.hub.load(str(ROOT), "custom", path=str(onnx_file), source="local", _verbose=False)
    hub.conf = 0.01
    np.testing.assert_allclose(hub(str(image)).xywhn[0][:, :5].numpy(), rows[:, 1:], rtol=1e-4, atol=2e-6)


def test_user_errors_are_one_line(trained, tmp_path, monkeypatch, caplog):
    weights = trained[0]
    caplog.set_level(logging.INFO, logger="yolo")
    cases = [
        (["--weights", str(weights), "--half"], "--half export needs a CUDA device"),
        (["--weights", str(tmp_path / "gone.pt")], "gone.pt not found"),
        (["--weights", str(weights.with_suffix(".onnx"))], "already exported"),
        (["--weights", str(weights), "--img", "0"], "--img must be one positive number or two (h w), got 0"),
        (["--weights", str(weights), "--img", "64", "64", "64"], "--img must be one positive number or two (h w), got 64 64 64"),
        (["--weights", str(weights), "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ]
    for argv, text in cases:
        caplog.clear()
        assert export.main(argv) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and text in errors[0] and "\n" not in errors[0], errors
    copy = copy_into(weights, tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    caplog.clear()
    assert export.main(["--weights", str(copy), "--include", "onnx"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["export: ONNX export needs the 'onnxscript' package, which is not installed: pip install onnxscript"]
    assert not copy.with_suffix(".onnx").exists()


def test_val_on_exported_files_ignores_half_and_refuses_augment(trained, fixed, tmp_path, monkeypatch, caplog):
    data = trained[1]
    used = []
    real = val.autocast
    monkeypatch.setattr(val, "autocast", lambda device, dtype: used.append(dtype) or real(device, dtype))
    caplog.set_level(logging.INFO, logger="yolo")
    for exported in fixed[1:]:
        used.clear()
        assert val.main(["--weights", str(exported), "--data", str(data), "--half", "--batch-size", "8", "--workers", "0",
                         "--project", str(tmp_path), "--name", exported.suffix[1:]]) == 0  # fmt: skip
        assert used and set(used) == {None}  # no fp16 autocast around a file that runs at its own precision
        assert f"--half has no effect on {exported.name}: an exported model runs in its own precision" in caplog.text
    caplog.clear()
    argv = ["--weights", str(fixed[2]), "--data", str(data), "--augment", "--project", str(tmp_path / "aug")]
    assert val.main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["val: --augment (test-time augmentation) needs PyTorch weights, not best.torchscript"]
    assert not (tmp_path / "aug").exists()


def test_export_rounds_the_size_up_to_the_stride(trained, tmp_path, caplog):
    weights = copy_into(trained[0], tmp_path)
    assert export.main(["--weights", str(weights), "--include", "torchscript", "--img", "50", "70"]) == 0
    model = load_model(weights.with_suffix(".torchscript"))
    assert model.export_shape == (64, 96)
    caplog.set_level(logging.INFO, logger="yolo")
    caplog.clear()
    assert export.main(["--weights", str(weights), "--include", "torchscript", "--img", "50"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "multiple of the max stride" in r.getMessage()]
    assert warnings == ["WARNING: --img 50 must be a multiple of the max stride 32; using 64"]  # once, not per side


def test_without_img_the_export_takes_the_size_the_weights_were_trained_at(trained, tmp_path, caplog):
    weights = copy_into(trained[0], tmp_path)  # its run trained at TRAIN_SIZE (64): a 640 export would be 100x the work
    caplog.set_level(logging.INFO, logger="yolo")
    assert export.main(["--weights", str(weights), "--include", "onnx"]) == 0
    dims = [d.dim_value for d in onnx.load(str(weights.with_suffix(".onnx"))).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, TRAIN_SIZE, TRAIN_SIZE]
    assert f"Exporting at --img {TRAIN_SIZE}, the size the weights were trained at" in caplog.text


def untrained_weights(tmp_path: Path) -> Path:
    """best.pt of a seeded, untrained 2-class tiny model that says it was trained at 64 px."""
    torch.manual_seed(0)
    model = Model(tiny_model_yaml(tmp_path), nc=2, verbose=False).eval()
    sd = half_state_dict(model.state_dict())
    ckpt = dict(format="yolo-ema", version=1, epoch=0, best_fitness=0.0, model=sd, ema=sd, updates=0,
                opt={"imgsz": 64}, hyp={}, yaml=model.yaml, nc=2, names=["c0", "c1"], date="2026-01-01T00:00:00")
    return save_checkpoint(ckpt, tmp_path / "best.pt")


def _script_module_to_meta(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The loaded file's parameters and buffers moved to the meta device, tensor by tensor: neither
    torch.jit.load(map_location="meta") nor ScriptModule.to("meta") can do it."""
    for mod in [module, *module.modules()]:
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, torch.nn.Parameter(p.detach().to("meta"), requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            setattr(mod, name, b.to("meta"))
    assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}
    return module


def test_torchscript_holds_no_device_and_runs_on_another_device_dtype_and_size(tmp_path):
    """torch.jit.trace records a device argument as a constant, which torch.jit.load(map_location=...) leaves
    alone: a file traced on the CPU would build its grid there when run on cuda:0. The traced graph must hold no
    device constant, and the file must run on a device (meta, the stand-in for CUDA here) and a dtype (float64)
    other than the ones it was traced with, at an image size other than the traced one."""
    weights = untrained_weights(tmp_path)
    assert export.main(["--weights", str(weights), "--include", "torchscript", "--img", "64"]) == 0
    file = weights.with_suffix(".torchscript")
    graph = str(torch.jit.load(str(file)).inlined_graph)
    assert 'prim::Constant[value="cpu"]' not in graph
    # 96x128: grids of 12x16, 6x8 and 3x4 cells, 3 anchors each, where the trace saw 8x8, 4x4 and 2x2
    cells = 3 * (12 * 16 + 6 * 8 + 3 * 4)
    on_meta = _script_module_to_meta(torch.jit.load(str(file)))
    out = on_meta(torch.zeros(2, 3, 96, 128, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (2, cells, 7)
    # float64 weights and input: equal to the PyTorch model's output in float64 at the new size
    im = torch.rand(1, 3, 96, 128, dtype=torch.float64)
    reference = load_model(weights).double()
    reference.model[-1].export = True
    with torch.no_grad():
        expected = reference(im)
        got = torch.jit.load(str(file)).double()(im)
    assert got.shape == expected.shape == (1, cells, 7)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-4)


def test_onnx_on_a_gpu_without_the_cuda_provider_says_it_runs_on_the_cpu(tmp_path, monkeypatch, caplog):
    """An onnxruntime without CUDAExecutionProvider (the CPU-only package) asked to run on cuda:0 falls back to its
    CPU provider: one warning line says so instead of a silent, slow CPU run."""
    import onnxruntime

    weights = untrained_weights(tmp_path)
    assert export.main(["--weights", str(weights), "--include", "onnx", "--img", "64"]) == 0
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="yolo"):
        runner = OnnxModel(weights.with_suffix(".onnx"), torch.device("cuda:0"))
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "WARNING: the installed onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu has it); best.onnx runs "
        "on the CPU, not cuda:0"]


def test_the_printed_validate_command_works_for_a_model_with_its_own_classes(trained, fixed, tmp_path, caplog,
                                                                           monkeypatch):
    """A 2-class model trained on its own dataset: val.py takes that dataset from the .pt's options and from the
    exported file's metadata (ONNX and TorchScript), so `python val.py --weights best.torchscript`, as export.py
    prints it, validates (coco128's 80 classes would be refused). Weights that do not name their dataset get a
    --data placeholder in the printed command."""
    weights, data = trained
    (tmp_path / "own").mkdir()
    own = copy_into(weights, tmp_path / "own")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="yolo")
    assert export.main(["--weights", str(own), "--include", "torchscript"]) == 0
    printed = re.search(r"Validate: +python val.py (.*)", caplog.text).group(1).split()
    assert printed == ["--weights", "own/best.torchscript"]
    for argv in (printed, ["--weights", str(fixed[1])], ["--weights", str(own)]):  # fixed[1]: best.onnx
        caplog.clear()
        assert val.main(argv + ["--workers", "0", "--task", "speed", "--project", str(tmp_path / "val")]) == 0
        assert f"No --data given: validating on {data}, the dataset the weights were trained on" in caplog.text

    ckpt = torch.load(weights, weights_only=True)
    ckpt["opt"] = {"imgsz": TRAIN_SIZE}
    anonymous = save_checkpoint(ckpt, tmp_path / "best.pt")
    caplog.clear()
    assert export.main(["--weights", str(anonymous), "--include", "torchscript"]) == 0
    assert "Validate:        python val.py --weights best.torchscript --data DATA.yaml\n" in caplog.text
