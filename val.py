"""Validate a detection model on a dataset split: mAP computed the COCO way, YOLOv5's report.

    python val.py --weights runs/train/exp/weights/best.pt --data coco128.yaml --img 640
    python val.py --weights best.pt --data coco128.yaml --save-json      # + pycocotools COCOeval
    python val.py --weights best.pt --data coco128.yaml --task speed     # timing only

Without --weights it validates the latest training run's best.pt; without --img, at the size the weights
were trained at; without --data, on the dataset they were trained on (a .pt's options, an exported file's metadata).

train.py calls run(model=ema.ema, dataloader=...) after every epoch. run() never modifies the model it is
given: it evaluates under torch.autocast instead of converting the weights (--half is fp16 autocast on any
device), and puts every module's train/eval flag back as it found it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from utils.cli import (AT_LEAST_0, AT_LEAST_1, DEFAULT_IMGSZ, UNIT_INTERVAL, FlagError, HelpFormatter,  # noqa: E402
                       check_flags, exit_process, refuse_bad_flags, shown_path)

DEFAULT_DATA = "coco128.yaml"  # --data when neither it nor the weights say
FLAG_RANGES = {"batch_size": ("--batch-size", AT_LEAST_1), "imgsz": ("--img", AT_LEAST_1),
               "conf_thres": ("--conf-thres", UNIT_INTERVAL), "iou_thres": ("--iou-thres", UNIT_INTERVAL),
               "max_det": ("--max-det", AT_LEAST_1), "workers": ("--workers", AT_LEAST_0)}


class ValError(Exception):
    """A validation that cannot start (a bad --device or --task, --augment with an exported file); one line
    for the user."""


def parse_opt(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Validate a YOLOv5-style detector", formatter_class=HelpFormatter)
    p.add_argument("--data", type=str, default=None,
                   help=f"dataset yaml: a name in data/ or a path (default: the one the weights were trained on, "
                        f"else {DEFAULT_DATA})")
    p.add_argument("--weights", type=str, default=None,
                   help="checkpoint path (default: the latest runs/train/*/weights/best.pt)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                   help=f"inference size in pixels (default: the size the weights were trained at, else {DEFAULT_IMGSZ})")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=("val", "test", "speed"),
                   help="the dataset split to validate, or speed (timing only, at conf 0.25 and IoU 0.45)")
    p.add_argument("--device", default="", help="cpu, cuda, or a GPU index such as 0 (default: the first GPU, else cpu)")
    p.add_argument("--workers", type=int, default=8, help="most dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--augment", action="store_true", help="test-time augmentation")
    p.add_argument("--verbose", action="store_true", help="per-class results")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO-json results file and run COCOeval")
    p.add_argument("--project", default=str(ROOT / "runs" / "val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="FP16 inference: fp16 autocast, on any device")
    return p


if __name__ == "__main__":
    CLI_OPT = parse_opt()  # --help and mistyped flags answer here, before the imports below take seconds
    refuse_bad_flags("val", lambda opt: check_flags(opt, FLAG_RANGES), CLI_OPT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.common import Conv  # noqa: E402
from models.yolo import check_img_size, size_multiple  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from utils.boxes import non_max_suppression, scale_boxes, xywhn2xyxy, xyxy2xywh  # noqa: E402
from utils.checkpoint import (CheckpointError, check_checkpoint_classes, load_checkpoint,  # noqa: E402
                              model_from_checkpoint, trained_imgsz)
from utils.inference import (  # noqa: E402
    MissingPackageError,
    autocast_dtype,
    is_exported,
    load_model,
    speed_line,
    write_yolo_labels,
)
from utils.coco import (  # noqa: E402
    category_map,
    coco_evaluate,
    find_annotations_json,
    image_id_from_path,
    predictions_to_coco,
    yolo_labels_to_coco_gt,
)
from utils.data_config import DatasetError, check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.paths import TRAIN_RUNS, increment_path, latest_best_weights  # noqa: E402
from utils.metrics import CONFIDENCE_GRID, IOU_THRESHOLDS, RECALL_POINTS, ConfusionMatrix, ap_per_class, match_predictions  # noqa: E402
from utils.profiling import PhaseTimer  # noqa: E402
from utils.plots import plot_confusion_matrix, plot_images, plot_mc_curve, plot_pr_curve  # noqa: E402
from utils.torch_utils import autocast, non_finite_tensors, select_device  # noqa: E402

PLOTTED_BATCHES = 3  # val_batch{0,1,2}_labels.jpg / _pred.jpg


class InferenceCopy:
    """A model in its fastest form for inference, as a copy (the source model, e.g. ema.ema, is never touched):
    BatchNorm folded into the convolutions, and channels_last weights, the layout oneDNN on the CPU and cuDNN's
    fp16 kernels run best. Predictions equal the source's up to float rounding.

    refresh() brings the copy up to date with the source's current weights in place, folding each BatchNorm
    with the same function fuse() uses (so the values equal a fresh copy's), which costs a fraction of making
    a new copy: train.py keeps one per validated model and refreshes it every epoch.
    """

    def __init__(self, model: torch.nn.Module, memory_format: torch.memory_format = torch.channels_last):
        # The buffers cloned one by one first: deepcopy of a view copies its whole storage (parameters clone
        # only their own values), and ema.ema's buffers are views into the EMA's flat buffer of the whole model.
        self.model = copy.deepcopy(model, {id(b): b.detach().clone() for b in model.buffers()})
        if hasattr(self.model, "fuse"):
            self.model.fuse(verbose=False)
        self.model.to(memory_format=memory_format)
        source, copied = dict(model.named_modules()), dict(self.model.named_modules())
        folded = [n for n, m in source.items() if isinstance(m, Conv) and not m.fused and copied[n].fused]
        self._folded = [(source[n], copied[n]) for n in folded]
        inside_folded = tuple(f"{n}." for n in folded)
        self._copied = [(source[n], copied[n]) for n in source if not n.startswith(inside_folded) and n not in folded]

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        for conv, twin in self._folded:
            weight, bias = conv.fused_weights()
            twin.conv.weight.copy_(weight)
            twin.conv.bias.copy_(bias)
        for module, twin in self._copied:
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                getattr(twin, name).copy_(t)
        return self.model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every module in eval mode for the block, then restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def output_to_target(output: list[torch.Tensor]) -> torch.Tensor:
    """NMS output per image -> rows [img_idx, cls, cx, cy, w, h, conf] (pixels) for plot_images."""
    rows = []
    for i, det in enumerate(output):
        det = det.detach().float().cpu()
        idx = torch.full((len(det), 1), float(i))
        rows.append(torch.cat((idx, det[:, 5:6], xyxy2xywh(det[:, :4]), det[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


def warn_non_finite(model: torch.nn.Module) -> None:
    """Say so when the weights hold NaN/Inf (a diverged run or EMA): the metrics would be silently zero."""
    bad = non_finite_tensors(model)
    if bad:
        LOGGER.warning(f"WARNING: {len(bad)} weight tensors hold NaN or Inf (first: {bad[0]}); these metrics are meaningless")


def _class_names(data_dict: dict, model_names, nc: int, single_cls: bool) -> list[str]:
    if single_cls:  # train.py names a single-class model the same way
        return list(data_dict["names"]) if len(data_dict["names"]) == 1 else ["item"]
    names = list(data_dict["names"])
    if model_names is not None and len(model_names) == nc and [str(n) for n in model_names] != [str(i) for i in range(nc)]:
        names = list(model_names)  # the names the model was trained with, unless they are placeholders
    return names


@torch.no_grad()
def run(
    data,
    weights=None,
    batch_size: int = 32,
    imgsz: int | None = None,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    task: str = "val",
    device="",
    workers: int = 8,
    single_cls: bool = False,
    augment: bool = False,
    verbose: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    save_json: bool = False,
    project=ROOT / "runs" / "val",
    name: str = "exp",
    exist_ok: bool = False,
    half: bool = False,
    amp_dtype: torch.dtype | None = None,
    model=None,
    dataloader=None,
    save_dir=Path(""),
    plots: bool = True,
    compute_loss=None,
    timer: PhaseTimer | None = None,
    memory_format: torch.memory_format = torch.channels_last,
    copy_model: bool = True,
):
    """Evaluate and report. Returns ((P, R, mAP50, mAP50-95, box_loss, obj_loss, cls_loss), maps, times):
    maps (nc,) is each class's mAP50-95 (classes without boxes get the overall value), times the
    (pre-process, inference, NMS) milliseconds per image. Losses are 0 without compute_loss.

    Precision: the model's weights are never converted; `amp_dtype` (train.py passes its run's) or, with
    `half`, float16 is the autocast dtype on whatever device runs, CPU included. A given `timer` is charged
    with this validation's phases (data wait, pre-process, inference, NMS, metrics, plots). A given model is
    evaluated as an InferenceCopy in `memory_format` (bench/val_speed.py compares the layouts); with
    `copy_model=False` it is evaluated as it is (train.py passes its own, refreshed InferenceCopy).
    """
    training = model is not None
    if not training:  # the command's numbers (train.py passes its own, already checked)
        check_flags(dict(batch_size=batch_size, imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres,
                         max_det=max_det, workers=workers), FLAG_RANGES)
    given_dict = isinstance(data, dict) and "nc" in data and "names" in data
    if data is None and not training:
        data_dict = None  # without --data the dataset is the weights' own, known once they are loaded
    else:
        data_dict = data if given_dict and dataloader is not None else check_dataset(data)
    amp_dtype = amp_dtype if amp_dtype is not None else (torch.float16 if half else None)
    if training:  # called by train.py: the caller's model, device and dataloader
        device = next(model.parameters()).device
        save_dir = Path(save_dir)
        model_names = getattr(model, "names", None)
        stride = int(max(getattr(model, "stride", torch.tensor([32])).max(), 32))
        imgsz = imgsz or DEFAULT_IMGSZ
        amp_dtype = autocast_dtype(model, amp_dtype)
        if copy_model:
            model = InferenceCopy(model, memory_format).model
    else:
        if task not in ("val", "test", "speed"):
            raise ValError(f"--task must be val, test or speed, not {task!r}")
        if task == "speed":  # timing only, at YOLOv5's deployment thresholds
            conf_thres, iou_thres, save_json, save_txt, plots = 0.25, 0.45, False, False, False
        try:
            device = select_device(device, batch_size)
        except ValueError as e:
            raise ValError(str(e)) from None
        if weights is None:
            weights = latest_best_weights(TRAIN_RUNS)
            LOGGER.info(f"No --weights given: validating the latest run's {shown_path(weights)}")
        if is_exported(weights):  # .onnx / .torchscript / OpenVINO, run as detect.py runs them
            if augment:  # the flipped and scaled passes are the PyTorch model's own forward
                raise ValError(f"--augment (test-time augmentation) needs PyTorch weights, not {Path(weights).name}")
            model = load_model(weights, device)
            amp_dtype = autocast_dtype(model, amp_dtype)
            ckpt = {"nc": model.nc}
            imgsz = model.square_size(imgsz) or DEFAULT_IMGSZ  # a fixed-size file's own size
            if model.fixed_shape and task != "speed":  # YOLOv5 says so too ("Forcing ... square inference")
                LOGGER.info(f"{Path(weights).name} is a fixed-size export: validating with {imgsz}x{imgsz} squares (no "
                            f"rectangular batches), {model.batch or batch_size} images per run, as it was exported; "
                            f"its figures can differ from its .pt's")
        else:
            ckpt = load_checkpoint(weights)
            if imgsz is None:
                imgsz = trained_imgsz(ckpt) or DEFAULT_IMGSZ
                LOGGER.info(f"Validating at --img {imgsz}, " + ("the size the weights were trained at"
                                                                 if trained_imgsz(ckpt) else "the default"))
            model = model_from_checkpoint(ckpt, use_ema=True)  # a fresh FP32 copy: ours to fuse
            model.fuse()
        if data_dict is None:
            data = getattr(model, "trained_data", None)
            LOGGER.info(f"No --data given: validating on {data}, the dataset the weights were trained on" if data else
                        f"No --data given: validating on {DEFAULT_DATA}, the default (the weights do not say their dataset)")
            try:
                data_dict = check_dataset(data or DEFAULT_DATA)
            except DatasetError as e:  # moved or renamed since training: the way out is --data
                raise DatasetError(f"{e}; pass --data with the dataset's yaml") from None
        if not (single_cls and ckpt["nc"] == 1):
            check_checkpoint_classes(ckpt, data_dict["nc"], weights=weights, data=data_dict.get("yaml_file", data))
        del ckpt
        model_names = model.names
        model.to(device, memory_format=memory_format)
        stride = size_multiple(model)
        imgsz = check_img_size(imgsz, stride)
        if device.type == "cuda":  # first CUDA calls are slow; keep them out of the timings
            with autocast(device, amp_dtype):
                model(torch.zeros(1, 3, imgsz, imgsz, device=device))
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # only once the weights are good
        save_dir.mkdir(parents=True, exist_ok=True)
    if save_txt:
        (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    if dataloader is None:  # the command, or a caller that passes a model but no loader
        split = "val" if task == "speed" else task
        if not data_dict.get(split):
            raise DatasetError(f"{data_dict.get('yaml_file', data)} has no '{split}' split")
        pad, rect = (0.0, False) if task == "speed" or getattr(model, "fixed_shape", None) else (0.5, True)
        dataloader, _ = create_dataloader(
            data_dict[split], check_img_size(imgsz, stride), batch_size, stride, single_cls=single_cls, pad=pad,
            rect=rect, workers=workers, nc=data_dict["nc"], prefix=f"{task}: ", pin_memory=device.type == "cuda",
        )  # fmt: skip

    if copy_model:  # (train.py checks the EMA itself before handing over its copy)
        warn_non_finite(model)
    nc = 1 if single_cls else int(data_dict["nc"])
    names = _class_names(data_dict, model_names, nc, single_cls)
    confusion = ConfusionMatrix(nc=nc)
    phases = PhaseTimer(device)  # its pre-process, inference and NMS totals make the speed line
    loss = torch.zeros(3, device=device)
    correct_all, conf_all, pcls_all, tcls_all = [], [], [], []
    jdict: list[dict] = []
    class_map = category_map(int(data_dict["nc"]))
    seen = 0
    excluded: dict[str, None] = {}  # images that could not be read, in order (validated without them)
    header = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")

    dataset = dataloader.dataset
    dataset_labels = {str(Path(f)): lb for f, lb in zip(dataset.im_files, dataset.labels)}
    coco_gt = getattr(dataset, "coco", None) if task != "speed" else None  # read from a COCO json: scored on it
    if coco_gt is not None:
        class_map = coco_gt.category_ids

    with eval_mode(model):
        waited_from = time.perf_counter()
        for batch_i, batch in enumerate(tqdm(dataloader, desc=header, bar_format="{l_bar}{bar:10}{r_bar}")):
            phases.add("data", time.perf_counter() - waited_from)  # the loader kept this process waiting
            if batch.unreadable:  # their samples are grey stand-ins: leave them out of the metrics
                excluded.update(dict.fromkeys(batch.unreadable))
                batch = batch.readable()
                if not len(batch.paths):
                    waited_from = time.perf_counter()
                    continue
            im, targets, paths, shapes, _ = batch
            with phases("pre-process"):
                im = im.to(device, non_blocking=True)
                # the model's layout while uint8 (fewer bytes); the loader's batches are channels_last already
                im = im.contiguous(memory_format=memory_format).float().div_(255)
                targets = targets.to(device)
                height, width = im.shape[2:]
            with phases("inference"), autocast(device, amp_dtype):
                out = model(im, augment=augment) if augment else model(im)
                preds, train_out = (out if isinstance(out, (list, tuple)) else (out, None))
            if compute_loss is not None and train_out is not None:
                with phases("loss"):
                    loss += compute_loss([x.float() for x in train_out], targets)[1]
            with phases("NMS"):
                preds = non_max_suppression(preds.float(), conf_thres, iou_thres, multi_label=True,
                                            agnostic=single_cls, max_det=max_det)  # fmt: skip

            with phases("metrics"):  # matching each image's predictions; the per-image files
                for si, pred in enumerate(preds):
                    path, shape = Path(paths[si]), shapes[si][0]
                    seen += 1
                    predn = pred.clone()
                    if single_cls:
                        predn[:, 5] = 0
                    scale_boxes((height, width), predn[:, :4], shape, ratio_pad=shapes[si][1])
                    # Ground truth straight from the label file, in original pixels: the same numbers a COCO
                    # json built from these labels holds (the batch targets went through letterbox and clipping).
                    gt = torch.from_numpy(dataset_labels[str(path)]).double()
                    tbox = xywhn2xyxy(gt[:, 1:5], w=shape[1], h=shape[0])
                    correct = match_predictions(predn[:, :4], predn[:, 4], predn[:, 5], tbox, gt[:, 0])  # COCO's IoU thresholds
                    correct_all.append(correct)
                    conf_all.append(predn[:, 4].cpu().numpy())
                    pcls_all.append(predn[:, 5].cpu().numpy())
                    tcls_all.append(gt[:, 0].cpu().numpy())
                    if plots:
                        confusion.process_batch(predn, torch.cat((gt[:, 0:1], tbox), 1))
                    if save_txt:
                        write_yolo_labels(predn, shape, save_dir / "labels" / f"{path.stem}.txt", save_conf)
                    if save_json or coco_gt is not None:
                        image_id = coco_gt.image_ids[str(path)] if coco_gt is not None else image_id_from_path(path)
                        jdict += predictions_to_coco(predn, image_id, class_map)

            if plots and batch_i < PLOTTED_BATCHES:
                with phases("plots"):
                    plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
                    plot_images(im, output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)
            waited_from = time.perf_counter()

    # Metrics over the whole split
    correct = np.concatenate(correct_all, 0) if correct_all else np.zeros((0, len(IOU_THRESHOLDS)), bool)
    confs = np.concatenate(conf_all) if conf_all else np.zeros(0)
    pcls = np.concatenate(pcls_all) if pcls_all else np.zeros(0)
    tcls = np.concatenate(tcls_all).astype(int) if tcls_all else np.zeros(0, int)
    with phases("metrics"):
        result = ap_per_class(correct, confs, pcls, tcls)
    mp, mr, map50, map50_95 = result.mean_results()
    n_instances = np.bincount(tcls, minlength=nc)
    row = "%22s" + "%11i" * 2 + "%11.3g" * 4  # under the header that the progress bar showed as its label
    LOGGER.info(row % ("all", seen, n_instances.sum(), mp, mr, map50, map50_95))
    if excluded:
        LOGGER.warning(f"WARNING: these {task} metrics exclude {len(excluded)} image{'s' * (len(excluded) > 1)} that "
                       f"could not be read (removed or changed since the label scan): {', '.join(excluded)}")
    if n_instances.sum() == 0:
        LOGGER.warning(f"WARNING: no labels found in the {task} set; metrics cannot be computed")
    if verbose and nc > 1:
        images_per_class = np.zeros(nc, dtype=int)
        for t in tcls_all:
            images_per_class[np.unique(t.astype(int))] += 1
        for i, c in enumerate(result.classes):
            LOGGER.info(row % (names[c], images_per_class[c], result.n_gt[i], result.p[i], result.r[i], result.ap50[i], result.ap50_95[i]))

    times = tuple(phases.total(k) / max(seen, 1) * 1e3 for k in ("pre-process", "inference", "NMS"))
    if not training:
        LOGGER.info(speed_line(times, (batch_size, 3, imgsz, imgsz)))

    if plots:
        with phases("plots"):
            plot_confusion_matrix(confusion.matrix, names, save_dir / "confusion_matrix.png")
            plot_pr_curve(RECALL_POINTS, result.pr_curve, result.ap50, save_dir / "PR_curve.png", names, result.classes)
            for curve, label, stem in ((result.f1_curve, "F1", "F1"), (result.p_curve, "Precision", "P"), (result.r_curve, "Recall", "R")):
                plot_mc_curve(CONFIDENCE_GRID, curve, save_dir / f"{stem}_curve.png", names, result.classes, ylabel=label)

    if coco_gt is not None:  # COCO's official figures (crowd regions, original ids) replace ours
        with phases("COCOeval"):
            map50_95, map50 = _score_with_coco_json(jdict, coco_gt, save_dir, weights, max_det, single_cls, excluded,
                                                    save_json, map50_95, map50)  # fmt: skip
    if save_json and not jdict:
        LOGGER.info("No predictions above --conf-thres: nothing to write or score with COCOeval")
    if save_json and jdict and coco_gt is None:
        with phases("COCOeval"):
            _score_with_cocoeval(jdict, dataset, data_dict, task, names, save_dir, weights, max_det, single_cls,
                                 map50_95, map50, excluded)
    if timer is not None:
        timer.merge(phases, prefix="validation/")

    if not training:
        saved = (f"\n{len(list(save_dir.glob('labels/*.txt')))} label files saved to {shown_path(save_dir / 'labels')}"
                 if save_txt else "")
        LOGGER.info(f"Results saved to {shown_path(save_dir)}{saved}")

    maps = np.full(nc, map50_95)
    maps[result.classes] = result.ap50_95
    losses = (loss.cpu() / max(len(dataloader), 1)).tolist()
    return (mp, mr, map50, map50_95, *losses), maps, times


def _score_with_coco_json(jdict, coco_gt, save_dir, weights, max_det, single_cls, excluded, save_json, our_map,
                          our_map50) -> tuple[float, float]:
    """COCOeval against the dataset's own json (utils/coco_json.py); returns its (mAP50-95, mAP50)."""
    if save_json:
        pred_json = save_dir / f"{Path(weights).stem if weights else 'model'}_predictions.json"
        pred_json.write_text(json.dumps(jdict))
        LOGGER.info(f"Predictions saved to {pred_json}")
    LOGGER.info(f"\nCOCOeval against {coco_gt.json_file} (the dataset's json: its ids, crowd regions as COCO scores "
                f"them; maxDets={max_det}):")
    coco_map, coco_map50, _ = coco_gt.evaluate(jdict, excluded, max_det=max_det, use_cats=not single_cls)
    LOGGER.info(f"mAP50-95 {coco_map:.6f}, mAP50 {coco_map50:.6f} (reported; without crowd regions ours are "
                f"{our_map:.6f}, {our_map50:.6f})")
    return coco_map, coco_map50


def _score_with_cocoeval(jdict, dataset, data_dict, task, names, save_dir, weights, max_det, single_cls, our_map, our_map50,
                         excluded=()):
    """Write the predictions json and score it with COCOeval, against a ground truth built from the same
    YOLO labels (comparable with our table) and against the dataset's official json when it has one."""
    stem = Path(weights).stem if weights else "model"
    pred_json = save_dir / f"{stem}_predictions.json"
    pred_json.write_text(json.dumps(jdict))
    LOGGER.info(f"Predictions saved to {pred_json}")
    nc_json = int(data_dict["nc"])
    try:
        gt = yolo_labels_to_coco_gt(dataset, class_map=category_map(nc_json), names=[str(n) for n in data_dict["names"]])
    except ValueError as e:  # labels or file names that no COCO json can describe; our table stands
        LOGGER.warning(f"WARNING: COCOeval skipped: {e}")
        return
    if single_cls:  # the labels were all set to class 0; score boxes regardless of class
        gt["categories"] = gt["categories"][:1]
    gt_json = save_dir / "labels_gt.json"
    gt_json.write_text(json.dumps(gt))
    left_out = {image_id_from_path(p) for p in excluded}  # unreadable images, as in our table
    img_ids = [im["id"] for im in gt["images"] if im["id"] not in left_out]
    LOGGER.info(f"\nCOCOeval against {gt_json.name} (ground truth from the YOLO labels, maxDets={max_det}):")
    coco_map, coco_map50, _ = coco_evaluate(gt, jdict, img_ids=img_ids, max_det=max_det, use_cats=not single_cls)
    LOGGER.info(f"mAP50-95: ours {our_map:.6f}, pycocotools {coco_map:.6f} (difference {our_map - coco_map:+.1e}); "
                f"mAP50: ours {our_map50:.6f}, pycocotools {coco_map50:.6f} (difference {our_map50 - coco_map50:+.1e})")  # fmt: skip
    split = "val" if task == "speed" else task
    official = find_annotations_json(data_dict.get(split))
    if official is not None:
        LOGGER.info(f"\nCOCOeval against {official} (official annotations, crowd regions included):")
        try:
            off_map, off_map50, _ = coco_evaluate(official, jdict, img_ids=img_ids, max_det=max_det, use_cats=not single_cls)
            LOGGER.info(f"mAP50-95 {off_map:.4f}, mAP50 {off_map50:.4f} (official annotations)")
        except Exception as e:  # a json that does not describe these images: report, keep our results
            LOGGER.warning(f"WARNING: COCOeval with {official} failed: {type(e).__name__}: {e}")


def main(argv=None) -> int:
    """val.py's exit status: 0, or 1 after a one-line error."""
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(**vars(opt))
    except (ValError, CheckpointError, DatasetError, FileNotFoundError, MissingPackageError, FlagError) as e:
        LOGGER.error(f"val: {e}")
        return 1
    return 0


if __name__ == "__main__":
    reuse_freed_memory()
    exit_process(main(CLI_OPT))
