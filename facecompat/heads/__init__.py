"""Classification heads: the combined margin and the sharded, sampled Partial FC softmax."""

from __future__ import annotations

from facecompat.config import HeadConfig
from facecompat.heads.margins import MARGIN_PRESETS, CombinedMargin, get_margins
from facecompat.heads.partial_fc import (
    LabelError,
    PartialFC,
    head_memory_bytes,
    init_centres,
    shard_range,
)

__all__ = [
    "MARGIN_PRESETS",
    "CombinedMargin",
    "LabelError",
    "PartialFC",
    "build_head",
    "get_margins",
    "head_memory_bytes",
    "init_centres",
    "shard_range",
]


def build_head(
    cfg_head: HeadConfig,
    num_classes: int,
    embedding_size: int,
    group: object | None = None,
    seed: int = 0,
    **kwargs: object,
) -> PartialFC:
    """The Partial FC head a ``head:`` config section describes (extra keyword arguments go to it)."""
    return PartialFC(embedding_size, num_classes, sample_rate=cfg_head.sample_rate,
                     margins=tuple(cfg_head.margins), scale=cfg_head.scale, group=group, seed=seed, **kwargs)
