"""The Light-ASD audio and visual encoders, reused as SyncNet-lite's front-ends.

Light-ASD (Liao et al., "A Light Weight Model for Active Speaker Detection", CVPR 2023; MIT
licence, see ``engine/models/weights/syncnet_lite/LICENSE.light-asd``) encodes a face track and its
audio into one 128-d feature per video frame with two small convolution stacks trained on
AVA-ActiveSpeaker; a recurrent back-end then decides who speaks. Those encoders already know what
a talking mouth and speech look like, which the few hundred seconds of video we can train on
cannot teach from scratch, so SyncNet-lite starts from them (see
:mod:`engine.models.syncnet_lite`).

Written here from the paper's description and the layer names of the published checkpoint, so the
official ``.model`` files load with :func:`load_light_asd_encoders`:

- visual: ``(batch, 1, T, 112, 112)`` normalised grey faces -> three blocks of parallel
  (1×3×3 then 3×1×1) and (1×5×5 then 5×1×1) factorised 3-D convolutions, summed and mixed by a
  1×1×1 convolution; spatial max-pooling between blocks; a global spatial max ->
  ``(batch, T, 128)``;
- audio: ``(batch, 1, 13, 4T)`` MFCC (cepstra × 10 ms steps) -> the same block shape in 2-D
  (cepstrum and time kernels), time max-pooled by 2 twice (100 Hz -> 25 Hz); a mean over the
  cepstra -> ``(batch, T, 128)``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from engine.core.errors import WeightsError

FEATURES = 128
"""Channels of both encoders' per-frame output."""
PIXEL_MEAN = 0.4161
"""Light-ASD's grey-level mean (of ``uint8 / 255``)."""
PIXEL_STD = 0.1688
"""Light-ASD's grey-level standard deviation."""


def _norm3d(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, momentum=0.01, eps=0.001)


def _norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=0.01, eps=0.001)


class VisualBlock(nn.Module):
    """Two factorised 3-D convolution paths (3 and 5 wide), summed, then a 1×1×1 mix."""

    def __init__(self, c_in: int, c_out: int, downsample: bool = False) -> None:
        super().__init__()
        stride = (1, 2, 2) if downsample else (1, 1, 1)
        self.s_3 = nn.Conv3d(c_in, c_out, (1, 3, 3), stride, (0, 1, 1), bias=False)
        self.bn_s_3 = _norm3d(c_out)
        self.t_3 = nn.Conv3d(c_out, c_out, (3, 1, 1), 1, (1, 0, 0), bias=False)
        self.bn_t_3 = _norm3d(c_out)
        self.s_5 = nn.Conv3d(c_in, c_out, (1, 5, 5), stride, (0, 2, 2), bias=False)
        self.bn_s_5 = _norm3d(c_out)
        self.t_5 = nn.Conv3d(c_out, c_out, (5, 1, 1), 1, (2, 0, 0), bias=False)
        self.bn_t_5 = _norm3d(c_out)
        self.last = nn.Conv3d(c_out, c_out, 1, bias=False)
        self.bn_last = _norm3d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, c_in, T, H, W)`` -> ``(batch, c_out, T, H', W')``."""
        a = self.relu(self.bn_t_3(self.t_3(self.relu(self.bn_s_3(self.s_3(x))))))
        b = self.relu(self.bn_t_5(self.t_5(self.relu(self.bn_s_5(self.s_5(x))))))
        out: torch.Tensor = self.relu(self.bn_last(self.last(a + b)))
        return out


class AudioBlock(nn.Module):
    """Two factorised 2-D convolution paths (cepstrum then time; 3 and 5 wide), then a 1×1 mix."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.m_3 = nn.Conv2d(c_in, c_out, (3, 1), padding=(1, 0), bias=False)
        self.bn_m_3 = _norm2d(c_out)
        self.t_3 = nn.Conv2d(c_out, c_out, (1, 3), padding=(0, 1), bias=False)
        self.bn_t_3 = _norm2d(c_out)
        self.m_5 = nn.Conv2d(c_in, c_out, (5, 1), padding=(2, 0), bias=False)
        self.bn_m_5 = _norm2d(c_out)
        self.t_5 = nn.Conv2d(c_out, c_out, (1, 5), padding=(0, 2), bias=False)
        self.bn_t_5 = _norm2d(c_out)
        self.last = nn.Conv2d(c_out, c_out, 1, bias=False)
        self.bn_last = _norm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, c_in, cepstra, steps)`` -> ``(batch, c_out, cepstra, steps)``."""
        a = self.relu(self.bn_t_3(self.t_3(self.relu(self.bn_m_3(self.m_3(x))))))
        b = self.relu(self.bn_t_5(self.t_5(self.relu(self.bn_m_5(self.m_5(x))))))
        out: torch.Tensor = self.relu(self.bn_last(self.last(a + b)))
        return out


class VisualEncoder(nn.Module):
    """Grey face frames -> one 128-d feature per frame."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = VisualBlock(1, 32, downsample=True)
        self.pool1 = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.block2 = VisualBlock(32, 64)
        self.pool2 = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.block3 = VisualBlock(64, FEATURES)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(batch, T, 112, 112)`` grey values 0..1 -> ``(batch, T, 128)``."""
        x = ((faces - PIXEL_MEAN) * (1.0 / PIXEL_STD)).unsqueeze(1)
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)  # (batch, 128, T, 14, 14)
        out: torch.Tensor = x.amax(dim=(3, 4)).transpose(1, 2)
        return out


class AudioEncoder(nn.Module):
    """MFCC at 100 Hz -> one 128-d feature per 40 ms (per video frame at 25 fps)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = AudioBlock(1, 32)
        self.pool1 = nn.MaxPool2d((1, 3), (1, 2), (0, 1))
        self.block2 = AudioBlock(32, 64)
        self.pool2 = nn.MaxPool2d((1, 3), (1, 2), (0, 1))
        self.block3 = AudioBlock(64, FEATURES)

    def forward(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, 13, 4T)`` MFCC -> ``(batch, T, 128)``."""
        x = self.pool1(self.block1(mfcc))
        x = self.pool2(self.block2(x))
        x = self.block3(x)  # (batch, 128, 13, T)
        out: torch.Tensor = x.mean(dim=2).transpose(1, 2)
        return out


def encoder_state(checkpoint: Mapping[str, torch.Tensor], encoder: str) -> dict[str, torch.Tensor]:
    """The tensors of one encoder (``visualEncoder`` or ``audioEncoder``) of a checkpoint."""
    prefix = f"model.{encoder}."
    return {k.removeprefix(prefix): v for k, v in checkpoint.items() if k.startswith(prefix)}


def load_light_asd_encoders(path: str | Path) -> tuple[VisualEncoder, AudioEncoder]:
    """Both encoders with the weights of a Light-ASD (or LR-ASD) ``.model`` checkpoint.

    Raises:
        WeightsError: the file is unreadable or its encoder tensors do not match.
    """
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsError(f"{path}: not a readable Light-ASD checkpoint ({error})") from None
    visual, audio = VisualEncoder(), AudioEncoder()
    for module, name in ((visual, "visualEncoder"), (audio, "audioEncoder")):
        try:
            module.load_state_dict(encoder_state(checkpoint, name))
        except RuntimeError as error:
            raise WeightsError(f"{path}: {name} does not match Light-ASD ({error})") from None
    return visual, audio
