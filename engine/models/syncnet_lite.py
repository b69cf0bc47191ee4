"""SyncNet-lite: talkscope's compact real-time sync model (architecture only; trained later).

Same contract as SyncNet v2 (see :data:`engine.models.spec.SYNCNET_LITE`) at a fraction of the
cost, so one CPU core keeps up with many streams:

- video tower on ``(batch, 5, 48, 96)`` grey mouth crops, values 0..1 (``uint8 / 255``). The 5
  frames are the input channels of a 2-D convolution stack (as Wav2Lip's SyncNet stacks them):
  the first layer already sees the motion between frames, and 2-D convolutions are what every
  ONNX runtime is fastest at. The model centres and scales the pixels itself
  (``(x - 0.5) / 0.25``), so callers only divide by 255;
- audio tower on ``(batch, 1, 13, 20)`` MFCC windows of the ``hamming`` preset. A
  ``BatchNorm1d`` over the 13 cepstra normalises each one with statistics learned in training
  (c0, the log energy, is an order of magnitude larger than the others).

Both towers are stacks of Conv + BatchNorm + ReLU blocks, downsampled by strided convolutions,
then flattened (not pooled: where in the window a lip movement or a sound happens is what sync is
about) into a two-layer head. They give ``(batch, 256)`` raw embeddings, not normalised;
distances are computed outside, Euclidean, as for SyncNet v2. 1.35 M parameters in all (video
0.87 M, audio 0.47 M).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.spec import SYNCNET_LITE

EMBEDDING_SIZE = SYNCNET_LITE.embedding_size
VIDEO_FRAMES, MOUTH_HEIGHT, MOUTH_WIDTH = SYNCNET_LITE.video.input.shape
PIXEL_MEAN = 0.5
"""Subtracted from the 0..1 grey values inside the video tower."""
PIXEL_STD = 0.25
"""Divides the centred grey values inside the video tower."""


def _block(
    c_in: int,
    c_out: int,
    kernel: int | tuple[int, int] = 3,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _head(features: int, hidden: int, size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, size),
    )


class SyncNetLiteModel(nn.Module):
    """The two towers of SyncNet-lite.

    Call :meth:`eval` before inference (the heads hold ``BatchNorm1d`` layers).

    Args:
        embedding_size: outputs of each tower.
    """

    def __init__(self, embedding_size: int = EMBEDDING_SIZE) -> None:
        super().__init__()
        self.video_cnn = nn.Sequential(
            _block(VIDEO_FRAMES, 32, stride=2),  # 24 x 48
            _block(32, 64, stride=2),  # 12 x 24
            _block(64, 64),
            _block(64, 128, stride=2),  # 6 x 12
            _block(128, 128),
            _block(128, 192, stride=2),  # 3 x 6
            _block(192, 64, kernel=1, padding=0),
        )
        self.video_head = _head(64 * 3 * 6, 256, embedding_size)
        self.audio_norm = nn.BatchNorm1d(13)
        self.audio_cnn = nn.Sequential(
            _block(1, 32),  # 13 x 20
            _block(32, 64, stride=(2, 1)),  # 7 x 20
            _block(64, 128, stride=2),  # 4 x 10
            _block(128, 128, stride=(1, 2)),  # 4 x 5: one column per video frame
            _block(128, 32, kernel=1, padding=0),
        )
        self.audio_head = _head(32 * 4 * 5, 256, embedding_size)

    def forward_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video embeddings.

        Args:
            video: ``(batch, 5, 48, 96)`` float32 grey mouth crops, 0..1, oldest frame first.

        Returns:
            ``(batch, embedding_size)`` raw embeddings.
        """
        features: torch.Tensor = self.video_cnn((video - PIXEL_MEAN) * (1.0 / PIXEL_STD))
        out: torch.Tensor = self.video_head(features.flatten(1))
        return out

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """Audio embeddings.

        Args:
            mfcc: ``(batch, 1, 13, 20)`` float32 MFCC windows (``hamming`` preset).

        Returns:
            ``(batch, embedding_size)`` raw embeddings.
        """
        normalised: torch.Tensor = self.audio_norm(mfcc.flatten(1, 2))  # (batch, 13, 20)
        features: torch.Tensor = self.audio_cnn(normalised.unsqueeze(1))
        out: torch.Tensor = self.audio_head(features.flatten(1))
        return out

    def forward(self, video: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers: ``(video embeddings, audio embeddings)``."""
        return self.forward_video(video), self.forward_audio(mfcc)
