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


def _chw(array: np.ndarray) -> np.ndarray:
    """The array channels first; HWC is recognised by a last axis of 1, 3 or 4."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        return array.transpose(2, 0, 1)
    if array.ndim != 3:
        raise ValueError(f"Images must be 2-D (H, W) or 3-D arrays, got shape {array.shape}.")
    return array


def _fallback_tensor(array: np.ndarray) -> torch.Tensor:
    """[C, H, W] float in [0, 1] (integer pixels / 255)."""
    chw = _chw(array)  # a read-only array (a PIL image's buffer) is copied: torch keeps no tensor over read-only memory
    tensor = torch.from_numpy(np.ascontiguousarray(chw) if chw.flags.writeable else chw.copy())
    return tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()


def _fallback_shape(image) -> tuple[int, ...]:
    """The [C, H, W] shape `_fallback_tensor` gives an image (ValueError for one it cannot take)."""
    array = np.asarray(_as_image(image))
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or 0 in array.shape:
        raise ValueError(f"not a non-empty numeric image ({array.dtype}, shape {array.shape})")
    return tuple(_chw(array).shape)


def check_images(ds, column: str, processor, where: str) -> None:
    """Images the run can batch, checked before anything is trained: with no processor every image must give the
    same [C, H, W] tensor (the collator stacks them); with one, the processor must take the first rows."""
    from ..config.checks import invalid

    if column not in ds.column_names:
        raise invalid("image_column", column, f"not a column of {where}; use one of {ds.column_names}.")
    rows = ds.select_columns([column])
    if processor is not None:
        try:
            processor(images=[_as_image(x) for x in rows[: min(len(rows), 2)][column]], return_tensors="pt")
        except Exception as err:  # noqa: BLE001 - whatever the processor refuses is the data's problem
            raise invalid("image_column", column, f"the image processor cannot take the images of {where}: "
                          f"{type(err).__name__}: {str(err)[:120]}") from None  # fmt: skip
        return
    first = None
    for i in range(len(rows)):
        try:
            shape = _fallback_shape(rows[i][column])  # decoded row by row: a path that is no image fails here
        except (ValueError, TypeError, AttributeError, OSError) as err:
            raise invalid("image_column", column, f"row {i} of {where} is not an image ({err})") from None
        if first is not None and shape != first:
            fix = (
                f"row {i} of {where} gives a {list(shape)} image, row 0 a {list(first)} one: with no image "
                "processor every image needs the same mode and size (resize them, or use a model with one)."
            )
            raise invalid("image_column", column, fix)
        first = shape


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


FIXED_SIZE_MODELS = ("vit", "deit", "vit_msn", "vit_mae")  # position embeddings of one image size (no interpolation)


def check_image_fit(tasks, processor, config, column: str) -> None:
    """With no image processor the images reach the model as they are: their channels must be the model config's
    `num_channels`, and for a model of one fixed image size their height and width its `image_size` (checked on the
    first row of each split: `check_images` made every row of a split alike)."""
    from ..config.checks import invalid

    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if size else None
    if getattr(config, "model_type", None) not in FIXED_SIZE_MODELS:
        size = None
    if processor is not None or (channels is None and size is None):
        return
    for t, task in enumerate(tasks):
        for name, ds in (("train", task.train), ("eval", task.eval)):
            if ds is None or not hasattr(ds, "__len__") or len(ds) == 0 or "pixel_values" not in ds.column_names:
                continue
            c, *hw = ds[0]["pixel_values"].shape
            what = f"task {t}'s {name} images are [{c}, {', '.join(map(str, hw))}]"
            if channels is not None and c != channels:
                fix = f"{what}; the model takes {channels} channels: convert them (to RGB or L), or give a processor."
                raise invalid("image_column", column, fix)
            if size is not None and tuple(hw) != size:
                fix = f"{what}; the model takes {list(size)} pixels: resize them, or give an image processor."
                raise invalid("image_column", column, fix)
