"""Detect objects in images and videos with trained weights, as YOLOv5's detect.py does.

    python detect.py --weights runs/train/exp/weights/best.pt --source img.jpg      # an image
    python detect.py --weights best.pt --source path/to/folder/                       # its images and videos
    python detect.py --weights best.pt --source 'path/*.jpg'                          # a glob
    python detect.py --weights best.pt --source vid.mp4                               # a video
    python detect.py --weights best.pt --source list.txt                              # a list of paths
    python detect.py --weights best.onnx --source img.jpg                             # an exported model

Without --weights it uses the latest training run's best.pt. Annotated images and videos are written
under runs/detect/exp* with their own names; --save-txt adds labels/NAME.txt (`cls cx cy w h [conf]`,
normalised to the original image), --save-crop adds crops/CLASS/NAME.jpg.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from utils.cli import (AT_LEAST_1, UNIT_INTERVAL, HelpFormatter, check_flags, exit_process,  # noqa: E402
                       refuse_bad_flags, shown_path)

FLAG_RANGES = {"imgsz": ("--img", AT_LEAST_1), "conf_thres": ("--conf-thres", UNIT_INTERVAL),
               "iou_thres": ("--iou-thres", UNIT_INTERVAL), "max_det": ("--max-det", AT_LEAST_1),
               "line_thickness": ("--line-thickness", AT_LEAST_1), "vid_stride": ("--vid-stride", AT_LEAST_1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Detect objects with a YOLOv5-style detector", formatter_class=HelpFormatter)
    p.add_argument("--weights", type=str, default=None,
                   help="best.pt, an original YOLOv5 .pt, best.onnx, best.torchscript or best_openvino_model/ "
                        "(default: the latest runs/train/*/weights/best.pt)")
    p.add_argument("--source", type=str, required=True,
                   help="an image or video, a folder, a glob, a .txt list of paths, or an image URL")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=None,
                   help="inference size: one number, or h w (default: the size the weights were trained at, else 640)")
    p.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    p.add_argument("--device", default="", help="cpu, cuda, or a GPU index such as 0 (default: the first GPU, else cpu)")
    p.add_argument("--classes", nargs="+", type=int, help="keep only these class ids: --classes 0, or --classes 0 2 3")
    p.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    p.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-crop", action="store_true", help="save each box's crop to crops/CLASS/")
    p.add_argument("--nosave", action="store_true", help="do not save images/videos")
    p.add_argument("--view-img", action="store_true",
                   help="YOLOv5's flag to show results in a window: accepted, but no window can open (OpenCV is "
                        "installed without GUI); the annotated files are saved")
    p.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without labels")
    p.add_argument("--hide-conf", action="store_true", help="draw labels without confidences")
    p.add_argument("--half", action="store_true", help="FP16 inference: fp16 autocast, on any device")
    p.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride: every n-th frame")
    p.add_argument("--project", default=str(ROOT / "runs" / "detect"), help="save results to project/name")
    p.add_argument("--name", default="exp", help="save results to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    return p


def parse_opt(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    CLI_OPT = parse_opt()  # --help and mistyped flags answer here, before the imports below take seconds
    refuse_bad_flags("detect", lambda opt: check_flags(opt, FLAG_RANGES), CLI_OPT)

import cv2  # noqa: E402
import torch  # noqa: E402

from utils.allocator import reuse_freed_memory  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.inference import (  # noqa: E402
    Detector,
    MissingPackageError,
    SourceError,
    autocast_dtype,
    default_imgsz,
    inference_size,
    iter_frames,
    list_source_files,
    load_model,
    save_image,
    speed_line,
)
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.paths import TRAIN_RUNS, increment_path, latest_best_weights  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


class VideoWriters:
    """One cv2.VideoWriter per source video (mp4v), opened at its first frame with that frame's size and the
    video's frame rate (divided by --vid-stride, so the output lasts as long as the input)."""

    def __init__(self, save_dir: Path, vid_stride: int):
        self.save_dir, self.vid_stride = save_dir, vid_stride
        self.writers: dict[str, cv2.VideoWriter] = {}

    def write(self, path: str, image, fps: float) -> None:
        writer = self.writers.get(path)
        if writer is None:
            for w in self.writers.values():  # videos come one after another: the previous one is complete
                w.release()
            file = self.save_dir / Path(path).with_suffix(".mp4").name
            h, w = image.shape[:2]
            writer = cv2.VideoWriter(str(file), cv2.VideoWriter_fourcc(*"mp4v"), fps / self.vid_stride, (w, h))
            if not writer.isOpened():
                raise OSError(f"cannot write the video {file}")
            self.writers = {path: writer}
        writer.write(image)

    def close(self) -> None:
        for w in self.writers.values():
            w.release()
        self.writers = {}


@torch.no_grad()
def run(
    source,
    weights=None,
    imgsz=None,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 1000,
    device="",
    classes=None,
    agnostic_nms: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    save_crop: bool = False,
    nosave: bool = False,
    view_img: bool = False,
    line_thickness: int = 3,
    hide_labels: bool = False,
    hide_conf: bool = False,
    half: bool = False,
    vid_stride: int = 1,
    project=ROOT / "runs" / "detect",
    name: str = "exp",
    exist_ok: bool = False,
) -> Path:
    """Detect in every image and video frame of `source`; returns the run folder."""
    check_flags(dict(imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                     line_thickness=line_thickness, vid_stride=vid_stride), FLAG_RANGES)
    device = select_device(device)
    files = list_source_files(source)  # a bad source fails before anything is loaded or written
    if weights is None:
        weights = latest_best_weights(TRAIN_RUNS)
        LOGGER.info(f"No --weights given: using the latest run's {shown_path(weights)}")
    model = load_model(weights, device)
    detector = Detector(model)
    detector.conf, detector.iou, detector.max_det = conf_thres, iou_thres, max_det
    detector.classes, detector.agnostic = classes, agnostic_nms
    detector.amp = autocast_dtype(model, torch.float16 if half else None) is not None
    imgsz = inference_size(default_imgsz(model, imgsz, "Detecting"), detector.stride, getattr(model, "fixed_shape", None))

    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    if view_img:  # opencv-python-headless (requirements.txt) has no windows to show them in
        shown = "nothing is saved either (--nosave)" if nosave else f"see the annotated files in {shown_path(save_dir)}"
        LOGGER.info(f"--view-img: no window can open here (OpenCV without GUI support); {shown}")
    videos = VideoWriters(save_dir, vid_stride)
    seen, totals = 0, [0.0, 0.0, 0.0]
    try:
        for frame in iter_frames(files, vid_stride):
            res = detector.detect([frame.image], [frame.name], size=imgsz)
            seen += 1
            totals = [t + r for t, r in zip(totals, res.times)]
            h, w = res.shape[2:]
            LOGGER.info(f"{frame.describe()} {h}x{w} {res.summary(0)}, {res.times[1]:.1f}ms")
            if save_txt:
                res.write_labels(0, save_dir / "labels" / f"{frame.stem}.txt", save_conf)
            if save_crop:
                res.save_crops(0, save_dir, frame.stem)
            if nosave:
                continue
            annotated = res.annotated(0, line_width=line_thickness, labels=not hide_labels, conf=not hide_conf)
            if frame.is_video:
                videos.write(frame.path, annotated, frame.fps)
            else:
                save_image(save_dir / frame.name, annotated)
    finally:
        videos.close()

    if not seen:
        raise SourceError(f"none of the {len(files)} file(s) of {source} could be read (see the warnings above)")
    LOGGER.info(speed_line([t / seen for t in totals], (1, 3, *imgsz)))
    labels = f"\n{len(list((save_dir / 'labels').glob('*.txt')))} labels saved to {shown_path(save_dir / 'labels')}" if save_txt else ""
    LOGGER.info(f"Results saved to {shown_path(save_dir)}{labels}")
    return save_dir


def main(argv=None) -> int:
    """detect.py's exit status: 0, or 1 after a one-line error."""
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(**vars(opt))
    except (CheckpointError, SourceError, MissingPackageError, ValueError, OSError) as e:
        LOGGER.error(f"detect: {e}")
        return 1
    return 0


if __name__ == "__main__":
    reuse_freed_memory()
    exit_process(main(CLI_OPT))
