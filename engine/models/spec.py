"""Model specs: what each sync model takes, gives, and where its weights come from.

A :class:`ModelSpec` is plain data (no torch import): the runtime, the batcher and the crop code
read it to build inputs of the right shape, dtype and layout without knowing the network. The
torch definitions live in :mod:`engine.models.syncnet_v2` and :mod:`engine.models.syncnet_lite`;
:func:`engine.models.export.export_towers` names the ONNX inputs and outputs after these specs.

Every model has two towers, ``video`` and ``audio``, each giving one embedding of
``embedding_size`` floats per window (a window model takes one window a call, a chunk model a run
of them, see :class:`WindowSpec`); the distance between the two embeddings (Euclidean, as
SyncNet) is computed outside the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.core.errors import UsageError, WeightsError

TowerName = Literal["video", "audio"]
"""The two towers every sync model has."""

BATCH_AXIS = "batch"
"""Name of the dynamic first axis of every ONNX input and output."""

_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor of a tower, without the batch axis.

    Attributes:
        name: the ONNX input name (the key of the mapping given to a back-end's ``run``).
        shape: the shape of one window, batch axis excluded, e.g. ``(3, 5, 224, 224)``.
        dtype: NumPy dtype name of the array handed to the back-end, e.g. ``"float32"``.
        layout: what each axis means, in which order, and the value range, in words.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str


@dataclass(frozen=True, slots=True)
class TowerSpec:
    """One tower: a window in, an embedding out.

    Attributes:
        tower: ``"video"`` or ``"audio"``.
        input: the window the tower takes.
        output: the embedding it gives, ``(embedding_size,)`` per window.
    """

    tower: TowerName
    input: TensorSpec
    output: TensorSpec


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """The span of media one embedding covers.

    At 25 fps and a 10 ms MFCC hop, one video frame spans exactly 4 MFCC steps, so 5 frames
    (0.2 s) pair with 20 MFCC steps.

    Attributes:
        video_frames: consecutive video frames per window.
        mfcc_steps: consecutive MFCC frames per window.
        mfcc_preset: name of the :data:`engine.dsp.mfcc.PRESETS` entry the audio tower expects.
        fps: the video frame rate the model was trained at.
        chunk_windows: windows one tower call embeds per item: 1 for a window model (SyncNet
            v2: one window in, one embedding out); more for a chunk model (SyncNet-lite), whose
            towers take a run of consecutive frames and give one embedding per window in it.
        context_frames: frames a chunk model needs on each side of its windows (its encoders
            look that far); 0 for a window model.
    """

    video_frames: int = 5
    mfcc_steps: int = 20
    mfcc_preset: str = "syncnet"
    fps: int = 25
    chunk_windows: int = 1
    context_frames: int = 0

    @property
    def chunk_frames(self) -> int:
        """Frames in one tower input: the windows, the window length and the context."""
        return self.chunk_windows + self.video_frames - 1 + 2 * self.context_frames

    @property
    def is_chunked(self) -> bool:
        """True for a chunk model (towers take runs of frames, not single windows)."""
        return self.chunk_windows > 1


@dataclass(frozen=True, slots=True)
class WeightsSpec:
    """Where a model's weights come from and how to check a copy.

    Attributes:
        file_name: the file name looked for in the weights directory.
        sha256: hex SHA-256 of the file, or None when we do not ship or pin it.
        git_blob_sha1: hex ``git hash-object`` of the file, or None; see :func:`git_blob_sha1`.
        licence: the terms the weights come under, as far as their publishers state them.
        source: where a user gets the file (a URL, or a note when not published yet).
        shipped: True when the file is package data of talkscope.
    """

    file_name: str
    sha256: str | None
    git_blob_sha1: str | None
    licence: str
    source: str
    shipped: bool = False


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything outside the network needs to know about one sync model.

    Attributes:
        name: registry key, e.g. ``"syncnet_v2"``.
        description: one line.
        video: the lip tower.
        audio: the MFCC tower.
        embedding_size: floats per embedding of either tower.
        window: the media span of one window.
        weights: where the weights come from; None for a model without published weights.
        distance: how embeddings compare: ``"euclidean"`` on the embeddings as the towers give
            them (SyncNet v2's are raw, SyncNet-lite's unit length).
    """

    name: str
    description: str
    video: TowerSpec
    audio: TowerSpec
    embedding_size: int
    window: WindowSpec
    weights: WeightsSpec | None
    distance: Literal["euclidean"] = "euclidean"

    @property
    def towers(self) -> tuple[TowerSpec, TowerSpec]:
        """Both towers, video first."""
        return (self.video, self.audio)

    def tower(self, tower: str) -> TowerSpec:
        """One tower by name.

        Raises:
            UsageError: ``tower`` is neither ``"video"`` nor ``"audio"``.
        """
        if tower == "video":
            return self.video
        if tower == "audio":
            return self.audio
        raise UsageError(f"unknown tower {tower!r} of model {self.name!r}; choose video or audio")


def _embedding(size: int) -> TensorSpec:
    return TensorSpec("embedding", (size,), "float32", f"(batch, {size}) raw embedding")


_MFCC_LAYOUT = (
    "(batch, 1, 13 cepstra, 20 steps): MFCC of the 'syncnet' preset (python_speech_features "
    "defaults, c0 = log energy) of 16 kHz int16-scaled audio, 10 ms hop, oldest step first"
)

SYNCNET_V2 = ModelSpec(
    name="syncnet_v2",
    description="SyncNet v2 (Chung & Zisserman 2016), the published weights of syncnet_python",
    video=TowerSpec(
        tower="video",
        input=TensorSpec(
            name="video",
            shape=(3, 5, 224, 224),
            dtype="float32",
            layout=(
                "(batch, 3 channels in BGR order, 5 frames, 224 height, 224 width): face crops "
                "as cv2 decodes them, values 0..255 unnormalised, oldest frame first"
            ),
        ),
        output=_embedding(1024),
    ),
    audio=TowerSpec(
        tower="audio",
        input=TensorSpec(name="mfcc", shape=(1, 13, 20), dtype="float32", layout=_MFCC_LAYOUT),
        output=_embedding(1024),
    ),
    embedding_size=1024,
    window=WindowSpec(video_frames=5, mfcc_steps=20, mfcc_preset="syncnet"),
    weights=WeightsSpec(
        file_name="syncnet_v2.model",
        sha256=None,
        git_blob_sha1="d714bbf3b30324ced69e3815fc41ae6dc519303c",
        licence=(
            "MIT, the licence of joonson/syncnet_python (LICENSE.md, (c) 2016-present Joon Son "
            "Chung) which downloads it; talkscope does not redistribute the file"
        ),
        source="http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
    ),
)

_CHUNK_EMBEDDINGS = TensorSpec(
    "embedding", (48, 256), "float32", "(batch, 48 windows, 256) unit-length embeddings"
)
"""What both SyncNet-lite towers give per chunk: one embedding per window."""

SYNCNET_LITE = ModelSpec(
    name="syncnet_lite",
    description=(
        "talkscope's compact sync model: Light-ASD's encoders (MIT) with sync heads trained on "
        "the train identities of the shared clips"
    ),
    video=TowerSpec(
        tower="video",
        input=TensorSpec(
            name="faces",
            shape=(64, 112, 112),
            dtype="float32",
            layout=(
                "(batch, 64 frames, 112 height, 112 width): grey 112x112 centre face crops "
                "(Light-ASD's), uint8 / 255 so values 0..1, oldest frame first; frames 0-5 and "
                "58-63 are context, windows start at frames 6..53"
            ),
        ),
        output=_CHUNK_EMBEDDINGS,
    ),
    audio=TowerSpec(
        tower="audio",
        input=TensorSpec(
            name="mfcc",
            shape=(1, 13, 256),
            dtype="float32",
            layout=(
                "(batch, 1, 13 cepstra, 256 steps): MFCC of the 'syncnet' preset over the same "
                "64 frames (4 steps a frame, the first step at the first frame's time)"
            ),
        ),
        output=_CHUNK_EMBEDDINGS,
    ),
    embedding_size=256,
    window=WindowSpec(
        video_frames=5, mfcc_steps=20, mfcc_preset="syncnet", chunk_windows=48, context_frames=6
    ),
    weights=None,
)

MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (SYNCNET_V2, SYNCNET_LITE)}
"""Every model talkscope knows, by name."""


def get_spec(name: str) -> ModelSpec:
    """The spec of a model by name.

    Raises:
        UsageError: an unknown name; the message lists the known ones.
    """
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise UsageError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODEL_SPECS))}"
        ) from None


def default_weights_dir() -> Path:
    """The directory weights files are looked for in when no ``--weights FILE`` is given.

    ``$TALKSCOPE_MODELS`` when set, else ``~/.cache/talkscope/models``; ``~`` is expanded. The
    directory may not exist: nothing is created or downloaded.
    """
    return Path(os.environ.get("TALKSCOPE_MODELS", "~/.cache/talkscope/models")).expanduser()


def default_weights_path(spec: ModelSpec) -> Path:
    """``default_weights_dir() / spec.weights.file_name``.

    Raises:
        UsageError: the model has no published weights file.
    """
    if spec.weights is None:
        raise UsageError(f"model {spec.name!r} has no published weights file yet")
    return default_weights_dir() / spec.weights.file_name


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """The hex SHA-1 ``git hash-object FILE`` prints: SHA-1 of ``blob <size>``, NUL, content.

    Read in 1 MiB chunks, so the file is never whole in memory.

    Raises:
        OSError: the file cannot be read.
    """
    file = Path(path)
    digest = hashlib.sha1(f"blob {file.stat().st_size}\0".encode("ascii"), usedforsecurity=False)
    with file.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Check a weights file against the hashes its spec pins (SHA-256, git blob SHA-1).

    A spec without pinned hashes passes any file.

    Raises:
        UsageError: the model has no published weights file.
        WeightsError: the file cannot be read, or a pinned hash differs.
    """
    if spec.weights is None:
        raise UsageError(f"model {spec.name!r} has no published weights file yet")
    expected = spec.weights
    try:
        if expected.git_blob_sha1 is not None:
            actual = git_blob_sha1(path)
            if actual != expected.git_blob_sha1:
                raise WeightsError(
                    f"{path}: git blob sha1 {actual} is not the published {spec.name} "
                    f"{expected.git_blob_sha1}; get the file from {expected.source}"
                )
        if expected.sha256 is not None:
            actual = sha256_file(path)
            if actual != expected.sha256:
                raise WeightsError(
                    f"{path}: sha256 {actual} is not the published {spec.name} "
                    f"{expected.sha256}; get the file from {expected.source}"
                )
    except OSError as error:
        raise WeightsError(f"{path}: cannot read weights: {error.strerror or error}") from error
