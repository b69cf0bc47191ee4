"""One tower as a module, and ONNX export of both towers of a sync model.

Each tower becomes its own ONNX file with one input (named after the spec, ``video`` or
``mfcc``), one output ``embedding``, and a dynamic first axis ``batch``: the batcher runs the
video and the audio towers on different batches, often on different streams' windows.

Two exporters, both shipped with torch 2.13:

- ``"legacy"`` (default), the TorchScript-based ``torch.onnx.export(..., dynamo=False)``: fast
  (well under a second for SyncNet v2), needs only ``onnx`` for the graph check, and folds
  BatchNorm into the convolutions. torch marks it deprecated since 2.9 and warns so; the warning
  is silenced here, inside the call only.
- ``"dynamo"``, the ``torch.export``-based exporter (torch's default since 2.9): needs
  ``onnxscript`` too, and takes seconds per tower. Use it once the legacy one is removed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Protocol, cast, runtime_checkable

import torch
from torch import nn

from engine.core.errors import EngineError, UsageError
from engine.models.spec import BATCH_AXIS, ModelSpec, TowerName, TowerSpec

Exporter = Literal["legacy", "dynamo"]

DEFAULT_OPSET = 17
_EXAMPLE_BATCH = 2  # not 1, so no exporter can mistake the batch axis for a constant


@runtime_checkable
class SyncModel(Protocol):
    """What every talkscope sync model (an ``nn.Module``) offers: one method per tower."""

    def forward_video(self, video: torch.Tensor) -> torch.Tensor:
        """``(batch, *spec.video.input.shape)`` -> ``(batch, embedding_size)``."""
        ...

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """``(batch, *spec.audio.input.shape)`` -> ``(batch, embedding_size)``."""
        ...


class TowerModule(nn.Module):
    """One tower of a sync model as a module whose ``forward`` takes one batch of windows.

    The wrapped model is a sub-module: ``eval()``, ``to()`` and the parameters are shared with it,
    and the tower starts in the model's mode (training or eval).

    Args:
        model: an ``nn.Module`` with ``forward_video`` and ``forward_audio``.
        tower: ``"video"`` or ``"audio"``.

    Raises:
        UsageError: ``model`` is not such a module, or ``tower`` is neither name.
    """

    def __init__(self, model: nn.Module, tower: TowerName) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not isinstance(model, SyncModel):
            raise UsageError(
                f"{type(model).__name__} is not a sync model "
                "(an nn.Module with forward_video and forward_audio)"
            )
        if tower not in ("video", "audio"):
            raise UsageError(f"unknown tower {tower!r}; choose video or audio")
        self.model = model
        self.tower: TowerName = tower
        self.train(model.training)  # a new module is in training mode; follow the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(batch, embedding_size)`` of one batch of windows of this tower."""
        model = cast(SyncModel, self.model)  # checked in __init__
        if self.tower == "video":
            return model.forward_video(x)
        return model.forward_audio(x)


def export_towers(
    model: nn.Module,
    spec: ModelSpec,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "legacy",
) -> dict[str, Path]:
    """Export the video and the audio tower of ``model`` to two ONNX files, and check them.

    The model is exported in eval mode on the CPU; its mode and device are restored afterwards.
    Files are ``<out_dir>/<spec.name>_<tower>.onnx``, overwritten when present. Each graph is
    checked with ``onnx.checker`` (full check, shape inference included), then its input and
    output names and shapes are compared with the spec.

    Not thread-safe: it changes the model's mode and, while the exporter runs, the process's
    warning filters.

    Args:
        model: a sync model, e.g. :class:`~engine.models.syncnet_v2.SyncNetV2Model`.
        spec: the model's spec (input names and shapes).
        out_dir: created when missing.
        opset: ONNX opset, 17 or newer.
        exporter: ``"legacy"`` (TorchScript) or ``"dynamo"`` (torch.export; needs onnxscript).

    Returns:
        ``{"video": path, "audio": path}``.

    Raises:
        UsageError: an opset below 17, an unknown exporter, a model that is not a sync model, or
            a missing ``onnx`` / ``onnxscript`` package.
        EngineError: the exporter failed, or wrote a graph that does not match the spec.
    """
    if opset < DEFAULT_OPSET:
        raise UsageError(f"opset {opset} is too old; use {DEFAULT_OPSET} or newer")
    if exporter not in ("legacy", "dynamo"):
        raise UsageError(f"unknown exporter {exporter!r}; choose legacy or dynamo")
    try:
        import onnx
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install onnx") from None
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    paths: dict[str, Path] = {}
    try:
        for tower_spec in spec.towers:
            path = directory / f"{spec.name}_{tower_spec.tower}.onnx"
            module = TowerModule(model, tower_spec.tower).eval().cpu()
            if exporter == "legacy":
                _export_legacy(module, tower_spec, path, opset)
            else:
                _export_dynamo(module, tower_spec, path, opset)
            _pin_output_shape(path, tower_spec)
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except onnx.checker.ValidationError as error:
                raise EngineError(f"{path}: the exported graph is invalid: {error}") from error
            _check_signature(onnx.load(str(path), load_external_data=False), tower_spec, path)
            paths[tower_spec.tower] = path
    finally:
        model.train(was_training).to(device)
    return paths


def _example(tower: TowerSpec) -> torch.Tensor:
    dtype = getattr(torch, tower.input.dtype)
    assert isinstance(dtype, torch.dtype)
    return torch.zeros((_EXAMPLE_BATCH, *tower.input.shape), dtype=dtype)


def _export_legacy(module: nn.Module, tower: TowerSpec, path: Path, opset: int) -> None:
    try:
        with warnings.catch_warnings():
            # "You are using the legacy TorchScript-based ONNX export" and kin: known, see above.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (_example(tower),),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[tower.input.name],
                output_names=[tower.output.name],
                dynamic_axes={
                    tower.input.name: {0: BATCH_AXIS},
                    tower.output.name: {0: BATCH_AXIS},
                },
                do_constant_folding=True,
            )
    except Exception as error:
        raise EngineError(f"ONNX export of the {tower.tower} tower failed: {error}") from error


def _export_dynamo(module: nn.Module, tower: TowerSpec, path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail early and clearly)
    except ImportError:
        raise UsageError(
            "the dynamo ONNX exporter needs onnxscript: pip install onnxscript"
        ) from None
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    try:
        with warnings.catch_warnings():
            # torch 2.13's exporter trips its own FutureWarning / DeprecationWarning (pytree).
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                module,
                (_example(tower),),
                dynamo=True,
                opset_version=opset,
                input_names=[tower.input.name],
                output_names=[tower.output.name],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
    except Exception as error:
        raise EngineError(f"ONNX export of the {tower.tower} tower failed: {error}") from error
    if program is None:
        raise EngineError(f"ONNX export of the {tower.tower} tower returned no program")
    program.save(str(path), external_data=False)


def _pin_output_shape(path: Path, tower: TowerSpec) -> None:
    """Write the spec's sizes into output axes the exporter left symbolic (all but the batch).

    The legacy exporter names every axis of an output it cannot size while tracing with a
    dynamic batch, e.g. after a reshape; the sizes are the spec's, fixed by the input's.
    """
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    dims = graph_model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != len(tower.output.shape) + 1:
        return  # _check_signature reports it
    changed = False
    for dim, size in zip(list(dims)[1:], tower.output.shape, strict=True):
        if dim.HasField("dim_param"):
            dim.dim_value = size
            changed = True
    if changed:
        onnx.save(graph_model, str(path))


def _check_signature(graph_model: object, tower: TowerSpec, path: Path) -> None:
    """Raise EngineError unless the graph has the spec's one input and output, batch dynamic."""
    import onnx

    assert isinstance(graph_model, onnx.ModelProto)
    graph = graph_model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    for values, expected in ((inputs, tower.input), (list(graph.output), tower.output)):
        if len(values) != 1 or values[0].name != expected.name:
            raise EngineError(
                f"{path}: expected one tensor {expected.name!r}, got {[v.name for v in values]}"
            )
        dims = values[0].type.tensor_type.shape.dim
        static = tuple(dim.dim_value for dim in dims[1:])
        if not dims or dims[0].dim_value or static != expected.shape:
            shape = [dim.dim_param or dim.dim_value for dim in dims]
            raise EngineError(
                f"{path}: {expected.name} has shape {shape}, expected "
                f"[{BATCH_AXIS}, {', '.join(map(str, expected.shape))}] with a dynamic batch"
            )
