"""Backbone registry, construction by name, and weight loading.

Machinery shared by the backbone modules: ``register_model`` / ``list_models`` / ``get_model``
(timm's pattern), the width-variant name syntax ``<base>-w<float>``, channel scaling,
activation checkpointing that leaves BatchNorm running statistics untouched on recompute, the
float32 embedding head under autocast, and ``load_backbone_weights`` for insightface ``model.pt``
files and our own checkpoints.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from facecompat.errors import UserError

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}
# "r18-w0.25", "mbf-w.5", "r50-w2"; the base is checked against the registry afterwards.
_WIDTH_NAME = re.compile(r"^(?P<base>[A-Za-z0-9_]+)-w(?P<width>\d+(?:\.\d*)?|\.\d+)$")
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


class ModelNameError(UserError, ValueError):
    """A backbone name (or its options) that no registered model has; one line with the valid names."""


class WeightsError(UserError, ValueError):
    """Backbone weights that cannot be read or do not fit the model (message names the file)."""


def register_model(fn: ModelFn) -> ModelFn:
    """Register a backbone builder under its function name.

    The builder takes ``embedding_size``, ``width``, ``dropout`` and ``grad_checkpoint`` keywords
    (plus options of its own) and returns an ``nn.Module`` with an ``embedding_size`` attribute.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"backbone {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered base names, in registration order (width variants ``<name>-w<float>`` not listed)."""
    return list(_MODELS)


def parse_model_name(name: str) -> tuple[str, float]:
    """Split ``"r18-w0.25"`` into ``("r18", 0.25)``; a plain name has width 1.0.

    Raises:
        ValueError: unknown base name (the message lists the valid ones) or a width <= 0.
    """
    match = _WIDTH_NAME.match(name)
    base, width = (match["base"], float(match["width"])) if match else (name, 1.0)
    if base not in _MODELS:
        raise ModelNameError(f"unknown backbone {name!r}; valid names: {', '.join(list_models())} "
                         "(or <name>-w<float> for a width variant, e.g. r18-w0.25)")
    if not width > 0:
        raise ModelNameError(f"backbone {name!r}: width multiplier must be > 0, got {width}")
    return base, width


def get_model(name: str, embedding_size: int = 512, *, dropout: float = 0.0, channels_last: bool = False,
              grad_checkpoint: bool = False, **kw: Any) -> nn.Module:
    """Build a backbone by registry name.

    Args:
        name: ``r18 r34 r50 r100 r200 mbf`` or a width variant ``<name>-w<float>`` (every channel
            count times the multiplier, rounded to a multiple of 8, at least 8; the embedding
            size does not change). At width 1 parameter names and shapes equal insightface's
            arcface_torch backbones, so their ``model.pt`` loads with ``strict=True``.
        embedding_size: D, the length of the output embedding.
        dropout: dropout probability before the final linear layer (training mode only).
        channels_last: return the model converted to ``torch.channels_last`` memory format.
        grad_checkpoint: recompute each residual block's activations in backward (training mode
            only); outputs, gradients and BatchNorm running statistics are unchanged.
        **kw: options particular to one backbone, e.g. ``zero_init_residual`` for iresnets.

    Returns:
        ``nn.Module`` mapping ``x [B, 3, 112, 112]`` float to unnormalised embeddings ``[B, D]``,
        with attribute ``embedding_size``.

    Raises:
        ValueError: unknown name (lists the valid ones), bad width, or an option the backbone lacks.
    """
    base, width = parse_model_name(name)
    builder = _MODELS[base]
    common = ("embedding_size", "width", "dropout", "grad_checkpoint")  # passed below; width by name
    options = [k for k in inspect.signature(builder).parameters if k not in common]
    unknown = [k for k in kw if k not in options]
    if unknown:
        raise ModelNameError(f"backbone {base!r} has no option {unknown[0]!r} "
                         f"(its own options: {', '.join(options) or 'none'}; a width goes in the name, "
                         "e.g. r18-w0.5)")
    if embedding_size <= 0:
        raise ValueError(f"embedding_size must be > 0, got {embedding_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    model = builder(embedding_size=embedding_size, width=width, dropout=dropout,
                    grad_checkpoint=grad_checkpoint, **kw)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``), as timm's
    ``make_divisible``: never more than 10% below the exact product. Width 1 returns ``channels``."""
    if width == 1.0:
        return channels
    exact = channels * width
    scaled = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if scaled < 0.9 * exact:
        scaled += divisor
    return scaled


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable and frozen (e.g. an iresnet's fixed ``features.weight``)."""
    return sum(p.numel() for p in model.parameters())


# --- activation checkpointing -------------------------------------------------------------------


@contextmanager
def _keep_running_stats(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of ``module`` after the block runs again.

    The recompute in backward calls forward a second time in training mode; without this every
    BatchNorm inside a checkpointed block would apply its momentum update twice per step.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``block(x)``, under activation checkpointing when asked and autograd is recording."""
    if not (use_checkpoint and block.training and torch.is_grad_enabled()):
        return block(x)
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _keep_running_stats(block)))


# --- mixed precision ----------------------------------------------------------------------------


def run_fp32(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``head(x)``, but under an autocast on ``x``'s device ``head(x.float())`` with autocast off.

    insightface's arcface_torch runs only the trunk under autocast and the layers after it (iresnet's
    ``fc`` + ``features``, MobileFaceNet's ``conv_sep`` + GDC) in float32, so the embedding (and the
    margin head that reads it) is never rounded to bf16/fp16 and those layers' gradients come from a
    float32 product. Without autocast nothing changes (no cast in a traced or exported graph).
    """
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return head(x)
    with torch.autocast(device_type=device_type, enabled=False):
        return head(x.float())


# --- weights ------------------------------------------------------------------------------------


def _load_failure(error: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed, without torch's advice to
    unpickle untrusted code."""
    raw = str(error)
    text = " ".join(raw.split())
    if "WeightsUnpickler error:" in raw:
        paragraph = raw.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
        detail = " ".join(paragraph.split()).split(". ")[0]
        if detail.startswith("Unsupported global"):
            return (f"holds Python objects, not only tensors ({detail}); "
                    "save the model's state_dict() instead of the module")
        return f"not a PyTorch weights file ({detail})"
    first = text.split(". ")[0] or type(error).__name__
    return f"not a readable PyTorch weights file ({first})"


def _read_state(path_or_state: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The state dict held by a path or mapping, and a name for it in messages."""
    if isinstance(path_or_state, Mapping):
        source, obj = "<state dict>", path_or_state
    else:
        source = str(path_or_state)
        if not Path(source).is_file():
            raise WeightsError(f"{source}: no such file")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # zip/pickle errors, weights_only refusals, truncated files
            raise WeightsError(f"{source}: {_load_failure(e)}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("backbone"), Mapping):
        obj = obj["backbone"]  # our training checkpoint
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: expected a state dict (name -> tensor) or a checkpoint with a "
                           f"'backbone' entry, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{source}: not a state dict: entry {bad[0]!r} is a "
                           f"{type(obj[bad[0]]).__name__}, not a tensor")
    return dict(obj), source


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# The embedding BatchNorm1d of each backbone family (its weight is [D]): iresnet's ``features``,
# MobileFaceNet's GDC ``features.layers.3``. A new family with another name adds it here.
EMBEDDING_KEYS = ("features.weight", "features.layers.3.weight")


def embedding_size_of(path_or_state: str | os.PathLike | Mapping[str, Any]) -> int | None:
    """The embedding size D that weights were trained with, read from their embedding layer.

    Returns:
        D, or ``None`` when no key of :data:`EMBEDDING_KEYS` is a 1-D tensor in them.

    Raises:
        WeightsError: an unreadable file or not a state dict (names the file).
    """
    state = strip_prefixes(_read_state(path_or_state)[0])
    for key in EMBEDDING_KEYS:
        if key in state and state[key].dim() == 1:
            return int(state[key].shape[0])
    return None


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any],
                          strict: bool = True) -> None:
    """Load backbone weights into ``model`` in place.

    Args:
        model: the backbone (built by ``get_model``; not wrapped in DDP).
        path_or_state: an insightface ``model.pt`` (a plain state dict), our checkpoint file holding
            a ``"backbone"`` state dict, or such a mapping itself. Leading ``module.`` and
            ``_orig_mod.`` prefixes are removed. Files load with ``weights_only=True``.
        strict: every model key must be in the weights and vice versa. BatchNorm
            ``num_batches_tracked`` counters may be absent (very old files), as PyTorch allows.
            Shapes must match in either mode.

    Raises:
        WeightsError: unreadable file, not a state dict, missing/unexpected keys or a shape mismatch;
            one line naming the file and the first offending keys.
    """
    state, source = _read_state(path_or_state)
    state = strip_prefixes(state)
    expected = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        if missing:
            problems.append(f"missing keys {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_first(unexpected)}")
    mismatched = [f"{k} {list(v.shape)} in file vs {list(expected[k].shape)} in model"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        problems.append(f"shape mismatch {_first(mismatched, 2)}")
    if problems:
        size = getattr(model, "embedding_size", "?")
        raise WeightsError(f"{source}: weights do not fit {type(model).__name__} (embedding_size {size}): "
                           + "; ".join(problems) + " - a different network, width or embedding size?")
    model.load_state_dict(state, strict=strict)
