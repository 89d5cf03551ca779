"""CIFAR ResNets of He et al. 2015, section 4.2 (pure PyTorch).

depth = 6n + 2: a 3x3 stem conv with 16 channels, three stages of n basic blocks with 16/32/64 channels
(stride 2 at the start of stages 2 and 3), global average pooling and a linear head.

Module names follow the most used PyTorch reproduction (github.com/akamaster/pytorch_resnet_cifar10):
`conv1`, `bn1`, `layer1.0.conv1`, ..., `linear`, so its published state dicts load 1:1.

Shortcuts where the shape changes (the paper's options):
  "A"  identity with stride-2 subsampling and zero-padded channels: no parameters (the paper's CIFAR nets)
  "B"  1x1 projection conv + BN, only where the shape changes
  None no shortcut at all: the "plain" nets of the degradation study (Figure 6, left)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_resnet.constants import parse_model_name

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and pad the new channels with zeros, half before and half after."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = shortcut is not None
        self.shortcut: nn.Module = nn.Sequential()  # identity; an empty Sequential keeps the reference key layout
        if self.residual and (stride != 1 or in_planes != planes):
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, shortcut: str | None = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {depth}")
        if shortcut not in ("A", "B", None):
            raise ValueError(f"shortcut must be 'A', 'B' or None; got {shortcut!r}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        for stage, planes in enumerate(STAGE_WIDTHS, start=1):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        for m in self.modules():  # He et al. 2015 ("Delving deep into rectifiers") init, as in the paper
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_model(name: str, num_classes: int = 10) -> CifarResNet:
    depth, shortcut = parse_model_name(name)
    return CifarResNet(depth, num_classes=num_classes, shortcut=shortcut)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
