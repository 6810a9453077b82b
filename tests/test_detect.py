"""detect.py on real coco128 images: labels and boxes against a hand-made letterbox and its inverse, video
in and out, --classes, --save-crop, --save-txt --save-conf, unreadable files skipped, one-line errors."""
import http.server
import logging
import math
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import detect
from models.yolo import Model
from utils.boxes import non_max_suppression
from utils.checkpoint import half_state_dict, save_checkpoint
from utils.data_config import check_dataset
from utils.inference import Detector, load_model
from utils.plots import Annotator, class_color

ROOT = detect.ROOT
IMG = 192  # small, to keep each run fast; images are 640 px wide, so the letterbox really scales them
COCO_STEMS = ("000000000009", "000000000025", "000000000030", "000000000034")


def coco128_images() -> list:
    """A few real coco128 images, found as the code finds datasets (data/coco128.yaml's lookup)."""
    folder = check_dataset("coco128.yaml", autodownload=False)["train"]
    return [Path(folder) / f"{s}.jpg" for s in COCO_STEMS]


def coco_names() -> list:
    names = yaml.safe_load((ROOT / "data" / "coco128.yaml").read_text())["names"]
    return [names[i] for i in range(len(names))] if isinstance(names, dict) else list(names)


def build_checkpoint(path, width: float = 0.125, obj_bias: float = -1.5, seed: int = 0):
    """A yolov5n-layout checkpoint of ours (80 COCO names) whose detections depend on the image.

    PyTorch's default conv init shrinks the signal layer after layer until the head sees a constant (every
    cell then scores the same); He-normal init keeps its scale, so boxes and scores follow the picture. The
    head is biased to propose persons and dogs, a few dozen per image at conf 0.25.
    """
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = width
    torch.manual_seed(seed)
    m = Model(cfg, nc=80, verbose=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        for conv in m.model[-1].m:
            b = conv.bias.view(m.model[-1].na, -1)
            b[:, 4], b[:, 5:] = obj_bias, -8.0
            b[:, 5], b[:, 5 + 16] = 2.0, 1.8  # person, dog
    sd = half_state_dict(m.state_dict())
    ckpt = dict(format="yolo-ema", version=1, epoch=0, best_fitness=0.0, model=sd, ema=sd, updates=1, opt={"imgsz": IMG},
                hyp={}, yaml=m.yaml, nc=80, names=coco_names(), date="2026-01-01T00:00:00")  # fmt: skip
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread per test module: on a busy machine two threads spin against each other and a few
    seconds of work take minutes (train_helpers.train_env does the same for its subprocesses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("weights") / "best.pt")


@pytest.fixture(scope="module")
def images(coco128):
    return coco128_images()


def read_labels(file) -> np.ndarray:
    """A --save-txt file's rows; no file means no detections (detect.py writes none then, as YOLOv5)."""
    if not file.exists():
        return np.zeros((0, 0))
    rows = [list(map(float, line.split())) for line in file.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=float).reshape(len(rows), len(rows[0]) if rows else 0)


def changed_pixels(original: np.ndarray, annotated: np.ndarray, suffix: str = ".jpg") -> np.ndarray:
    """Mask of the pixels where `annotated` differs from `original` written the same way (same encoder, so
    an image with nothing drawn on it comes back identical)."""
    same_way = cv2.imdecode(cv2.imencode(suffix, original)[1], cv2.IMREAD_COLOR) if suffix else original
    return np.abs(annotated.astype(int) - same_way.astype(int)).max(2) > 40


def near_boxes(shape, boxes, margin: int = 24, label_room: int = 40) -> np.ndarray:
    """Mask of the areas a drawing of `boxes` may touch: each box grown by margin, with room for its label."""
    mask = np.zeros(shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        mask[max(int(y1) - margin - label_room, 0):int(y2) + margin, max(int(x1) - margin, 0):int(x2) + margin + 200] = True
    return mask


def hand_detections(model, image_path, size=IMG) -> tuple[np.ndarray, np.ndarray]:
    """The boxes detect.py should find, by a hand-made letterbox and its inverse: rows (cls, cx, cy, w, h, conf)
    normalised to the original image, and the pixel boxes (x1, y1, x2, y2)."""
    im0 = cv2.imread(str(image_path))
    h0, w0 = im0.shape[:2]
    r = min(size / h0, size / w0)
    nh, nw = round(h0 * r), round(w0 * r)
    canvas = (math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32)  # the smallest stride multiple holding it
    left, top = (canvas[1] - nw) // 2, (canvas[0] - nh) // 2
    padded = cv2.copyMakeBorder(cv2.resize(im0, (nw, nh), interpolation=cv2.INTER_LINEAR), top, canvas[0] - nh - top,
                                left, canvas[1] - nw - left, cv2.BORDER_CONSTANT, value=(114, 114, 114))  # fmt: skip
    x = torch.from_numpy(np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1)))[None].float() / 255
    with torch.no_grad():
        det = non_max_suppression(model(x)[0], 0.25, 0.45, max_det=1000)[0].double()
    xs = ((det[:, [0, 2]] - left) * w0 / nw).clamp(0, w0)
    ys = ((det[:, [1, 3]] - top) * h0 / nh).clamp(0, h0)
    boxes = torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), 1)
    rows = torch.stack((det[:, 5], (xs[:, 0] + xs[:, 1]) / 2 / w0, (ys[:, 0] + ys[:, 1]) / 2 / h0,
                        (xs[:, 1] - xs[:, 0]) / w0, (ys[:, 1] - ys[:, 0]) / h0, det[:, 4]), 1)  # fmt: skip
    return rows.numpy(), boxes.numpy()


def test_annotator_draws_box_in_class_colour_and_label_above_or_inside():
    im = np.zeros((100, 120, 3), np.uint8)
    a = Annotator(im, line_width=2)
    a.box_label([20, 40, 80, 90], "dog 0.87", color=class_color(16, bgr=True))
    a.box_label([30, 0, 60, 30], "person", color=class_color(0, bgr=True))  # no room above: label inside
    out = a.result()
    assert out[65, 20].tolist() == list(class_color(16, bgr=True))  # left edge of the first box
    assert out[65, 50].tolist() == [0, 0, 0]  # its interior untouched
    label_rows = np.where((out[:40, 22] == class_color(16, bgr=True)).all(1))[0]
    assert len(label_rows) and label_rows.max() < 40  # the filled label sits above the box's top edge
    assert (out[5:12, 32] != 0).any(1).all()  # the second label fills the top of its own box
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        Annotator(np.zeros((10, 10), np.uint8))


def test_parser_has_yolov5_flags_and_defaults():
    opt = detect.parse_opt(["--source", "x.jpg"])
    assert (opt.conf_thres, opt.iou_thres, opt.max_det, opt.line_thickness, opt.vid_stride) == (0.25, 0.45, 1000, 3, 1)
    assert opt.imgsz is None and opt.project.endswith("runs/detect") and opt.name == "exp" and opt.classes is None
    flags = ["--save-txt", "--save-conf", "--save-crop", "--nosave", "--hide-labels", "--hide-conf", "--half",
             "--agnostic-nms", "--exist-ok"]  # fmt: skip
    opt = detect.parse_opt(["--source", "x", "--classes", "0", "2", "--img", "320", "256", "--device", "cpu", *flags])
    assert opt.classes == [0, 2] and opt.imgsz == [320, 256] and opt.device == "cpu"
    assert all(getattr(opt, f[2:].replace("-", "_")) for f in flags)


def test_folder_labels_and_images_match_hand_computed_boxes(weights, images, tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for f in images:
        shutil.copy(f, src / f.name)
    (src / "broken.jpg").write_bytes(b"not a jpeg")  # named and skipped
    (src / "notes.txt").write_text("not an image")  # not an image or video: ignored
    caplog.set_level(logging.INFO, logger="yolo")
    save_dir = detect.run(source=src, weights=weights, imgsz=IMG, save_txt=True, save_conf=True,
                          project=tmp_path / "runs", name="exp")  # fmt: skip
    log = caplog.text
    assert re.search(r"WARNING: skipping \S*broken\.jpg: not a readable image", log)
    model, counts = load_model(weights), []
    for k, f in enumerate(images):
        expected, boxes = hand_detections(model, f)
        counts.append(len(expected))
        got = read_labels(save_dir / "labels" / f"{f.stem}.txt")
        assert (save_dir / "labels" / f"{f.stem}.txt").exists() == bool(len(expected))  # no detections, no file
        assert got.shape == ((len(expected), 6) if len(expected) else (0, 0))  # cls cx cy w h conf
        np.testing.assert_allclose(got.reshape(-1, 6), expected, rtol=0, atol=2e-6)  # %g keeps six significant digits
        per_class = {c: int((expected[:, 0] == c).sum()) for c in (0, 16)}
        said = ", ".join(f"{n} {name}{'s' * (n > 1)}" for c, name in ((0, "person"), (16, "dog")) if (n := per_class[c]))
        line = re.search(rf"image {k + 1}/5 {re.escape(str(src / f.name))}: (\d+)x(\d+) (.*), ([\d.]+)ms", log)
        assert line and line.group(3) == (said or "(no detections)"), log
        original, annotated = cv2.imread(str(f)), cv2.imread(str(save_dir / f.name))
        assert annotated.shape == original.shape
        changed = changed_pixels(original, annotated)
        assert changed[~near_boxes(original.shape, boxes)].sum() == 0  # drawing only where the boxes are
        assert (changed.mean() > 1e-3) if len(expected) else not changed.any()
    assert sum(counts) > 10 and 0 in counts  # images with boxes and one without were seen
    assert sorted(p.name for p in save_dir.iterdir()) == sorted([f.name for f in images] + ["labels"])
    assert re.search(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image at shape \(1, 3, 192, 192\)", log)
    assert f"{sum(1 for n in counts if n)} labels saved to {save_dir / 'labels'}" in log


def test_classes_save_crop_and_nosave(weights, images, tmp_path):
    image = images[0]
    expected, boxes = hand_detections(load_model(weights), image)
    dogs = expected[:, 0] == 16
    assert dogs.any() and (~dogs).any()
    save_dir = detect.run(source=image, weights=weights, imgsz=IMG, classes=[16], save_txt=True, save_crop=True,
                          nosave=True, project=tmp_path, name="dogs")  # fmt: skip
    got = read_labels(save_dir / "labels" / f"{image.stem}.txt")
    np.testing.assert_allclose(got, expected[dogs, :5], atol=2e-6)  # cls cx cy w h, dogs only
    assert sorted(p.name for p in save_dir.iterdir()) == ["crops", "labels"]  # --nosave: no image
    crops = sorted((save_dir / "crops" / "dog").glob("*.jpg"), key=lambda p: (len(p.name), p.name))
    assert [p.name for p in crops][:2] == [f"{image.stem}.jpg", f"{image.stem}2.jpg"][: len(crops)]
    assert len(crops) == int(dogs.sum()) and not (save_dir / "crops" / "person").exists()
    im0 = cv2.imread(str(image))
    for crop_file, (x1, y1, x2, y2) in zip(crops, boxes[dogs]):
        # YOLOv5's crop: the box grown by 2% and 10 px, clipped to the image
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 1.02 + 10, (y2 - y1) * 1.02 + 10
        gx1, gy1 = max(int(cx - w / 2), 0), max(int(cy - h / 2), 0)
        gx2, gy2 = min(int(cx + w / 2), im0.shape[1]), min(int(cy + h / 2), im0.shape[0])
        crop = cv2.imread(str(crop_file))
        assert abs(crop.shape[1] - (gx2 - gx1)) <= 1 and abs(crop.shape[0] - (gy2 - gy1)) <= 1
        region = im0[gy1:gy1 + crop.shape[0], gx1:gx1 + crop.shape[1]].astype(int)
        assert np.abs(crop.astype(int) - region).mean() < 6  # the same pixels, up to JPEG


def write_video(file, frames, fps):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(file), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()


def test_video_comes_back_annotated_with_same_frames_size_and_fps(weights, images, tmp_path, caplog):
    base = cv2.resize(cv2.imread(str(images[0])), (160, 120))
    frames = [np.roll(base, 6 * k, axis=1) for k in range(5)]  # a panning shot
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "clip.mp4", frames, fps=12)
    (src / "corrupt.mp4").write_bytes(b"\x00" * 2048)  # named and skipped
    caplog.set_level(logging.INFO, logger="yolo")
    save_dir = detect.run(source=src, weights=weights, imgsz=IMG, save_txt=True, project=tmp_path, name="v")
    assert re.search(r"WARNING: skipping \S*corrupt\.mp4: not a readable video", caplog.text)
    assert len(re.findall(r"video 1/2 \(\d/5\) \S*clip\.mp4: ", caplog.text)) == 5
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    out = []
    while (ok_frame := cap.read())[0]:
        out.append(ok_frame[1])
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    assert len(out) == 5 and out[0].shape == (120, 160, 3) and fps == pytest.approx(12)
    src_cap = cv2.VideoCapture(str(src / "clip.mp4"))
    originals = [src_cap.read()[1] for _ in range(5)]
    src_cap.release()
    labels = [read_labels(save_dir / "labels" / f"clip_{k}.txt") for k in range(1, 6)]
    for frame_in, frame_out, lb in zip(originals, out, labels):
        drawn = np.abs(frame_out.astype(int) - frame_in.astype(int)).max(2) > 60  # beyond mp4v's own losses
        assert (drawn.mean() > 1e-3) if len(lb) else (drawn.mean() < 1e-3)
    assert sum(len(lb) for lb in labels) > 0
    # --vid-stride 2: frames 1, 3 and 5, written at half the frame rate so the video lasts as long
    caplog.clear()
    strided = detect.run(source=src / "clip.mp4", weights=weights, imgsz=IMG, vid_stride=2, save_txt=True,
                         project=tmp_path, name="v2")  # fmt: skip
    cap = cv2.VideoCapture(str(strided / "clip.mp4"))
    assert (cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)) == (3, pytest.approx(6))
    cap.release()
    assert sorted(p.name for p in (strided / "labels").iterdir()) == [f"clip_{k}.txt" for k in (1, 3, 5) if len(labels[k - 1])]
    for k in (1, 3, 5):
        np.testing.assert_array_equal(read_labels(strided / "labels" / f"clip_{k}.txt"), labels[k - 1])
    assert re.findall(r"video 1/1 \((\d)/(\d)\) \S*clip\.mp4: ", caplog.text) == [("1", "3"), ("2", "3"), ("3", "3")]


def test_half_is_autocast_and_leaves_weights_fp32(weights, images):
    model = load_model(weights)
    fp32 = Detector(model)(str(images[0]), size=IMG)
    half = Detector(model)
    half.amp = True
    fp16 = half(str(images[0]), size=IMG)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(fp32.xyxy[0]) > 3 and abs(len(fp16.xyxy[0]) - len(fp32.xyxy[0])) <= 2
    top32, top16 = fp32.xyxy[0][0], fp16.xyxy[0][0]
    assert torch.allclose(top16[:4], top32[:4], atol=1.0) and abs(float(top16[4] - top32[4])) < 0.03
    assert not torch.equal(fp16.xyxy[0], fp32.xyxy[0])  # fp16 really ran


def test_user_errors_are_one_line(weights, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    cases = [
        (["--weights", str(tmp_path / "missing.pt"), "--source", str(images[0])], "missing.pt not found"),
        (["--weights", str(weights), "--source", str(tmp_path / "nowhere")], "nowhere does not exist"),
        (["--weights", str(weights), "--source", str(images[0]), "--conf-thres", "2"], "--conf-thres must be in"),
        (["--weights", str(weights), "--source", str(images[0]), "--img", "64", "0"],
         "--img must be one positive number or two (h w), got 64 0"),
        (["--weights", "yolov5s.pt", "--source", str(images[0])],  # YOLOv5 would download it; here it cannot
         "checkpoint yolov5s.pt not found: pretrained weights cannot be downloaded here; train from scratch with "
         "python train.py --cfg yolov5s.yaml --weights '', or give the path of a local .pt file"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"broken")
    cases.append((["--weights", str(weights), "--source", str(empty)], "none of the 1 file(s)"))
    for argv, text in cases:
        caplog.clear()
        assert detect.main(argv + ["--project", str(tmp_path / "runs")]) == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and text in errors[0] and "\n" not in errors[0], errors
    r = subprocess.run([sys.executable, str(ROOT / "detect.py"), "--weights", str(tmp_path / "gone.pt"), "--source",
                        str(images[0]), "--project", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"detect: checkpoint {tmp_path / 'gone.pt'} not found"


def test_without_img_detect_runs_at_the_size_the_weights_were_trained_at(weights, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    detect.run(source=images[0], weights=weights, nosave=True, project=tmp_path, name="d")  # trained at IMG (192)
    assert f"Detecting at --img {IMG}, the size the weights were trained at" in caplog.text
    assert f"per image at shape (1, 3, {IMG}, {IMG})" in caplog.text


def test_unwritable_extensions_are_saved_as_jpg(weights, images, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(images[0], src / "photo.mpo")  # an MPO is a JPEG stream: OpenCV reads it but cannot write one
    save_dir = detect.run(source=src / "photo.mpo", weights=weights, imgsz=IMG, project=tmp_path, name="mpo")
    assert [p.name for p in save_dir.iterdir()] == ["photo.jpg"]
    assert cv2.imread(str(save_dir / "photo.jpg")).shape == cv2.imread(str(images[0])).shape


def test_a_failed_write_names_the_file_it_tried(weights, images, tmp_path, caplog):
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(images[1].parent))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{images[1].name}?size=large"
        blocked = tmp_path / "runs" / "url" / images[1].name
        blocked.mkdir(parents=True)  # a folder where the annotated image should go: the write fails
        caplog.set_level(logging.INFO, logger="yolo")
        argv = ["--weights", str(weights), "--source", url, "--img", str(IMG), "--project", str(tmp_path / "runs"),
                "--name", "url", "--exist-ok"]  # fmt: skip
        assert detect.main(argv) == 1
    finally:
        server.shutdown()
        server.server_close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"detect: could not write {blocked}"]


@pytest.mark.parametrize("source, message", [
    ("0", "--source 0: webcams, screen capture and streams are not supported; give an image or video file, a "
          "folder, a glob or a .txt list of paths"),
    ("screen", "--source screen: webcams, screen capture and streams are not supported"),
    ("rtsp://example.com/media.mp4", "rtsp://example.com/media.mp4: streams are not supported; record the stream to "
                                     "a video file first"),
])
def test_webcams_and_streams_are_said_to_be_unsupported(weights, tmp_path, caplog, source, message):
    """YOLOv5's --source 0 (a webcam) or a stream URL: one line saying so, not 'source 0 does not exist'."""
    caplog.set_level(logging.INFO, logger="yolo")
    assert detect.main(["--weights", str(weights), "--source", source, "--project", str(tmp_path / "runs")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"detect: {message}"), errors
    assert not (tmp_path / "runs").exists()


def test_a_file_named_like_a_webcam_index_is_still_read(weights, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(images[0], tmp_path / "0")  # a file called 0 (no suffix): refused as not an image, not as a webcam
    with pytest.raises(detect.SourceError, match="0 is not an image or video"):
        detect.list_source_files("0")


def test_view_img_is_accepted_and_says_no_window_opens(weights, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    assert detect.main(["--weights", str(weights), "--source", str(images[0]), "--img", str(IMG), "--view-img",
                        "--project", str(tmp_path), "--name", "viewed"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--view-img")]
    assert lines == [f"--view-img: no window can open here (OpenCV without GUI support); see the annotated files in "
                     f"{tmp_path / 'viewed'}"]
    assert (tmp_path / "viewed" / images[0].name).is_file()


def test_a_size_off_the_stride_is_warned_about_once(weights, images, tmp_path, caplog):
    """--img 50 is 50x50: one warning that it is rounded to 64, not one per side."""
    caplog.set_level(logging.INFO, logger="yolo")
    assert detect.main(["--weights", str(weights), "--source", str(images[0]), "--img", "50", "--project",
                        str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "multiple of the max stride" in r.getMessage()]
    assert warnings == ["WARNING: --img 50 must be a multiple of the max stride 32; using 64"]
