"""MobileFaceNet ("mbf") laid out as insightface's arcface_torch.

Parameter names and shapes follow ``recognition/arcface_torch/backbones/mobilefacenet.py`` with
its defaults (``blocks=(1, 4, 6, 2)``, ``scale=2``, the ``get_mbf`` used for ``"mbf"``), so an
insightface ``model.pt`` loads with ``strict=True``. Layout (input 112x112; c = channels):

    layers.0  ConvBlock 3x3/2, 3 -> 128                                      56x56
    layers.1  ConvBlock 3x3/1, 128 -> 128, groups 64 (2 channels per group)
    layers.2  DepthWise /2, 128 -> 128 (expansion 128)                        28x28
    layers.3  Residual x4, 128 (expansion 128)
    layers.4  DepthWise /2, 128 -> 256 (expansion 256)                        14x14
    layers.5  Residual x6, 256 (expansion 256)
    layers.6  DepthWise /2, 256 -> 256 (expansion 512)                        7x7
    layers.7  Residual x2, 256 (expansion 256)
    conv_sep  ConvBlock 1x1, 256 -> 512
    features  GDC: depthwise 7x7 conv + BN, flatten, Linear(512, D, no bias), BatchNorm1d(D)

ConvBlock = conv (no bias) + BN + PReLU (``.layers.{0,1,2}``); LinearBlock = conv + BN;
DepthWise = ConvBlock 1x1 (expand) - ConvBlock 3x3 depthwise - LinearBlock 1x1 (project), with
an identity shortcut inside ``Residual``. All BatchNorm eps 1e-5. Mixed precision as insightface's:
under an autocast the caller opens, ``layers`` run in bf16/fp16 and ``conv_sep`` + ``features`` (the
GDC head) run in float32 with autocast off, so the embedding is float32. Unlike insightface,
``dropout`` (before the final Linear) is supported, and the model opens no autocast itself.
"""

from __future__ import annotations

import torch
from torch import nn

from facecompat.models._registry import register_model, run_block, run_fp32, scale_channels

Kernel = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv2d (no bias) + BatchNorm2d (+ PReLU), kept in ``self.layers`` as insightface names them."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Kernel = (1, 1), stride: Kernel = (1, 1),
                 padding: Kernel = (0, 0), groups: int = 1, activation: bool = True):
        super().__init__()
        layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_ch)]
        if activation:
            layers.append(nn.PReLU(out_ch))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(ConvBlock):
    """Conv2d (no bias) + BatchNorm2d, no activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Kernel = (1, 1), stride: Kernel = (1, 1),
                 padding: Kernel = (0, 0), groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride, padding, groups, activation=False)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``mid_ch``, 3x3 depthwise (``stride``), 1x1 project.

    ``residual`` adds the input (only when shapes agree: stride 1 and ``in_ch == out_ch``).
    """

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int, stride: int = 2, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, mid_ch),
            ConvBlock(mid_ch, mid_ch, kernel=(3, 3), stride=(stride, stride), padding=(1, 1), groups=mid_ch),
            LinearBlock(mid_ch, out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` stride-1 residual DepthWise blocks at ``channels`` (``self.layers``)."""

    def __init__(self, channels: int, num_blocks: int, mid_ch: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, mid_ch, stride=1, residual=True)
                                      for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise LinearBlock, flatten, Linear (no bias), BatchNorm1d.

    ``layers`` indices (0 conv block, 1 flatten, 2 linear, 3 norm) are insightface's; dropout, when
    asked for, is applied between flatten and the linear layer without a module of its own.
    """

    def __init__(self, channels: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=(7, 7), groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, flatten, linear, norm = self.layers
        x = nn.functional.dropout(flatten(conv(x)), self.dropout, self.training)
        return norm(linear(x))


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``forward(x [B, 3, 112, 112]) -> [B, embedding_size]`` (not normalised).

    Args:
        embedding_size: D.
        blocks: residual blocks in the four groups (insightface's ``blocks``; the first group is a
            single grouped ConvBlock when it is 1).
        width: channel multiplier (1.0 = insightface's ``scale=2`` shapes).
        dropout: dropout probability before the final Linear.
        grad_checkpoint: activation checkpointing of every residual block in training mode.
    """

    def __init__(self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 width: float = 1.0, dropout: float = 0.0, grad_checkpoint: bool = False):
        super().__init__()
        self.embedding_size = embedding_size
        self.grad_checkpoint = grad_checkpoint
        c1, c2, c3, c4 = (scale_channels(c, width) for c in (128, 256, 512, 512))
        # insightface's hard-coded expansion widths for scale 2: 128, 256, 512 (the stride-2 block
        # into the last group) and 256; c4 is conv_sep's output and the GDC width.
        first = (ConvBlock(c1, c1, kernel=(3, 3), padding=(1, 1), groups=c1 // 2) if blocks[0] == 1
                 else Residual(c1, blocks[0], mid_ch=c1))
        self.layers = nn.Sequential(
            ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
            first,
            DepthWise(c1, c1, mid_ch=c1),
            Residual(c1, blocks[1], mid_ch=c1),
            DepthWise(c1, c2, mid_ch=c2),
            Residual(c2, blocks[2], mid_ch=c2),
            DepthWise(c2, c2, mid_ch=c3),
            Residual(c2, blocks[3], mid_ch=c2),
        )
        self.conv_sep = ConvBlock(c2, c4)
        self.features = GDC(c4, embedding_size, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface: conv and linear weights Kaiming-normal (fan_out, relu gain), BatchNorm2d
        # weight 1 / bias 0; PReLU and the final BatchNorm1d keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 112, 112] float -> embeddings [B, embedding_size] float32, not normalised.

        Under autocast ``layers`` run in the autocast dtype; ``conv_sep`` and ``features`` run in
        float32 (:func:`run_fp32`), as insightface's ``self.conv_sep(x.float())`` outside autocast.
        """
        for group in self.layers:
            if isinstance(group, Residual):
                for block in group.layers:
                    x = run_block(block, x, self.grad_checkpoint)
            else:
                x = group(x)
        return run_fp32(self._embed, x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding head: ``features(conv_sep(x))``, [B, C, 7, 7] -> [B, embedding_size]."""
        return self.features(self.conv_sep(x))


@register_model
def mbf(embedding_size: int = 512, width: float = 1.0, dropout: float = 0.0,
        grad_checkpoint: bool = False) -> MobileFaceNet:
    """MobileFaceNet as insightface's ``get_mbf`` (blocks (1, 4, 6, 2), scale 2)."""
    return MobileFaceNet(embedding_size, blocks=(1, 4, 6, 2), width=width, dropout=dropout,
                         grad_checkpoint=grad_checkpoint)
