"""Side by side with YOLOv5's own val.py: the same weights, images and flags, mAP from both tools.

    python bench/yolov5_parity.py --weights best.pt --data coco16.yaml --img 256 \
        --yolov5 ../yolov5 --yolov5-python ../yolov5-venv/bin/python

--weights is a YOLOv5 .pt or a checkpoint of ours; ours is first rebuilt as a YOLOv5 .pt in YOLOv5's
interpreter (its Model from the same yaml, our EMA's state dict, whose keys are YOLOv5's), so that both tools
validate the same weights. --yolov5 is a checkout of the YOLOv5 repository and --yolov5-python an interpreter
whose environment has that checkout's requirements (and onnx/onnxruntime for the ONNX row): a separate virtual
environment, since YOLOv5 is never a dependency of this project (so the test suite cannot run this bench). Each row runs YOLOv5's `val.run` in that interpreter and ours in this one, with the same conf, IoU,
batch size and image size:

  pt, --batch-size B    the .pt for each of --batch-sizes (rectangular batches, as both val.py's do)
  onnx                  one .onnx file exported by YOLOv5's export.py at a square --img (YOLOv5 validates
                        exported files at batch 1; so does this row for both tools)

  detect.py             both detect.py's on the val images (conf 0.25, IoU 0.45, --save-txt --save-conf): images
                        whose detections differ in number or classes, and the largest box and confidence
                        differences of the rest. YOLOv5 rounds detect.py's boxes to whole pixels and maps them
                        back with one gain; ours are neither, so boxes differ by up to about a pixel.

--stages IMAGE compares one image stage by stage instead (the check that found the rounding difference): the
letterboxed input tensor, the raw predictions of the same .pt, and the detections after NMS, as max
differences between the two pipelines.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import detect  # noqa: E402
import val  # noqa: E402
from utils.boxes import non_max_suppression  # noqa: E402
from utils.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import LoadImagesAndLabels  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402

TOLERANCE = 0.005  # mAP50-95: the agreement the parity issue asks for

# Run inside YOLOv5's interpreter, from its checkout: its val.run, printed as one JSON line.
YOLOV5_VAL = """
import json, sys
sys.path.insert(0, '.')
import val
(mp, mr, map50, map50_95, *_), _, _ = val.run(data={data!r}, weights={weights!r}, batch_size={batch}, imgsz={img},
    conf_thres={conf}, iou_thres={iou}, task='val', device='cpu', workers=0, plots=False,
    half=False, project={project!r}, name='yolov5', exist_ok=True)  # half: the CLI's default (run()'s is True)
print('PARITY ' + json.dumps(dict(map50=map50, map50_95=map50_95)))
"""

YOLOV5_DETECT = """
import sys
sys.path.insert(0, '.')
import detect
detect.run(weights={weights!r}, source={source!r}, imgsz=({img}, {img}), device='cpu', save_txt=True, save_conf=True,
           nosave=True, project={project!r}, name='yolov5_detect', exist_ok=True)
"""

# Inside YOLOv5's interpreter: our weights (state dict, yaml and names saved as plain data) as a YOLOv5 .pt.
YOLOV5_FROM_OURS = """
import sys, torch
sys.path.insert(0, '.')
from models.yolo import Model
d = torch.load({plain!r}, weights_only=True)
model = Model(d['yaml'], ch=3, nc=d['nc'])
model.load_state_dict(d['state_dict'])
model.names, model.nc = dict(enumerate(d['names'])), d['nc']  # as YOLOv5's train.py attaches them
torch.save(dict(model=model.half(), ema=None, epoch=-1, best_fitness=None, optimizer=None, updates=None), {out!r})
"""

# Inside YOLOv5's interpreter: the stages of one image through its dataset, model and NMS, saved to an npz.
YOLOV5_STAGES = """
import os, sys, numpy as np, torch
sys.path.insert(0, '.')
from models.common import DetectMultiBackend
from utils.dataloaders import LoadImagesAndLabels
from utils.general import non_max_suppression
ds = LoadImagesAndLabels({image_dir!r}, {img}, 1, augment=False, rect=True, stride=32, pad=0.5)
i = [os.path.abspath(f) for f in ds.im_files].index({image!r})
im, _, _, shapes = ds[i]
model = DetectMultiBackend({weights!r}, device=torch.device('cpu'), fuse=True)
x = im[None].float() / 255
with torch.no_grad():
    pred = model(x)
    pred = pred[0] if isinstance(pred, (list, tuple)) else pred
det = non_max_suppression(pred, {conf}, {iou}, multi_label=True, max_det=300)[0]
np.savez({out!r}, input=x.numpy(), pred=pred.numpy(), det=det.numpy())
"""


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a .pt trained by YOLOv5")
    p.add_argument("--data", required=True, help="dataset yaml (its val split is validated)")
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.6)
    p.add_argument("--yolov5", required=True, help="a checkout of the YOLOv5 repository")
    p.add_argument("--yolov5-python", required=True, help="python with YOLOv5's requirements installed")
    p.add_argument("--onnx", default=None, help="the .onnx to compare (default: exported here by YOLOv5's export.py)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX row")
    p.add_argument("--stages", default=None, metavar="IMAGE", help="compare one image of the val split stage by stage")
    return p.parse_args(argv)


def run_yolov5(opt, script: str) -> str:
    """Run a snippet in YOLOv5's interpreter from its checkout; its stdout (stderr shown on failure)."""
    done = subprocess.run([opt.yolov5_python, "-c", script], cwd=opt.yolov5, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"yolov5_parity: YOLOv5's side failed:\n{done.stderr[-3000:]}")
    if "NMS time limit" in done.stderr:  # YOLOv5 then drops the rest of the batch's images
        LOGGER.warning("WARNING: YOLOv5's NMS hit its time limit in this run; its mAP is then too low")
    return done.stdout


def yolov5_map(opt, weights: str, batch: int, project: str) -> tuple[float, float]:
    out = run_yolov5(opt, YOLOV5_VAL.format(data=str(Path(opt.data).resolve()), weights=weights, batch=batch,
                                            img=opt.img, conf=opt.conf_thres, iou=opt.iou_thres, project=project))
    line = next(x for x in out.splitlines() if x.startswith("PARITY "))
    got = json.loads(line[len("PARITY "):])
    return got["map50"], got["map50_95"]


def our_map(opt, weights: str, batch: int, project: str) -> tuple[float, float]:
    (_, _, map50, map50_95, *_), _, _ = val.run(
        data=opt.data, weights=weights, batch_size=batch, imgsz=opt.img, conf_thres=opt.conf_thres,
        iou_thres=opt.iou_thres, device="cpu", workers=0, plots=False, project=project, name="ours", exist_ok=True)
    return map50, map50_95


def read_detections(folder: Path, image: Path) -> np.ndarray:
    """A --save-txt --save-conf label file as (n, 6) [cls, x1, y1, x2, y2, conf] in pixels, by confidence."""
    file = folder / f"{image.stem}.txt"
    rows = np.loadtxt(file, ndmin=2) if file.exists() and file.stat().st_size else np.zeros((0, 6))
    h, w = cv2.imread(str(image)).shape[:2]
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    boxes = np.stack([rows[:, 0], cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, rows[:, 5]], 1)
    return boxes[np.argsort(-boxes[:, 5], kind="stable")]


def compare_detect(opt, weights: str, folder: Path) -> str:
    """Both detect.py's on the val images; one line saying how far apart their detections are."""
    source = check_dataset(opt.data)["val"]
    source = source[0] if isinstance(source, list) else source
    run_yolov5(opt, YOLOV5_DETECT.format(weights=weights, source=str(source), img=opt.img, project=str(folder)))
    detect.run(weights=weights, source=str(source), imgsz=[opt.img], device="cpu", save_txt=True, save_conf=True,
               nosave=True, project=str(folder), name="ours_detect", exist_ok=True)
    images = sorted(Path(source).glob("*.*"))
    differ, box_diff, conf_diff, n = 0, 0.0, 0.0, 0
    for image in images:
        theirs = read_detections(folder / "yolov5_detect" / "labels", image)
        ours = read_detections(folder / "ours_detect" / "labels", image)
        if len(theirs) != len(ours) or (theirs[:, 0] != ours[:, 0]).any():
            differ += 1
            continue
        n += len(ours)
        if len(ours):
            box_diff = max(box_diff, float(np.abs(theirs[:, 1:5] - ours[:, 1:5]).max()))
            conf_diff = max(conf_diff, float(np.abs(theirs[:, 5] - ours[:, 5]).max()))
    return (f"detect.py: {len(images) - differ} of {len(images)} images with the same detections ({n} boxes), "
            f"largest box difference {box_diff:.2f} px, confidence {conf_diff:.4f}")


def as_yolov5_weights(opt, weights: str, folder: Path) -> str:
    """A YOLOv5 .pt as it is; a checkpoint of ours rebuilt as one (its EMA, as both val.py's would use)."""
    ckpt = load_checkpoint(weights)
    if ckpt.get("imported_from"):
        return weights
    model = model_from_checkpoint(ckpt, use_ema=True)
    plain, out = folder / "ours_plain.pt", folder / f"{Path(weights).stem}_yolov5.pt"
    torch.save(dict(yaml=model.yaml, nc=model.nc, names=list(model.names), state_dict=model.state_dict()), plain)
    run_yolov5(opt, YOLOV5_FROM_OURS.format(plain=str(plain), out=str(out)))
    return str(out)


def export_onnx(opt, weights: str, folder: Path) -> str:
    """YOLOv5's own export of --weights at a square --img (so both tools read one and the same file)."""
    local = folder / "export" / Path(weights).name
    local.parent.mkdir()
    local.write_bytes(Path(weights).read_bytes())
    cmd = [opt.yolov5_python, "export.py", "--weights", str(local), "--include", "onnx", "--imgsz", str(opt.img)]
    done = subprocess.run(cmd, cwd=opt.yolov5, capture_output=True, text=True)
    onnx = local.with_suffix(".onnx")
    if done.returncode or not onnx.exists():
        sys.exit(f"yolov5_parity: YOLOv5's export failed:\n{done.stderr[-3000:]}")
    return str(onnx)


def compare_stages(opt, weights: str, folder: Path) -> None:
    data = check_dataset(opt.data)
    image = os.path.abspath(opt.stages)
    out = folder / "yolov5_stages.npz"
    run_yolov5(opt, YOLOV5_STAGES.format(image_dir=str(Path(image).parent), img=opt.img, image=image,
                                         weights=weights, conf=opt.conf_thres,
                                         iou=opt.iou_thres, out=str(out)))
    theirs = np.load(out)
    ds = LoadImagesAndLabels(str(Path(image).parent), opt.img, 1, rect=True, stride=32, pad=0.5, nc=data["nc"])
    sample = ds[[os.path.abspath(f) for f in ds.im_files].index(image)]
    x = sample.img[None].float() / 255
    model = model_from_checkpoint(load_checkpoint(weights), use_ema=True).eval()
    model.fuse()
    with torch.no_grad():
        pred = model(x)[0]
    det = non_max_suppression(pred, opt.conf_thres, opt.iou_thres, multi_label=True, max_det=300)[0].numpy()
    print(f"input    shape ours {tuple(x.shape)} yolov5 {theirs['input'].shape}", end="")
    if x.shape == theirs["input"].shape:
        print(f", max |diff| {np.abs(x.numpy() - theirs['input']).max():.3g}")
        print(f"raw pred max |diff| {np.abs(pred.numpy() - theirs['pred']).max():.3g}")
    else:
        print()
    print(f"NMS      detections ours {len(det)} yolov5 {len(theirs['det'])}", end="")
    if len(det) == len(theirs["det"]):
        print(f", max |diff| {np.abs(det - theirs['det']).max() if len(det) else 0:.3g}")
    else:
        print()


def main(opt) -> None:
    set_logging()
    LOGGER.setLevel(logging.WARNING)  # our val.run's own report would bury the table
    with tempfile.TemporaryDirectory() as tmp:
        weights = as_yolov5_weights(opt, str(Path(opt.weights).resolve()), Path(tmp))
        if opt.stages:
            compare_stages(opt, weights, Path(tmp))
            return
        rows = [(f"pt, --batch-size {b}", weights, b) for b in opt.batch_sizes]
        if not opt.no_onnx:
            rows.append(("onnx (YOLOv5's export), batch 1", opt.onnx or export_onnx(opt, weights, Path(tmp)), 1))
        print(f"{'weights':34}{'YOLOv5 mAP50':>14}{'ours':>8}{'YOLOv5 mAP50-95':>17}{'ours':>8}{'diff':>9}")
        for label, w, batch in rows:
            y50, y = yolov5_map(opt, w, batch, tmp)
            o50, o = our_map(opt, w, batch, tmp)
            flag = "" if abs(o - y) <= TOLERANCE else "  <- over 0.005"
            print(f"{label:34}{y50:14.4f}{o50:8.4f}{y:17.4f}{o:8.4f}{o - y:+9.4f}{flag}")
        print(compare_detect(opt, weights, Path(tmp)))


if __name__ == "__main__":
    main(parse_opt())
