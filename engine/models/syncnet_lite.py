"""SyncNet-lite: talkscope's compact sync model, Light-ASD's encoders plus trained sync heads.

Contract (see :data:`engine.models.spec.SYNCNET_LITE`): one embedding per 5-frame / 20-MFCC-step
window, as SyncNet, compared by Euclidean distance. The towers take *chunks* of a track rather
than single windows, because their encoders look around each window:

- video tower: ``(batch, 64, 112, 112)`` grey face crops (Light-ASD's 112×112 centre crop), values
  0..1, oldest frame first -> Light-ASD's visual encoder (one 128-d feature per frame, each seeing
  ±6 frames) -> a head over each 5 consecutive features -> ``(batch, 48, 256)``: the embeddings of
  the 48 windows that start at frames 6..53 of the chunk (the first and last 6 frames are context);
- audio tower: ``(batch, 1, 13, 256)`` MFCC steps of the ``syncnet`` preset covering the same 64
  frames (4 steps a frame, the first step at the chunk's first frame) -> Light-ASD's audio encoder
  (one 128-d feature per 4 steps) -> the same kind of head -> ``(batch, 48, 256)``.

Computed this way every frame goes through the visual encoder 64/48 times, instead of 5 times as
5-frame windows each needing their own encoder pass would. The encoders come from the
MIT-licensed Light-ASD checkpoint and stay frozen in training: the few minutes of video we train
on teach only the heads (:mod:`pipelines.train_sync`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from engine.models.light_asd import FEATURES, AudioEncoder, VisualEncoder
from engine.models.spec import SYNCNET_LITE

EMBEDDING_SIZE = SYNCNET_LITE.embedding_size
WINDOW_FRAMES = SYNCNET_LITE.window.video_frames
CONTEXT_FRAMES = SYNCNET_LITE.window.context_frames
CHUNK_WINDOWS = SYNCNET_LITE.window.chunk_windows
CHUNK_FRAMES = SYNCNET_LITE.window.chunk_frames
STEPS_PER_FRAME = SYNCNET_LITE.window.mfcc_steps // SYNCNET_LITE.window.video_frames
HIDDEN = 512


class WindowHead(nn.Module):
    """Per-frame features ``(batch, T, 128)`` -> window embeddings ``(batch, T - 4, 256)``.

    A convolution over 5 consecutive features (one window) is a linear layer on the window's
    flattened features; then BatchNorm, ReLU, dropout (training only), a 1×1 projection and an
    L2 normalisation: embeddings are unit vectors, so the Euclidean distance the sync analysis
    takes is a function of the cosine similarity the heads are trained on.
    """

    def __init__(self, hidden: int = HIDDEN, size: int = EMBEDDING_SIZE) -> None:
        super().__init__()
        self.window = nn.Conv1d(FEATURES, hidden, WINDOW_FRAMES, bias=False)
        self.norm = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.2)
        self.project = nn.Conv1d(hidden, size, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(batch, T, 128)`` -> ``(batch, T - 4, size)``."""
        x = self.relu(self.norm(self.window(features.transpose(1, 2))))
        out: torch.Tensor = F.normalize(self.project(self.dropout(x)), dim=1).transpose(1, 2)
        return out


class SyncNetLiteModel(nn.Module):
    """The two towers of SyncNet-lite. Call :meth:`eval` before inference."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = VisualEncoder()
        self.audio = AudioEncoder()
        self.video_head = WindowHead()
        self.audio_head = WindowHead()

    def forward_video(self, faces: torch.Tensor) -> torch.Tensor:
        """``(batch, 64, 112, 112)`` grey faces 0..1 -> ``(batch, 48, 256)`` window embeddings.

        Any chunk of ``T >= 17`` frames works in torch (``T - 16`` windows); the ONNX graph is
        exported for the spec's 64.
        """
        features = self.visual(faces)
        inner = features[:, CONTEXT_FRAMES:-CONTEXT_FRAMES]
        out: torch.Tensor = self.video_head(inner)
        return out

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, 13, 256)`` MFCC -> ``(batch, 48, 256)`` window embeddings (any ``4 T``)."""
        features = self.audio(mfcc)
        inner = features[:, CONTEXT_FRAMES:-CONTEXT_FRAMES]
        out: torch.Tensor = self.audio_head(inner)
        return out

    def forward(self, faces: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers: ``(video embeddings, audio embeddings)``."""
        return self.forward_video(faces), self.forward_audio(mfcc)
