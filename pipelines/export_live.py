"""Build the live model folder (``engine/models/weights/live``) from the two checkpoints.

``python -m pipelines.export_live --light-asd ../shared/models/light-asd/finetuning_TalkSet.model``
reads Light-ASD's encoders and back-end and SyncNet-lite's trained heads (the shipped
``syncnet_lite.pt`` by default) and writes ``visual_step.onnx``, ``audio_step.onnx`` and
``heads.npz`` (see :mod:`engine.models.live`). Needs the ``dev`` extra (``onnx``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.models.light_asd import (
    StreamingVisualEncoder,
    load_light_asd_backend,
    load_light_asd_encoders,
    streaming_state_size,
)
from engine.models.live import (
    AUDIO_STEP_FRAMES,
    LIVE_WEIGHTS_DIR,
    STEP_FRAMES,
    STEPS_PER_FRAME,
)

SYNCNET_LITE_PT = LIVE_WEIGHTS_DIR.parent / "syncnet_lite" / "syncnet_lite.pt"


def export(light_asd: Path, syncnet_lite: Path, out: Path) -> None:
    """Write the three files of the live model into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    visual, audio = load_light_asd_encoders(light_asd)
    visual.eval()
    audio.eval()
    state = streaming_state_size()
    step = StreamingVisualEncoder(visual, STEP_FRAMES).eval()
    _onnx(
        step,
        (torch.rand(2, STEP_FRAMES, 112, 112), torch.zeros(2, state)),
        ["faces", "state"],
        out / "visual_step.onnx",
    )
    _onnx(
        audio,
        (torch.rand(2, 1, 13, AUDIO_STEP_FRAMES * STEPS_PER_FRAME),),
        ["mfcc"],
        out / "audio_step.onnx",
    )
    arrays = _heads(syncnet_lite) | _backend(light_asd)
    arrays["state_size"] = np.array(state)
    np.savez_compressed(out / "heads.npz", **arrays)


def _onnx(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path
) -> None:
    axes = {name: {0: "batch"} for name in [*names, "out"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_axes=axes,
            dynamo=False,
            opset_version=17,
        )


def _heads(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    arrays: dict[str, np.ndarray] = {}
    for name in ("video_head", "audio_head"):
        weight = state[f"{name}.window.weight"].double()  # (512, 128, 5)
        mean, var = state[f"{name}.norm.running_mean"], state[f"{name}.norm.running_var"]
        scale = state[f"{name}.norm.weight"].double() / torch.sqrt(var.double() + 1e-5)
        arrays[f"{name}.window"] = (weight * scale[:, None, None]).reshape(512, -1).numpy()
        arrays[f"{name}.shift"] = (state[f"{name}.norm.bias"] - mean * scale).numpy()
        arrays[f"{name}.project"] = state[f"{name}.project.weight"][:, :, 0].numpy()
        arrays[f"{name}.bias"] = state[f"{name}.project.bias"].numpy()
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _backend(path: Path) -> dict[str, np.ndarray]:
    backend = load_light_asd_backend(path)
    return {k: v.detach().numpy().astype(np.float32) for k, v in backend.state_dict().items()}


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light-asd", type=Path, required=True)
    parser.add_argument("--syncnet-lite", type=Path, default=SYNCNET_LITE_PT)
    parser.add_argument("--out", type=Path, default=LIVE_WEIGHTS_DIR)
    args = parser.parse_args()
    export(args.light_asd, args.syncnet_lite, args.out)
    for file in sorted(args.out.iterdir()):
        print(f"{file}  {file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
