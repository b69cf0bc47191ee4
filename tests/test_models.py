"""Model specs, SyncNet v2 weights loading, ONNX export and parity, inference back-ends."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.core.errors import UsageError, WeightsError
from engine.models import (
    MODEL_SPECS,
    SYNCNET_LITE,
    SYNCNET_V2,
    ModelSpec,
    TowerName,
    default_weights_dir,
    default_weights_path,
    get_spec,
    git_blob_sha1,
    verify_weights,
)
from engine.models.export import TowerModule, export_towers
from engine.models.syncnet_lite import SyncNetLiteModel
from engine.models.syncnet_v2 import SyncNetV2Model, load_syncnet_v2
from engine.runtime import InferenceBackend, OnnxBackend, TorchBackend, available_providers

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# Per tower: the batch sizes the exported graph is run at. SyncNet v2's lip tower is ~60 ms per
# window on one core, so its batches stay small.
BATCHES = {
    ("syncnet_lite", "video"): (1, 2),
    ("syncnet_lite", "audio"): (1, 7),
    ("syncnet_v2", "video"): (1, 2),
    ("syncnet_v2", "audio"): (1, 7),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so export folding is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "syncnet_v2": randomise_batchnorm(SyncNetV2Model(), 1),
        "syncnet_lite": randomise_batchnorm(SyncNetLiteModel(), 2),
    }


@pytest.fixture(scope="module")
def exported(
    models: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("onnx")
    return {name: export_towers(model, get_spec(name), out) for name, model in models.items()}


def window(spec: ModelSpec, tower: str, batch: int, seed: int = 0) -> np.ndarray:
    """Inputs in the value range the layout describes."""
    rng = np.random.default_rng(seed)
    shape = (batch, *spec.tower(tower).input.shape)
    if tower == "audio":
        return (rng.standard_normal(shape) * 8).astype(np.float32)
    scale = 255.0 if spec is SYNCNET_V2 else 1.0
    return (rng.random(shape) * scale).astype(np.float32)


# --- specs --------------------------------------------------------------------------------


def test_unknown_model_name_is_a_usage_error_listing_the_known_ones() -> None:
    with pytest.raises(UsageError, match="syncnet_lite, syncnet_v2"):
        get_spec("syncnet_v3")
    with pytest.raises(UsageError, match="video or audio"):
        SYNCNET_V2.tower("lips")


def test_specs_pair_5_frames_with_20_mfcc_steps() -> None:
    assert set(MODEL_SPECS) == {"syncnet_v2", "syncnet_lite"}
    for spec in MODEL_SPECS.values():
        assert spec.window.video_frames == 5 and spec.window.mfcc_steps == 20
        frames = spec.window.chunk_frames
        assert spec.audio.input.shape == (1, 13, 4 * frames)
        assert spec.video.input.name != spec.audio.input.name
        assert spec.towers == (spec.video, spec.audio)
        assert spec.tower("audio") is spec.audio
    assert SYNCNET_V2.video.input.shape == (3, 5, 224, 224)
    assert SYNCNET_V2.window.chunk_frames == 5 and not SYNCNET_V2.window.is_chunked
    # a chunk of 48 windows with 6 frames of context on each side
    assert SYNCNET_LITE.window.chunk_frames == 64 and SYNCNET_LITE.window.is_chunked
    assert SYNCNET_LITE.video.input.shape == (64, 112, 112)
    assert SYNCNET_LITE.video.output.shape == (48, 256) == SYNCNET_LITE.audio.output.shape
    assert SYNCNET_V2.weights is not None and SYNCNET_LITE.weights is None


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_models_take_and_give_what_their_spec_says(name: str, models: dict[str, nn.Module]) -> None:
    spec = get_spec(name)
    model = models[name]
    with torch.inference_mode():
        for tower in ("video", "audio"):
            out = TowerModule(model, tower)(torch.from_numpy(window(spec, tower, 1)))
            assert out.shape == (1, *spec.tower(tower).output.shape)
            assert torch.isfinite(out).all()


def test_parameter_counts() -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(SyncNetV2Model()) == 13_631_616
    assert count(SyncNetLiteModel()) < 2_000_000


def test_weights_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALKSCOPE_MODELS", "~/weights")
    assert default_weights_dir() == Path.home() / "weights"
    assert default_weights_path(SYNCNET_V2) == Path.home() / "weights" / "syncnet_v2.model"
    monkeypatch.delenv("TALKSCOPE_MODELS")
    assert default_weights_dir() == Path.home() / ".cache" / "talkscope" / "models"
    with pytest.raises(UsageError, match="no published weights"):
        default_weights_path(SYNCNET_LITE)


# --- hashes -------------------------------------------------------------------------------


def test_git_blob_sha1_is_what_git_hash_object_prints(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(range(256)) * 5000 + b"tail\0\n")  # > 1 MiB: crosses a chunk
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    expected = subprocess.run(
        ["git", "hash-object", "--no-filters", str(small)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert git_blob_sha1(small) == expected


# --- SyncNet v2 weights ---------------------------------------------------------------------


def test_syncnet_v2_has_the_official_parameter_names() -> None:
    state = SyncNetV2Model().state_dict()
    assert len(state) == 102
    assert state["netcnnaud.0.weight"].shape == (64, 1, 3, 3)
    assert state["netcnnaud.18.weight"].shape == (512, 256, 5, 4)
    assert state["netcnnlip.0.weight"].shape == (96, 3, 5, 7, 7)
    assert state["netcnnlip.18.weight"].shape == (512, 256, 1, 6, 6)
    assert state["netfcaud.1.running_var"].shape == (512,)
    assert state["netfclip.3.weight"].shape == (1024, 512)
    assert "netcnnaud.3.weight" not in state  # index 3 is the (parameter-free) no-op pool


@pytest.fixture(scope="module")
def v2_state(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in models["syncnet_v2"].state_dict().items()}


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_loader_round_trip(
    legacy_format: bool,
    v2_state: dict[str, torch.Tensor],
    models: dict[str, nn.Module],
    tmp_path: Path,
) -> None:
    path = tmp_path / "syncnet_v2.model"
    state = dict(v2_state)
    if legacy_format:
        # Like a file saved before PyTorch 0.4.1: old serialisation, no num_batches_tracked.
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    loaded = load_syncnet_v2(path)
    assert not loaded.training
    for key, value in v2_state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    mfcc = torch.from_numpy(window(SYNCNET_V2, "audio", 3))
    with torch.inference_mode():
        reference = TowerModule(models["syncnet_v2"], "audio")(mfcc)
        assert torch.equal(loaded.forward_aud(mfcc), reference)


def test_loader_strips_wrapper_prefixes(v2_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "instance.model"
    torch.save({f"__S__.{key}": value for key, value in v2_state.items()}, path)
    loaded = load_syncnet_v2(path)
    assert torch.equal(loaded.state_dict()["netfcaud.3.bias"], v2_state["netfcaud.3.bias"])


def test_missing_and_unexpected_keys_are_named(
    v2_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "bad.model"
    state = {k: v for k, v in v2_state.items() if k != "netcnnlip.4.weight"}
    state["netcnnlip.99.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsError) as caught:
        load_syncnet_v2(path)
    message = str(caught.value)
    assert "missing keys (1): netcnnlip.4.weight" in message
    assert "unexpected keys (1): netcnnlip.99.weight" in message


def test_a_wrong_shape_is_named(v2_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "wide.model"
    state = dict(v2_state)
    state["netfclip.3.weight"] = torch.zeros(512, 512)  # a 512-d embedding head
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"netfclip.3.weight has shape \(512, 512\), expected"):
        load_syncnet_v2(path)


def test_unusable_files_are_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found.*syncnet_v2.model"):
        load_syncnet_v2(tmp_path / "absent.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match="weights_only"):
        load_syncnet_v2(garbage)
    truncated = tmp_path / "truncated.model"
    torch.save({"netfcaud.3.bias": torch.zeros(1024)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a readable torch file"):
        load_syncnet_v2(truncated)
    listing = tmp_path / "list.model"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_syncnet_v2(listing)


def test_a_pickled_model_needs_allow_pickle(
    models: dict[str, nn.Module], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "whole.model"
    torch.save(models["syncnet_v2"], path)
    with pytest.raises(WeightsError, match="SyncNetV2Model.*allow_pickle=True"):
        load_syncnet_v2(path)
    with caplog.at_level(logging.WARNING, logger="engine.models.syncnet_v2"):
        loaded = load_syncnet_v2(path, allow_pickle=True)
    assert "weights_only=False" in caplog.text
    expected = models["syncnet_v2"].state_dict()["netfclip.3.bias"]
    assert torch.equal(loaded.state_dict()["netfclip.3.bias"], expected)


def test_check_hash_rejects_a_file_that_is_not_the_published_one(
    v2_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "syncnet_v2.model"
    torch.save(v2_state, path)
    with pytest.raises(WeightsError, match="d714bbf3b30324ced69e3815fc41ae6dc519303c"):
        load_syncnet_v2(path, check_hash=True)
    with pytest.raises(WeightsError, match="git blob sha1"):
        verify_weights(path, SYNCNET_V2)


# --- ONNX export and parity ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "tower"), sorted(BATCHES))
def test_exported_tower_has_a_dynamic_batch_and_matches_torch(
    name: str,
    tower: TowerName,
    models: dict[str, nn.Module],
    exported: dict[str, dict[str, Path]],
) -> None:
    spec = get_spec(name)
    onnx_backend = OnnxBackend(exported[name][tower], ("cpu",), threads=1)
    torch_backend = TorchBackend(TowerModule(models[name], tower))
    assert onnx_backend.input_names == (spec.tower(tower).input.name,)
    for batch in BATCHES[(name, tower)]:
        inputs = {spec.tower(tower).input.name: window(spec, tower, batch, seed=batch)}
        got = onnx_backend.run(inputs)
        expected = torch_backend.run(inputs)
        assert got.shape == expected.shape == (batch, *spec.tower(tower).output.shape)
        assert got.dtype == np.float32
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(got - expected).max() <= 1e-4 * scale


def test_export_checks_and_restores_the_training_mode(tmp_path: Path) -> None:
    import onnx

    model = SyncNetLiteModel().train()
    paths = export_towers(model, SYNCNET_LITE, tmp_path, opset=18)
    assert model.training
    assert set(paths) == {"video", "audio"}
    graph = onnx.load(str(paths["video"]))
    assert graph.opset_import[0].version == 18
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with pytest.raises(UsageError, match="opset 16"):
        export_towers(model, SYNCNET_LITE, tmp_path, opset=16)
    with pytest.raises(UsageError, match="not a sync model"):
        TowerModule(nn.Linear(2, 2), "video")


def test_dynamo_exporter_gives_the_same_embeddings(
    models: dict[str, nn.Module], exported: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript")
    paths = export_towers(models["syncnet_lite"], SYNCNET_LITE, tmp_path, exporter="dynamo")
    for tower, path in paths.items():
        inputs = {SYNCNET_LITE.tower(tower).input.name: window(SYNCNET_LITE, tower, 5)}
        dynamo = OnnxBackend(path, threads=1).run(inputs)
        legacy = OnnxBackend(exported["syncnet_lite"][tower], threads=1).run(inputs)
        assert np.abs(dynamo - legacy).max() <= 1e-4 * max(1.0, float(np.abs(legacy).max()))


# --- back-ends ----------------------------------------------------------------------------


def test_backends_satisfy_the_protocol(
    models: dict[str, nn.Module], exported: dict[str, dict[str, Path]]
) -> None:
    onnx_backend = OnnxBackend(exported["syncnet_lite"]["audio"].read_bytes(), "cpu", threads=1)
    torch_backend = TorchBackend(TowerModule(models["syncnet_lite"], "audio"))
    for backend in (onnx_backend, torch_backend):
        assert isinstance(backend, InferenceBackend)
    assert (onnx_backend.name, onnx_backend.providers) == ("onnxruntime", ("cpu",))
    assert not onnx_backend.fell_back and onnx_backend.fallback_reason is None
    assert (torch_backend.name, torch_backend.providers) == ("torch", ("cpu",))


def test_asking_for_a_gpu_provider_that_is_not_installed(
    exported: dict[str, dict[str, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    """Without onnxruntime-gpu: an error by default, a reported fallback when allowed."""
    if "cuda" in available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA provider exists here")
    path = exported["syncnet_lite"]["audio"]
    with pytest.raises(UsageError, match=r"no cuda provider.*talkscope\[gpu\]"):
        OnnxBackend(path, ("cuda", "cpu"))
    with pytest.raises(UsageError, match="no tensorrt provider"):
        OnnxBackend(path, ("tensorrt", "cuda", "cpu"))
    with caplog.at_level(logging.WARNING, logger="engine.runtime.backends"):
        backend = OnnxBackend(path, ("cuda", "cpu"), allow_fallback=True, threads=1)
    assert backend.requested == ("cuda", "cpu")
    assert backend.providers == ("cpu",)
    assert backend.fell_back
    assert backend.fallback_reason is not None and "cuda" in backend.fallback_reason
    assert "fell back" in caplog.text
    # Falling back entirely: CPU is what remains even when it was not asked for.
    assert OnnxBackend(path, "cuda", allow_fallback=True).providers == ("cpu",)


@pytest.mark.gpu
def test_cuda_provider_really_runs_when_installed(exported: dict[str, dict[str, Path]]) -> None:
    if "cuda" not in available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    backend = OnnxBackend(exported["syncnet_lite"]["audio"], ("cuda", "cpu"))
    assert backend.providers[0] == "cuda" and not backend.fell_back


def test_backend_usage_errors(
    exported: dict[str, dict[str, Path]], models: dict[str, nn.Module], tmp_path: Path
) -> None:
    path = exported["syncnet_lite"]["video"]
    with pytest.raises(UsageError, match="unknown execution provider 'gpu'"):
        OnnxBackend(path, ("gpu",))
    with pytest.raises(UsageError, match="no execution provider"):
        OnnxBackend(path, ())
    with pytest.raises(UsageError, match="threads"):
        OnnxBackend(path, threads=0)
    backend = OnnxBackend(path, ("CPUExecutionProvider",), threads=1)
    good = window(SYNCNET_LITE, "video", 2)
    with pytest.raises(UsageError, match="do not match"):
        backend.run({"mfcc": good})
    with pytest.raises(UsageError, match="float64"):
        backend.run({"faces": good.astype(np.float64)})
    with pytest.raises(WeightsError, match="not found"):
        OnnxBackend(tmp_path / "absent.onnx")
    with pytest.raises(WeightsError, match="onnxruntime"):
        OnnxBackend(b"not a graph")
    with pytest.raises(UsageError, match="unknown torch device"):
        TorchBackend(TowerModule(models["syncnet_lite"], "video"), "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            TorchBackend(TowerModule(models["syncnet_lite"], "video"), "cuda")


def test_torch_backend_takes_read_only_arrays(models: dict[str, nn.Module]) -> None:
    frames = window(SYNCNET_LITE, "video", 2)
    frames.flags.writeable = False  # Frame data is read-only
    backend = TorchBackend(TowerModule(models["syncnet_lite"], "video"))
    assert backend.run({"faces": frames}).shape == (2, 48, 256)
    named = TorchBackend(models["syncnet_lite"], input_names=("video", "mfcc"))
    with pytest.raises(UsageError, match="do not match"):
        named.run({"video": frames})


def test_missing_onnxruntime_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, exported: dict[str, dict[str, Path]]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(UsageError, match=r"install talkscope\[cpu\].*talkscope\[gpu\]"):
        OnnxBackend(exported["syncnet_lite"]["audio"])
