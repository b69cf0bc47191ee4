"""One ONNX graph per pretrained PINs tower: the unimodal trunk, then the trained head.

The trunks come as ONNX files (SFace with a batch axis fixed at 1, resemblyzer on mel power); the
head is two matrix products. The graph is assembled with ``onnx.helper`` rather than exported
from torch, so the trunk keeps its own opset (SFace's block-quantised weights need opset 21):

- face: ``face (batch, 3, 112, 112)`` -> SFace -> unit ``sface`` (128) -> head -> ``pins`` (256);
- voice: ``spectrogram (batch, 160, 257)`` -> squared -> 40-band Slaney mel -> resemblyzer ->
  ``d-vector`` (256, unit) -> head -> ``pins`` (256);
- output ``embedding`` = ``concat(pins, trunk)``: ``(batch, 256 + trunk size)``.

Needs the ``onnx`` package (a dev extra): only training builds towers; the engine only runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.core.errors import UsageError
from engine.models.pins import PinsTowerSpec
from engine.models.spec import BATCH_AXIS

FACE_TRUNK_INPUT = "data"
FACE_TRUNK_OUTPUT = "fc1"
VOICE_TRUNK_INPUT = "mels"
VOICE_TRUNK_OUTPUT = "embed"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - dev extra
        raise UsageError("building PINs towers needs onnx: pip install talkscope[dev]") from error
    return onnx


def assemble_tower(
    tower: PinsTowerSpec,
    trunk: Path,
    head: dict[str, npt.NDArray[np.float32]],
    mel_bank: npt.NDArray[np.float64] | None = None,
) -> bytes:
    """The serialised ONNX tower: ``trunk`` (an ONNX file) then the head's weights.

    Args:
        tower: which tower (its input name and shape).
        trunk: the unimodal ONNX encoder.
        head: :meth:`engine.models.pins.Head.arrays` of the trained head.
        mel_bank: the ``(40, 257)`` filterbank in front of the voice trunk (voice only).
    """
    onnx = _onnx()
    helper = onnx.helper
    model = onnx.load(str(trunk))
    graph = model.graph
    del graph.value_info[:]  # shapes inferred at batch 1 would pin the batch axis
    trunk_in = graph.input[0].name
    trunk_out = graph.output[0].name
    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, array: npt.NDArray[Any]) -> str:
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    if tower.modality == "voice":
        if mel_bank is None:
            raise UsageError("the voice tower needs the mel filterbank")
        _rename_input(graph, trunk_in, "pins_mels")
        nodes.append(helper.make_node("Mul", [tower.input.name] * 2, ["pins_power"]))
        bank = const("pins_mel_bank", mel_bank.T.astype(np.float32))
        nodes.append(helper.make_node("MatMul", ["pins_power", bank], ["pins_mels"]))
    else:
        _rename_input(graph, trunk_in, tower.input.name)
    nodes.append(helper.make_node("LpNormalization", [trunk_out], ["pins_trunk"], axis=1, p=2))
    w1 = const("pins_w1", head["hidden.weight"])
    b1 = const("pins_b1", head["hidden.bias"])
    w2 = const("pins_w2", head["out.weight"])
    b2 = const("pins_b2", head["out.bias"])
    nodes.append(helper.make_node("Gemm", ["pins_trunk", w1, b1], ["pins_h"], transB=1))
    nodes.append(helper.make_node("Relu", ["pins_h"], ["pins_hr"]))
    nodes.append(helper.make_node("Gemm", ["pins_hr", w2, b2], ["pins_raw"], transB=1))
    nodes.append(helper.make_node("LpNormalization", ["pins_raw"], ["pins_unit"], axis=1, p=2))
    nodes.append(helper.make_node("Concat", ["pins_unit", "pins_trunk"], ["embedding"], axis=1))

    prefix = nodes[:2] if tower.modality == "voice" else []
    suffix = nodes[len(prefix) :]
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*prefix, *old, *suffix])
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info(
            tower.input.name, onnx.TensorProto.FLOAT, [BATCH_AXIS, *tower.input.shape]
        )
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(
            "embedding", onnx.TensorProto.FLOAT, [BATCH_AXIS, tower.output_size]
        )
    )
    graph.name = f"talkscope_pins_{tower.modality}"
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _rename_input(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
