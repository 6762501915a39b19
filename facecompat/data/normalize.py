"""The one input normalisation: uint8 RGB pixels → float32 ``(x - 127.5) * float32(1 / 127.5)`` in [-1, 1].

Every path that feeds a backbone uses it: the training loaders (:mod:`facecompat.data.loader`, in
the DataLoader workers for a CPU target, on the device otherwise; the DALI engine when DALI leaves
uint8), the embedding engine (:func:`facecompat.features.embed_batches`: verification, IJB
extraction) and the old-feature bank's extraction. The models were trained with it.

It is a multiplication by the float32 reciprocal, which is also what ``cv2.dnn.blobFromImage``
computes (:func:`facecompat.data.faces.to_tensor`, the per-image dataset path: the same bits). A
true division ``(x - 127.5) / 127.5`` differs from it by one ulp on about half the uint8 values on
the CPU; on CUDA a division by a scalar already runs as a multiplication by its reciprocal.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

PIXEL_MEAN = 127.5
PIXEL_SCALE = np.float32(1.0 / 127.5)  # the float32 reciprocal every path multiplies by

# The normalised value of every uint8 v; cv2.LUT applies it to a batch in one pass.
_LUT = (np.arange(256, dtype=np.float32) - np.float32(PIXEL_MEAN)) * PIXEL_SCALE


def normalize_array(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[B, ...]`` array → float32 of the same shape, normalised (one ``cv2.LUT`` pass).

    Args:
        images: uint8, any shape with a leading batch dimension.
        out: a C-contiguous float32 array of the same shape to write into (e.g. a pooled batch).

    Returns:
        ``out`` when given, else a new array.
    """
    rows = len(images)
    if out is None:
        return cv2.LUT(images.reshape(rows, -1), _LUT).reshape(images.shape)
    cv2.LUT(images.reshape(rows, -1), _LUT, dst=out.reshape(rows, -1))
    return out


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` → float32 ``[B, C, H, W]`` in [-1, 1], on the images' device and in their
    memory format (float32 input is returned as it is: already normalised by the loader's workers)."""
    if images.dtype == torch.float32:
        return images
    if images.device.type != "cpu":
        # .to(dtype) preserves the memory format and the in-place ops keep it
        return images.to(torch.float32).sub_(PIXEL_MEAN).mul_(float(PIXEL_SCALE))
    nhwc = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    src = (images.permute(0, 2, 3, 1) if nhwc else images.contiguous()).numpy()
    out = torch.from_numpy(normalize_array(src))
    return out.permute(0, 3, 1, 2) if nhwc else out
