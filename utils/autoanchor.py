"""Anchor fit: best-possible recall of a model's anchors on a dataset, and k-means + evolution when poor."""
from __future__ import annotations

import torch


@torch.no_grad()
def check_anchor_order(m) -> bool:
    """Make anchor size order follow stride order (small anchors on the fine level); flip levels if not.

    `m` is a Detect module (anchors (nl, na, 2), stride (nl,)). Returns True when the levels were flipped.
    """
    area = m.anchors.prod(-1).mean(-1).view(-1)
    d_area = area[-1] - area[0]
    d_stride = m.stride[-1] - m.stride[0]
    if d_area and torch.sign(d_area).item() != torch.sign(d_stride).item():
        m.anchors[:] = m.anchors.flip(0)
        return True
    return False
