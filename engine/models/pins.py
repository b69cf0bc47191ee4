"""PINs: cross-modal face and voice embeddings for person identity (Nagrani et al., ECCV 2018).

Two subnetworks map a face crop and a voice segment into one 256-d unit-length space where the
face and the voice of one person lie close. The paper trains them from scratch or from pretrained
unimodal identity networks; both initialisations are here:

- ``scratch``: :class:`ScratchFaceNet` on the 112×112 aligned face crop and :class:`ScratchVoiceNet`
  on the per-bin normalised magnitude spectrogram (VGGVox-style convolutions, average pooling over
  time, so any length works).
- ``pretrained`` (the shipped default): frozen unimodal trunks, SFace (MobileFaceNet, 128-d) on the
  same aligned crop and the resemblyzer GE2E encoder (256-d) on the mel power of the same
  spectrogram, each followed by a trainable :class:`Head`. With 44 training identities a frozen
  trunk is the only initialisation that does not overfit at once; the heads learn the cross-modal
  map.

A pretrained tower ships as one ONNX graph (:func:`assemble_tower`): trunk + head, dynamic batch,
output ``embedding`` = the 256-d PINs embedding followed by the trunk's own unit-length embedding
(128 face / 256 voice), which the identity engine uses for face and voice re-identification.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.spec import TensorSpec

EMBEDDING_SIZE = 256
"""Floats in a PINs embedding, either modality."""
FACE_TRUNK_SIZE = 128
VOICE_TRUNK_SIZE = 256
Modality = Literal["face", "voice"]


@dataclass(frozen=True, slots=True)
class PinsTowerSpec:
    """One shipped PINs tower: its input, output layout and file.

    Attributes:
        modality: ``"face"`` or ``"voice"``.
        input: the tensor one item is (batch axis excluded).
        trunk_size: floats of the unimodal embedding after the PINs embedding in the output.
        file_name: the ONNX file in the weights directory.
    """

    modality: Modality
    input: TensorSpec
    trunk_size: int
    file_name: str

    @property
    def output_size(self) -> int:
        """Floats per item in the output: PINs embedding then trunk embedding."""
        return EMBEDDING_SIZE + self.trunk_size


FACE_TOWER = PinsTowerSpec(
    modality="face",
    input=TensorSpec(
        name="face",
        shape=(3, 112, 112),
        dtype="float32",
        layout=(
            "(batch, 3 RGB channels, 112, 112): the ArcFace-aligned identity crop of a track "
            "(engine.vision.crops.aligned_face), values 0..255 unnormalised"
        ),
    ),
    trunk_size=FACE_TRUNK_SIZE,
    file_name="face.onnx",
)
VOICE_TOWER = PinsTowerSpec(
    modality="voice",
    input=TensorSpec(
        name="spectrogram",
        shape=(160, 257),
        dtype="float32",
        layout=(
            "(batch, 160 frames, 257 bins): magnitude of the engine's STFT (Hamming 25 ms, hop "
            "10 ms, 512-point FFT, 16 kHz audio scaled to [-1, 1]) over 1.6 s, times "
            "engine.identity.voice.level_gain"
        ),
    ),
    trunk_size=VOICE_TRUNK_SIZE,
    file_name="voice.onnx",
)
TOWERS: dict[Modality, PinsTowerSpec] = {"face": FACE_TOWER, "voice": VOICE_TOWER}


class Head(nn.Module):
    """The trainable part on top of a frozen trunk: two layers to a unit-length 256-d vector."""

    def __init__(self, in_size: int, hidden: int = 256, dropout: float = 0.2) -> None:
        """See the class docstring."""
        super().__init__()
        self.hidden = nn.Linear(in_size, hidden)
        self.out = nn.Linear(hidden, EMBEDDING_SIZE)
        self.dropout = nn.Dropout(dropout)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        """``(batch, in_size)`` unit trunk embeddings -> ``(batch, 256)`` unit PINs embeddings."""
        hidden = self.dropout(F.relu(self.hidden(trunk)))
        return F.normalize(self.out(hidden), dim=1)

    def arrays(self) -> dict[str, npt.NDArray[np.float32]]:
        """The weights as arrays, for the ONNX graph."""
        return {
            name: value.detach().cpu().numpy().astype(np.float32)
            for name, value in self.state_dict().items()
        }


def _conv(inputs: int, outputs: int, stride: int | tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class ScratchFaceNet(nn.Module):
    """The from-scratch face subnetwork: five strided convolutions, global pooling, 256-d."""

    def __init__(self) -> None:
        """See the class docstring."""
        super().__init__()
        widths = (3, 32, 64, 96, 128, 192)
        self.body = nn.Sequential(*(_conv(a, b, 2) for a, b in itertools.pairwise(widths)))
        self.out = nn.Linear(widths[-1], EMBEDDING_SIZE)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, 112, 112)`` 0..255 RGB -> ``(batch, 256)`` unit embeddings."""
        features = self.body(face / 127.5 - 1.0).mean(dim=(2, 3))
        return F.normalize(self.out(features), dim=1)


class ScratchVoiceNet(nn.Module):
    """The from-scratch voice subnetwork (VGGVox-style, small).

    Convolutions over frequency and time; frequency pooled by a learned layer, time by the
    average (any length).
    """

    def __init__(self, bins: int = 257) -> None:
        """See the class docstring."""
        super().__init__()
        self.body = nn.Sequential(
            _conv(1, 32, (2, 1)),
            _conv(32, 64, (2, 2)),
            _conv(64, 96, (2, 1)),
            _conv(96, 128, (2, 2)),
        )
        freq = bins
        for _ in range(4):
            freq = (freq + 1) // 2
        self.freq = nn.Linear(128 * freq, 256)
        self.out = nn.Linear(256, EMBEDDING_SIZE)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """``(batch, frames, 257)`` per-bin normalised magnitude -> ``(batch, 256)`` unit."""
        x = self.body(spectrogram.transpose(1, 2).unsqueeze(1))  # (b, c, freq, time)
        b, c, f, t = x.shape
        per_step = F.relu(self.freq(x.permute(0, 3, 1, 2).reshape(b, t, c * f)))
        return F.normalize(self.out(per_step.mean(dim=1)), dim=1)


def contrastive_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """The contrastive loss with margin of the paper: pull positives, push negatives past it."""
    pos = (anchor - positive).norm(dim=1)
    neg = (anchor - negative).norm(dim=1)
    loss: torch.Tensor = (pos.pow(2) + F.relu(margin - neg).pow(2)).mean()
    return loss


def curriculum_negatives(distances: torch.Tensor, tau: float) -> torch.Tensor:
    """The negative of each anchor at difficulty ``tau`` (the paper's curriculum mining).

    For anchor ``i``, the other ``K - 1`` candidates of the mini-batch are sorted from the
    farthest (easiest) to the nearest (hardest) and the one at position
    ``round(tau * (K - 2))`` is taken: ``tau = 0`` is the easiest, ``tau = 1`` the hardest.

    Args:
        distances: ``(K, K)`` anchor-to-candidate distances; the diagonal is the positive.
        tau: difficulty in ``[0, 1]``.

    Returns:
        ``(K,)`` candidate indices.
    """
    k = distances.shape[0]
    masked = distances.clone()
    masked.fill_diagonal_(-1.0)  # the positive sorts last, past every negative
    order = masked.argsort(dim=1, descending=True)
    position = int(round(min(max(tau, 0.0), 1.0) * (k - 2)))
    return order[:, position]


def ranged_negatives(
    distances: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A curriculum variant: negatives drawn among the easiest ``tau`` share.

    Each anchor's negative is drawn at random among the easiest ``tau`` share of the
    candidates (``tau = 1``: any negative, uniformly), so the range widens towards the hardest
    as ``tau`` rises instead of jumping to one rank.

    Args:
        distances: ``(K, K)`` anchor-to-candidate distances; the diagonal is the positive.
        tau: the hardest position allowed, as a share of ``K - 2``, in ``[0, 1]``.
        generator: random source.
    """
    k = distances.shape[0]
    masked = distances.clone()
    masked.fill_diagonal_(-1.0)
    order = masked.argsort(dim=1, descending=True)
    highest = int(round(min(max(tau, 0.0), 1.0) * (k - 2)))
    position = torch.randint(0, highest + 1, (k,), generator=generator)
    return order[torch.arange(k), position]
