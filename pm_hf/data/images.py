"""Image preprocessing of the task streams: any image-like value (PIL image, nested lists, arrays) to what the image
processor takes, or to a [C, H, W] float tensor in [0, 1] when the model has no processor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _as_image(image):
    """PIL images in mode L or RGB; anything else as an array with a channel axis (H, W, 1), integers as uint8."""
    mode = getattr(image, "mode", None)
    if mode is not None:
        return image if mode in ("L", "RGB") else image.convert("L" if mode == "1" else "RGB")
    array = np.asarray(image)
    array = array[..., None] if array.ndim == 2 else array  # image processors want 3-D arrays
    return array.astype(np.uint8) if np.issubdtype(array.dtype, np.integer) else array


def _fallback_tensor(array: np.ndarray) -> torch.Tensor:
    """[C, H, W] float in [0, 1] (integer pixels / 255); HWC is recognised by a last axis of 1, 3 or 4."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    elif array.ndim != 3:
        raise ValueError(f"Images must be 2-D (H, W) or 3-D arrays, got shape {array.shape}.")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


def image_transform(processor, offset: int) -> Callable[[dict], dict]:
    """A lazy `with_transform` for image datasets: `pixel_values` through the image processor (or the built-in [0, 1]
    float tensor when there is none) and `labels` shifted by `offset` to global class ids."""

    def transform(batch: dict) -> dict:
        out = {}
        if "pixel_values" in batch:  # also called with only "labels" (column access)
            images = [_as_image(x) for x in batch["pixel_values"]]
            if processor is None:
                out["pixel_values"] = [_fallback_tensor(np.asarray(x)) for x in images]
            else:
                out["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
        if "labels" in batch:
            out["labels"] = torch.as_tensor(np.asarray(batch["labels"], dtype=np.int64) + offset)
        return out

    return transform
