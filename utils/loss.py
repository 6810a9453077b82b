"""The YOLOv5 training loss: CIoU box loss, IoU-targeted objectness, class BCE, with ratio anchor matching.

    compute_loss = ComputeLoss(model, hyp)
    loss, items = compute_loss(model(imgs), targets)   # loss is scaled by batch size; items = [box, obj, cls]

targets: (n, 6) rows [image index in batch, class, cx, cy, w, h], coordinates normalised to the image.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, complete_box_iou_loss

from utils.torch_utils import de_parallel

# Objectness loss weight per output level, fine to coarse: small-object levels have many more cells.
LEVEL_BALANCE = {3: [4.0, 1.0, 0.4], 4: [4.0, 1.0, 0.25, 0.06], 5: [4.0, 1.0, 0.25, 0.06, 0.02]}
# A target is also assigned to the neighbouring cell(s) whose centre is within this many cells of it.
NEIGHBOUR_OFFSET = 0.5


def smooth_bce(eps: float = 0.0) -> tuple[float, float]:
    """Positive and negative BCE targets under label smoothing eps (https://arxiv.org/abs/1902.04103)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalBCEWithLogits(nn.Module):
    """Focal loss (gamma, alpha) around BCE-with-logits that keeps the positive weight of the BCE.

    torchvision.ops.sigmoid_focal_loss has no pos_weight, which the hyp files' cls_pw / obj_pw need.
    """

    def __init__(self, pos_weight: torch.Tensor, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        p = logits.sigmoid()
        p_t = target * p + (1 - target) * (1 - p)
        alpha_t = target * self.alpha + (1 - target) * (1 - self.alpha)
        return (bce * alpha_t * (1.0 - p_t) ** self.gamma).mean()


class ComputeLoss:
    """YOLOv5 loss for a Model (or a DDP/DataParallel wrapper of one).

    hyp keys: box, obj, cls (gains), cls_pw, obj_pw (BCE positive weights), anchor_t (max w/h ratio
    between a target and an anchor for a match), fl_gamma (focal loss when > 0). hyp defaults to the
    model's `hyp` attribute.
    """

    def __init__(self, model: nn.Module, hyp: dict | None = None, label_smoothing: float = 0.0):
        core = de_parallel(model)
        self.hyp = dict(core.hyp if hyp is None else hyp)
        missing = [k for k in ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t") if k not in self.hyp]
        if missing:
            raise KeyError(f"ComputeLoss: hyp is missing {', '.join(missing)}")
        self.detect = core.model[-1]  # read anchors at each call: they may be moved or refit after this
        self.device = next(core.parameters()).device
        pos_cls = torch.tensor([float(self.hyp["cls_pw"])], device=self.device)
        pos_obj = torch.tensor([float(self.hyp["obj_pw"])], device=self.device)
        gamma = float(self.hyp.get("fl_gamma", 0.0))
        if gamma > 0:
            self.bce_cls = FocalBCEWithLogits(pos_cls, gamma)
            self.bce_obj = FocalBCEWithLogits(pos_obj, gamma)
        else:
            self.bce_cls = nn.BCEWithLogitsLoss(pos_weight=pos_cls)
            self.bce_obj = nn.BCEWithLogitsLoss(pos_weight=pos_obj)
        self.cp, self.cn = smooth_bce(label_smoothing)
        self.nl, self.na, self.nc = self.detect.nl, self.detect.na, self.detect.nc
        if self.nl not in LEVEL_BALANCE:
            raise ValueError(f"ComputeLoss: no objectness balance defined for {self.nl} output levels")
        self.balance = LEVEL_BALANCE[self.nl]

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = preds[0].device
        # float32 whatever the autocast context: BCE and CIoU lose too much in half precision.
        with torch.autocast(device_type=device.type, enabled=False):
            preds = [p.float() for p in preds]
            targets = targets.to(device=device, dtype=torch.float32)
            tcls, tbox, indices, anchors = self.build_targets(preds, targets)
            lbox = torch.zeros((), device=device)
            lobj = torch.zeros((), device=device)
            lcls = torch.zeros((), device=device)
            for i, pi in enumerate(preds):
                b, a, gj, gi = indices[i]
                tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
                n = b.shape[0]
                if n:
                    pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                    pxy = pxy.sigmoid() * 2 - 0.5
                    pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                    iou = box_ciou(torch.cat((pxy, pwh), 1), tbox[i])
                    lbox = lbox + (1.0 - iou).mean()
                    # Objectness target is the (detached, non-negative) CIoU of the matched prediction.
                    tobj[b, a, gj, gi] = iou.detach().clamp(0)
                    if self.nc > 1:
                        t = torch.full_like(pcls, self.cn)
                        t[torch.arange(n, device=device), tcls[i]] = self.cp
                        lcls = lcls + self.bce_cls(pcls, t)
                lobj = lobj + self.bce_obj(pi[..., 4], tobj) * self.balance[i]
            lbox = lbox * self.hyp["box"]
            lobj = lobj * self.hyp["obj"]
            lcls = lcls * self.hyp["cls"]
            bs = preds[0].shape[0]
            return (lbox + lobj + lcls) * bs, torch.stack((lbox, lobj, lcls)).detach()

    @torch.no_grad()
    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor):
        """Assign each target to anchors and cells on every level.

        A target matches an anchor when max(w/aw, aw/w, h/ah, ah/h) < anchor_t. Each match is placed in the
        target's own cell and in the one or two neighbouring cells (left/right, up/down) whose border the
        centre is within 0.5 cell of, so positives are up to 3x more numerous than cells with centres.

        Returns per level: classes (m,), boxes (m, 4) as [x, y offset from the cell corner, w, h] in grid
        units, indices (image, anchor, gy, gx), and matched anchors (m, 2) in grid units.
        """
        device = targets.device
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        anchors_all = self.detect.anchors.to(device=device, dtype=torch.float32)
        # (na, nt, 7): every target repeated once per anchor, with the anchor index appended.
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)
        g = NEIGHBOUR_OFFSET
        offsets_all = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * g
        gain = torch.ones(7, device=device)
        for i in range(self.nl):
            anchors, shape = anchors_all[i], preds[i].shape  # shape (bs, na, ny, nx, no)
            gain[2:6] = torch.tensor(shape, device=device, dtype=torch.float32)[[3, 2, 3, 2]]
            t = targets * gain  # xywh in grid units of this level
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                match = torch.max(r, 1 / r).max(2)[0] < self.hyp["anchor_t"]
                t = t[match]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy  # distances from the right/bottom border
                left, up = ((gxy % 1 < g) & (gxy > 1)).T
                right, down = ((gxi % 1 < g) & (gxi > 1)).T
                use = torch.stack((torch.ones_like(left), left, up, right, down))
                t = t.repeat((5, 1, 1))[use]
                offsets = (torch.zeros_like(gxy)[None] + offsets_all[:, None])[use]
            else:
                t = targets[0]
                offsets = torch.zeros((0, 2), device=device)
            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            # A centre exactly on the far border (cx == 1) belongs to the last cell.
            gi = gij[:, 0].clamp(0, shape[3] - 1)
            gj = gij[:, 1].clamp(0, shape[2] - 1)
            gij = torch.stack((gi, gj), 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch


def box_ciou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """Elementwise complete IoU of matching rows of two (n, 4) xywh box sets (torchvision's CIoU)."""
    b1 = box_convert(box1, "cxcywh", "xyxy")
    b2 = box_convert(box2, "cxcywh", "xyxy")
    return 1.0 - complete_box_iou_loss(b1, b2, reduction="none", eps=1e-7)
