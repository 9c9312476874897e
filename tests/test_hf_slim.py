"""End to end on real transformers models: a tiny Llama (tied embeddings, float32) and a tiny Mistral (untied,
bfloat16) fine-tuned with RateConstraint through transformers' Trainer, saved with save_pretrained, compressed
with `slimrate compress`, then loaded back (runtime.load with model_factory="hf:DIR", `slimrate decompress` +
from_pretrained) and compared with the fine-tuned model whose weights are quantized independently here.

Logits are compared exactly: both sides run the same transformers code on the same weights, in the same dtype,
process and thread count, so any difference is a weight that differs (measured: identical logits).
"""

import copy
import subprocess
import sys

import pytest
import torch

from slimrate import cli, runtime
from slimrate.backslash import RateConstraint
from slimrate.sparse import SparseLinear

from helpers import skip_unless_backend

transformers = pytest.importorskip("transformers")

STEP = 0.002  # Δ of `slimrate compress --step`
VOCAB = 64
TOKENS = 16
FAMILIES = {  # name: (config, dtype saved)
    "llama": (lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True), torch.float32),
    "mistral": (lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, sliding_window=8), torch.bfloat16),
}
# Sparse against dense layers: both accumulate in float32, in another order. float32: as tests/test_sparse.py's
# sparse-vs-dense checks (measured here: 3e-8 on logits ≤ 0.42); bfloat16: 2 ulps at 1 (measured: 0, both round
# the float32 sum once to bfloat16).
SPARSE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


def fine_tune(config, out_dir, steps: int = 4):
    """``steps`` Trainer steps on random token sequences with RateConstraint applied through its callback."""
    from slimrate.backslash import RateConstraintCallback

    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, TOKENS), generator=g)]
    torch.manual_seed(0)  # a module-scoped fixture runs before the per-test seed
    model = transformers.AutoModelForCausalLM.from_config(config)
    constraint = RateConstraint(model, lam=1.0)
    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                                          use_cpu=True, report_to=[], save_strategy="no", learning_rate=1e-3,
                                          disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         callbacks=[RateConstraintCallback(constraint)]).train()
    assert constraint.steps == steps
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """(fine-tuned model as from_pretrained loads it back, the save_pretrained folder), once per family.

    The model is read back rather than kept: ``.to(bfloat16)`` also casts the rotary inv_freq buffer, which
    from_pretrained (and the runtime) recompute in float32."""
    make_config, dtype = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    fine_tune(make_config(), root / "trainer").to(dtype).save_pretrained(root / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    assert model.dtype == dtype
    return model, root / "model"


def quantized(model):
    """The model with every float weight of ≥ 2 dims replaced by round(θ/Δ)·Δ, computed in float64 (ties to even)
    and rounded once to the weight's dtype: what `slimrate compress --step Δ` stores; 1-D weights are kept."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():  # a tied tensor once: quantizing twice can move a bf16 value
            if p.dim() >= 2:
                p.copy_((torch.round(p.double() / STEP) * STEP).to(p.dtype))
    return reference


def logits(model, ids):
    with torch.no_grad():
        return runtime.output_tensor(model(ids))


def compress(folder, out):
    skip_unless_backend("native", "cpu")
    assert cli.main(["compress", str(folder), "-o", str(out), "--step", str(STEP)]) == 0
    return out


def test_runtime_loads_the_safetensors_of_a_saved_model_losslessly(saved):
    model, folder = saved
    loaded = runtime.load(folder / "model.safetensors", model_factory=f"hf:{folder}", sparse=False)
    assert type(loaded) is type(model) and loaded.dtype == model.dtype and not loaded.training
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings
    ids = runtime.example_input(f"hf:{folder}", loaded, 3)
    assert ids.shape == (3, TOKENS) and ids.dtype == torch.int64
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_runtime_loads_a_sharded_folder(saved, tmp_path):
    model, folder = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    loaded = runtime.load(tmp_path / "sharded", model_factory=f"hf:{folder}", sparse=False)
    ids = runtime.example_input(f"hf:{folder}", loaded, 2)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_runtime_loads_the_compressed_model_as_its_quantized_weights(saved, tmp_path):
    model, folder = saved
    slim = compress(folder, tmp_path / "m.slim")
    loaded = runtime.load(slim, model_factory=f"hf:{folder}", sparse=False)
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    expected = logits(quantized(model), ids)
    assert not torch.equal(expected, logits(model, ids)), "Δ must change the weights, or this test proves nothing"
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_decompressed_folder_loads_with_from_pretrained(saved, tmp_path):
    model, folder = saved
    slim = compress(folder, tmp_path / "m.slim")
    assert cli.main(["decompress", str(slim), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    assert loaded.dtype == model.dtype
    torch.testing.assert_close(logits(loaded, ids), logits(quantized(model), ids), rtol=0, atol=0)


def test_runtime_swaps_pruned_hf_linears_for_sparse_ones(saved, tmp_path):
    skip_unless_backend("native", "cpu")
    from safetensors.torch import save_model

    from slimrate.sparse import prune_

    model, folder = saved
    pruned = copy.deepcopy(model)
    prune_(pruned, 0.9)
    save_model(pruned, tmp_path / "pruned.safetensors")
    factory = f"hf:{folder}"
    sparse = runtime.load(tmp_path / "pruned.safetensors", model_factory=factory, min_sparsity=0.5, measure=False)
    dense = runtime.load(tmp_path / "pruned.safetensors", model_factory=factory, sparse=False)
    swapped = [d.name for d in sparse.sparsify_decisions if d.replaced]
    assert "model.layers.0.mlp.down_proj" in swapped and isinstance(sparse.model.layers[0].mlp.down_proj,
                                                                     SparseLinear)
    ids = torch.randint(0, VOCAB, (2, TOKENS))
    tol = SPARSE_TOLERANCE[model.dtype]
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=tol, atol=tol)


def test_cli_run_loads_an_hf_model(saved, tmp_path, capsys):
    model, folder = saved
    path = folder / "model.safetensors"
    assert cli.main(["run", str(path), "--arch", f"hf:{folder}", "--bench", "--repeats", "2", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and f"input (2, {TOKENS}) torch.int64" in out
    assert "max |sparse − dense| = 0" in out  # nothing is pruned: no layer is swapped


@pytest.mark.parametrize("folder,message", [
    ("missing", "'hf:{tmp}/missing': {tmp}/missing is not a folder"),
    ("empty", "'hf:{tmp}/empty': {tmp}/empty holds no config.json"),
], ids=["missing", "no-config"])
def test_hf_factory_needs_a_folder_holding_config_json(saved, tmp_path, capsys, folder, message):
    (tmp_path / "empty").mkdir()
    message = message.format(tmp=tmp_path)
    weights = saved[1] / "model.safetensors"
    with pytest.raises(ValueError, match=f"model_factory {message}"):
        runtime.load(weights, model_factory=f"hf:{tmp_path / folder}")
    assert cli.main(["run", str(weights), "--arch", f"hf:{tmp_path / folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimrate run: --arch {message}") and err.count("\n") == 1


def test_hf_weights_that_do_not_fit_the_config_are_named(saved, tmp_path):
    from safetensors.torch import save_file

    _, folder = saved
    weights = {"model.embed_tokens.weight": torch.randn(VOCAB + 1, 16)}
    save_file(weights, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has shape \(65, 16\), \w+ForCausalLM expects "
                                         r"\(64, 16\)"):
        runtime.load(tmp_path / "w.safetensors", model_factory=f"hf:{folder}")


def test_importing_slimrate_runtime_does_not_import_transformers():
    code = "import sys, slimrate.runtime; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
