"""Improved ResNets (IResNet, "r18" ... "r200") laid out as insightface's arcface_torch.

Parameter names, shapes, BatchNorm eps (1e-5) and initialisation follow
``recognition/arcface_torch/backbones/iresnet.py``, so an insightface ``model.pt`` loads with
``strict=True`` and gives the same embeddings. Layout (input 112x112):

    conv1 3x3/1 (64) - bn1 - prelu                                           112x112
    layer1..4: blocks of IBasicBlock, first block of each stage stride 2     56, 28, 14, 7
    bn2 - flatten - dropout - fc (512*7*7 -> D) - features (BatchNorm1d, weight fixed at 1)

IBasicBlock (pre-activation style): bn1 - conv1 3x3/1 - bn2 - prelu - conv2 3x3/s - bn3, plus the
identity or ``downsample`` (conv1x1/s + BN) when the stride or width changes. Mixed precision as
insightface's: under an autocast the caller opens (the trainer, extraction) the trunk runs in
bf16/fp16 and ``fc`` + ``features`` run in float32 with autocast off, so the embedding is float32.
Unlike insightface, the model opens no autocast itself (AMP is the caller's choice) and
checkpointing is per model, not a module-level switch.
"""

from __future__ import annotations

import torch
from torch import nn

from facecompat.models._registry import register_model, run_block, run_fp32, scale_channels

BN_EPS = 1e-5
STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
FEATURE_MAP = 7  # 112 / 2**4: the spatial size fc sees


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Residual block ``x + bn3(conv2(prelu(bn2(conv1(bn1(x))))))``; the stride is on conv2.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of conv2 and of the shortcut projection.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        # Registration order = insightface's state_dict order.
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_ch, H, W] -> [B, out_ch, H/stride, W/stride]."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone: ``forward(x [B, 3, 112, 112]) -> [B, embedding_size]`` (not normalised).

    Args:
        depths: blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        embedding_size: D.
        width: channel multiplier (1.0 = insightface's shapes).
        dropout: dropout probability before ``fc``.
        zero_init_residual: as insightface, set every block's ``bn2.weight`` to 0 (their choice of
            bn2, not bn3; it still makes each residual branch start near zero).
        grad_checkpoint: activation checkpointing of every residual block in training mode.
    """

    def __init__(self, depths: tuple[int, int, int, int], embedding_size: int = 512, width: float = 1.0,
                 dropout: float = 0.0, zero_init_residual: bool = False, grad_checkpoint: bool = False):
        super().__init__()
        self.embedding_size = embedding_size
        self.grad_checkpoint = grad_checkpoint
        widths = [scale_channels(c, width) for c in STAGE_WIDTHS]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        in_ch = widths[0]
        for i, (depth, out_ch) in enumerate(zip(depths, widths), start=1):
            blocks = [IBasicBlock(in_ch if j == 0 else out_ch, out_ch, stride=2 if j == 0 else 1)
                      for j in range(depth)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * FEATURE_MAP * FEATURE_MAP, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # insightface: conv N(0, 0.1^2); BatchNorm2d weight 1, bias 0; fc keeps PyTorch's default
        # init; the embedding BatchNorm1d is a fixed-scale normaliser (weight 1, not trained).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 112, 112] float -> embeddings [B, embedding_size] float32, not normalised.

        Under autocast everything up to dropout runs in the autocast dtype; ``fc`` and ``features``
        run in float32 (:func:`run_fp32`), as insightface's ``self.fc(x.float())`` outside autocast.
        """
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = run_block(block, x, self.grad_checkpoint)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return run_fp32(self._embed, x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding head: ``features(fc(x))``, [B, C*7*7] -> [B, embedding_size]."""
        return self.features(self.fc(x))


def _variant(name: str) -> None:
    """Register ``name`` (a key of DEPTHS) as a builder of that IResNet."""

    def build(embedding_size: int = 512, width: float = 1.0, dropout: float = 0.0,
              grad_checkpoint: bool = False, zero_init_residual: bool = False) -> IResNet:
        return IResNet(DEPTHS[name], embedding_size=embedding_size, width=width, dropout=dropout,
                       zero_init_residual=zero_init_residual, grad_checkpoint=grad_checkpoint)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"IResNet-{name[1:]}, stages {tuple(DEPTHS[name])}."
    register_model(build)


for _name in DEPTHS:
    _variant(_name)
