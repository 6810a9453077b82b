"""torch.hub entry points: this project's detectors in one line, as YOLOv5's hubconf.py offers them.

    import torch
    model = torch.hub.load('.', 'custom', path='runs/train/exp/weights/best.pt', source='local')
    model = torch.hub.load('.', 'custom', path='best.onnx', source='local')        # exported models too
    model = torch.hub.load('.', 'yolov5n', pretrained=False, classes=80, source='local')  # untrained
    results = model('image.jpg')           # also a PIL image, an HWC RGB numpy image, a list, a BCHW tensor
    results.print(); results.xyxy[0]; results.pandas().xyxy[0]; results.save(); results.crop()
    model.conf, model.iou, model.classes, model.max_det = 0.5, 0.45, [0, 2], 100

No pretrained weights are published for this project: pretrained=True looks for NAME.pt in the working
folder and in this repository (an original YOLOv5 file placed there works) and otherwise fails in one line.
"""
from pathlib import Path

dependencies = ["torch", "torchvision", "cv2", "numpy", "yaml"]  # torch.hub checks these are importable
# The project's modules are imported inside the entry points: torch.hub lists every public callable at the
# top of this file as an entry point, and imported names would show up there too.

ROOT = Path(__file__).resolve().parent


def _create(name: str, pretrained: bool = True, channels: int = 3, classes: int = 80, autoshape: bool = True,
            verbose: bool = True, device=None):
    """yolov5{n,s,m,l,x}: an untrained model of that size, or with pretrained=True its local NAME.pt."""
    from models.yolo import Model
    from utils.checkpoint import CheckpointError
    from utils.inference import Detector, load_model
    from utils.log import set_logging
    from utils.torch_utils import select_device

    set_logging(verbose=verbose)
    device = select_device("" if device is None else str(device))
    if pretrained:
        candidates = list(dict.fromkeys([Path.cwd() / f"{name}.pt", ROOT / f"{name}.pt"]))  # each folder once
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(
                f"no pretrained weights exist here for {name} (nothing is downloaded; {name}.pt is not in "
                f"{' or '.join(str(c.parent) for c in candidates)}): use pretrained=False for an untrained model, "
                "or 'custom' with path= for your own weights")
        model = load_model(found, device)
        if model.nc != classes or channels != 3:
            raise CheckpointError(f"{found} has {model.nc} classes and 3 channels, not classes={classes} "
                                  f"channels={channels}; fine-tune with train.py --weights {found.name} instead")
    else:
        model = Model(f"{name}.yaml", ch=channels, nc=classes, verbose=verbose).to(device).eval()
    return Detector(model) if autoshape else model


def custom(path: str = "best.pt", autoshape: bool = True, _verbose: bool = True, device=None):
    """Your weights: our checkpoint (EMA weights), an original YOLOv5 .pt, an .onnx or a .torchscript file or an
    OpenVINO folder (*_openvino_model/), a local path or an http(s) URL (fetched into torch.hub's cache folder)."""
    from utils.inference import Detector, fetch_weights, load_model
    from utils.log import set_logging
    from utils.torch_utils import select_device

    set_logging(verbose=_verbose)
    device = select_device("" if device is None else str(device))
    model = load_model(fetch_weights(path), device)
    return Detector(model) if autoshape else model


def yolov5n(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    return _create("yolov5n", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5s(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    return _create("yolov5s", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5m(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    return _create("yolov5m", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5l(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    return _create("yolov5l", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5x(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    return _create("yolov5x", pretrained, channels, classes, autoshape, _verbose, device)
