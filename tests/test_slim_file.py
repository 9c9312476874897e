"""Streaming writes and lazy reads of .slim files: SlimWriter, save_slim from a generator, SlimFile,
load_slim_into (strict, non-strict, meta device, tied weights), interruptions and the memory bound."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import slimrate
from slimrate import SlimFile, SlimWriter, load_slim, load_slim_into, save_slim
from slimrate.backslash import SlimFormatError
from slimrate.ops import extension_available

from helpers import assert_same_tensors, quantized, slim_index

if not extension_available():
    pytest.skip("slimrate._C is not built: the .slim coders (eg_encode, rans_encode) run in C++",
                allow_module_level=True)

CODERS = ["eg", "eg-signed", "rans"]
STEP = 0.01


def mixed_state() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(6, 7) * 0.05, "h": (torch.randn(3, 5) * 0.05).to(torch.bfloat16), "b": torch.randn(7),
            "n": torch.randint(-9, 9, (4,)), "e": torch.empty(0, 3)}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("coder", CODERS)
def test_slim_file_reads_what_load_slim_reads(tmp_path, coder):
    path = save_slim(mixed_state(), tmp_path / "m.slim", step=STEP, coder=coder, metadata={"format": "pt"})
    with SlimFile(path) as f:
        assert f.keys() == ["w", "h", "b", "n", "e"] and f.metadata() == {"format": "pt"}
        assert f.info("h") == {"shape": (3, 5), "dtype": "bfloat16", "coder": coder, "step": STEP,
                               "nbytes": slim_index(path.read_bytes())[1]["tensors"][1]["nbytes"]}
        assert f.info("b")["coder"] == "raw" and f.info("b")["step"] is None
        assert_same_tensors({name: f.get_tensor(name) for name in reversed(f.keys())},
                            {name: t for name, t in reversed(load_slim(path).items())})


def test_get_tensor_converts_dtype_and_moves_to_device(tmp_path):
    state = mixed_state()
    path = save_slim(state, tmp_path / "m.slim", step=STEP)
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    with SlimFile(path) as f:
        for dtype in [torch.float64, torch.float16]:
            assert_same_tensors({"h": f.get_tensor("h", dtype=dtype)}, {"h": quantized(state["h"], STEP).to(dtype)})
        for device in devices:
            got = f.get_tensor("w", device=device, dtype=torch.bfloat16)
            assert got.device.type == device and got.dtype == torch.bfloat16 and got.shape == (6, 7)
        assert torch.equal(f.get_tensor("w", device=torch.device("cpu")), quantized(state["w"], STEP))


def test_get_tensor_decodes_only_the_tensor_asked_for(tmp_path):
    path = save_slim(mixed_state(), tmp_path / "m.slim", step=STEP)
    data = bytearray(path.read_bytes())
    w = slim_index(bytes(data))[1]["tensors"][0]
    data[w["offset"]] ^= 0xFF  # w's payload is corrupt; the index and the other payloads are intact
    path.write_bytes(data)
    with SlimFile(path) as f:
        assert f.get_tensor("h").shape == (3, 5)
        with pytest.raises(SlimFormatError, match="'w': payload checksum mismatch"):
            f.get_tensor("w")
    with pytest.raises(SlimFormatError, match="checksum"):
        load_slim(path)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda f: f.get_tensor("nope"), ValueError, "no tensor 'nope'"), (lambda f: f.info("nope"), ValueError, "nope"),
    (lambda f: f.get_tensor("w", dtype="float32"), TypeError, "dtype"),
    (lambda f: f.get_tensor("w", device=0), TypeError, "device"),
])
def test_slim_file_rejects_bad_arguments(tmp_path, call, error, match):
    with SlimFile(save_slim(mixed_state(), tmp_path / "m.slim", step=STEP)) as f, pytest.raises(error, match=match):
        call(f)


def test_slim_file_refuses_reads_after_close_and_empty_files(tmp_path):
    f = SlimFile(save_slim(mixed_state(), tmp_path / "m.slim", step=STEP))
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("w")
    (tmp_path / "empty.slim").write_bytes(b"")
    with pytest.raises(SlimFormatError, match="empty file"):
        SlimFile(tmp_path / "empty.slim")


def test_save_slim_streams_a_generator_one_tensor_at_a_time(tmp_path):
    # Payloads larger than the file's 8 KiB write buffer, so the file's size shows what was written.
    state = {"a": torch.randn(3000), "b": torch.randn(120, 201) * 0.05, "c": torch.randn(4000).to(torch.float64)}
    written = []

    def tensors():
        for name, t in state.items():
            yield name, t
            # Back here only after the writer took the tensor: its payload is already in the temporary file.
            (temp,) = temp_files(tmp_path)
            written.append(temp.stat().st_size)

    path = save_slim(tensors(), tmp_path / "m.slim", step=STEP, coder="eg-signed")
    _, index = slim_index(path.read_bytes())
    assert [e["coder"] for e in index["tensors"]] == ["raw", "eg-signed", "raw"]
    assert written == [e["offset"] + e["nbytes"] for e in index["tensors"]]
    assert path.read_bytes() == save_slim(state, tmp_path / "d.slim", step=STEP, coder="eg-signed").read_bytes()
    assert temp_files(tmp_path) == []


def test_slim_writer_takes_a_step_and_coder_per_tensor(tmp_path):
    state = mixed_state()
    plan = {"w": (STEP, "eg"), "h": (0.25, "rans"), "b": (0.5, "eg-signed"), "n": (None, "eg"), "e": (STEP, "rans")}
    with SlimWriter(tmp_path / "m.slim", metadata={"a": "1"}, chunk_numel=4) as writer:
        for name, (step, coder) in plan.items():
            writer.add(name, state[name], step=step, coder=coder)
    assert_same_tensors(load_slim(tmp_path / "m.slim"), {n: quantized(t, plan[n][0]) for n, t in state.items()})
    _, index = slim_index((tmp_path / "m.slim").read_bytes())
    assert [e["coder"] for e in index["tensors"]] == ["eg", "rans", "eg-signed", "raw", "rans"]
    assert [len(e.get("chunk_nbytes", [])) for e in index["tensors"]] == [11, 4, 2, 0, 0]


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda p: SlimWriter(p, chunk_numel=0), ValueError, "chunk_numel"),
    (lambda p: SlimWriter(p, chunk_numel=True), ValueError, "chunk_numel"),
    (lambda p: SlimWriter(p, metadata={"a": 1}), TypeError, "metadata"),
    (lambda p: SlimWriter(p, metadata=["a"]), TypeError, "metadata"),
])
def test_slim_writer_rejects_bad_arguments(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path / "m.slim")


@pytest.mark.parametrize(("add", "error", "match"), [
    (lambda w: w.add("w", torch.randn(2, 2), step=STEP, coder="zip"), ValueError, "coder"),
    (lambda w: w.add("n", torch.arange(3), step=STEP), ValueError, "not a float dtype"),
    (lambda w: w.add("w", torch.randn(2, 2), step=-1.0), ValueError, "step for 'w'"),
    (lambda w: w.add("x", torch.randn(2, 2), step=STEP), ValueError, "added twice"),
    (lambda w: w.add("y", [1.0], step=None), TypeError, "dense tensor"),
])
def test_slim_writer_add_rejects_bad_tensors_and_writes_nothing_for_them(tmp_path, add, error, match):
    with SlimWriter(tmp_path / "m.slim") as writer:
        writer.add("x", torch.randn(2, 2), step=STEP)
        with pytest.raises(error, match=match):
            add(writer)
    assert list(load_slim(tmp_path / "m.slim")) == ["x"]


def test_slim_writer_refuses_adds_outside_its_with_block(tmp_path):
    writer = SlimWriter(tmp_path / "m.slim")
    with pytest.raises(ValueError, match="inside `with"):
        writer.add("w", torch.randn(2), step=None)
    with writer:
        writer.add("w", torch.randn(2), step=None)
    with pytest.raises(ValueError, match="not open"):
        writer.add("v", torch.randn(2), step=None)
    with pytest.raises(ValueError, match="already used"), writer:
        pass


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_write_leaves_no_file_and_the_old_one_intact(tmp_path, failure):
    old = save_slim({"old": torch.randn(3, 3)}, tmp_path / "m.slim", step=STEP).read_bytes()
    with pytest.raises(failure), SlimWriter(tmp_path / "m.slim") as writer:
        writer.add("w", torch.randn(4, 4), step=STEP)
        raise failure()

    def tensors():
        yield "w", torch.randn(4, 4)
        raise failure()

    with pytest.raises(failure):
        save_slim(tensors(), tmp_path / "m.slim", step=STEP)
    with pytest.raises(ValueError, match="bad: x: expected finite"):
        save_slim(iter([("w", torch.randn(4, 4)), ("bad", torch.full((2, 2), float("nan")))]), tmp_path / "m.slim",
                  step=STEP)
    with pytest.raises(ValueError, match="names not in the state dict"):  # seen only once the stream has ended
        save_slim(iter([("w", torch.randn(4, 4))]), tmp_path / "m.slim", step={"w": STEP, "typo": STEP})
    assert [p.name for p in tmp_path.iterdir()] == ["m.slim"] and (tmp_path / "m.slim").read_bytes() == old
    with pytest.raises(RuntimeError), SlimWriter(tmp_path / "new.slim"):
        raise RuntimeError()
    assert [p.name for p in tmp_path.iterdir()] == ["m.slim"]


class Net(nn.Module):
    """A Linear, a LayerNorm, an int buffer and a head tied to the first layer's weight."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 6, bias=False)
        self.out.weight = self.inp.weight
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(3), persistent=False)


def saved_net(tmp_path, **kwargs) -> tuple[Path, dict]:
    net = Net()
    net.steps += torch.randint(1, 9, (2,))
    path = save_slim(net, tmp_path / "net.slim", **kwargs)
    return path, load_slim(path)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_load_slim_into_fills_every_tensor_and_keeps_ties(tmp_path, device):
    path, want = saved_net(tmp_path, step=STEP)
    assert set(want) == {"inp.weight", "inp.bias", "norm.weight", "norm.bias", "out.weight", "steps"}
    with torch.device(device):
        net = Net()
    net.norm.bias.requires_grad_(False)
    before = net.inp.weight
    if device == "meta":  # a non-persistent buffer no model hook recomputes stays on meta, which strict refuses
        with pytest.raises(ValueError, match=r"does not recompute: \['cache'\]"):
            load_slim_into(net, path)
    assert load_slim_into(net, path, strict=device == "cpu") is net
    assert_same_tensors(dict(net.state_dict()), want)
    assert net.out.weight is net.inp.weight and isinstance(net.inp.weight, nn.Parameter)
    assert (net.inp.weight is before) == (device == "cpu")  # copied in place, or assigned on the meta device
    assert net.inp.weight.requires_grad and not net.norm.bias.requires_grad
    assert net.cache.device.type == device  # not in a state dict, not loaded


def test_load_slim_into_counts_a_tied_twin_as_loaded(tmp_path):
    net = Net()
    path = save_slim({n: t for n, t in net.state_dict().items() if n != "out.weight"}, tmp_path / "n.slim", step={})
    with torch.device("meta"):
        loaded = load_slim_into(Net(), path, strict=False)  # strict=False: the meta 'cache' buffer
    assert loaded.out.weight is loaded.inp.weight and torch.equal(loaded.out.weight, net.inp.weight)


def test_load_slim_into_strict_lists_missing_and_unexpected_names(tmp_path):
    state = Net().state_dict()
    partial = {**{n: t for n, t in state.items() if n != "norm.bias"}, "extra.weight": torch.randn(2, 2)}
    path = save_slim(partial, tmp_path / "p.slim", step=STEP)
    net, want = Net(), load_slim(path)
    with torch.no_grad():
        net.norm.bias.normal_()
    bias = net.norm.bias.detach().clone()
    with pytest.raises(ValueError, match=r"missing 1 of its 6 tensors: \['norm.bias'\]; tensors it does not have: "
                                         r"\['extra.weight'\]"):
        load_slim_into(net, path)
    assert not torch.equal(net.inp.weight, want["inp.weight"])  # the names are checked before anything is loaded
    load_slim_into(net, path, strict=False)
    assert torch.equal(net.inp.weight, want["inp.weight"]) and torch.equal(net.norm.bias, bias)


def test_load_slim_into_converts_float_dtypes_except_on_meta(tmp_path):
    path, want = saved_net(tmp_path, step=STEP)
    net = Net().to(torch.float64)
    load_slim_into(net, path)
    assert net.inp.weight.dtype == torch.float64 and torch.equal(net.inp.weight, want["inp.weight"].double())
    with torch.device("meta"):
        meta = Net().to(torch.bfloat16)
    load_slim_into(meta, path, strict=False)
    assert meta.inp.weight.dtype == torch.float32 and torch.equal(meta.inp.weight, want["inp.weight"])


@pytest.mark.parametrize(("edit", "match"), [
    (lambda net: setattr(net, "norm", nn.LayerNorm(5)), r"'norm.weight' has shape \(6,\), Net expects \(5,\)"),
    (lambda net: setattr(net, "steps", torch.zeros(2)), "'steps' is torch.int64, Net expects torch.float32"),
])
def test_load_slim_into_names_the_tensor_that_does_not_fit(tmp_path, edit, match):
    path, _ = saved_net(tmp_path, step=STEP)
    net = Net()
    edit(net)
    with pytest.raises(ValueError, match=match):
        load_slim_into(net, path)
    with pytest.raises(TypeError, match="model"):
        load_slim_into(net.state_dict(), path)


def test_load_slim_into_builds_a_meta_device_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    reference = transformers.LlamaForCausalLM(config).eval()
    path = save_slim(reference, tmp_path / "llama.slim", step=1e-3, coder="rans")
    reference.load_state_dict(load_slim(path))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    load_slim_into(model, path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(not t.is_meta for t in model.state_dict().values())
    assert_same_tensors(dict(model.state_dict()), dict(reference.state_dict()))
    # The rotary frequencies, a non-persistent buffer never in a checkpoint, were recomputed from the config.
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


MEMORY_SCRIPT = """
import resource, sys, torch
from slimrate import save_slim

def peak_kib_after_saving(n, rows):  # float32 tensors made one at a time: half quantized (rANS), half stored raw
    tensors = ((f"layer{i}.weight", torch.full((rows, 1024), 0.01 * i)) for i in range(n))
    save_slim(tensors, sys.argv[1], step={f"layer{i}.weight": 0.002 for i in range(0, n, 2)}, coder="rans")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

print(peak_kib_after_saving(2, 1), peak_kib_after_saving(50, 1024))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_save_slim_from_a_generator_holds_one_tensor_not_the_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(slimrate.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "m.slim")], capture_output=True,
                          text=True, env=env, timeout=300, check=True)
    empty, streamed = map(int, done.stdout.split())  # peak RSS after a 2-tensor save, then after a 200 MiB one
    input_kib = 50 * 4 * 1024  # 50 tensors of 1024 × 1024 float32 (4 MiB)
    assert (tmp_path / "m.slim").stat().st_size > input_kib * 1024 / 2  # the raw half is really there
    assert streamed < empty + input_kib / 2, f"peak RSS {streamed} KiB, {empty} KiB after saving 2 tiny tensors"
