"""Where a sync model's weights come from, and the two tower back-ends built from them.

Lookup order, first hit wins (:func:`resolve_weights`):

1. ``weights`` given (``--weights FILE``): a torch state dict (``.pt``, ``.model``, ...) of the
   model asked for (``syncnet_v2``: :func:`~engine.models.syncnet_v2.load_syncnet_v2`;
   ``syncnet_lite``: a :class:`~engine.models.syncnet_lite.SyncNetLiteModel` state dict), or a
   directory holding the two ONNX graphs ``video.onnx`` and ``audio.onnx`` (or the
   ``<model>_video.onnx`` / ``<model>_audio.onnx`` that
   :func:`~engine.models.export.export_towers` writes);
2. ``syncnet_lite``: the ONNX pair embedded in the package,
   ``engine/models/weights/syncnet_lite/{video,audio}.onnx``: the trained model ships there;
3. ``syncnet_v2``: ``default_weights_dir() / "syncnet_v2.model"`` (``$TALKSCOPE_MODELS``, else
   ``~/.cache/talkscope/models``); talkscope never downloads it.

When nothing is found :class:`~engine.core.errors.NoWeights` says where it looked and how to get
or pass the weights. There is no fallback to random weights: a sync model with untrained weights
gives offsets that look like numbers and mean nothing.

:func:`tower_backends` turns resolved weights into one back-end per tower: ONNX graphs run on
onnxruntime as they are; a torch state dict is exported to ONNX in memory (through a temporary
directory, about a second for SyncNet v2) and run on onnxruntime, or run on torch itself with
``backend="torch"``. torch is imported only when a state dict is loaded or exported.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.core.errors import NoWeights, UsageError, WeightsError
from engine.models.spec import (
    SYNCNET_LITE,
    SYNCNET_V2,
    ModelSpec,
    TowerName,
    default_weights_path,
    get_spec,
    git_blob_sha1,
)

if TYPE_CHECKING:  # torch only where a state dict is loaded
    from torch import nn

    from engine.runtime.backends import InferenceBackend

Backend = Literal["onnx", "torch"]
"""Which engine runs the towers: onnxruntime or torch."""

Origin = Literal["argument", "embedded", "models_dir"]
"""Where resolved weights came from: ``--weights``, the package, or the models directory."""

EMBEDDED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Package data: ``<EMBEDDED_WEIGHTS_DIR>/<model>/{video,audio}.onnx`` for shipped models."""

ONNX_FILE_NAMES: dict[TowerName, str] = {"video": "video.onnx", "audio": "audio.onnx"}
"""The two graphs of a weights directory, by tower."""

_EMBEDDED_MODELS = (SYNCNET_LITE.name,)


def model_spec(name: str) -> ModelSpec:
    """The spec of a model by its CLI name (``syncnet-lite``) or spec name (``syncnet_lite``).

    Raises:
        UsageError: an unknown model; the message lists the known ones.
    """
    try:
        return get_spec(name.strip().lower().replace("-", "_"))
    except UsageError:
        known = ", ".join(sorted(cli_name(spec) for spec in (SYNCNET_LITE, SYNCNET_V2)))
        raise UsageError(f"unknown model {name!r}; choose one of {known}") from None


def cli_name(spec: ModelSpec) -> str:
    """The name the CLI uses for a model: ``syncnet-lite``, ``syncnet-v2``."""
    return spec.name.replace("_", "-")


def embedded_weights_dir(spec: ModelSpec) -> Path:
    """Where the package keeps a model's ONNX pair (it may not exist)."""
    return EMBEDDED_WEIGHTS_DIR / spec.name


def default_locations(spec: ModelSpec) -> list[Path]:
    """Where weights are looked for when none are given, in order (they may not exist)."""
    locations: list[Path] = []
    if spec.name in _EMBEDDED_MODELS:
        locations.append(embedded_weights_dir(spec))
    if spec.weights is not None:
        locations.append(default_weights_path(spec))
    return locations


def how_to_get(spec: ModelSpec) -> str:
    """One sentence: how a user gets or passes weights for ``spec``."""
    name = cli_name(spec)
    if spec.weights is not None:
        checksum = (
            f" (git blob sha1 {spec.weights.git_blob_sha1})" if spec.weights.git_blob_sha1 else ""
        )
        return (
            f"download {spec.weights.source}{checksum} to {default_weights_path(spec)} "
            "($TALKSCOPE_MODELS, else ~/.cache/talkscope/models), or pass --weights FILE"
        )
    return (
        f"{name} is not trained yet, so this build ships no weights for it (they will come as "
        f"{_relative(embedded_weights_dir(spec))}/{{video,audio}}.onnx); pass --weights with a "
        f"state dict of the model or a folder holding video.onnx and audio.onnx, or use "
        f"--model {cli_name(SYNCNET_V2)} with its published weights"
    )


def looked_for(spec: ModelSpec) -> list[str]:
    """:func:`default_locations` in words: a weights folder as ``<dir>/{video,audio}.onnx``."""
    return [
        f"{path}/{{video,audio}}.onnx" if path == embedded_weights_dir(spec) else str(path)
        for path in default_locations(spec)
    ]


@dataclass(frozen=True, eq=False)
class ResolvedWeights:
    """Weights found for one model, ready for :func:`tower_backends`.

    Exactly one of ``onnx`` and ``module`` is set.

    Attributes:
        spec: the model.
        origin: ``"argument"`` (``--weights``), ``"embedded"`` (package data) or
            ``"models_dir"`` (``default_weights_dir()``).
        path: the file or directory the weights were read from.
        onnx: the two graphs by tower, for ONNX weights.
        module: the torch model in eval mode on the CPU, for a state dict.
    """

    spec: ModelSpec
    origin: Origin
    path: Path
    onnx: Mapping[TowerName, Path] | None = None
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def format(self) -> Literal["onnx", "torch"]:
        """``"onnx"`` for a pair of graphs, ``"torch"`` for a state dict."""
        return "onnx" if self.onnx is not None else "torch"

    def describe(self) -> str:
        """One line, e.g. ``syncnet-v2 weights /x/syncnet_v2.model (torch state dict)``."""
        what = "ONNX graphs" if self.onnx is not None else "torch state dict"
        return f"{cli_name(self.spec)} weights {self.path} ({what}, {self.origin})"


def resolve_weights(
    model: str | ModelSpec, weights: str | os.PathLike[str] | None = None
) -> ResolvedWeights:
    """Find and load the weights of ``model``: ``weights`` when given, else the default places.

    Blocks (reads files, may import torch and load a state dict): call it from a thread when an
    event loop runs.

    Args:
        model: a spec, or a name (``syncnet-lite``, ``syncnet_v2``...).
        weights: a torch state dict file, or a directory with ``video.onnx`` and ``audio.onnx``.

    Returns:
        The weights; a state dict is loaded into its torch model.

    Raises:
        UsageError: an unknown model.
        NoWeights: ``weights`` is None and no weights are installed; the message says where they
            were looked for and how to get or pass them.
        WeightsError: ``weights`` (or an installed file) is missing, unreadable, incomplete, or
            not weights of this model.
    """
    spec = model if isinstance(model, ModelSpec) else model_spec(model)
    if weights is not None:
        return _load_given(spec, Path(weights).expanduser())
    if spec.name in _EMBEDDED_MODELS:
        directory = embedded_weights_dir(spec)
        pair = _onnx_pair(spec, directory)
        if pair is not None:
            return ResolvedWeights(spec, "embedded", directory, onnx=pair)
    if spec.weights is not None:
        path = default_weights_path(spec)
        if path.is_file():
            return ResolvedWeights(spec, "models_dir", path, module=_load_state_dict(spec, path))
    looked = " and ".join(looked_for(spec)) or "nowhere"
    raise NoWeights(
        f"no trained weights are installed for {cli_name(spec)} (looked for {looked}): "
        f"{how_to_get(spec)}; see `talkscope models`"
    )


def installed_weights(spec: ModelSpec) -> Path | None:
    """The file or directory :func:`resolve_weights` would read with no ``weights``, or None.

    Checks that the files exist, not that they load.
    """
    if spec.name in _EMBEDDED_MODELS:
        directory = embedded_weights_dir(spec)
        if all((directory / name).is_file() for name in ONNX_FILE_NAMES.values()):
            return directory
    if spec.weights is not None and default_weights_path(spec).is_file():
        return default_weights_path(spec)
    return None


def is_published_file(spec: ModelSpec, path: Path) -> bool | None:
    """Whether ``path`` is the published weights file (its git blob SHA-1); None when unknown.

    None when the spec pins no hash or ``path`` is not a file. Reads the whole file.
    """
    if spec.weights is None or spec.weights.git_blob_sha1 is None or not path.is_file():
        return None
    try:
        return git_blob_sha1(path) == spec.weights.git_blob_sha1
    except OSError:
        return False


def _relative(path: Path) -> str:
    package_root = EMBEDDED_WEIGHTS_DIR.parents[2]
    try:
        return str(path.relative_to(package_root))
    except ValueError:
        return str(path)


def _load_given(spec: ModelSpec, path: Path) -> ResolvedWeights:
    if path.is_dir():
        pair = _onnx_pair(spec, path)
        if pair is None:
            raise WeightsError(
                f"{path}: a weights folder must hold video.onnx and audio.onnx "
                f"(or {spec.name}_video.onnx and {spec.name}_audio.onnx)"
            )
        return ResolvedWeights(spec, "argument", path, onnx=pair)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix.lower() == ".onnx":
        raise WeightsError(
            f"{path}: an ONNX file holds one tower; pass the folder holding video.onnx and "
            "audio.onnx"
        )
    return ResolvedWeights(spec, "argument", path, module=_load_state_dict(spec, path))


def _onnx_pair(spec: ModelSpec, directory: Path) -> dict[TowerName, Path] | None:
    """The two graphs of ``directory`` by tower; None when it has neither, an error for one."""
    for names in (ONNX_FILE_NAMES, {t: f"{spec.name}_{t}.onnx" for t in ONNX_FILE_NAMES}):
        paths: dict[TowerName, Path] = {t: directory / n for t, n in names.items()}
        present = [t for t, p in paths.items() if p.is_file()]
        if len(present) == len(paths):
            return paths
        if present:
            missing = [str(paths[t]) for t in paths if t not in present]
            raise WeightsError(f"{directory}: incomplete weights, {', '.join(missing)} is missing")
    return None


def _load_state_dict(spec: ModelSpec, path: Path) -> nn.Module:
    if spec.name == SYNCNET_V2.name:
        from engine.models.syncnet_v2 import load_syncnet_v2

        return load_syncnet_v2(path)
    if spec.name == SYNCNET_LITE.name:
        from engine.models.syncnet_lite import SyncNetLiteModel

        model = SyncNetLiteModel()
        model.load_state_dict(_checked_state(path, _torch_state(path), model, spec))
        return model.eval()
    raise UsageError(f"talkscope cannot load torch weights of model {spec.name!r}")


def _torch_state(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a state dict"
        raise WeightsError(
            f"{path}: not a torch state dict (torch.load with weights_only=True cannot read it: "
            f"{_load_failure(error)})"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # a training checkpoint: {"state_dict": ..., "epoch": ...}
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    state = {str(key): value for key, value in loaded.items()}
    if state and all(key.startswith("module.") for key in state):  # nn.DataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _checked_state(
    path: Path, state: Mapping[str, Any], model: nn.Module, spec: ModelSpec
) -> dict[str, Any]:
    import torch

    expected = model.state_dict()
    problems: list[str] = []
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
    for key, value in state.items():
        if key in expected and (
            not isinstance(value, torch.Tensor) or value.shape != expected[key].shape
        ):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{key} is {shape}, expected {tuple(expected[key].shape)}")
    if problems:
        raise WeightsError(f"{path}: not {cli_name(spec)} weights: {'; '.join(problems[:4])}")
    return dict(state)


def _load_failure(error: BaseException) -> str:
    """The useful part of a ``torch.load`` error: torch's weights-only message is long."""
    text = str(error).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker) :].strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def tower_backends(
    resolved: ResolvedWeights,
    *,
    backend: Backend = "onnx",
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
) -> dict[TowerName, InferenceBackend]:
    """One inference back-end per tower of the resolved weights.

    Blocks (exports, creates sessions): call it from a thread when an event loop runs.

    Args:
        resolved: from :func:`resolve_weights`.
        backend: ``"onnx"`` runs onnxruntime (a state dict is exported to ONNX first, in memory);
            ``"torch"`` runs the torch model (state dicts only).
        providers: onnxruntime providers, most preferred first (``cpu``, ``cuda``,
            ``tensorrt``...); for torch, the first one picks the device (``cpu`` or ``cuda``).
        threads: onnxruntime intra-op threads per session; None uses every core.

    Returns:
        ``{"video": backend, "audio": backend}``.

    Raises:
        UsageError: an unknown back-end or provider, a provider that is not installed or does not
            start, ``backend="torch"`` with ONNX weights, or ONNX export without the ``onnx``
            package.
        WeightsError: a graph onnxruntime cannot load, or one whose input is not the tower's.
    """
    spec = resolved.spec
    if backend == "torch":
        return _torch_backends(resolved, providers)
    if backend != "onnx":
        raise UsageError(f"unknown back-end {backend!r}; choose onnx or torch")
    from engine.runtime.backends import OnnxBackend

    graphs: Mapping[TowerName, Path | bytes]
    if resolved.onnx is not None:
        graphs = resolved.onnx
    else:
        assert resolved.module is not None
        graphs = _export_in_memory(resolved.module, spec)
    backends: dict[TowerName, InferenceBackend] = {}
    for tower in spec.towers:
        onnx_backend = OnnxBackend(graphs[tower.tower], providers, threads=threads)
        if onnx_backend.input_names != (tower.input.name,):
            where = resolved.path if resolved.onnx is None else resolved.onnx[tower.tower]
            raise WeightsError(
                f"{where}: the {tower.tower} graph takes {list(onnx_backend.input_names)}, "
                f"the {cli_name(spec)} {tower.tower} tower takes [{tower.input.name!r}]"
            )
        backends[tower.tower] = onnx_backend
    return backends


def _torch_backends(
    resolved: ResolvedWeights, providers: Sequence[str]
) -> dict[TowerName, InferenceBackend]:
    if resolved.module is None:
        raise UsageError(
            f"--backend torch needs torch weights (a state dict); {resolved.path} holds ONNX "
            "graphs: use --backend onnx"
        )
    first = (list(providers) or ["cpu"])[0].lower()
    if first not in ("cpu", "cuda") and not first.startswith("cuda:"):
        raise UsageError(f"the torch back-end runs on cpu or cuda, not {first!r}")
    from engine.models.export import TowerModule
    from engine.runtime.backends import TorchBackend

    return {
        tower.tower: TorchBackend(TowerModule(resolved.module, tower.tower), first)
        for tower in resolved.spec.towers
    }


def _export_in_memory(module: nn.Module, spec: ModelSpec) -> dict[TowerName, bytes]:
    from engine.models.export import export_towers

    with tempfile.TemporaryDirectory(prefix="talkscope-onnx-") as directory:
        paths = export_towers(module, spec, directory)
        return {tower.tower: paths[tower.tower].read_bytes() for tower in spec.towers}
