"""From crops and MFCC windows as the front-end keeps them to the arrays a model tower takes.

The front-end keeps crops as uint8 (RGB face crops ``(224, 224, 3)``, grey 112×112 face crops)
and MFCC windows as ``(13, steps)`` float32; each model wants its own layout, range and
channel order (see :data:`~engine.models.spec.SYNCNET_V2` and
:data:`~engine.models.spec.SYNCNET_LITE`).
These functions do that conversion for a whole batch at once. Batchers queue the uint8 windows
(views into a track's crops: no copy per window) and call these on their worker thread, so the
float conversion — 3 MB per SyncNet v2 window — never runs on the event loop and never sits in a
queue. Pure numpy, thread-safe.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from engine.core.errors import UsageError
from engine.models.spec import ModelSpec

CropKind = Literal["face", "face112"]
"""Which crop of a track a model's video tower looks at."""

_CROPS: dict[str, CropKind] = {"syncnet_v2": "face", "syncnet_lite": "face112"}


def crop_kind(spec: ModelSpec) -> CropKind:
    """The crop the model's video tower takes: ``"face"`` (224×224 RGB) or ``"face112"`` (grey).

    Raises:
        UsageError: a model talkscope does not know how to feed.
    """
    kind = _CROPS.get(spec.name)
    if kind is None:
        raise UsageError(f"no crop is defined for model {spec.name!r}")
    return kind


def video_input(spec: ModelSpec, windows: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Stacked crop windows as the model's video tower takes them.

    Args:
        spec: the model.
        windows: ``(batch, 5, 224, 224, 3)`` RGB face crops for ``syncnet_v2``, or
            ``(batch, 64, 112, 112)`` grey face chunks for ``syncnet_lite``; uint8, oldest frame
            first.

    Returns:
        ``syncnet_v2``: ``(batch, 3, 5, 224, 224)`` BGR, values 0..255 (as syncnet_python feeds
        ``cv2`` images); ``syncnet_lite``: ``(batch, 64, 112, 112)`` values 0..1. float32,
        C-contiguous.

    Raises:
        UsageError: an unknown model.
        ValueError: ``windows`` does not have the model's shape.
    """
    kind = crop_kind(spec)
    expected = crop_window_shape(spec)
    if windows.shape[1:] != expected:
        raise ValueError(
            f"{spec.name} video windows must be (batch, {', '.join(map(str, expected))}), "
            f"got {windows.shape}"
        )
    if kind == "face":
        # RGB -> BGR, then (batch, frames, h, w, channels) -> (batch, channels, frames, h, w)
        bgr = windows[..., ::-1].transpose(0, 4, 1, 2, 3)
        return np.ascontiguousarray(bgr, dtype=np.float32)
    scaled: npt.NDArray[np.float32] = windows.astype(np.float32)
    scaled *= np.float32(1.0 / 255.0)
    return scaled


def audio_input(spec: ModelSpec, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Stacked MFCC windows as the model's audio tower takes them.

    Args:
        spec: the model (its MFCC preset must be the one the windows were computed with).
        windows: ``(batch, 13, steps)`` MFCC windows, cepstra × steps (20 for SyncNet v2, 256
            for a SyncNet-lite chunk), float32.

    Returns:
        ``(batch, 1, 13, steps)`` float32, C-contiguous.

    Raises:
        ValueError: ``windows`` does not have the model's shape.
    """
    expected = spec.audio.input.shape[1:]
    if windows.shape[1:] != expected:
        raise ValueError(
            f"{spec.name} MFCC windows must be (batch, {', '.join(map(str, expected))}), "
            f"got {windows.shape}"
        )
    return np.ascontiguousarray(windows[:, None], dtype=np.float32)


def crop_window_shape(spec: ModelSpec) -> tuple[int, ...]:
    """The shape of one uint8 crop window as the front-end keeps it (the batcher queues these).

    ``(5, 224, 224, 3)`` for ``syncnet_v2``, ``(64, 112, 112)`` for ``syncnet_lite``.

    Raises:
        UsageError: an unknown model.
    """
    if crop_kind(spec) == "face":
        channels, frames, height, width = spec.video.input.shape
        return (frames, height, width, channels)
    return spec.video.input.shape
