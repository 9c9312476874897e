"""DMB on a chosen device: the device check, a run folder loaded onto a device, the --device flags, and (with a
GPU) a run trained on CUDA against the same run's bound on the CPU.  CPU runs are bit-identical to the code
before the device option (checked once against it: final weights, bounds and samples of 20-step runs of every
method, schedule and objective)."""

import json

import pytest
import torch

from slimrate.cli import main
from slimrate.dmb import DMBConfig, bound_of, load_model, load_token_data, official_bound_of, train_dmb
from slimrate.dmb.driver import EVAL_SEED
from slimrate.train import check_device
from slimrate.train.checkpoint import read_tensors, write_manifest

TINY = {"model": "tiny", "seq_len": 16, "batch": 4, "eval_sequences": 4, "eval_samples": 2, "p0_samples": 4,
        "p0_steps": 3, "matrix_steps": 2, "outer_every": 2, "log_every": 1, "progress": False}
NO_CUDA = "no CUDA: the refusal of 'cuda' needs a machine without a GPU"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize("device", ["tpu", "meta", "cpu:1", "", "cuda:x", "gpu"])
def test_check_device_rejects_unknown_devices(device):
    with pytest.raises(ValueError, match=f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}"):
        check_device(device)


def test_check_device_rejects_a_non_string():
    with pytest.raises(TypeError, match="device: expected a string"):
        check_device(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_CUDA)
def test_config_refuses_cuda_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="device: 'cuda' needs a CUDA GPU, and this process has none.*pass 'cpu'"):
        DMBConfig(out_dir=str(tmp_path), device="cuda")


def test_config_refuses_a_gpu_this_process_cannot_see(tmp_path):
    """cuda:99: past the last GPU on a GPU machine, no GPU at all here; refused either way, naming it."""
    with pytest.raises(ValueError, match="device: 'cuda:99' (needs a CUDA GPU|is past the last GPU)"):
        DMBConfig(out_dir=str(tmp_path), device="cuda:99")


@pytest.fixture(scope="module")
def dmb_folder(tmp_path_factory):
    """A finished 4-step DMB run on the CPU (matrix phases, a p̂_0 re-estimate, the final bound)."""
    folder = tmp_path_factory.mktemp("dmb-device")
    record = train_dmb(DMBConfig(out_dir=str(folder), steps=4, device="cpu", **TINY))
    return folder, record


def test_load_model_on_the_cpu_holds_the_saved_weights_and_gives_the_runs_bound(dmb_folder):
    folder, record = dmb_folder
    model, config, _ = load_model(folder, device="cpu")
    assert model.device == torch.device("cpu") and config.device == "cpu"
    saved = read_tensors(folder / "model.safetensors", "")
    state = model.state_dict()
    assert sorted(saved) == sorted(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    x_eval = load_token_data("text8", 16).eval_subset(TINY["eval_sequences"])
    assert bound_of(model, x_eval, TINY["eval_samples"], EVAL_SEED).bits_per_token == \
        record["final_eval"]["bits_per_token"]


def test_load_model_reads_a_run_written_before_the_device_setting(dmb_folder, tmp_path):
    folder, _ = dmb_folder
    run = json.loads((folder / "dmb.json").read_text())
    del run["config"]["device"]
    (tmp_path / "dmb.json").write_text(json.dumps(run))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    write_manifest(tmp_path, "slimrate-dmb", 2, ("model.safetensors", "dmb.json"))
    model, config, _ = load_model(tmp_path)
    assert config.device == "cpu" and model.device == torch.device("cpu")


def test_load_model_refuses_an_unknown_device(dmb_folder):
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        load_model(dmb_folder[0], device="tpu")


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_cli_refuses_an_unknown_device(dmb_folder, command, capsys):
    assert main(["dmb", command, str(dmb_folder[0]), "--device", "tpu"]) == 2
    assert "argument --device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("argv", [["dmb", "train", "--budget", "2", "--out", "x"], ["study", "dmb", "--quick"]],
                         ids=["train", "study"])
def test_cli_refuses_cuda_without_a_gpu(argv, capsys):
    assert main(argv + ["--device", "cuda"]) == 2
    assert "argument --device: 'cuda' needs a CUDA GPU" in capsys.readouterr().err


@needs_cuda
@pytest.mark.parametrize("method", ["dmb", "sedd-absorb"])
def test_run_on_cuda_resumes_and_its_model_bounds_agree_on_both_devices(tmp_path, method):
    """Trained on cuda with a checkpoint, resumed to the end, loaded on either device: same bounds (a CPU
    generator draws the same times and uniforms for both; the float32 networks differ in rounding only, ~1e-6
    relative per term; the tolerance 1e-3 is not measured: no GPU where this was written)."""
    config = {**TINY, "method": method, "device": "cuda", "checkpoint_every": 2}
    train_dmb(DMBConfig(out_dir=str(tmp_path), steps=2, **config))
    record = train_dmb(DMBConfig(out_dir=str(tmp_path), steps=4, resume=True, **config))
    assert record["config"]["device"] == "cuda"
    x_eval = load_token_data("text8", 16).eval_subset(8)
    (on_gpu, _, _), (on_cpu, _, _) = load_model(tmp_path, device="cuda"), load_model(tmp_path)
    assert on_gpu.device.type == "cuda" and on_gpu.net.output.weight.device.type == "cuda"
    for evaluate in (bound_of, official_bound_of):
        gpu, cpu = evaluate(on_gpu, x_eval, 2, 0).bits_per_token, evaluate(on_cpu, x_eval, 2, 0).bits_per_token
        assert gpu == pytest.approx(cpu, rel=1e-3), evaluate.__name__
