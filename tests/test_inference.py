"""utils/inference.py's shared pieces on their own: the one image-size parser, video frame counting with a
stride, the weights download cache, writing images whose extension OpenCV cannot encode, exported-file
metadata in YOLOv5's form, the one speed line and the one --half rule."""
import ast
import http.server
import logging
import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
import export
import val
import utils.paths
from models.yolo import Model
import utils.inference as inference
from utils.inference import ExportedModel, Results, _parse_meta_value, export_metadata, fetch_weights, iter_frames

SIZE_MESSAGE = "image size must be one positive number or two (h w)"


@pytest.mark.parametrize("size, expected", [(100, (128, 128)), (330, (352, 352)), ((200, 300), (224, 320)),
                                            ([640], (640, 640)), ((64, 96), (64, 96)), (1, (32, 32))])  # fmt: skip
def test_inference_size_rounds_up_to_the_stride(size, expected):
    assert inference.inference_size(size, 32) == expected


def test_inference_size_fixed_shape_wins_and_bad_sizes_are_one_message():
    assert inference.inference_size(640, 32, fixed_shape=(64, 96)) == (64, 96)
    for bad in ((), (1, 2, 3), 0, (-5, 64), (64, 0)):
        with pytest.raises(ValueError) as e:
            inference.inference_size(bad, 32)
        assert str(e.value).startswith(SIZE_MESSAGE) and "\n" not in str(e.value)


def test_video_progress_counts_the_frames_kept(tmp_path):
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for k in range(7):
        writer.write(np.full((48, 64, 3), 30 * k, np.uint8))
    writer.release()
    frames = list(iter_frames([str(clip)], vid_stride=2))
    assert [f.describe() for f in frames] == [f"video 1/1 ({k}/4) {clip}:" for k in (1, 2, 3, 4)]
    assert [f.stem for f in frames] == ["clip_1", "clip_3", "clip_5", "clip_7"]  # named by their place in the video


def test_downloaded_weights_are_cached_per_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    served = tmp_path / "www"
    for run in ("run1", "run2"):
        (served / run).mkdir(parents=True)
        (served / run / "best.pt").write_bytes(run.encode() * 100)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        first, second = fetch_weights(f"{base}/run1/best.pt"), fetch_weights(f"{base}/run2/best.pt")
        assert first.read_bytes() == b"run1" * 100 and second.read_bytes() == b"run2" * 100
        assert first.name == second.name == "best.pt"  # the suffix still tells the loader the format
        (served / "run1" / "best.pt").unlink()
        assert fetch_weights(f"{base}/run1/best.pt") == first  # fetched once
    finally:
        server.shutdown()
        server.server_close()


def test_results_save_writes_jpg_for_extensions_opencv_cannot_encode(tmp_path):
    im = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    dets = [torch.tensor([[5.0, 5.0, 30.0, 30.0, 0.9, 0.0]])] * 3
    res = Results([im] * 3, dets, ["photo.mpo", "image", "pic.png"], (0.0, 0.0, 0.0), ["person"], (3, 3, 64, 64))
    save_dir = res.save(save_dir=tmp_path / "exp")
    assert sorted(p.name for p in save_dir.iterdir()) == ["image.jpg", "photo.jpg", "pic.png"]
    for name in ("image.jpg", "photo.jpg"):
        assert cv2.imread(str(save_dir / name)).shape == im.shape


def test_export_metadata_is_yolov5s_form_and_both_forms_load():
    model = Model("yolov5n.yaml", nc=2, verbose=False)
    model.names = ["cat", "dog"]
    meta = export_metadata(model, (1, 3, 64, 96), dynamic=False, half=False)
    # what YOLOv5's DetectMultiBackend does with an ONNX file's metadata strings (eval replaced by a literal parse)
    text = {k: json.dumps(v) for k, v in meta.items()}
    assert int(text["stride"]) == 32
    names = ast.literal_eval(text["names"])
    assert {int(k): v for k, v in names.items()} == {0: "cat", 1: "dog"}
    for stored in (text, {"names": "['cat', 'dog']", "stride": "[8.0, 16.0, 32.0]"},  # ours before
                   {"names": "{0: 'cat', 1: 'dog'}", "stride": "32"}):  # YOLOv5's own str(dict)
        loaded = ExportedModel(Path("best.onnx"), torch.device("cpu"))
        loaded._configure({k: _parse_meta_value(v) for k, v in stored.items()}, [1, 3, 64, 96], 7)
        assert loaded.names == ["cat", "dog"] and loaded.nc == 2 and float(loaded.stride.max()) == 32.0


def test_speed_line_and_train_runs_are_shared():
    line = inference.speed_line((1.234, 5.0, 0.56), (1, 3, 64, 96))
    assert line == "Speed: 1.2ms pre-process, 5.0ms inference, 0.6ms NMS per image at shape (1, 3, 64, 96)"
    assert detect.TRAIN_RUNS is val.TRAIN_RUNS is export.TRAIN_RUNS is utils.paths.TRAIN_RUNS
    assert utils.paths.TRAIN_RUNS == detect.ROOT / "runs" / "train"


def test_half_applies_to_pytorch_weights_only(caplog):
    model = Model("yolov5n.yaml", nc=2, verbose=False)
    exported = ExportedModel(Path("best.onnx"), torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="yolo"):
        caplog.clear()  # what building the model logged (when an earlier test left the logger at INFO)
        assert inference.autocast_dtype(model, torch.float16) is torch.float16
        assert inference.autocast_dtype(model, None) is None
        assert inference.autocast_dtype(exported, None) is None
        assert not caplog.records
        assert inference.autocast_dtype(exported, torch.float16) is None
    assert caplog.records[0].getMessage() == "--half has no effect on best.onnx: an exported model runs in its own precision"

