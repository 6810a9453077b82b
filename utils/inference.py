"""Running a trained detector on pictures: the one inference path of detect.py, the torch.hub model
(hubconf.py) and val.py's support for exported files.

    model = load_model("best.pt")             # our checkpoint (EMA weights), a YOLOv5 .pt, best.onnx, best.torchscript,
                                              # best_openvino_model/ (or the .xml in it)
    detector = Detector(model)                # letterbox -> model -> NMS -> boxes in each image's own pixels
    results = detector(["a.jpg", pil_image])  # Results: .xyxy .xywh .xyxyn .xywhn .print() .save() .crop() .pandas()

Every loaded model, PyTorch or exported, answers forward(images float BCHW RGB 0..1) with
(predictions (batch, N, 5 + nc), raw maps or None) and carries names, nc and stride; an exported file of one
input size also says so in `fixed_shape` (every image is then letterboxed to exactly that size).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import glob
import hashlib
import importlib
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import yaml

from models.yolo import Model, check_img_size, size_multiple
from utils.augmentations import FILL_VALUE, letterbox
from utils.boxes import clip_boxes, non_max_suppression, scale_boxes, xywh2xyxy, xyxy2xywh
from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.cli import DEFAULT_IMGSZ
from utils.dataloaders import IMG_FORMATS
from utils.log import LOGGER
from utils.paths import increment_path
from utils.plots import Annotator, class_color
from utils.profiling import PhaseTimer
from utils.torch_utils import autocast

VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
EXPORT_SUFFIXES = (".onnx", ".torchscript")
OPENVINO_DIR_SUFFIX = "_openvino_model"  # YOLOv5's folder name: best.pt -> best_openvino_model/{best.xml,.bin,.yaml}
TORCHSCRIPT_CONFIG = "config.txt"  # the extra file of a .torchscript archive that holds its metadata (as YOLOv5's)
DOWNLOAD_TIMEOUT_S = 10
# torch 2.14 marks torch.jit deprecated; TorchScript stays one of the export formats YOLOv5 users expect.
JIT_DEPRECATION = r"`torch\.jit\..*` is deprecated"


class SourceError(ValueError):
    """An image or video source that cannot be used; the message is one line naming it."""


class MissingPackageError(ImportError):
    """An optional package that a requested format needs is not installed; one line naming it."""


def require(package: str, purpose: str):
    """Import `package` or fail with one line naming it and what needed it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(f"{purpose} needs the '{package}' package, which is not installed: "
                                  f"pip install {package}") from None


# ------------------------------------------------------------------------------------------- loading
def is_exported(weights) -> bool:
    """True for a file export.py writes (.onnx, .torchscript, an OpenVINO folder or its .xml), not PyTorch weights."""
    path = Path(weights)
    return path.suffix.lower() in (*EXPORT_SUFFIXES, ".xml") or path.name.endswith(OPENVINO_DIR_SUFFIX)


def load_model(weights, device: torch.device | str = "cpu", fuse: bool = True) -> nn.Module:
    """The detector in `weights`, in eval mode on `device`.

    .pt: our checkpoint's EMA weights (else its raw ones) or an original YOLOv5 file, read without running
    code (utils.checkpoint), in FP32 and with Conv+BatchNorm folded when `fuse`. .onnx: an onnxruntime
    session. .torchscript: torch.jit.load. *_openvino_model/ or its .xml: OpenVINO on the CPU. Raises
    CheckpointError (or MissingPackageError) with one line.
    """
    path = Path(weights)
    device = torch.device(device)
    suffix = path.suffix.lower()
    if is_exported(path):
        if not path.exists():
            raise CheckpointError(f"weights {path} not found")
        if suffix == ".onnx":
            return OnnxModel(path, device)
        return TorchScriptModel(path, device) if suffix == ".torchscript" else OpenVinoModel(path, device)
    model = model_from_checkpoint(load_checkpoint(path), use_ema=True)
    if fuse:
        model.fuse()
    return model.to(device).eval()


def default_imgsz(model: nn.Module, imgsz, command: str):
    """--img as given (a number, or [n] or [h, w]), or when not given (None) the size the weights were trained at
    (an exported file: the size it was exported at), said in one line; 640 when neither is known."""
    if imgsz:
        return imgsz
    known = getattr(model, "trained_imgsz", None)
    exported = getattr(model, "export_shape", None)
    if known:
        LOGGER.info(f"{command} at --img {known}, the size the weights were trained at")
        return [known]
    if exported:
        LOGGER.info(f"{command} at --img {exported[0]} {exported[1]}, the size the file was exported at")
        return list(exported)
    LOGGER.info(f"{command} at --img {DEFAULT_IMGSZ}, the default (the weights do not say what size they were trained at)")
    return [DEFAULT_IMGSZ]


def export_metadata(model: nn.Module, shape, dynamic: bool, half: bool) -> dict:
    """What an exported file records about its model (read back by the loaders below): class names as
    {index: name} and the largest stride as an int, the two keys YOLOv5's loader reads (int(stride), names as a
    dict), then the export's input shape (batch, 3, h, w), whether batch and size are free, the precision, and the
    dataset yaml the weights were trained on, when known."""
    meta = {"names": {i: str(n) for i, n in enumerate(model.names)}, "stride": int(max(float(s) for s in model.stride)),
            "shape": [int(s) for s in shape], "dynamic": bool(dynamic), "half": bool(half)}
    if getattr(model, "trained_data", None):  # val.py of the exported file then needs no --data
        meta["data"] = model.trained_data
    return meta


def _parse_meta_value(text: str):
    """A metadata value as JSON (ours) or a Python literal (YOLOv5 writes str(dict)); never evaluated as code."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        with contextlib.suppress(ValueError, SyntaxError):
            return ast.literal_eval(text)
    return text


class ExportedModel(nn.Module):
    """An exported detector behind the eval-mode Model interface. A file exported for one batch size runs
    larger or smaller batches in chunks of that size (the last one padded); a fixed-size file refuses other
    image sizes. Subclasses run one chunk in _run()."""

    def __init__(self, file: Path, device: torch.device):
        super().__init__()
        self.file, self.device = file, device
        self.names, self.nc, self.stride = [], 0, torch.tensor([32.0])
        self.fixed_shape, self.batch = None, None
        self.export_shape = None  # (h, w) the file was exported at, when it says
        self.trained_data = None  # the dataset yaml the weights were trained on, when the file says

    def _configure(self, meta: dict, input_shape, output_width) -> None:
        """Names, strides and input geometry from the file's metadata (ours or YOLOv5's) and its input shape."""
        names = meta.get("names")
        if isinstance(names, dict):  # {index: name} (JSON turns the indices into strings); files before it held a list
            names = [names[k] for k in sorted(names, key=int)]
        if not names:
            if not isinstance(output_width, int):
                raise CheckpointError(f"{self.file} holds no class names and its output width is unknown; "
                                      "export it with export.py")
            names = [str(i) for i in range(output_width - 5)]
        self.names, self.nc = [str(n) for n in names], len(names)
        self.trained_data = meta.get("data") if isinstance(meta.get("data"), str) else None
        stride = meta.get("stride", 32)  # an int, or per-level strides in files written before YOLOv5's form
        self.stride = torch.tensor(stride if isinstance(stride, (list, tuple)) else [stride], dtype=torch.float32)
        shape = meta.get("shape") or input_shape
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            self.export_shape = (int(shape[2]), int(shape[3]))
        dynamic = bool(meta.get("dynamic", False))
        if not dynamic and all(isinstance(d, int) for d in input_shape[2:]):
            self.fixed_shape = tuple(int(d) for d in input_shape[2:])
        if not dynamic and isinstance(input_shape[0], int):
            self.batch = int(input_shape[0])

    def square_size(self, imgsz: int | None) -> int | None:
        """The square size val.py letterboxes to: a fixed-size file's own (said in one line when --img asked
        for another), else imgsz, else the size it was exported at."""
        if self.fixed_shape is None:
            return imgsz or (self.export_shape[0] if self.export_shape else None)
        h, w = self.fixed_shape
        if h != w:
            raise CheckpointError(f"{self.file} takes {h}x{w} images, and validation letterboxes to squares: "
                                  "export with one --img size or with --dynamic")
        if imgsz not in (None, h):
            LOGGER.info(f"{self.file.name} was exported for {h}x{w} images: validating at --img {h}")
        return h

    def forward(self, im: torch.Tensor, augment: bool = False):
        if augment:
            raise ValueError(f"test-time augmentation needs the PyTorch weights, not {self.file.name}")
        b, _, h, w = im.shape
        if self.fixed_shape and (h, w) != self.fixed_shape:
            raise ValueError(f"{self.file.name} was exported for {self.fixed_shape[0]}x{self.fixed_shape[1]} "
                             f"images, got {h}x{w}; export with --dynamic for other sizes")
        step = self.batch or b
        outs = []
        for i in range(0, b, step):
            chunk = im[i:i + step]
            n = len(chunk)
            if n < step:
                chunk = torch.cat((chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))))
            outs.append(self._run(chunk)[:n])
        return torch.cat(outs).to(im.device), None

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxModel(ExportedModel):
    """An .onnx file run by onnxruntime (CPUExecutionProvider; CUDA's when the device is a GPU and the
    installed onnxruntime has it), with torch.get_num_threads() intra-op threads."""

    def __init__(self, file: Path, device: torch.device):
        super().__init__(file, device)
        ort = require("onnxruntime", "running an .onnx model")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        elif device.type == "cuda":
            LOGGER.warning(f"WARNING: the installed onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu has it); "
                           f"{file.name} runs on the CPU, not {device}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as PyTorch's and OpenVINO's: OMP_NUM_THREADS where set
        try:
            self.session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable or invalid files
            raise CheckpointError(f"{file} is not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        meta = {k: _parse_meta_value(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._configure(meta, inp.shape, self.session.get_outputs()[0].shape[-1])

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(im.detach().cpu().numpy(), dtype=self.input_dtype)  # val passes channels_last
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0]).float()


class TorchScriptModel(ExportedModel):
    """A .torchscript file (torch.jit.load). A traced graph takes any batch and any stride-multiple size:
    Detect builds its grids from the input's shape while being traced."""

    def __init__(self, file: Path, device: torch.device):
        super().__init__(file, device)
        extra = {TORCHSCRIPT_CONFIG: ""}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
                self.module = torch.jit.load(str(file), map_location=device, _extra_files=extra).eval()
        except Exception as e:  # torch.jit raises RuntimeError/ValueError for anything unreadable
            raise CheckpointError(f"{file} is not a readable TorchScript model ({str(e).splitlines()[0][:200]})") from None
        meta = _parse_meta_value(extra[TORCHSCRIPT_CONFIG]) if extra[TORCHSCRIPT_CONFIG] else {}
        meta = meta if isinstance(meta, dict) else {}
        self.half = bool(meta.get("half"))
        self._configure({**meta, "dynamic": True}, [None, 3, None, None], None)

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        out = self.module(im.half() if self.half else im.float())
        out = out[0] if isinstance(out, (list, tuple)) else out  # YOLOv5's TorchScript files return a tuple
        return out.float()


class OpenVinoModel(ExportedModel):
    """An OpenVINO model (YOLOv5's *_openvino_model/ folder: NAME.xml, NAME.bin and NAME.yaml with stride and
    names), compiled for the CPU whatever `device` is (outputs come back on it).

    Computed in float32 (INFERENCE_PRECISION_HINT): on CPUs with AMX the plugin would otherwise pick bfloat16 and
    lose parity with PyTorch; an --half export stores FP16 weights, which the CPU widens when compiling. The
    plugin's threads follow torch.get_num_threads() (so OMP_NUM_THREADS), as PyTorch's own do."""

    def __init__(self, file: Path, device: torch.device):
        super().__init__(file, device)
        ov = require("openvino", "running an OpenVINO model")
        xml = file
        if file.is_dir():
            found = sorted(file.glob("*.xml"))
            if len(found) != 1:
                raise CheckpointError(f"{file} holds {len(found)} .xml files; an OpenVINO model folder holds one")
            xml = found[0]
        core = ov.Core()
        try:
            model = core.read_model(str(xml), str(xml.with_suffix(".bin")))
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        except Exception as e:  # OpenVINO raises RuntimeError for unreadable or mismatched files
            raise CheckpointError(f"{xml} is not a readable OpenVINO model ({str(e).splitlines()[0][:200]})") from None
        meta_file = xml.with_suffix(".yaml")
        meta = {}
        if meta_file.is_file():
            with contextlib.suppress(yaml.YAMLError, OSError, UnicodeDecodeError):
                meta = yaml.safe_load(meta_file.read_text(encoding="utf-8")) or {}
        meta = meta if isinstance(meta, dict) else {}
        self.file = xml.parent if file.is_dir() else xml
        shape = model.inputs[0].get_partial_shape()
        input_shape = [d.get_length() if d.is_static else None for d in shape]
        out = model.outputs[0].get_partial_shape()
        width = out[out.rank.get_length() - 1]
        self._configure({**meta, "dynamic": bool(meta.get("dynamic", shape.is_dynamic))}, input_shape,
                        width.get_length() if width.is_static else None)
        self.output = self.compiled.output(0)

    def _run(self, im: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(im.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.array(self.compiled(x)[self.output], np.float32))


# ------------------------------------------------------------------------------------------- sources
def is_url(source) -> bool:
    return str(source).lower().startswith(("http://", "https://"))


def _suffix(name: str) -> str:
    return Path(str(name).split("?")[0]).suffix[1:].lower()


STREAM_SCHEMES = ("rtsp://", "rtmp://", "rtp://", "udp://", "tcp://", "srt://")  # what YOLOv5 opens as streams


def list_source_files(source) -> list[str]:
    """The files of a detect.py --source: an image or video file, an image URL, a folder (its images and
    videos, sorted), a glob pattern, or a .txt file listing such paths (relative ones from its folder)."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and (text.isdigit() or text == "screen"):  # YOLOv5's webcam index, its screen capture
        raise SourceError(f"--source {text}: webcams, screen capture and streams are not supported; give an image "
                          "or video file, a folder, a glob or a .txt list of paths")
    if text.lower().startswith(STREAM_SCHEMES):
        raise SourceError(f"{text}: streams are not supported; record the stream to a video file first")
    if is_url(text):
        if _suffix(text) in VID_FORMATS:
            raise SourceError(f"{text}: video URLs and streams are not supported; download the file first")
        return [text]
    if any(c in text for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise SourceError(f"no files match {text}")
    elif path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.is_file())
    elif path.is_file() and path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read the list {path}: {e}") from None
        files = [x if is_url(x) or Path(x).expanduser().is_absolute() else str(path.parent / x)
                 for x in (line.strip() for line in lines) if x]
    elif path.is_file():
        if _suffix(text) not in IMG_FORMATS + VID_FORMATS:
            raise SourceError(f"{text} is not an image or video (images: {', '.join(IMG_FORMATS)}; "
                              f"videos: {', '.join(VID_FORMATS)})")
        files = [str(path)]
    else:
        raise SourceError(f"source {text} does not exist")
    files = [f for f in files if _suffix(f) in IMG_FORMATS + VID_FORMATS]
    if not files:
        raise SourceError(f"no images or videos in {text} (images: {', '.join(IMG_FORMATS)}; "
                          f"videos: {', '.join(VID_FORMATS)})")
    return files


def read_url(url: str) -> bytes:
    """The body of an http(s) URL; SourceError in one line when it cannot be fetched (no network...)."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise SourceError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SourceError(f"cannot download {url}: {reason} (is there a network connection?)") from None


def download_image(url: str) -> np.ndarray:
    """A BGR image fetched from an http(s) URL."""
    im = cv2.imdecode(np.frombuffer(read_url(url), np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise SourceError(f"{url} did not return a readable image")
    return im


def fetch_weights(weights) -> Path:
    """A weights path as given, or an http(s) URL downloaded once into torch.hub's cache folder."""
    if not is_url(weights):
        return Path(weights)
    url = str(weights)
    # Runs all save best.pt: the folder is named by the whole URL so .../run2/best.pt is never run1's copy;
    # the file keeps its own name because its suffix says how to load it.
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = Path(torch.hub.get_dir()) / "yolo-ema" / folder / Path(urllib.parse.urlparse(url).path).name
    if not dest.is_file():
        data = read_url(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(data)
        os.replace(part, dest)  # never a half-written file under the final name
        LOGGER.info(f"Downloaded {weights} to {dest}")
    return dest


@dataclass
class Frame:
    """One picture from a source: a file's image or a video frame (BGR), with its place in the source."""

    path: str
    image: np.ndarray
    index: int  # 0-based position of the file among the source's files
    count: int  # number of files in the source
    frame: int = 0  # 1-based frame number in the video; 0 for an image
    frames: int = 0  # frames the video will yield
    kept: int = 0  # 1-based count of the frames yielded so far from this video (differs from frame with a stride)
    fps: float = 0.0

    @property
    def is_video(self) -> bool:
        return self.frame > 0

    @property
    def name(self) -> str:
        """File name, without a URL's query (bus.jpg for .../bus.jpg?size=large): what outputs are named after."""
        return Path(self.path.split("?")[0]).name

    @property
    def stem(self) -> str:
        """File stem, with the frame number for a video frame (labels/NAME_FRAME.txt)."""
        stem = Path(self.name).stem
        return f"{stem}_{self.frame}" if self.is_video else stem

    def describe(self) -> str:
        if self.is_video:
            return f"video {self.index + 1}/{self.count} ({self.kept}/{self.frames}) {self.path}:"
        return f"image {self.index + 1}/{self.count} {self.path}:"


def iter_frames(files: list[str], vid_stride: int = 1):
    """Yield the Frames of `files` in order: each image once, every vid_stride-th frame of each video.
    A file that cannot be read is named in a warning and skipped."""
    if vid_stride < 1:
        raise SourceError(f"--vid-stride must be at least 1, got {vid_stride}")
    for i, f in enumerate(files):
        if _suffix(f) in VID_FORMATS:
            yield from _video_frames(f, i, len(files), vid_stride)
            continue
        try:
            im = download_image(f) if is_url(f) else cv2.imread(f)
        except SourceError as e:
            LOGGER.warning(f"WARNING: skipping {f}: {e}")
            continue
        if im is None:
            LOGGER.warning(f"WARNING: skipping {f}: not a readable image")
            continue
        yield Frame(f, im, i, len(files))


def _video_frames(f: str, index: int, count: int, vid_stride: int):
    cap = cv2.VideoCapture(f)
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        if total <= 0:
            LOGGER.warning(f"WARNING: skipping {f}: not a readable video")
            return
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        frames = math.ceil(total / vid_stride)
        kept = 0
        for k in range(total):
            if not cap.grab():
                LOGGER.warning(f"WARNING: skipping {f}: not a readable video" if k == 0 else
                               f"WARNING: {f}: only {k} of {total} frames could be read")
                return
            if k % vid_stride:
                continue
            ok, im = cap.retrieve()
            if not ok:
                LOGGER.warning(f"WARNING: {f}: frame {k + 1} could not be decoded; stopping this video")
                return
            kept += 1
            yield Frame(f, im, index, count, frame=k + 1, frames=frames, fps=fps, kept=kept)
    finally:
        cap.release()


def read_images(ims) -> tuple[list[np.ndarray], list[str]]:
    """What the hub model accepts, as BGR uint8 images and file names: a path or URL, a PIL image, an HWC
    RGB numpy image (YOLOv5's convention: cv2 images are passed as im[..., ::-1]), or a list of those."""
    items = list(ims) if isinstance(ims, (list, tuple)) else [ims]
    images, files = [], []
    for i, x in enumerate(items):
        name = f"image{i}.jpg"
        if isinstance(x, (str, Path)):
            text = str(x)
            if is_url(text):
                im, name = download_image(text), Path(text.split("?")[0]).name or name
            else:
                im, name = cv2.imread(text), Path(text).name
                if im is None:
                    raise SourceError(f"{text} does not exist" if not Path(text).exists() else f"{text} is not a readable image")
        elif hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image (PIL itself is only needed by callers)
            name = Path(getattr(x, "filename", "") or name).name
            im = np.asarray(x.convert("RGB"))[..., ::-1]
        elif isinstance(x, np.ndarray):
            im = _rgb_array_to_bgr(x, i)
        else:
            raise SourceError(f"input {i}: cannot read a {type(x).__name__} (give a path, URL, PIL image, "
                              "HWC numpy image, a list of them, or a BCHW tensor)")
        images.append(np.ascontiguousarray(im))
        files.append(name)
    if not images:
        raise SourceError("no images given")
    return images, files


def _rgb_array_to_bgr(x: np.ndarray, i: int) -> np.ndarray:
    if x.dtype != np.uint8:
        raise SourceError(f"input {i}: numpy images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 2:
        x = np.stack([x] * 3, -1)
    elif x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[2] not in (1, 3, 4):  # CHW given
        x = x.transpose(1, 2, 0)
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise SourceError(f"input {i}: expected an HxWx3 image, got shape {x.shape}")
    x = np.repeat(x, 3, 2) if x.shape[2] == 1 else x[..., :3]
    return x[..., ::-1]


# ------------------------------------------------------------------------------------------- inference
SIZE_ERROR = "image size must be one positive number or two (h w)"


def image_size(imgsz) -> tuple[int, int]:
    """(h, w) of a size given as one number or h w (detect.py and export.py --img, the hub model's size=);
    ValueError in one line otherwise."""
    given = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    try:
        sizes = [int(s) for s in given]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes != given:
        raise ValueError(f"{SIZE_ERROR}, got {' '.join(map(str, given)) or 'nothing'}")
    return (sizes[0], sizes[-1])


def inference_size(imgsz, stride: int, fixed_shape=None) -> tuple[int, int]:
    """The (h, w) to letterbox to: imgsz (see image_size) rounded up to multiples of the model's stride, as
    YOLOv5 does, since every detection level must tile the input; a fixed-size exported model's own size wins."""
    size = image_size(imgsz)
    if fixed_shape is not None:
        if size != tuple(fixed_shape):
            LOGGER.info(f"The model was exported for {fixed_shape[0]}x{fixed_shape[1]} images: detecting at that size")
        return tuple(fixed_shape)
    rounded = {s: check_img_size(s, stride) for s in dict.fromkeys(size)}  # one warning for --img 50 (50x50)
    return tuple(rounded[s] for s in size)


def speed_line(times, shape) -> str:
    """YOLOv5's closing line of detect.py, val.py and the hub's Results: milliseconds per image of each phase."""
    return "Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape %s" % (*times, tuple(shape))


def autocast_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype to run `model` under: the one asked for (--half's float16), except for an exported
    file, which runs at the precision it was exported in; asking for one there is said in one line."""
    if dtype is None or not isinstance(model, ExportedModel):
        return dtype
    LOGGER.info(f"--half has no effect on {model.file.name}: an exported model runs in its own precision")
    return None


def letterbox_batch(images: list[np.ndarray], size, stride: int, fixed_shape=None):
    """Letterbox BGR images into one uint8 RGB batch (b, 3, h, w).

    Each image is scaled to fit in `size` (an int or (h, w)) and padded to the smallest stride multiple
    holding it, as YOLOv5's detect.py does (640x480 at 640 -> 480x640); a batch of differently shaped images
    is padded further, centred, to the largest of those. A fixed-size exported model gets every image
    letterboxed to exactly its `fixed_shape`. Returns (batch, ratio_pads) with each image's
    ((gain_h, gain_w), (pad_w, pad_h)) for utils.boxes.scale_boxes.
    """
    size = tuple(fixed_shape) if fixed_shape is not None else size
    boxed = [letterbox(im, size, auto=fixed_shape is None, stride=stride) for im in images]
    shape = tuple(max(out.shape[k] for out, _, _ in boxed) for k in (0, 1))
    batch, ratio_pads = [], []
    for out, (ratio_w, ratio_h), (pad_w, pad_h) in boxed:
        dh, dw = shape[0] - out.shape[0], shape[1] - out.shape[1]
        if dh or dw:
            out = cv2.copyMakeBorder(out, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2, cv2.BORDER_CONSTANT,
                                     value=(FILL_VALUE,) * 3)  # fmt: skip
            pad_w, pad_h = pad_w + dw // 2, pad_h + dh // 2
        batch.append(out[..., ::-1].transpose(2, 0, 1))
        ratio_pads.append(((ratio_h, ratio_w), (pad_w, pad_h)))
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch))), ratio_pads


class Detector(nn.Module):
    """A loaded model that takes pictures and returns Results (the hub model; detect.py uses detect()).

    Settable like YOLOv5's hub model: conf, iou, classes (list of class ids or None), agnostic, multi_label,
    max_det, amp (fp16 autocast on the model's device, for PyTorch weights).
    """

    conf = 0.25
    iou = 0.45
    classes = None
    agnostic = False
    multi_label = False
    max_det = 1000
    amp = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.names = list(model.names)
        self.stride = size_multiple(model)
        self._sizes = {}  # each size= resolved once, so a rounding warning is not repeated on every call

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else self.model.device

    @property
    def input_dtype(self) -> torch.dtype:
        """PyTorch weights take input in their own dtype (model.half() works, as with YOLOv5's AutoShape); an
        exported file converts float32 input to its own precision itself."""
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None and not isinstance(self.model, ExportedModel) else torch.float32

    def _autocast(self):
        """fp16 autocast with amp on PyTorch weights; an exported file runs at the precision it was exported in."""
        return autocast(self.device, torch.float16 if self.amp and isinstance(self.model, Model) else None)

    @torch.no_grad()
    def forward(self, ims, size=640, augment: bool = False):
        """Detect in `ims` (see read_images) letterboxed to `size`; a BCHW float tensor (0..1) instead returns
        the model's own output, (predictions, raw maps) before NMS."""
        if isinstance(ims, torch.Tensor):
            with self._autocast():
                return self.model(ims.to(self.device, self.input_dtype), augment=augment)
        images, files = read_images(ims)
        return self.detect(images, files, size=size, augment=augment)

    @torch.no_grad()
    def detect(self, images: list[np.ndarray], files: list[str], size=640, augment: bool = False) -> "Results":
        """Detect in BGR images: letterbox into one batch, run the model, NMS, boxes back to each image."""
        phases = PhaseTimer(self.device)
        with phases("pre-process"):
            fixed_shape = getattr(self.model, "fixed_shape", None)
            key = (tuple(size) if isinstance(size, (list, tuple)) else size, fixed_shape)
            if key not in self._sizes:
                self._sizes[key] = inference_size(size, self.stride, fixed_shape)
            batch, ratio_pads = letterbox_batch(images, self._sizes[key], self.stride, fixed_shape)
            x = batch.to(self.device, self.input_dtype) / 255
        with phases("inference"), self._autocast():
            pred = self.model(x, augment=augment)[0]
        with phases("NMS"):
            dets = non_max_suppression(pred.float(), self.conf, self.iou, self.classes, self.agnostic,
                                       self.multi_label, max_det=self.max_det)  # fmt: skip
            for det, rp, im in zip(dets, ratio_pads, images):
                scale_boxes(x.shape[2:], det[:, :4], im.shape[:2], ratio_pad=rp)
        times = tuple(phases.total(k) * 1e3 / len(images) for k in ("pre-process", "inference", "NMS"))
        return Results(images, dets, files, times, self.names, tuple(x.shape))


# ------------------------------------------------------------------------------------------- results
def write_yolo_labels(det: torch.Tensor, shape, file: Path, save_conf: bool = False) -> None:
    """YOLO-format label file of detections (x1, y1, x2, y2, conf, cls) in an image of shape (h, w): one line
    `cls cx cy w h` normalised to the image (`cls cx cy w h conf` with save_conf). No detections, no file (as
    YOLOv5 writes them): one left by an earlier run into the same folder (--exist-ok) is removed."""
    if not len(det):
        file.unlink(missing_ok=True)
        return
    h, w = shape[:2]
    det = det.detach().cpu().double()
    xywhn = xyxy2xywh(det[:, :4]) / torch.tensor([w, h, w, h], dtype=torch.float64)
    with open(file, "w") as f:  # one call per image: a rerun with --exist-ok replaces, never appends
        for cls, xywh, conf in zip(det[:, 5].tolist(), xywhn.tolist(), det[:, 4].tolist()):
            row = (int(cls), *xywh, conf) if save_conf else (int(cls), *xywh)
            f.write(("%g " * len(row)).rstrip() % row + "\n")


def crop_box(im: np.ndarray, xyxy, gain: float = 1.02, pad: int = 10, square: bool = False) -> np.ndarray:
    """The part of `im` under box xyxy, enlarged by `gain` and `pad` pixels (YOLOv5's crops) and clipped."""
    b = xyxy2xywh(torch.as_tensor(xyxy, dtype=torch.float32).view(-1, 4)[:, :4])
    if square:
        b[:, 2:] = b[:, 2:].max(1, keepdim=True)[0]
    b[:, 2:] = b[:, 2:] * gain + pad
    box = xywh2xyxy(b).long()
    clip_boxes(box, im.shape[:2])
    x1, y1, x2, y2 = box[0].tolist()
    return im[y1:y2, x1:x2]


def save_image(file: Path, im: np.ndarray) -> Path:
    """Write a BGR image to `file` and return the file written. OpenCV has no encoder for some image formats it
    reads (.mpo) nor for a name without an extension (an image URL's); those are written as .jpg instead, as
    YOLOv5 names the images it saves."""
    file = Path(file)
    if not cv2.haveImageWriter(str(file)):
        file = file.with_suffix(".jpg")
    try:
        written = cv2.imwrite(str(file), im)
    except cv2.error as e:  # an encoder that refuses this image
        raise OSError(f"could not write {file}: {str(e).strip().splitlines()[-1]}") from None
    if not written:
        raise OSError(f"could not write {file}")
    return file


def free_file(path: Path, start: int = 2) -> tuple[Path, int]:
    """path itself when free, else its stem numbered start, start+1, ... (crops/person/bus.jpg, bus2.jpg);
    returns the file and the number to try next for the same path."""
    out, n = path, start
    while out.exists():
        out = path.with_name(f"{path.stem}{n}{path.suffix}")
        n += 1
    return out, n


class Results:
    """Detections of one call, per image: the boxes (x1, y1, x2, y2, conf, cls) in the image's own pixels,
    also as .xywh and normalised .xyxyn/.xywhn (one tensor per image), with the image and its file name.
    `times` are milliseconds per image for pre-processing, inference and NMS; `shape` is the batch's."""

    def __init__(self, ims: list[np.ndarray], pred: list[torch.Tensor], files: list[str], times, names, shape):
        self._bgr = ims
        self.pred = self.xyxy = pred
        self.files = files
        self.names = names
        self.times = self.t = times
        self.s = self.shape = shape
        self.n = len(pred)
        gains = [torch.tensor([im.shape[1], im.shape[0]] * 2 + [1, 1], dtype=p.dtype, device=p.device)
                 for im, p in zip(ims, pred)]
        self.xywh = [xyxy2xywh(p) for p in pred]
        self.xyxyn = [p / g for p, g in zip(pred, gains)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gains)]

    def __len__(self) -> int:
        return self.n

    @property
    def ims(self) -> list[np.ndarray]:
        """The original images, RGB (views of the BGR arrays)."""
        return [im[..., ::-1] for im in self._bgr]

    def _name(self, c: int) -> str:
        return self.names[c] if self.names and 0 <= c < len(self.names) else str(c)

    def summary(self, i: int) -> str:
        """'2 persons, 1 dog' (classes in id order), or '(no detections)'."""
        det = self.pred[i]
        if not len(det):
            return "(no detections)"
        classes, counts = det[:, 5].int().unique(return_counts=True)
        return ", ".join(f"{n} {self._name(int(c))}{'s' * (n > 1)}" for c, n in zip(classes.tolist(), counts.tolist()))

    def annotated(self, i: int, line_width: int | None = None, labels: bool = True, conf: bool = True) -> np.ndarray:
        """A BGR copy of image i with its boxes drawn (class name and confidence unless switched off)."""
        annotator = Annotator(self._bgr[i].copy(), line_width=line_width)
        for *xyxy, score, cls in reversed(self.pred[i].tolist()):  # highest confidence drawn last, on top
            c = int(cls)
            label = (self._name(c) if not conf else f"{self._name(c)} {score:.2f}") if labels else ""
            annotator.box_label(xyxy, label, color=class_color(c, bgr=True))
        return annotator.result()

    def write_labels(self, i: int, file: Path, save_conf: bool = False) -> None:
        write_yolo_labels(self.pred[i], self._bgr[i].shape, file, save_conf)

    def save_crops(self, i: int, save_dir: Path, stem: str, save: bool = True) -> list[dict]:
        """Each box of image i cropped from the original (crops/CLASS/STEM.jpg, numbered when taken)."""
        crops, next_number = [], {}  # next free number per class folder: no rescans for crowded images
        for *xyxy, score, cls in self.pred[i].tolist():
            c = int(cls)
            im = crop_box(self._bgr[i], xyxy)
            file = None
            if save:
                base = Path(save_dir) / "crops" / self._name(c) / f"{stem}.jpg"
                file, next_number[base] = free_file(base, next_number.get(base, 2))
                file.parent.mkdir(parents=True, exist_ok=True)
                save_image(file, im)
            crops.append({"box": xyxy, "conf": score, "cls": c, "label": f"{self._name(c)} {score:.2f}",
                          "im": im, "file": file})  # fmt: skip
        return crops

    # --- YOLOv5's hub API
    def __str__(self) -> str:
        h, w = self.shape[2:]
        lines = [f"image {i + 1}/{self.n}: {h}x{w} {self.summary(i)}" for i in range(self.n)]
        lines.append(speed_line(self.times, self.shape))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.n} image(s)>\n{self}"

    def print(self) -> None:
        print(self)

    def render(self, labels: bool = True) -> list[np.ndarray]:
        """The images with their boxes drawn, RGB."""
        return [self.annotated(i, labels=labels)[..., ::-1] for i in range(self.n)]

    @staticmethod
    def _new_dir(save_dir, exist_ok: bool) -> Path:
        save_dir = increment_path(Path(save_dir), exist_ok=exist_ok)
        save_dir.mkdir(parents=True, exist_ok=True)
        return save_dir

    def save(self, labels: bool = True, save_dir="runs/detect/exp", exist_ok: bool = False) -> Path:
        """Write each annotated image under save_dir (a new numbered folder unless exist_ok), same name (see
        save_image for the formats written as .jpg)."""
        save_dir = self._new_dir(save_dir, exist_ok)
        for i, name in enumerate(self.files):
            save_image(save_dir / name, self.annotated(i, labels=labels))
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n > 1)} to {save_dir}")
        return save_dir

    def crop(self, save: bool = True, save_dir="runs/detect/exp", exist_ok: bool = False) -> list[dict]:
        """Every box cropped from its image: dicts of box, conf, cls, label, im (BGR) and the file written."""
        save_dir = self._new_dir(save_dir, exist_ok) if save else Path(save_dir)
        crops = [c for i, name in enumerate(self.files) for c in self.save_crops(i, save_dir, Path(name).stem, save)]
        if save:
            LOGGER.info(f"Saved {len(crops)} crops to {save_dir / 'crops'}")
        return crops

    def pandas(self) -> "Results":
        """A copy whose xyxy, xyxyn, xywh and xywhn are lists of pandas DataFrames (one per image) with the
        columns xmin ymin xmax ymax (or xcenter ycenter width height), confidence, class, name."""
        pd = require("pandas", "Results.pandas()")
        new = copy.copy(self)
        corners, centres = ["xmin", "ymin", "xmax", "ymax"], ["xcenter", "ycenter", "width", "height"]
        for attr, cols in (("xyxy", corners), ("xyxyn", corners), ("xywh", centres), ("xywhn", centres)):
            frames = []
            for t in getattr(self, attr):
                rows = [r[:5] + [int(r[5]), self._name(int(r[5]))] for r in t.tolist()]
                frames.append(pd.DataFrame(rows, columns=cols + ["confidence", "class", "name"]))
            setattr(new, attr, frames)
        return new

    def tolist(self) -> list["Results"]:
        """One Results per image."""
        return [Results([self._bgr[i]], [self.pred[i]], [self.files[i]], self.times, self.names, self.shape)
                for i in range(self.n)]
