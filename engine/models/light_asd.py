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
    checkpoint = _read_checkpoint(path)
    visual, audio = VisualEncoder(), AudioEncoder()
    for module, name in ((visual, "visualEncoder"), (audio, "audioEncoder")):
        try:
            module.load_state_dict(encoder_state(checkpoint, name))
        except RuntimeError as error:
            raise WeightsError(f"{path}: {name} does not match Light-ASD ({error})") from None
    return visual, audio


class AsdBackend(nn.Module):
    """Light-ASD's back-end: audio + visual features -> a speaking logit pair per frame.

    A forward GRU, GELU, a GRU over the reversed sequence, GELU (Light-ASD's "BGRU"), then the
    ``lossAV`` linear layer; class 1 is "speaking".
    """

    def __init__(self) -> None:
        super().__init__()
        self.gru_forward = nn.GRU(FEATURES, FEATURES, batch_first=True)
        self.gru_backward = nn.GRU(FEATURES, FEATURES, batch_first=True)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(FEATURES, 2)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``(batch, T, 128)`` twice -> ``(batch, T, 2)`` logits (not speaking, speaking)."""
        x, _ = self.gru_forward(audio + visual)
        x = torch.flip(self.gelu(x), dims=[1])
        x, _ = self.gru_backward(x)
        x = self.gelu(torch.flip(x, dims=[1]))
        out: torch.Tensor = self.fc(x)
        return out


def load_light_asd_backend(path: str | Path) -> AsdBackend:
    """The back-end (GRUs and the audio-visual classifier) of a Light-ASD checkpoint.

    Raises:
        WeightsError: the file is unreadable or has no matching back-end tensors.
    """
    checkpoint = _read_checkpoint(path)
    state = {k.removeprefix("model.GRU."): v for k, v in checkpoint.items() if ".GRU." in k}
    state |= {
        f"fc.{k.removeprefix('lossAV.FC.')}": v
        for k, v in checkpoint.items()
        if k.startswith("lossAV.FC.")
    }
    backend = AsdBackend()
    try:
        backend.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"{path}: back-end does not match Light-ASD ({error})") from None
    return backend.eval()


def _read_checkpoint(path: str | Path) -> Mapping[str, torch.Tensor]:
    try:
        checkpoint: Mapping[str, torch.Tensor] = torch.load(
            str(path), map_location="cpu", weights_only=True
        )
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsError(f"{path}: not a readable Light-ASD checkpoint ({error})") from None
    return checkpoint


STEP_DELAY_FRAMES = 6
"""How many frames the streaming visual encoder's output trails its input: each of the three
blocks needs 2 frames of look-ahead for its 5-wide temporal convolution."""

_BLOCK_SHAPES = ((32, 56), (64, 28), (FEATURES, 14))
"""``(channels, side)`` of each visual block's output for 112×112 input."""


def streaming_state_size() -> int:
    """Floats of :class:`StreamingVisualEncoder` state per track."""
    return sum(c * 7 * side * side + 4 for c, side in _BLOCK_SHAPES)


class StreamingVisualEncoder(nn.Module):
    """:class:`VisualEncoder` run a few frames at a time, each frame encoded once.

    The encoder's temporal convolutions see ±2 frames per block, so a frame's feature needs the 6
    frames after it. Run over whole sequences (as :class:`VisualEncoder`), a live caller would
    re-encode those context frames at every step; here each block keeps, per track, the last
    spatial-path outputs its temporal convolutions still need (3 frames for the 3-wide path, 4
    for the 5-wide one) plus which of them are real frames (so that the start of a track sees
    zeros, exactly as the whole-sequence padding), carried in one flat ``state`` vector.

    ``forward(faces, state)``: ``faces (batch, step, 112, 112)`` grey 0..1, the track's next
    frames; ``state (batch, streaming_state_size())``, zeros for a new track ->
    ``(batch, step * 128 + state size)``: the features of the ``step`` frames that end
    :data:`STEP_DELAY_FRAMES` before the newest input (the first 6 outputs of a track are
    before its start and meaningless), then the new state. One output array, so that the shared
    batcher can route it.
    """

    def __init__(self, encoder: VisualEncoder, step: int = 5) -> None:
        super().__init__()
        self.encoder = encoder
        self.step = step

    def forward(self, faces: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        batch = faces.shape[0]
        x = ((faces - PIXEL_MEAN) * (1.0 / PIXEL_STD)).unsqueeze(1)
        mask = torch.ones(batch, self.step, dtype=faces.dtype)
        blocks = (self.encoder.block1, self.encoder.block2, self.encoder.block3)
        pools: tuple[nn.Module | None, ...] = (self.encoder.pool1, self.encoder.pool2, None)
        states, offset = [], 0
        for block, pool, (channels, side) in zip(blocks, pools, _BLOCK_SHAPES, strict=True):
            sizes = (channels * 3 * side * side, channels * 4 * side * side, 4)
            parts = []
            for size in sizes:
                parts.append(state[:, offset : offset + size])
                offset += size
            old3 = parts[0].reshape(batch, channels, 3, side, side)
            old5 = parts[1].reshape(batch, channels, 4, side, side)
            x, mask, new_state = _block_step(block, x, mask, old3, old5, parts[2])
            states.append(new_state)
            if pool is not None:
                x = pool(x)
        features = x.amax(dim=(3, 4)).transpose(1, 2).reshape(batch, -1)
        return torch.cat([features, *states], dim=1)


def _block_step(
    block: VisualBlock,
    x: torch.Tensor,
    mask: torch.Tensor,
    old3: torch.Tensor,
    old5: torch.Tensor,
    old_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block on ``n`` new frames: outputs for the ``n`` frames ending 2 before the newest."""
    n = x.shape[2]
    frames = mask[:, None, :, None, None]
    a = block.relu(block.bn_s_3(block.s_3(x))) * frames
    b = block.relu(block.bn_s_5(block.s_5(x))) * frames
    a_all = torch.cat([old3, a], dim=2)  # 3 + n frames
    b_all = torch.cat([old5, b], dim=2)  # 4 + n frames
    ta = nn.functional.conv3d(a_all[:, :, : n + 2], block.t_3.weight)
    tb = nn.functional.conv3d(b_all, block.t_5.weight)
    ta = block.relu(block.bn_t_3(ta))
    tb = block.relu(block.bn_t_5(tb))
    out = block.relu(block.bn_last(block.last(ta + tb)))
    mask_all = torch.cat([old_mask, mask], dim=1)  # 4 + n
    batch = x.shape[0]
    new_state = torch.cat(
        [
            a_all[:, :, -3:].reshape(batch, -1),
            b_all[:, :, -4:].reshape(batch, -1),
            mask_all[:, -4:],
        ],
        dim=1,
    )
    return out, mask_all[:, 2 : 2 + n], new_state
