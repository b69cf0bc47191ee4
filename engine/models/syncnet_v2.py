"""SyncNet v2: the published lip-sync network of Chung & Zisserman, "Out of time" (ACCV-W 2016).

The layers are those of class ``S`` in joonson/syncnet_python ``SyncNetModel.py``, with the same
module names and ``nn.Sequential`` indices, so the official ``syncnet_v2.model`` state dict
(keys ``netcnnaud.0.weight`` ... ``netfclip.3.bias``) loads as is. Two towers:

- audio: ``netcnnaud`` (Conv2d stack) then ``netfcaud`` on ``(batch, 1, 13, 20)`` MFCC windows;
- video (lips): ``netcnnlip`` (Conv3d stack) then ``netfclip`` on ``(batch, 3, 5, 224, 224)``
  BGR face crops, values 0..255 (syncnet_python feeds ``cv2`` images unnormalised).

Both give ``(batch, 1024)`` raw embeddings; syncnet_python compares them by Euclidean distance.
The one change from ``S``: its ``MaxPool2d(kernel_size=1, stride=1)`` (an identity) is an
``nn.Identity`` here, at the same index, so ONNX graphs carry no no-op pool.

The weights are not part of talkscope: see :mod:`engine.models` for where to get them.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.core.errors import WeightsError
from engine.models.spec import SYNCNET_V2, git_blob_sha1

log = logging.getLogger(__name__)

EMBEDDING_SIZE = 1024

# Prefixes that wrappers add to every key of a saved state dict: ``nn.DataParallel`` and
# syncnet_python's ``SyncNetInstance`` (which holds ``S`` as ``__S__``).
_WRAPPER_PREFIXES = ("module.", "__S__.")


def _conv2d_block(
    c_in: int, c_out: int, kernel: tuple[int, int], padding: tuple[int, int] = (0, 0)
) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=padding),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _conv3d_block(
    c_in: int,
    c_out: int,
    kernel: tuple[int, int, int],
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> list[nn.Module]:
    return [
        nn.Conv3d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    ]


def _head(size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, size),
    )


class SyncNetV2Model(nn.Module):
    """The two towers of SyncNet v2; parameter names match the official state dict.

    Call :meth:`eval` before inference: the heads hold ``BatchNorm1d`` layers, which in training
    mode cannot take a batch of one.

    Args:
        embedding_size: outputs of each tower; the published weights have 1024.
    """

    def __init__(self, embedding_size: int = EMBEDDING_SIZE) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv2d_block(1, 64, (3, 3), (1, 1)),  # 0-2: 13 x 20
            nn.Identity(),  # 3: S has MaxPool2d(kernel_size=1, stride=1), a no-op
            *_conv2d_block(64, 192, (3, 3), (1, 1)),  # 4-6
            nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),  # 7: 11 x 9
            *_conv2d_block(192, 384, (3, 3), (1, 1)),  # 8-10
            *_conv2d_block(384, 256, (3, 3), (1, 1)),  # 11-13
            *_conv2d_block(256, 256, (3, 3), (1, 1)),  # 14-16
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),  # 17: 5 x 4
            *_conv2d_block(256, 512, (5, 4)),  # 18-20: 1 x 1
        )
        self.netfcaud = _head(embedding_size)
        self.netfclip = _head(embedding_size)  # defined before netcnnlip, as in S: same key order
        self.netcnnlip = nn.Sequential(
            *_conv3d_block(3, 96, (5, 7, 7), stride=(1, 2, 2)),  # 0-2: 1 x 109 x 109
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 3: 54 x 54
            *_conv3d_block(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),  # 4-6: 26
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # 7: 13
            *_conv3d_block(256, 256, (1, 3, 3), padding=(0, 1, 1)),  # 8-10
            *_conv3d_block(256, 256, (1, 3, 3), padding=(0, 1, 1)),  # 11-13
            *_conv3d_block(256, 256, (1, 3, 3), padding=(0, 1, 1)),  # 14-16
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 17: 6 x 6
            *_conv3d_block(256, 512, (1, 6, 6)),  # 18-20: 1 x 1 x 1
        )

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """Audio embeddings (the official method name).

        Args:
            mfcc: ``(batch, 1, 13, 20)`` float32 MFCC windows (see ``SYNCNET_V2.audio``).

        Returns:
            ``(batch, embedding_size)`` raw embeddings.
        """
        features: torch.Tensor = self.netcnnaud(mfcc)
        out: torch.Tensor = self.netfcaud(features.flatten(1))
        return out

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        """Lip embeddings (the official method name).

        Args:
            video: ``(batch, 3, 5, 224, 224)`` float32 BGR face crops, 0..255.

        Returns:
            ``(batch, embedding_size)`` raw embeddings.
        """
        features: torch.Tensor = self.netcnnlip(video)
        out: torch.Tensor = self.netfclip(features.flatten(1))
        return out

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """The audio tower under the name all talkscope sync models use: :meth:`forward_aud`."""
        return self.forward_aud(mfcc)

    def forward_video(self, video: torch.Tensor) -> torch.Tensor:
        """The video tower under the name all talkscope sync models use: :meth:`forward_lip`."""
        return self.forward_lip(video)

    def forward(self, video: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers: ``(video embeddings, audio embeddings)``."""
        return self.forward_lip(video), self.forward_aud(mfcc)


def load_syncnet_v2(
    path: str | os.PathLike[str],
    *,
    check_hash: bool = False,
    allow_pickle: bool = False,
) -> SyncNetV2Model:
    """Load the official ``syncnet_v2.model`` (or a state dict with its keys) into a model.

    The official file is what syncnet_python's ``SyncNetInstance.loadParameters`` reads: a
    ``torch.save``-d state dict of ``S``. It is read with ``torch.load(weights_only=True)``, which
    unpickles tensors and containers only, in both the zip and the legacy (pre-1.6) format.
    ``num_batches_tracked`` buffers may be absent (files saved before PyTorch 0.4.1 lack them;
    inference does not use them); every other key must be there with its exact shape. A
    ``module.`` or ``__S__.`` prefix on every key is removed.

    Args:
        path: the weights file.
        check_hash: also compare the file's git blob SHA-1 with the published one
            (``SYNCNET_V2.weights.git_blob_sha1``); reads the whole file once more. Leave it off
            for weights of your own (fine-tuned, converted).
        allow_pickle: when the file holds more than tensors (a whole pickled model, say), retry
            with ``weights_only=False``. That runs arbitrary code from the file: only for files
            whose origin you trust.

    Returns:
        The model in eval mode on the CPU.

    Raises:
        WeightsError: the file is missing or unreadable, holds no state dict, holds keys that
            ``S`` lacks or lacks keys it has, has a tensor of the wrong shape, or (with
            ``check_hash``) is not the published file.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsError(
            f"{file}: SyncNet v2 weights not found; download "
            f"{SYNCNET_V2.weights.source if SYNCNET_V2.weights else 'them'} "
            "(see engine.models) and pass --weights FILE or put it in $TALKSCOPE_MODELS"
        )
    if check_hash and SYNCNET_V2.weights is not None:
        expected = SYNCNET_V2.weights.git_blob_sha1
        actual = git_blob_sha1(file)
        if actual != expected:
            raise WeightsError(
                f"{file}: git blob sha1 {actual} is not the published syncnet_v2.model {expected}"
            )
    loaded = _torch_load(file, allow_pickle=allow_pickle)
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{file}: holds a {type(loaded).__name__}, not a state dict")
    model = SyncNetV2Model()
    model.load_state_dict(_checked_state_dict(file, loaded, model), strict=False)
    return model.eval()


def _torch_load(file: Path, *, allow_pickle: bool) -> object:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports both a forbidden class and a non-pickle file this way.
        if not allow_pickle:
            raise WeightsError(
                f"{file}: cannot be loaded with weights_only=True ({_unpickler_reason(error)}); "
                "if it is a whole pickled model from a source you trust, pass allow_pickle=True"
            ) from error
        log.warning("%s: loading with weights_only=False (allow_pickle=True)", file)
    except Exception as error:  # torch raises RuntimeError, EOFError, ... on corrupt files
        raise WeightsError(f"{file}: not a readable torch file: {_first_line(error)}") from error
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise WeightsError(f"{file}: cannot be unpickled: {_first_line(error)}") from error


def _unpickler_reason(error: BaseException) -> str:
    """The useful part of torch's long weights-only message, e.g. ``Unsupported global: ...``."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker) :]
    reason = _first_line(ValueError(text))
    return reason.split(" was not an allowed global")[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _checked_state_dict(
    file: Path, loaded: Mapping[Any, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The loaded entries renamed to the model's keys, or a WeightsError naming what is wrong."""
    state: dict[str, Any] = {str(key): value for key, value in loaded.items()}
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    expected = model.state_dict()
    missing = [
        key for key in expected if key not in state and not key.endswith(".num_batches_tracked")
    ]
    unexpected = [key for key in state if key not in expected]
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    for key, value in state.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected[key].shape:
            problems.append(
                f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    if problems:
        raise WeightsError(f"{file}: not SyncNet v2 weights: {'; '.join(problems)}")
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"({len(keys)}): {shown}{more}"
