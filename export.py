"""Export trained weights to ONNX, TorchScript and OpenVINO, written beside the weights (best.onnx,
best.torchscript, best_openvino_model/).

    python export.py --weights runs/train/exp/weights/best.pt --include onnx torchscript
    python export.py --weights best.pt --include onnx --dynamic          # any batch size and image size
    python export.py --weights best.pt --include onnx --half --device 0  # FP16, on a GPU
    python export.py --weights best.pt --include openvino --half         # FP16 weights for the CPU

The exported graph has one output, (batch, anchors, 5 + nc): boxes (cx, cy, w, h) in input pixels, then
objectness and class scores, as YOLOv5's exports. Without --weights the latest runs/train/*/weights/best.pt
is exported. detect.py, val.py and torch.hub ('custom', path=...) run the exported files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from utils.cli import AT_LEAST_1, HelpFormatter, check_flags, exit_process, refuse_bad_flags, shown_path  # noqa: E402

FORMATS = ("torchscript", "onnx", "openvino")
FLAG_RANGES = {"imgsz": ("--img", AT_LEAST_1), "batch_size": ("--batch-size", AT_LEAST_1), "opset": ("--opset", AT_LEAST_1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a YOLOv5-style detector to ONNX, TorchScript and OpenVINO",
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--weights", type=str, default=None,
                   help="checkpoint to export (default: the latest runs/train/*/weights/best.pt)")
    p.add_argument("--include", nargs="+", default=["torchscript"], choices=FORMATS, help="formats to write")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=None,
                   help="input size: one number, or h w (default: the size the weights were trained at, else 640)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input")
    p.add_argument("--dynamic", action="store_true",
                   help="ONNX, OpenVINO: free batch size and image size (multiples of the stride)")
    p.add_argument("--half", action="store_true",
                   help="FP16 weights and input (needs a CUDA --device); OpenVINO: FP16 weights, on any device")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or a GPU index such as 0")
    return p


def parse_opt(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    CLI_OPT = parse_opt()  # --help and mistyped flags answer here, before the imports below take seconds
    refuse_bad_flags("export", lambda opt: check_flags(opt, FLAG_RANGES), CLI_OPT)

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from models.yolo import Detect, size_multiple  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.inference import (  # noqa: E402
    JIT_DEPRECATION,
    OPENVINO_DIR_SUFFIX,
    TORCHSCRIPT_CONFIG,
    MissingPackageError,
    default_imgsz,
    export_metadata,
    inference_size,
    is_exported,
    load_model,
    require,
)
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.paths import TRAIN_RUNS, latest_best_weights  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


class ExportError(Exception):
    """An export that cannot be made; the message is one line."""


def _size_mb(file: Path) -> float:
    """Size of a file, or of a folder's files."""
    files = file.rglob("*") if file.is_dir() else [file]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def export_torchscript(model: torch.nn.Module, im: torch.Tensor, file: Path, meta: dict) -> Path:
    """torch.jit.trace; the metadata travels in the archive's config.txt (as YOLOv5's does)."""
    LOGGER.info(f"\nTorchScript: starting export with torch {torch.__version__}...")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION)
        traced = torch.jit.trace(model, im, strict=False)
        traced.save(str(file), _extra_files={TORCHSCRIPT_CONFIG: json.dumps(meta)})
    return file


def export_onnx(model: torch.nn.Module, im: torch.Tensor, file: Path, meta: dict, opset: int | None,
                dynamic: bool, stride: int) -> Path:
    """torch.onnx.export (torch.export-based: it needs onnxscript), one input 'images' and one output
    'output0', the metadata as metadata_props, checked with onnx.checker before it is written.

    Each value is written as Python's str() of it, as YOLOv5's export does: its loader reads `names` with
    ast.literal_eval and indexes the result with ints, so names must read back as {0: 'person', ...}; JSON
    would turn those keys into strings. Our own loader reads both forms."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    LOGGER.info(f"\nONNX: starting export with onnx {onnx.__version__}...")
    dynamic_shapes = None
    if dynamic:
        from torch.export import Dim

        # Sizes are multiples of the largest stride: every level's grid then tiles the image and the
        # upsampled maps match the ones they are concatenated with, which torch.export must be told.
        dynamic_shapes = {"x": {0: Dim("batch", min=1), 2: stride * Dim("height", min=1), 3: stride * Dim("width", min=1)}}
        if im.shape[0] == 1:  # torch.export treats a size-1 example dimension as fixed; any other batch will do
            im = im.repeat(2, 1, 1, 1)
    program = torch.onnx.export(model, (im,), None, input_names=["images"], output_names=["output0"],
                                opset_version=opset, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(file))
    return file


def export_openvino(model: torch.nn.Module, im: torch.Tensor, folder: Path, stem: str, meta: dict,
                    opset: int | None, dynamic: bool, stride: int, half: bool, onnx_file: Path | None = None) -> Path:
    """YOLOv5's OpenVINO folder: STEM.xml and STEM.bin converted from the ONNX graph (this run's .onnx when it
    wrote one, else a temporary one), and STEM.yaml with the metadata YOLOv5's loader reads (stride, names).
    `half` compresses the weights to FP16. Built beside `folder` and renamed into place, so a failed export
    leaves an earlier folder as it was."""
    ov = require("openvino", "OpenVINO export")
    LOGGER.info(f"\nOpenVINO: starting export with openvino {ov.__version__}...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if onnx_file is None:
            if next(model.parameters()).dtype != torch.float32:  # an FP16 CUDA export: OpenVINO gets FP32 to compress
                model, im = copy.deepcopy(model).float().cpu(), im.float().cpu()
            onnx_file = export_onnx(model, im, staging / f"{stem}.onnx", meta, opset, dynamic, stride)
        ov_model = ov.convert_model(str(onnx_file))
        ov.save_model(ov_model, str(staging / f"{stem}.xml"), compress_to_fp16=half)
        (staging / f"{stem}.onnx").unlink(missing_ok=True)
        (staging / f"{stem}.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def run(weights=None, include=("torchscript",), imgsz=None, batch_size: int = 1, dynamic: bool = False,
        half: bool = False, opset: int | None = None, device="cpu") -> list[Path]:
    """Write each format in `include` beside `weights`; returns the files written."""
    include = [f.lower() for f in include]
    unknown = [f for f in include if f not in FORMATS]
    if unknown:
        raise ExportError(f"--include {' '.join(unknown)}: unknown format; choose from {', '.join(FORMATS)}")
    try:  # a bad size fails before the model is loaded; the stride rounds it later
        check_flags(dict(imgsz=imgsz, batch_size=batch_size, opset=opset), FLAG_RANGES)
    except ValueError as e:
        raise ExportError(str(e)) from None
    try:
        device = select_device(device)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if half and device.type != "cuda" and set(include) != {"openvino"}:  # OpenVINO's FP16 weights suit CPUs too
        raise ExportError("--half export needs a CUDA device (--device 0): FP16 models are for GPU inference "
                          "(--include openvino alone compresses to FP16 on any device)")
    if "onnx" in include or "openvino" in include:  # missing packages fail before any work
        require("onnx", "ONNX export")
        require("onnxscript", "ONNX export")
    if "openvino" in include:
        require("openvino", "OpenVINO export")
    if weights is None:
        weights = latest_best_weights(TRAIN_RUNS)
    weights = Path(weights)
    if is_exported(weights):
        raise ExportError(f"{weights} is already exported; export.py starts from PyTorch weights (.pt)")

    t0 = time.time()
    model = load_model(weights, device)  # a fresh FP32 copy with the EMA weights, fused: ours to convert
    head = model.model[-1]
    if not isinstance(head, Detect):
        raise ExportError(f"{weights}: the model does not end in a Detect layer")
    head.export = True
    imgsz = default_imgsz(model, imgsz, "Exporting")
    stride = size_multiple(model)
    im = torch.zeros(batch_size, 3, *inference_size(imgsz, stride), device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    if half and device.type == "cuda":  # on the CPU only OpenVINO is exported, which compresses the weights itself
        im, model = im.half(), model.half()
    with torch.no_grad():
        shape = tuple(model(im).shape)
    LOGGER.info(f"\nPyTorch: starting from {shown_path(weights)} with output shape {shape} ({_size_mb(weights):.1f} MB)")
    meta = export_metadata(model, im.shape, dynamic, half)

    written = []
    for fmt in FORMATS:  # a fixed order, whatever --include's
        if fmt not in include:
            continue
        t = time.time()
        file = {"torchscript": weights.with_suffix(".torchscript"), "onnx": weights.with_suffix(".onnx"),
                "openvino": weights.with_name(weights.stem + OPENVINO_DIR_SUFFIX)}[fmt]
        name = {"torchscript": "TorchScript", "onnx": "ONNX", "openvino": "OpenVINO"}[fmt]
        try:
            if fmt == "torchscript":
                export_torchscript(model, im, file, meta)
            elif fmt == "onnx":
                export_onnx(model, im, file, meta, opset, dynamic, stride)
            else:  # from this run's .onnx when it is FP32 (OpenVINO compresses to FP16 itself)
                reuse = file.with_name(weights.stem + ".onnx") if "onnx" in include and im.dtype == torch.float32 else None
                export_openvino(model, im, file, weights.stem, meta, opset, dynamic, stride, half, reuse)
        except MissingPackageError:
            raise
        except Exception as e:  # the exporters' many error types: one line, naming the format
            text = str(e).strip().splitlines()
            raise ExportError(f"{name} export failed: {type(e).__name__}: {text[0] if text else ''}"[:400]) from None
        LOGGER.info(f"{name}: export success, {time.time() - t:.1f}s, saved as {shown_path(file)} ({_size_mb(file):.1f} MB)")
        written.append(file)

    LOGGER.info(f"\nExport complete ({time.time() - t0:.1f}s)\nResults saved to {shown_path(weights.parent)}")
    if written:  # how to use it (the last format written; the others the same way)
        f = shown_path(written[-1])
        data = "" if getattr(model, "trained_data", None) else " --data DATA.yaml"  # the file names its dataset
        LOGGER.info(f"Detect:          python detect.py --weights {f} --source IMAGE\n"
                    f"Validate:        python val.py --weights {f}{data}\n"
                    f"PyTorch Hub:     model = torch.hub.load('.', 'custom', path='{f}', source='local')")
    return written


def main(argv=None) -> int:
    """export.py's exit status: 0, or 1 after a one-line error."""
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(**vars(opt))
    except (ExportError, CheckpointError, MissingPackageError, OSError) as e:
        LOGGER.error(f"export: {e}")
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main(CLI_OPT))
