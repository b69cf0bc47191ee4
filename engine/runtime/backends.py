"""Inference back-ends: run one model tower on a batch of windows, and say where it really ran.

:class:`OnnxBackend` runs an ONNX graph with onnxruntime on the execution providers asked for;
:class:`TorchBackend` runs an ``nn.Module`` with torch. Both satisfy :class:`InferenceBackend`,
which is all the batcher sees.

onnxruntime is an optional dependency (``talkscope[cpu]`` installs ``onnxruntime``,
``talkscope[gpu]`` installs ``onnxruntime-gpu``; never both: they write the same package). It is
imported when the first :class:`OnnxBackend` is built, not when this module is; likewise torch
and the first :class:`TorchBackend`.

Provider fallback. onnxruntime-gpu does not fail when CUDA cannot start (no driver, a missing
cuDNN): it logs an error and runs everything on the CPU, ten to a hundred times slower. So
:class:`OnnxBackend` compares what it asked for with what the session reports
(``session.get_providers()``) and, by default, raises :class:`~engine.core.errors.UsageError`
when a provider is not installed or did not start. With ``allow_fallback=True`` it runs on
what is left instead, sets :attr:`OnnxBackend.fell_back`, keeps the reason in
:attr:`OnnxBackend.fallback_reason` and logs it as a warning; :attr:`OnnxBackend.providers`
always lists what really runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from engine.core.errors import UsageError, WeightsError

if TYPE_CHECKING:  # torch is imported by TorchBackend, so that onnx-only users never load it
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
"""Short provider names talkscope accepts, and onnxruntime's names for them."""

_SHORT_NAMES = {full: short for short, full in PROVIDERS.items()}
_GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})
_INSTALL_HINT = "install talkscope[cpu] (onnxruntime) or talkscope[gpu] (onnxruntime-gpu)"

# onnxruntime's tensor type names -> NumPy dtypes, for the inputs our graphs take.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
}


@runtime_checkable
class InferenceBackend(Protocol):
    """Runs one model tower (one graph) on a batch of windows.

    ``run`` blocks for the whole inference: call it from a worker thread or an executor, never
    on the event loop.
    """

    @property
    def name(self) -> str:
        """The engine, e.g. ``"onnxruntime"`` or ``"torch"``."""
        ...

    @property
    def providers(self) -> tuple[str, ...]:
        """Where it really runs, most preferred first, e.g. ``("cuda", "cpu")``."""
        ...

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Run the graph.

        Args:
            inputs: one array per graph input, by input name, each ``(batch, ...)``.

        Returns:
            The first output, ``(batch, ...)``, float32.
        """
        ...


def _import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime  # type: ignore[import-untyped]  # no py.typed, no stubs
    except ImportError:
        raise UsageError(f"onnxruntime is not installed: {_INSTALL_HINT}") from None
    module: ModuleType = onnxruntime
    return module


def _short(provider: str) -> str:
    return _SHORT_NAMES.get(provider, provider)


def available_providers() -> tuple[str, ...]:
    """The providers the installed onnxruntime offers, by short name where talkscope has one.

    Being offered is not being able to start: ``cuda`` is listed by onnxruntime-gpu even on a
    machine without a GPU. Only a session tells (see :class:`OnnxBackend`).

    Raises:
        UsageError: onnxruntime is not installed.
    """
    ort = _import_onnxruntime()
    return tuple(_short(provider) for provider in ort.get_available_providers())


def _resolve(providers: str | Sequence[str]) -> list[str]:
    """Short or full provider names -> onnxruntime names, in order, without duplicates."""
    names = [providers] if isinstance(providers, str) else list(providers)
    if not names:
        raise UsageError(f"no execution provider asked for; choose from {', '.join(PROVIDERS)}")
    resolved: list[str] = []
    for name in names:
        full = PROVIDERS.get(name.lower())
        if full is None and name.endswith("ExecutionProvider"):
            full = name  # onnxruntime's own name, e.g. XnnpackExecutionProvider
        if full is None:
            raise UsageError(
                f"unknown execution provider {name!r}; choose from {', '.join(PROVIDERS)}"
            )
        if full not in resolved:
            resolved.append(full)
    return resolved


def _missing_hint(short: str, version: str) -> str:
    if short in _GPU_PROVIDERS:
        return (
            f"the installed onnxruntime {version} has no {short} provider: install "
            "talkscope[gpu] (onnxruntime-gpu) in place of talkscope[cpu], uninstalling "
            "onnxruntime first, as both write the same package"
        )
    return f"the installed onnxruntime {version} has no {short} provider"


class OnnxBackend:
    """One ONNX graph in an onnxruntime session, on the providers asked for or an error.

    ``run`` is thread-safe (onnxruntime sessions are), and blocks: call it from an executor.

    Args:
        model: an ``.onnx`` file, or the serialised graph as bytes.
        providers: short names (``"cpu"``, ``"cuda"``, ``"tensorrt"``, also ``"openvino"``,
            ``"coreml"``, ``"directml"``, ``"migraphx"``) or onnxruntime's full names
            (``"...ExecutionProvider"``), most preferred first: ``("cpu",)``,
            ``("cuda", "cpu")``, ``("tensorrt", "cuda", "cpu")``. A plain string means one
            provider. Each one must be installed and start, unless ``allow_fallback``: a ``"cpu"``
            after ``"cuda"`` is where the nodes CUDA lacks run, not permission to run it all on
            the CPU.
        threads: CPU threads for one ``run`` (onnxruntime's intra-op threads); None lets
            onnxruntime use every core.
        allow_fallback: when a provider is not installed or does not start, run on the others
            (the CPU at worst) and report it, instead of raising.
        device_id: the GPU the CUDA and TensorRT providers use.

    Raises:
        UsageError: onnxruntime is not installed; an unknown provider name; ``threads`` < 1; a
            provider that is not installed or did not start, unless ``allow_fallback``; a
            session that fails to start on a non-CPU provider.
        WeightsError: the model file is missing or is not a graph onnxruntime can load.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        providers: str | Sequence[str] = ("cpu",),
        *,
        threads: int | None = None,
        allow_fallback: bool = False,
        device_id: int = 0,
    ) -> None:
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        ort = _import_onnxruntime()
        version = str(ort.__version__)
        requested = _resolve(providers)
        self._requested = tuple(_short(provider) for provider in requested)
        available = set(ort.get_available_providers())
        reasons: list[str] = []
        usable = [provider for provider in requested if provider in available]
        for provider in requested:
            if provider not in available:
                hint = _missing_hint(_short(provider), version)
                if not allow_fallback:
                    raise UsageError(
                        f"{hint} (it offers {', '.join(map(_short, sorted(available)))})"
                    )
                reasons.append(hint)
        if not usable:
            usable = [PROVIDERS["cpu"]]

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: why CUDA failed to load (a missing libcudnn...) is logged as an error.
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        provider_options = [
            {"device_id": str(device_id)} if _short(provider) in _GPU_PROVIDERS else {}
            for provider in usable
        ]
        source: str | bytes
        if isinstance(model, bytes):
            source, where = model, "<ONNX bytes>"
        else:
            path = Path(model)
            if not path.is_file():
                raise WeightsError(f"{path}: ONNX model not found")
            source, where = str(path), str(path)
        try:
            self._session = ort.InferenceSession(
                source, options, providers=usable, provider_options=provider_options
            )
        except Exception as error:  # onnxruntime's own exception types (Fail, InvalidGraph...)
            text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            kind = type(error).__name__
            if kind in ("InvalidGraph", "InvalidProtobuf", "NoSuchFile"):
                raise WeightsError(
                    f"{where}: not an ONNX model onnxruntime can load: {text}"
                ) from error
            if any(provider != PROVIDERS["cpu"] for provider in usable):
                raise UsageError(
                    f"onnxruntime cannot start a session on {', '.join(map(_short, usable))} "
                    f"for {where}: {text}"
                ) from error
            raise WeightsError(f"{where}: onnxruntime cannot create a session: {text}") from error

        active = list(self._session.get_providers())
        # onnxruntime-gpu drops a provider that fails to start and goes on without it.
        dropped = [provider for provider in usable if provider not in active]
        if dropped:
            hint = (
                f"{', '.join(map(_short, dropped))} did not start (onnxruntime runs on "
                f"{', '.join(map(_short, active))}): check the GPU driver and the CUDA / cuDNN "
                "libraries onnxruntime-gpu needs"
            )
            if not allow_fallback:
                raise UsageError(hint)
            reasons.append(hint)
        self._providers = tuple(_short(provider) for provider in active)
        self._fallback_reason = "; ".join(reasons) if reasons else None
        if self._fallback_reason is not None:
            log.warning("onnxruntime fell back: %s", self._fallback_reason)

        self._inputs: dict[str, np.dtype[Any] | None] = {
            node.name: _ORT_DTYPES.get(node.type) for node in self._session.get_inputs()
        }
        self._output_names = [self._session.get_outputs()[0].name]

    @property
    def name(self) -> str:
        """``"onnxruntime"``."""
        return "onnxruntime"

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers the session really runs on, short names, most preferred first."""
        return self._providers

    @property
    def requested(self) -> tuple[str, ...]:
        """The providers asked for, short names."""
        return self._requested

    @property
    def fell_back(self) -> bool:
        """True when a provider asked for is not installed or did not start."""
        return self._fallback_reason is not None

    @property
    def fallback_reason(self) -> str | None:
        """Why it fell back, in words; None when it did not."""
        return self._fallback_reason

    @property
    def input_names(self) -> tuple[str, ...]:
        """The graph's input names."""
        return tuple(self._inputs)

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Run the graph on one batch.

        Args:
            inputs: one array per graph input (see :attr:`input_names`), ``(batch, ...)``.

        Returns:
            The first output, ``(batch, ...)``.

        Raises:
            UsageError: an input is missing, unexpected or of the wrong dtype.
        """
        if inputs.keys() != self._inputs.keys():
            raise UsageError(
                f"inputs {sorted(inputs)} do not match the graph's {sorted(self._inputs)}"
            )
        for key, array in inputs.items():
            expected = self._inputs[key]
            if expected is not None and array.dtype != expected:
                raise UsageError(f"input {key!r} is {array.dtype}, the graph takes {expected}")
        outputs = self._session.run(self._output_names, dict(inputs))
        result: npt.NDArray[np.float32] = outputs[0]
        return result

    def __repr__(self) -> str:
        return f"OnnxBackend(providers={self._providers}, fell_back={self.fell_back})"


class TorchBackend:
    """One ``nn.Module`` run with torch under ``torch.inference_mode()``.

    The module is put in eval mode and moved to ``device`` (in place: it is the caller's
    module). Torch's CPU thread count is process-wide (``torch.set_num_threads``), so it is not
    set here.

    Args:
        module: takes one tensor per input, in ``input_names`` order, returns one tensor.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        input_names: the keys ``run`` takes, in the order of the module's arguments; None for a
            module of one input, which then takes any one key.

    Raises:
        UsageError: an unknown device, or a CUDA device torch cannot use.
    """

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device = "cpu",
        *,
        input_names: Sequence[str] | None = None,
    ) -> None:
        import torch

        try:
            self._device = torch.device(device)
        except RuntimeError as error:
            raise UsageError(f"unknown torch device {device!r}: {error}") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(
                f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU"
            )
        self._module = module.eval().to(self._device)
        self._input_names = None if input_names is None else tuple(input_names)

    @property
    def name(self) -> str:
        """``"torch"``."""
        return "torch"

    @property
    def providers(self) -> tuple[str, ...]:
        """The device, e.g. ``("cpu",)`` or ``("cuda:0",)``."""
        return (str(self._device),)

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Run the module on one batch.

        Args:
            inputs: one array per module argument, ``(batch, ...)``; read-only arrays are
                copied (torch cannot wrap them).

        Returns:
            The module's output as float32 on the host, ``(batch, ...)``.

        Raises:
            UsageError: the inputs do not match ``input_names`` (or are not exactly one).
        """
        if self._input_names is None:
            if len(inputs) != 1:
                raise UsageError(f"this module takes one input, got {sorted(inputs)}")
            arrays = list(inputs.values())
        else:
            if inputs.keys() != set(self._input_names):
                raise UsageError(
                    f"inputs {sorted(inputs)} do not match {sorted(self._input_names)}"
                )
            arrays = [inputs[name] for name in self._input_names]
        import torch  # already loaded by __init__: a dictionary lookup

        with torch.inference_mode():
            tensors = [
                torch.from_numpy(array if array.flags.writeable else array.copy()).to(self._device)
                for array in arrays
            ]
            out: torch.Tensor = self._module(*tensors)
            result: npt.NDArray[np.float32] = out.float().cpu().numpy()
        return result

    def __repr__(self) -> str:
        return f"TorchBackend(device={self._device})"
