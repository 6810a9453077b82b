"""Building blocks of the YOLOv5 v6+ networks: Conv, Bottleneck, C3, SPPF, Concat.

Attribute names (conv, bn, act, cv1, cv2, cv3, m) follow YOLOv5 so that its state dicts load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import fuse_conv_bn_eval, fuse_conv_bn_weights

# YOLOv5 trains with these BatchNorm settings rather than torch's defaults (eps 1e-5, momentum 0.1).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Padding that keeps the spatial size for stride 1 ('same' padding) when none is given."""
    if p is not None:
        return p
    k = d * (k - 1) + 1
    return k // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU. After fuse(), the BatchNorm is folded into the conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act is True:
            self.act = nn.SiLU(inplace=True)
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @property
    def fused(self) -> bool:
        return isinstance(self.bn, nn.Identity)

    @torch.no_grad()
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the conv with this layer's BatchNorm folded in, as fuse() would make them (the
        same function, so the same values), without changing this layer."""
        return fuse_conv_bn_weights(self.conv.weight, self.conv.bias, self.bn.running_mean, self.bn.running_var,
                                    self.bn.eps, self.bn.weight, self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm's running statistics and affine parameters into the conv weight and bias.

        Only valid for inference: the fused layer no longer normalises by batch statistics.
        """
        if self.fused:
            return
        self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """1x1 conv to c2*e channels, 3x3 conv back to c2, plus the input when shapes allow a residual."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: one branch through n Bottlenecks, one straight; concatenated, mixed."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained k x k max-pools stand in for pools of k, 2k-1, 3k-2."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along one dimension (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
