"""torch.hub and the Python API: hubconf.py loaded with source='local', the Results object, the inputs the
hub model takes, detect.py and the hub model agreeing, URL sources, and `python models/yolo.py` summaries."""
import http.server
import math
import socket
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
from tests.test_detect import IMG, images, one_thread, read_labels, weights  # noqa: F401  (fixtures)
from utils.checkpoint import CheckpointError
from utils.inference import Results, SourceError
from utils.torch_utils import count_parameters

ROOT = detect.ROOT
YOLOV5_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557, "l": 46_563_709, "x": 86_749_405}


@pytest.fixture(autouse=True)
def private_hub_dir(tmp_path, monkeypatch):
    """torch.hub's cache folder in tmp: nothing here reads or writes ~/.cache/torch/hub."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(before)


@pytest.fixture(scope="module")
def model(weights):
    return torch.hub.load(str(ROOT), "custom", path=str(weights), source="local", _verbose=False)


def test_results_api(model, images, tmp_path, capsys):
    files = [str(f) for f in images[:2]]
    results = model(files, size=IMG)
    assert isinstance(results, Results) and len(results) == 2 and results.files == [images[0].name, images[1].name]
    for i, f in enumerate(files):
        h, w = cv2.imread(f).shape[:2]
        xyxy = results.xyxy[i]
        assert xyxy.shape[1] == 6 and len(xyxy) > 0
        assert (xyxy[:, [0, 2]] >= 0).all() and (xyxy[:, [0, 2]] <= w).all() and (xyxy[:, [1, 3]] <= h).all()
        cx, cy, bw, bh = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
        torch.testing.assert_close(results.xywh[i][:, :4], torch.stack((cx, cy, bw, bh), 1))
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        torch.testing.assert_close(results.xyxyn[i][:, :4], xyxy[:, :4] / scale)
        torch.testing.assert_close(results.xywhn[i][:, :4], results.xywh[i][:, :4] / scale)
        for t in (results.xywh, results.xyxyn, results.xywhn):
            assert torch.equal(t[i][:, 4:], xyxy[:, 4:])  # conf and class untouched
    assert (results.xyxy[0][:, 4] >= 0.25).all() and (results.xyxy[0][:-1, 4] >= results.xyxy[0][1:, 4]).all()

    results.print()
    out = capsys.readouterr().out.splitlines()
    h0, w0 = results.shape[2:]
    assert out[0].startswith(f"image 1/2: {h0}x{w0} ") and out[1].startswith("image 2/2: ")
    assert out[2].startswith("Speed: ") and out[2].endswith(f"per image at shape {results.shape}")

    frames = results.pandas().xyxy
    assert list(frames[0].columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    np.testing.assert_allclose(frames[0][["xmin", "ymin", "xmax", "ymax", "confidence"]].to_numpy(),
                               results.xyxy[0][:, :5].numpy(), rtol=1e-6)  # fmt: skip
    assert set(frames[0]["name"]) <= {"person", "dog"} and list(results.pandas().xywhn[1].columns)[:4] == ["xcenter", "ycenter", "width", "height"]
    assert isinstance(results.xyxy[0], torch.Tensor)  # pandas() returned a copy

    per_image = results.tolist()
    assert len(per_image) == 2 and all(len(r) == 1 for r in per_image)
    assert torch.equal(per_image[1].xyxy[0], results.xyxy[1])

    saved = results.save(save_dir=tmp_path / "exp")
    again = results.save(save_dir=tmp_path / "exp")
    assert (saved.name, again.name) == ("exp", "exp2")
    for f in images[:2]:
        assert cv2.imread(str(saved / f.name)).shape == cv2.imread(str(f)).shape
    crops = results.crop(save_dir=tmp_path / "crops_run")
    assert len(crops) == len(results.xyxy[0]) + len(results.xyxy[1])
    assert all(c["file"].is_file() and c["file"].parent.name in ("person", "dog") for c in crops)
    assert crops[0]["label"].startswith(("person ", "dog ")) and crops[0]["im"].ndim == 3
    rendered = results.render()
    assert rendered[0].shape == results.ims[0].shape and not np.array_equal(rendered[0], results.ims[0])


def test_inputs_path_pil_numpy_list_and_tensor(model, images):
    f = str(images[0])
    by_path = model(f, size=IMG).xyxy[0]
    rgb = cv2.imread(f)[..., ::-1]
    assert torch.equal(model(Image.open(f), size=IMG).xyxy[0], by_path)  # PIL decodes the same pixels as cv2
    assert torch.equal(model(rgb, size=IMG).xyxy[0], by_path)
    both = model([Image.open(f), rgb], size=IMG)
    assert both.files == [images[0].name, "image1.jpg"] and torch.equal(both.xyxy[0], both.xyxy[1])
    torch.testing.assert_close(both.xyxy[0], by_path, rtol=1e-4, atol=1e-3)  # a batch of 2 sums in another order
    gray = model(np.ascontiguousarray(rgb.mean(2).astype(np.uint8)), size=IMG)  # HxW is taken as grey
    assert len(gray) == 1
    x = torch.zeros(2, 3, 64, 96)
    pred, raw = model(x)  # a BCHW tensor: the model's own output, before NMS
    assert pred.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 85) and len(raw) == 3
    with pytest.raises(SourceError, match="uint8"):
        model(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(SourceError, match="missing.jpg does not exist"):
        model("missing.jpg")


def test_settable_thresholds(weights, images):
    m = torch.hub.load(str(ROOT), "custom", path=str(weights), source="local", _verbose=False)
    f = str(images[0])
    base = m(f, size=IMG).xyxy[0]
    assert {0, 16} <= set(base[:, 5].int().tolist())
    m.classes = [16]
    dogs = m(f, size=IMG).xyxy[0]
    assert torch.equal(dogs, base[base[:, 5] == 16])  # per-class NMS: the same dog boxes, nothing else
    m.classes, m.max_det = None, 3
    assert torch.equal(m(f, size=IMG).xyxy[0], base[:3])
    m.max_det, m.conf = 1000, 0.5
    assert torch.equal(m(f, size=IMG).xyxy[0], base[base[:, 4] > 0.5])
    m.conf, m.iou = 0.25, 0.0  # IoU threshold 0: no two kept boxes of a class overlap at all
    sparse = m(f, size=IMG).xyxy[0]
    assert len(sparse) < len(base)


def test_detect_and_hub_give_the_same_boxes(model, weights, images, tmp_path):
    save_dir = detect.run(source=images[2], weights=weights, imgsz=IMG, save_txt=True, save_conf=True, nosave=True,
                          project=tmp_path, name="d")  # fmt: skip
    from_file = read_labels(save_dir / "labels" / f"{images[2].stem}.txt")
    hub = model(str(images[2]), size=IMG).xywhn[0]
    assert len(hub) > 3 and from_file.shape == (len(hub), 6)
    np.testing.assert_array_equal(from_file[:, 0], hub[:, 5].numpy())
    np.testing.assert_allclose(from_file[:, 1:], hub[:, [0, 1, 2, 3, 4]].numpy(), rtol=1e-5, atol=1e-6)  # %g rounding


@pytest.mark.parametrize("size", list(YOLOV5_PARAMS))
def test_untrained_yolov5_sizes(size, images):
    m = torch.hub.load(str(ROOT), f"yolov5{size}", pretrained=False, classes=80, source="local", _verbose=False)
    assert count_parameters(m.model) == YOLOV5_PARAMS[size] and len(m.names) == 80
    if size == "n":
        assert isinstance(m(str(images[0]), size=IMG), Results)


def test_pretrained_without_weights_fails_in_one_line(tmp_path, monkeypatch, weights):
    monkeypatch.chdir(tmp_path)
    assert not (ROOT / "yolov5n.pt").exists()
    with pytest.raises(CheckpointError, match="no pretrained weights exist here for yolov5n") as e:
        torch.hub.load(str(ROOT), "yolov5n", source="local", _verbose=False)
    assert "\n" not in str(e.value)
    (tmp_path / "yolov5n.pt").write_bytes(weights.read_bytes())  # a local yolov5n.pt is what pretrained=True loads
    m = torch.hub.load(str(ROOT), "yolov5n", pretrained=True, source="local", _verbose=False)
    assert m.names[16] == "dog"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_url_sources(model, images, weights, tmp_path):
    port = _closed_port()
    with pytest.raises(SourceError, match=rf"cannot download http://127.0.0.1:{port}/bus.jpg: .*network") as e:
        model(f"http://127.0.0.1:{port}/bus.jpg")
    assert "\n" not in str(e.value)
    with pytest.raises(SourceError, match="cannot download .*best.pt"):
        torch.hub.load(str(ROOT), "custom", path=f"http://127.0.0.1:{port}/best.pt", source="local", _verbose=False)

    served = tmp_path / "www"
    served.mkdir()
    (served / images[1].name).write_bytes(images[1].read_bytes())
    (served / "w.pt").write_bytes(weights.read_bytes())
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        fetched = torch.hub.load(str(ROOT), "custom", path=f"{base}/w.pt", source="local", _verbose=False)
        assert len(list((tmp_path / "hub" / "yolo-ema").glob("*/w.pt"))) == 1  # fetched into torch.hub's (private) cache
        by_url = fetched(f"{base}/{images[1].name}", size=IMG)
        assert by_url.files == [images[1].name]
        assert torch.equal(by_url.xyxy[0], model(str(images[1]), size=IMG).xyxy[0])
    finally:
        server.shutdown()
        server.server_close()


def test_model_summary_command():
    r = subprocess.run([sys.executable, str(ROOT / "models" / "yolo.py"), "--cfg", "yolov5n.yaml"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = (r.stdout + r.stderr).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["from", "n", "params", "module", "arguments"])
    rows = [(int(x[:3]), int(x[24:34]), x[36:76].strip()) for x in lines[header + 1:header + 26]]  # i, params, module
    assert [r[0] for r in rows] == list(range(25)) and rows[-1][2] == "Detect" and rows[9][2] == "SPPF"
    assert sum(r[1] for r in rows) == YOLOV5_PARAMS["n"]  # the table's parameter column adds up
    summary = lines[header + 26]
    assert summary.startswith("yolov5n summary: ") and "1,872,157 parameters" in summary and summary.endswith("4.5 GFLOPs")


def letterboxed_shape(image_path, size) -> tuple:
    """The batch shape YOLOv5's hub model runs for one image at `size`: the size rounded up to multiples of 32,
    the image scaled to fit in it, then padded to the smallest multiples of 32 holding it."""
    h, w = (size, size) if isinstance(size, int) else size
    h, w = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    h0, w0 = cv2.imread(str(image_path)).shape[:2]
    r = min(h / h0, w / w0)
    return 1, 3, math.ceil(round(h0 * r) / 32) * 32, math.ceil(round(w0 * r) / 32) * 32


@pytest.mark.parametrize("size", [100, 330, (200, 300)])
def test_sizes_that_are_not_stride_multiples_are_rounded_up(model, images, size):
    results = model(str(images[0]), size=size)
    assert results.shape == letterboxed_shape(images[0], size)


def test_half_model_runs_in_fp16(weights, images):
    m = torch.hub.load(str(ROOT), "custom", path=str(weights), source="local", _verbose=False)
    fp32 = m(str(images[0]), size=IMG).xyxy[0]
    m.half()
    assert all(p.dtype == torch.float16 for p in m.model.parameters())
    fp16 = m(str(images[0]), size=IMG).xyxy[0]
    assert len(fp32) > 3 and abs(len(fp16) - len(fp32)) <= 2
    torch.testing.assert_close(fp16[0, :4], fp32[0, :4], atol=1.0, rtol=0)
    assert abs(float(fp16[0, 4] - fp32[0, 4])) < 0.03 and not torch.equal(fp16, fp32)  # fp16 really ran
