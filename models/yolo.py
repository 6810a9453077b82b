"""YOLOv5 detection model: the Detect head, the yaml layer-list parser and the Model that ties them together.

    from models.yolo import Model
    model = Model('yolov5s.yaml', ch=3, nc=80)   # or a dict, or the path of a user's yaml

State-dict keys match YOLOv5's (model.0.conv.weight ... model.24.anchors, model.24.m.0.weight), so the
original YOLOv5 v6+ weights load into the model built from the same yaml.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script (python models/yolo.py): the repository root holds the packages
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from models.common import C3, SPPF, Bottleneck, Concat, Conv
from utils.autoanchor import check_anchor_order
from utils.cli import read_text_file
from utils.log import LOGGER
from utils.torch_utils import count_parameters

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"

# Objectness prior: about 8 objects in a 640x640 image, spread over the (640/stride)^2 cells of a level.
OBJECTS_PER_IMAGE = 8
PRIOR_IMAGE_SIZE = 640


def resolve_cfg(cfg: str | Path) -> Path:
    """Find a model yaml: a path as given (or relative to the repository), or a bare name ('yolov5s',
    'yolov5s.yaml') in models/.

    Raises FileNotFoundError naming every place that was searched.
    """
    given = Path(cfg)
    candidates = [given]
    if given.suffix not in (".yaml", ".yml"):
        candidates.append(given.with_name(given.name + ".yaml"))
    if not given.is_absolute():
        for c in list(candidates):
            candidates.append(ROOT / c)
            if len(given.parts) == 1:  # only a bare name may mean a zoo model; a mistyped path must fail
                candidates.append(MODELS_DIR / c.name)
    seen = []
    for c in candidates:
        if c not in seen:
            seen.append(c)
    for c in seen:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"model config '{cfg}' not found; searched: " + ", ".join(str(c) for c in seen))


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of divisor that is >= x (channel counts stay friendly to hardware)."""
    return int(math.ceil(x / divisor) * divisor)


def size_multiple(model: nn.Module) -> int:
    """The multiple every input side is rounded to: the model's largest stride, and never under 32 (YOLOv5's
    floor), so that an --img chosen for one model tiles every other one too."""
    return max(int(float(model.stride.max())), 32)


def check_img_size(imgsz: int, stride: int) -> int:
    """imgsz rounded up to a multiple of the model's largest stride (at least one stride), with a warning
    when that changes it: every detection level must tile the image exactly."""
    size = max(math.ceil(imgsz / stride) * stride, int(stride))
    if size != imgsz:
        LOGGER.warning(f"WARNING: --img {imgsz} must be a multiple of the max stride {stride}; using {size}")
    return size


class Detect(nn.Module):
    """One 1x1 conv per output level predicting, for each of na anchors, (x, y, w, h, obj, nc class logits).

    `anchors` is a buffer of shape (nl, na, 2) in grid units (pixels / stride) so that it is saved with the
    weights; `stride` is a plain tensor set by Model once the feature-map sizes are known.
    """

    def __init__(self, nc: int = 80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.stride = None
        # Cell-offset grids per level, keyed by (ny, nx, device). A plain attribute, not a buffer: it is
        # derived data, must stay out of the state dict, and is rebuilt whenever the key changes.
        self._grids: dict[int, tuple[tuple, torch.Tensor]] = {}
        # Set by export.py: forward returns the decoded tensor alone (the exported graph's one output), and
        # grids are built from the input's shape on every call, so a traced graph keeps them symbolic.
        self.export = False

    @property
    def stride(self) -> torch.Tensor | None:
        """Pixels per grid cell of each level, (nl,) float32; set by Model once the feature-map sizes are known."""
        return self._stride

    @stride.setter
    def stride(self, value) -> None:
        self._stride = None if value is None else torch.as_tensor(value, dtype=torch.float32)
        # The same values as Python floats for decode(): reading them back from the tensor would be a
        # data-dependent .item() call that torch.export cannot trace.
        self._stride_values = None if value is None else [float(s) for s in self._stride]

    def forward(self, x: list[torch.Tensor]):
        raw = []
        for i in range(self.nl):
            y = self.m[i](x[i])
            bs, _, ny, nx = y.shape
            raw.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training or self.stride is None:
            return raw
        if self.export:
            return self.decode(raw)
        return self.decode(raw), raw

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps -> (bs, N, no): box centre/size in input pixels, sigmoid objectness and class scores.

        Decoding runs in float32 even for half/bfloat16 maps: at 640 px a bfloat16 coordinate is only
        resolved to 4 px, which would cost localisation accuracy for nothing (the cost is negligible).
        """
        # Exporters get one concatenation per level (a plain graph op). Otherwise the box columns are written
        # into the sigmoid's output (a copy of it under autograd, which needs the sigmoid's output unchanged):
        # torch's CPU cat along a last dimension of widths 2, 2 and nc+1 cost more than the rest of decode.
        exporting = self.export or torch.jit.is_tracing() or torch.compiler.is_compiling()
        out = []
        for i, y in enumerate(raw):
            bs, _, ny, nx, _ = y.shape
            s = self._stride_values[i]
            grid = self._grid(i, ny, nx, y)
            anchor_wh = (self.anchors[i].float() * s).view(1, self.na, 1, 1, 2)
            p = y.float().sigmoid()
            xy = (p[..., 0:2] * 2 + grid) * s
            wh = (p[..., 2:4] * 2) ** 2 * anchor_wh
            if exporting:
                p = torch.cat((xy, wh, p[..., 4:]), -1)
            else:
                p = p.clone() if torch.is_grad_enabled() else p
                p[..., 0:2], p[..., 2:4] = xy, wh
            out.append(p.view(bs, -1, self.no))
        return torch.cat(out, 1)

    def _grid(self, i: int, ny: int, nx: int, like: torch.Tensor) -> torch.Tensor:
        # A tracer (torch.jit.trace, torch.export) would freeze a cached grid into the graph as a constant of
        # one size and bake the cache lookup's Python comparisons in: build it from the shape instead.
        tracing = self.export or torch.jit.is_tracing() or torch.compiler.is_compiling()
        key = (ny, nx, like.device)
        cached = None if tracing else self._grids.get(i)
        if cached is not None and cached[0] == key:
            return cached[1]
        # Counted up from new_ones rather than torch.arange(device=...): torch.jit.trace records a device argument
        # as a constant, and a TorchScript file would build its grid on the device it was exported on whatever
        # device it is loaded on; new_ones takes its device from `like` in the graph as well as here.
        yv, xv = torch.meshgrid(like.new_ones(ny, dtype=torch.float32).cumsum(0) - 1,
                                like.new_ones(nx, dtype=torch.float32).cumsum(0) - 1, indexing="ij")
        # -0.5 because predicted offsets 2*sigmoid-0.5 span (-0.5, 1.5) cells around the cell corner.
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2) - 0.5
        if not tracing:
            self._grids[i] = (key, grid)
        return grid


# Module names a model yaml may use; looked up by name, never eval()'d.
MODULES = {
    "Conv": Conv,
    "C3": C3,
    "SPPF": SPPF,
    "Bottleneck": Bottleneck,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
    "Upsample": nn.Upsample,
    "nn.BatchNorm2d": nn.BatchNorm2d,
}
# Modules whose first arg is an output channel count to be scaled by width_multiple.
CHANNEL_MODULES = (Conv, C3, SPPF, Bottleneck)
# Modules that take the (depth-scaled) repeat count as an argument instead of being stacked n times.
REPEAT_MODULES = (C3,)


def _resolve_arg(a, names: dict):
    """yaml arg strings: 'nc', 'anchors', 'None', 'True', 'False' are substituted; others stay strings."""
    if isinstance(a, str) and a in names:
        return names[a]
    return a


def parse_model(d: dict, ch: list[int], verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a YOLOv5 layer-list dict. Returns (nn.Sequential of layers, sorted save list).

    Each layer gets attributes i (index), f (from), type (name), np (parameter count), as in YOLOv5.
    """
    anchors, nc = d["anchors"], d["nc"]
    gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    na = len(anchors[0]) // 2 if isinstance(anchors, (list, tuple)) else int(anchors)
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}
    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers, save, c2 = [], [], ch[-1]
    for i, row in enumerate(d["backbone"] + d["head"]):
        if len(row) != 4:
            raise ValueError(f"model yaml layer {i}: expected [from, number, module, args], got {row}")
        f, n, mname, args = row
        if mname not in MODULES:
            raise ValueError(f"model yaml layer {i}: unknown module '{mname}'; known: {', '.join(MODULES)}")
        m = MODULES[mname]
        args = [_resolve_arg(a, names) for a in args]
        n = n_ = max(round(n * gd), 1) if n > 1 else n
        if m in CHANNEL_MODULES:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in REPEAT_MODULES:
                args.insert(2, n)
                n = 1
        elif m is nn.BatchNorm2d:
            c2 = ch[f]
            args = [c2]
        elif m is Concat:
            c2 = sum(ch[x] for x in f)
        elif m is Detect:
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):  # a count of anchors per level: placeholders for autoanchor to fill
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]
        layer = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        layer.i, layer.f, layer.type = i, f, mname
        layer.np = count_parameters(layer)
        if verbose:
            LOGGER.info(f"{i:>3}{str(f):>18}{n_:>3}{layer.np:10.0f}  {mname:<40}{str(args):<30}")
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(layer)
        if i == 0:
            ch = []
        ch.append(c2)
    if not isinstance(layers[-1], Detect):
        raise ValueError("model yaml: the last layer must be Detect")
    return nn.Sequential(*layers), sorted(set(save))


class Model(nn.Module):
    """YOLOv5 detection model built from a yaml (bare name, path or dict).

    nc / anchors given here override the yaml's (with a log line). anchors may be a list of per-level
    (w, h) pixel pairs or an int count per level (placeholders, to be computed by autoanchor).

    forward(x): training -> list of nl raw maps (bs, na, ny, nx, no);
                eval -> (pred (bs, N, no) decoded to input pixels, list of raw maps).
    """

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors=None, verbose: bool = True):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = deepcopy(cfg)
            self.yaml_file = None
        else:
            path = resolve_cfg(cfg)
            self.yaml_file = path.name
            try:
                self.yaml = yaml.safe_load(read_text_file(path, "model config"))
            except yaml.YAMLError as e:
                raise ValueError(f"model config {path} is not valid yaml: {e}") from e
            if not isinstance(self.yaml, dict):
                raise ValueError(f"model config {path} does not hold a mapping")
        where = self.yaml_file or "model yaml dict"
        for key in ("backbone", "head") + (() if nc else ("nc",)) + (() if anchors else ("anchors",)):
            if key not in self.yaml:
                raise ValueError(f"{where}: missing key '{key}'")

        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            LOGGER.info(f"Overriding {where} nc={self.yaml.get('nc')} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding {where} anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors) if isinstance(anchors, (int, float)) else anchors
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch], verbose=verbose)
        self.nc = int(self.yaml["nc"])
        self.names = [str(i) for i in range(self.nc)]
        self.hyp: dict = {}
        self.class_weights: torch.Tensor | None = None

        # Strides from one dry run: Detect returns raw maps while its stride is unknown. Eval mode so the
        # BatchNorm running statistics are left untouched. 128 px divides exactly by every stride up to
        # 128 (P7), and keeps the dry run of the large models cheap.
        m = self.model[-1]
        size = 128
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self._forward_once(torch.zeros(1, ch, size, size))
        self.train(was_training)
        m.stride = torch.tensor([size / y.shape[-3] for y in maps], dtype=torch.float32)
        check_anchor_order(m)
        m.anchors /= m.stride.view(-1, 1, 1)
        self.stride = m.stride
        self._initialize_biases()
        if verbose:
            self.info()

    def forward(self, x: torch.Tensor, augment: bool = False):
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor):
        y = []  # outputs of layers listed in self.save, None elsewhere
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _forward_augment(self, x: torch.Tensor):
        """Test-time augmentation: full size, 0.83x flipped left-right, 0.67x; predictions merged.

        The coarsest level of the full-size pass and the finest level of the smallest pass are dropped:
        objects there are better seen at the other scales. Returns (pred, None).
        """
        if self.training:
            raise RuntimeError("augmented inference needs the model in eval mode")
        h, w = x.shape[-2:]
        gs = int(self.stride.max())
        preds = []
        for k, (scale, flip) in enumerate(((1.0, None), (0.83, 3), (0.67, None))):
            xi = scale_img(x.flip(flip) if flip else x, scale, gs)
            pred, raw = self._forward_once(xi)
            pred = pred.clone()
            pred[..., :4] /= scale
            if flip == 2:
                pred[..., 1] = h - pred[..., 1]
            elif flip == 3:
                pred[..., 0] = w - pred[..., 0]
            per_level = [r.shape[1] * r.shape[2] * r.shape[3] for r in raw]
            if k == 0:
                pred = pred[:, : sum(per_level[:-1])]
            elif k == 2:
                pred = pred[:, per_level[0]:]
            preds.append(pred)
        return torch.cat(preds, 1), None

    @torch.no_grad()
    def _initialize_biases(self, cf: torch.Tensor | None = None) -> None:
        """Set Detect biases to priors so that early training is not swamped by background.

        Objectness: log(8 / (640/stride)^2), i.e. about 8 objects per 640 image spread over a level's cells.
        Classes: log(0.6 / (nc - 0.99999)) without class counts, else log(cf / cf.sum()) from the per-class
        label counts cf (classes never seen count as 1 so the prior stays finite).
        The biases are set, not added to, so calling this again (e.g. with cf) gives the same result.
        """
        m = self.model[-1]
        if cf is not None:
            cf = torch.as_tensor(cf, dtype=torch.float32).flatten()
            if cf.numel() != m.nc:
                raise ValueError(f"class counts have {cf.numel()} entries for a model with nc={m.nc}")
            cf = cf.clamp(min=1.0)
        for conv, s in zip(m.m, m.stride):
            b = conv.bias.view(m.na, -1)
            b[:, 4] = math.log(OBJECTS_PER_IMAGE / (PRIOR_IMAGE_SIZE / float(s)) ** 2)
            if cf is None:
                b[:, 5:5 + m.nc] = math.log(0.6 / (m.nc - 0.99999))
            else:
                b[:, 5:5 + m.nc] = torch.log(cf / cf.sum()).to(b)

    def fuse(self, verbose: bool = True) -> "Model":
        """Fold every BatchNorm into its conv, in place, for inference: no parameter needs a gradient any more.
        Callers fuse a deepcopy to keep a trainable model."""
        if verbose:
            LOGGER.info("Fusing layers... ")
        for m in self.model.modules():
            if isinstance(m, Conv):
                m.fuse()
        self.requires_grad_(False)
        if verbose:
            self.info()
        return self

    def info(self, imgsz: int = 640) -> str:
        """Log and return the one-line summary: layers, parameters, gradients, GFLOPs at imgsz."""
        name = Path(self.yaml_file).stem if self.yaml_file else "Model"
        n_params = count_parameters(self)
        n_grads = sum(p.numel() for p in self.parameters() if p.requires_grad)
        # A fused Conv keeps an Identity where its BatchNorm was: that is not a layer of the fused model.
        n_layers = sum(1 for m in self.modules()) - sum(1 for m in self.modules() if isinstance(m, Conv) and m.fused)
        line = (f"{name} summary: {n_layers} layers, {n_params:,} parameters, {n_grads:,} gradients, "
                f"{self.gflops(imgsz):.1f} GFLOPs")
        LOGGER.info(line)
        return line

    @contextlib.contextmanager
    def _measuring(self):
        """Eval mode and no autograd for a measurement, every module's train flag restored afterwards (a
        training-mode pass would move the BatchNorm statistics)."""
        flags = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, flag in flags:
                m.training = flag

    def gflops(self, imgsz: int = 640) -> float:
        """GFLOPs of one imgsz x imgsz image (a multiply-add counts two), as torch's FlopCounterMode counts
        them on a small input scaled by the area ratio: each layer's cost is proportional to the area."""
        p = next(self.parameters())
        size = int(self.stride.max()) * 2
        with self._measuring(), FlopCounterMode(display=False) as counter:
            self._forward_once(torch.zeros(1, self.yaml["ch"], size, size, device=p.device, dtype=p.dtype))
        return counter.get_total_flops() * (imgsz / size) ** 2 / 1e9

    def profile(self, im: torch.Tensor, runs: int = 10) -> list[tuple[float, float, int, str]]:
        """Per-layer (milliseconds per forward, GFLOPs, parameters, module type) on im, logged as a table."""
        rows = []
        with self._measuring():
            y, x = [], im
            for m in self.model:
                if m.f != -1:
                    x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                with FlopCounterMode(display=False) as counter:
                    m(x)
                sync = torch.cuda.synchronize if im.device.type == "cuda" else (lambda: None)
                sync()
                t = time.perf_counter()
                for _ in range(runs):
                    out = m(x)
                sync()
                rows.append(((time.perf_counter() - t) * 1e3 / runs, counter.get_total_flops() / 1e9, m.np, m.type))
                x = out
                y.append(x if m.i in self.save else None)
        LOGGER.info(f"{'time (ms)':>10s} {'GFLOPs':>10s} {'params':>10s}  module")
        for ms, gf, n, kind in rows:
            LOGGER.info(f"{ms:10.2f} {gf:10.2f} {n:10.0f}  {kind}")
        LOGGER.info(f"{sum(r[0] for r in rows):10.2f} {sum(r[1] for r in rows):10.2f} {sum(r[2] for r in rows):10.0f}  Total")
        return rows


DetectionModel = Model  # YOLOv5's newer name for the same class


def scale_img(img: torch.Tensor, ratio: float = 1.0, gs: int = 32) -> torch.Tensor:
    """Resize a (bs, 3, h, w) batch by ratio, then pad right/bottom up to a multiple of gs with grey 0.447."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    h, w = (math.ceil(v * ratio / gs) * gs for v in (h, w))
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


def main(argv=None) -> int:
    """python models/yolo.py --cfg yolov5n.yaml: build a model from its yaml and print the layer table and the
    summary (--profile adds per-layer times and GFLOPs at --img)."""
    from utils.log import set_logging
    from utils.torch_utils import select_device

    p = argparse.ArgumentParser(description="Build a model from its yaml and print its summary")
    p.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model yaml: a name in models/ or a path")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for --profile")
    p.add_argument("--img", type=int, default=640, help="image size for --profile")
    p.add_argument("--device", default="", help="cpu, cuda, or a GPU index such as 0")
    p.add_argument("--profile", action="store_true", help="time and count each layer's forward pass")
    opt = p.parse_args(argv)
    set_logging()
    try:
        device = select_device(opt.device)
        model = Model(opt.cfg).to(device)  # logs the layer table and the summary (GFLOPs at 640, as YOLOv5's)
    except (FileNotFoundError, ValueError) as e:
        LOGGER.error(f"ERROR: {e}")
        return 1
    if opt.profile:
        model.profile(torch.rand(opt.batch_size, model.yaml["ch"], opt.img, opt.img, device=device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
