"""Knowledge distillation for the detector: a frozen teacher loaded from a checkpoint, or the student's own EMA.

    teacher = load_teacher("runs/train/exp_s/weights/best.pt", hyp, student, names, device)   # or "ema"
    distiller = Distiller(teacher, ema, student.hyp, hyp)
    t_raw = distiller.teacher_outputs(imgs, amp_dtype)      # no gradients, eval mode, the run's autocast
    kd_loss, kd_item = distiller.loss(student_raw, t_raw)   # added to the YOLOv5 loss on the labels

The loss follows the objectness-scaled distillation of R. Mehta and C. Ozturk, "Object detection at 200 Frames Per
Second", ECCV 2018 Workshops (arXiv:1805.06361), Section 3.2, adapted from YOLOv2 to YOLOv5's head. On every cell and
anchor of the Detect head's raw maps:

    L_kd = kd_weight * (obj * L_obj + cls * L_cls + box * L_box)

- L_obj: the student's objectness against the teacher's as a soft target, unweighted (the paper's objectness term:
  it is what teaches the student where the background is).
- L_cls: the student's class probabilities against the teacher's, each cell weighted by the teacher's objectness
  o_T = sigmoid(teacher objectness logit), so the teacher's guesses on background cells do not dominate.
- L_box: the student's box against the teacher's box, weighted by o_T in the same way.

Departures from the paper, each for YOLOv5's head: classes are independent sigmoids (YOLOv5), not a softmax, so
L_obj and L_cls are Bernoulli KL divergences KL(sigmoid(t/T) || sigmoid(s/T)) * T**2 with a temperature T
(Hinton, Vinyals and Dean 2015, arXiv:1503.02531; T = 1 is the paper's plain soft target), zero when the student
equals the teacher; the box term is 1 - CIoU between the decoded boxes (YOLOv5's box loss) instead of YOLOv2's
squared error; the o_T-weighted sums are divided by the sum of o_T (a weighted mean, so the term's size does not
grow with the image size); and the gains obj, cls, box are the run's own label-loss gains (YOLOv5's scaling by
classes, levels and image size), so kd_weight 1 weighs the teacher like the labels. The paper's feature-map NMS of
the teacher's outputs is not used. Boxes are decoded with each model's own anchors (autoanchor may have refit the
student's), in grid units of the level, so a teacher with other anchors still teaches the same boxes.

hyp keys: kd_weight (default 1.0; 0 turns distillation off even with --teacher), kd_temperature (default 1.0).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from utils.loss import LEVEL_BALANCE, box_ciou
from utils.torch_utils import autocast, de_parallel

TEACHER_EMA = "ema"  # --teacher ema: the student's EMA is the teacher (mean-teacher self-distillation)
HYP_DEFAULTS = {"kd_weight": 1.0, "kd_temperature": 1.0}


class TeacherError(ValueError):
    """A teacher that cannot be used; the message is one line for the user."""


def check_hyp(hyp: dict) -> None:
    """Refuse kd_* values outside their meaning (one-line ValueError): kd_weight >= 0, kd_temperature > 0."""
    unknown = sorted(str(k) for k in hyp if str(k).startswith("kd_") and k not in HYP_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown distillation hyperparameter(s) {unknown}; known: {list(HYP_DEFAULTS)}")
    rules = {"kd_weight": (lambda v: v >= 0, ">= 0 (0 turns distillation off)"),
             "kd_temperature": (lambda v: v > 0, "> 0")}
    for key, (valid, rule) in rules.items():
        value = hyp.get(key, HYP_DEFAULTS[key])
        try:
            ok = not isinstance(value, bool) and valid(float(value)) and float(value) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{key} must be {rule}, not {value!r}")


@dataclass
class Teacher:
    """What teaches: `source` is TEACHER_EMA or the checkpoint's resolved path; `model` the frozen network
    (None for the EMA, which train.py owns); `sha256` a digest of the teacher's weights (None for the EMA)."""
    source: str
    model: nn.Module | None = None
    sha256: str | None = None

    @property
    def record(self) -> dict:
        """What a checkpoint's train_state keeps, for --resume to load and check the same teacher."""
        return {"path": self.source, "sha256": self.sha256}


def weights_sha256(state_dict: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict's tensors, in name order: a file re-saved with
    the same weights keeps it, any changed weight changes it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teacher(spec: str, hyp: dict, student: nn.Module, names: list[str], device: torch.device,
                 saved: dict | None = None, memory_format: torch.memory_format = torch.channels_last
                 ) -> Teacher | None:
    """The run's teacher from --teacher (a checkpoint path or 'ema'), or None when there is none or hyp kd_weight
    is 0. A checkpoint (ours, or an original YOLOv5 .pt imported without running its pickle) is loaded with its
    EMA weights in FP32, frozen, in eval mode, on device. `saved` is the train_state record of a resumed run: its
    path is reloaded and must hold the same weights. TeacherError (one line) for a teacher that does not fit."""
    if saved is not None:
        spec = saved["path"]
    if not spec or float(hyp.get("kd_weight", HYP_DEFAULTS["kd_weight"])) == 0:
        return None
    if spec == TEACHER_EMA:
        return Teacher(TEACHER_EMA)
    path = Path(spec).resolve()
    try:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)  # EMA weights when it has them, FP32, eval mode
    except CheckpointError as e:
        raise TeacherError(f"--teacher: {e}") from None
    digest = weights_sha256(model.state_dict())
    if saved is not None and saved.get("sha256") != digest:
        raise TeacherError(f"--resume: teacher {path} changed since the run started (sha256 of its weights "
                           f"{digest[:16]}..., recorded {str(saved.get('sha256'))[:16]}...); put the original "
                           "file back to resume")
    check_teacher_fits(model, de_parallel(student), names, path)
    model.requires_grad_(False)
    model = model.to(device).to(memory_format=memory_format).eval()
    return Teacher(str(path), model, digest)


def check_teacher_fits(teacher: nn.Module, student: nn.Module, names: list[str], path: Path) -> None:
    """Refuse, in one line naming what differs, a teacher whose head does not predict the student's classes on the
    student's cells: class count and names, output strides, anchors per level."""
    t_head, s_head = teacher.model[-1], student.model[-1]
    t_names = [str(n) for n in getattr(teacher, "names", [])]
    if t_head.nc != s_head.nc:
        raise TeacherError(f"--teacher {path} predicts {t_head.nc} classes, the student {s_head.nc}: a teacher "
                           "must be trained on the student's classes")
    if t_names and t_names != [str(n) for n in names]:
        i = next((i for i, (a, b) in enumerate(zip(t_names, names)) if a != str(b)), min(len(t_names), len(names)) - 1)
        raise TeacherError(f"--teacher {path} has other class names than the data: class {i} is {t_names[i]!r} "
                           f"for the teacher, {names[i]!r} for the student")
    t_stride, s_stride = [int(s) for s in t_head.stride], [int(s) for s in s_head.stride]
    if t_stride != s_stride:
        raise TeacherError(f"--teacher {path} has output strides {t_stride}, the student {s_stride}: the teacher "
                           "must predict on the student's grid")
    if t_head.na != s_head.na:
        raise TeacherError(f"--teacher {path} has {t_head.na} anchors per cell, the student {s_head.na}: the "
                           "teacher must predict on the student's anchors")


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Elementwise KL(sigmoid(t/T) || sigmoid(s/T)) * T**2: the soft-target BCE minus the target's own entropy,
    so it is 0 where the student agrees with the teacher (same gradient as the BCE)."""
    s, t = student_logits / temperature, teacher_logits / temperature
    target = t.sigmoid()
    cross = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(t, target, reduction="none")
    return (cross - entropy) * temperature ** 2


def decoded_boxes(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes cx, cy (offset within the cell) and w, h, in grid units, of raw maps (bs, na, ny, nx, no)
    with anchors (na, 2) in grid units: YOLOv5's decoding, as its loss uses it."""
    xy = raw[..., 0:2].sigmoid() * 2 - 0.5
    wh = (raw[..., 2:4].sigmoid() * 2) ** 2 * anchors.view(1, -1, 1, 1, 2)
    return torch.cat((xy, wh), -1)


class Distiller:
    """The distillation term of a training step: the teacher's raw outputs for a batch and the loss of the
    student's raw outputs against them (see the module docstring for the recipe)."""

    def __init__(self, teacher: Teacher, student: nn.Module, ema, hyp: dict):
        """student: the trained model (its Detect anchors decode its boxes, read at each step since autoanchor may
        change them; its `hyp` holds the run's scaled label-loss gains box, obj, cls); ema: the run's ModelEMA,
        the teacher for TEACHER_EMA as it stands at each step; hyp: the run's kd_* keys."""
        if teacher.model is None and ema is None:
            raise TeacherError("--teacher ema needs the run's EMA on this process")
        self.teacher, self.ema = teacher, ema
        self.student_head = de_parallel(student).model[-1]
        gains = de_parallel(student).hyp
        self.weight = float(hyp.get("kd_weight", HYP_DEFAULTS["kd_weight"]))
        self.temperature = float(hyp.get("kd_temperature", HYP_DEFAULTS["kd_temperature"]))
        self.box_gain, self.obj_gain, self.cls_gain = float(gains["box"]), float(gains["obj"]), float(gains["cls"])

    def summary(self) -> str:
        """One line for the start of the run: who teaches, and how strongly."""
        who = ("the run's own EMA" if self.teacher.model is None
               else f"{self.teacher.source} (sha256 {self.teacher.sha256[:12]}...)")
        return (f"Distillation: teacher {who}, kd_weight {self.weight:g}, kd_temperature {self.temperature:g}; "
                f"results.csv gains a train/kd_loss column")

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher.model if self.teacher.model is not None else self.ema.ema

    @torch.no_grad()
    def teacher_outputs(self, imgs: torch.Tensor, amp_dtype: torch.dtype | None) -> list[torch.Tensor]:
        """The teacher's raw Detect maps for imgs, without gradients, under the run's autocast precision."""
        model = self.teacher_model
        with autocast(imgs.device, amp_dtype):
            out = model(imgs)
        return out[1] if isinstance(out, tuple) else out  # eval mode returns (decoded, raw)

    def loss(self, student_raw: list[torch.Tensor], teacher_raw: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kd loss scaled by the batch size, as ComputeLoss scales its own; the unscaled value, detached, (1,))."""
        s_anchors = self.student_head.anchors
        t_anchors = self.teacher_model.model[-1].anchors
        device = student_raw[0].device
        balance = LEVEL_BALANCE[len(student_raw)]
        with torch.autocast(device_type=device.type, enabled=False):  # FP32, as the label loss
            l_obj = l_cls = l_box = torch.zeros((), device=device)
            for i, (s, t) in enumerate(zip(student_raw, teacher_raw)):
                s, t = s.float(), t.float()
                if s.shape != t.shape:
                    raise TeacherError(f"the teacher's output level {i} has shape {tuple(t.shape)}, the student's "
                                       f"{tuple(s.shape)}")
                t_obj = t[..., 4].sigmoid()
                weight_sum = t_obj.sum().clamp_min(1e-9)
                l_obj = l_obj + bernoulli_kl(s[..., 4], t[..., 4], self.temperature).mean() * balance[i]
                if s.shape[-1] > 6:  # more than one class (YOLOv5 has no class loss for one class either)
                    per_cell = bernoulli_kl(s[..., 5:], t[..., 5:], self.temperature).mean(-1)
                    l_cls = l_cls + (per_cell * t_obj).sum() / weight_sum
                s_box = decoded_boxes(s, s_anchors[i].to(device, torch.float32))
                t_box = decoded_boxes(t, t_anchors[i].to(device, torch.float32))
                ciou = box_ciou(s_box.reshape(-1, 4), t_box.reshape(-1, 4)).view(t_obj.shape)
                l_box = l_box + ((1.0 - ciou) * t_obj).sum() / weight_sum
            total = self.weight * (self.obj_gain * l_obj + self.cls_gain * l_cls + self.box_gain * l_box)
        return total * student_raw[0].shape[0], total.detach().view(1)
