"""The `slimrate` command line's error boundary: every bad flag value, input file and output path exits with
status 2 and one line on stderr that names the command and the file or flag, never a traceback."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import slimrate
from slimrate import save_slim
from slimrate.checkpoints import INDEX_FILE, write_checkpoint
from slimrate.cli import build_parser, main
from slimrate.cli.errors import UsageError
from slimrate.models.mlp import DigitsMLP

from helpers import env_with_this_slimrate

GARBAGE = b"this is not a model file, just some text " * 4


def refused(argv, capsys, prog: str) -> str:
    """main(argv)'s one stderr line, after checking that main returned 2 and that the line starts with prog."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: "), err
    return err


def raw_slim(path: Path, names=("w",)) -> Path:
    """A .slim file of 1-D float tensors, which are stored raw (no C++ coder needed)."""
    save_slim({name: torch.randn(5) for name in names}, path, step=0.1)
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {"ckpt": tmp_path / "m.safetensors", "slim": raw_slim(tmp_path / "m.slim"), "garbage": tmp_path / "g.dat",
             "missing": tmp_path / "nope.slim", "pt": tmp_path / "model.pt", "empty": tmp_path / "empty.safetensors",
             "no_tensors": tmp_path / "none.safetensors", "nan": tmp_path / "nan.safetensors", "folder": tmp_path}
    save_file({"w": torch.randn(3, 3)}, paths["ckpt"])
    paths["garbage"].write_bytes(GARBAGE)
    paths["pt"].write_bytes(b"not read")
    paths["empty"].write_bytes(b"")
    save_file({}, paths["no_tensors"])
    save_file({"w": torch.tensor([[1.0, float("nan")]])}, paths["nan"])
    return paths


@pytest.mark.parametrize("args,prog,message", [
    (["compress", "{ckpt}", "-o", "{out}", "--step", "0"], "slimrate compress", "--step: expected a finite number > 0"),
    (["compress", "{ckpt}", "-o", "{out}", "--step", "-1"], "slimrate compress", "--step: expected a finite number"),
    (["compress", "{ckpt}", "-o", "{out}", "--step", "0.1", "--max-error", "0.1"], "slimrate compress",
     "--max-error: not allowed with argument --step"),
    (["compress", "{ckpt}", "-o", "{out}"], "slimrate compress", "one of the arguments --step --max-error"),
    (["compress", "{ckpt}", "-o", "{out}", "--step", "0.1", "--coder", "zip"], "slimrate compress", "--coder"),
    (["compress", "{ckpt}", "-o", "{out}", "--step", "x"], "slimrate compress", "--step: invalid"),
    (["compress", "-o", "{out}", "--step", "0.1"], "slimrate compress", "the following arguments are required: SRC"),
    (["decompress", "{slim}", "-o", "{folder}", "--max-shard-size", "5XB"], "slimrate decompress",
     "--max-shard-size: expected bytes as an int or a size like '5GB'"),
    (["decompress", "{slim}", "-o", "{folder}", "--max-shard-size", "0"], "slimrate decompress",
     "--max-shard-size: expected a size > 0"),
    (["run", "{ckpt}", "--arch", "digits", "--batch", "0"], "slimrate run", "--batch: expected an integer > 0"),
    (["run", "{ckpt}", "--arch", "resnet"], "slimrate run", "--arch: invalid choice"),
    (["dmb", "eval", "{folder}", "--sequences", "-3"], "slimrate dmb eval", "--sequences: expected an integer > 0"),
    (["demo", "--bogus"], "slimrate", "unrecognized arguments: --bogus"),
    (["frobnicate"], "slimrate", "invalid choice: 'frobnicate'"),
], ids=["step0", "step-neg", "both", "neither", "coder", "step-text", "no-source", "shard-size", "shard-size0",
        "batch0", "arch", "sequences", "unknown-flag", "unknown-command"])
def test_bad_flag_values_exit_2_naming_the_flag(files, tmp_path, capsys, args, prog, message):
    err = refused([a.format(out=tmp_path / "o.slim", **files) for a in args], capsys, prog)
    assert message in err and f"see {prog} --help" in err


@pytest.mark.parametrize("args,message", [
    (["compress", "{missing}"], "nope.slim: no such file or folder"),
    (["compress", "{pt}"], "model.pt: pickle checkpoints are not read"),
    (["compress", "{garbage}"], "g.dat: not a valid safetensors file (a header of"),
    (["compress", "{empty}"], "empty.safetensors: not a valid safetensors file (0 bytes, shorter than the 8-byte"),
    (["compress", "{no_tensors}"], "none.safetensors: no tensors, nothing to read"),
    (["compress", "{ckpt}", "{ckpt}"], "m.safetensors: given twice"),
    (["compress", "{nan}"], "nan.safetensors: w: x: expected finite"),
], ids=["missing", "pickle", "garbage", "empty-file", "no-tensors", "twice", "nan"])
def test_compress_refuses_bad_checkpoints(files, tmp_path, capsys, args, message):
    out = tmp_path / "o.slim"
    err = refused([a.format(**files) for a in args] + ["-o", out, "--step", "0.1"], capsys, "slimrate compress")
    assert message in err and not out.exists()


SLIM_DAMAGES = {"missing": "nope.slim: no such file", "garbage": "g.dat: not a .slim file",
                "truncated": "m.slim: truncated or corrupt: the file ends with",
                "header-cut": "m.slim: truncated: 30 bytes",
                "header-checksum": "m.slim: header checksum mismatch",
                "flipped": "m.slim: tensor 'w': payload checksum mismatch"}


@pytest.mark.parametrize("command,damage", [
    *[("inspect", damage) for damage in SLIM_DAMAGES if damage != "flipped"],  # inspect reads the index only
    *[("decompress", damage) for damage in SLIM_DAMAGES]])
def test_inspect_and_decompress_refuse_bad_slim_files(files, tmp_path, capsys, command, damage):
    data = files["slim"].read_bytes()
    source = {"missing": files["missing"], "garbage": files["garbage"]}.get(damage, files["slim"])
    if damage == "truncated":
        source.write_bytes(data[:-3])
    elif damage == "header-cut":
        source.write_bytes(data[:30])
    elif damage == "header-checksum":
        source.write_bytes(b"SLIM\x01" + bytes(30))
    elif damage == "flipped":
        source.write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])  # the first payload's first byte
    out = tmp_path / "o.safetensors"
    output = ["-o", out] if command == "decompress" else []
    assert SLIM_DAMAGES[damage] in refused([command, source, *output], capsys, f"slimrate {command}")
    assert not out.exists()


def digits_safetensors(path: Path, **replace: torch.Tensor) -> Path:
    state = {**DigitsMLP(hidden=6).state_dict(), **replace}
    save_file({name: t.contiguous() for name, t in state.items()}, path)
    return path


@pytest.mark.parametrize("arch,replace,message", [
    ("digits", {"2.weight": torch.randn(6, 4)}, "'2.weight' has shape (6, 4), DigitsMLP expects (6, 6)"),
    ("digits", {"0.weight": torch.randn(6)}, "'0.weight' has shape (6,), the digits architecture expects 2 dims"),
    ("digits", {"extra.bias": torch.randn(2)}, "does not fit DigitsMLP: tensors it does not have: ['extra.bias']"),
    ("charlm", {}, "no tensor 'tok_emb.weight', which the charlm architecture is sized from"),
], ids=["wrong-shape", "wrong-dims", "extra-tensor", "other-arch"])
def test_run_names_the_file_and_the_tensor_that_does_not_fit(tmp_path, capsys, arch, replace, message):
    path = digits_safetensors(tmp_path / "m.safetensors", **replace)
    err = refused(["run", path, "--arch", arch], capsys, "slimrate run")
    assert f"{path}: state dict: {message}" in err


def test_run_refuses_missing_and_corrupt_files(files, capsys):
    assert "nope.slim: no such file" in refused(["run", files["missing"], "--arch", "digits"], capsys, "slimrate run")
    files["slim"].write_bytes(files["slim"].read_bytes()[:-2])
    assert "m.slim: truncated or corrupt" in refused(["run", files["slim"], "--arch", "digits"], capsys,
                                                     "slimrate run")


OUTPUT_COMMANDS = {  # command: (argv with the output path left as {out}, the output's flag)
    "compress": (["compress", "{ckpt}", "-o", "{out}", "--step", "0.1"], "--output"),
    "decompress": (["decompress", "{slim}", "-o", "{out}"], "--output"),  # a .safetensors file: {out} ends so
    "schedules plot": (["schedules", "plot", "--total", "20", "-o", "{out}"], "--output"),
    "demo": (["demo", "--steps", "1", "--json", "{out}"], "--json"),
}


OUTPUT_PLACES = {"folder": "is a folder; pass a file path", "missing-folder": "folder {tmp}/no/such does not exist",
                 "read-only-folder": "folder {tmp}/ro is not writable"}


@pytest.mark.parametrize("command,where", [(command, where) for command in OUTPUT_COMMANDS for where in OUTPUT_PLACES
                                           if (command, where) != ("decompress", "folder")])  # a folder output
def test_unwritable_outputs_are_refused_before_the_work(files, tmp_path, capsys, monkeypatch, command, where):
    monkeypatch.setattr("slimrate.demo.run_demo", lambda config: pytest.fail("the demo ran before the check"))
    out = {"folder": tmp_path, "missing-folder": tmp_path / "no" / "such" / "o.safetensors",
           "read-only-folder": tmp_path / "ro" / "o.safetensors"}[where]
    argv, flag = OUTPUT_COMMANDS[command]
    if where == "read-only-folder":
        out.parent.mkdir()
        out.parent.chmod(0o500)
        if os.access(out.parent, os.W_OK):  # root writes anyway: let os.access say what it says to other users
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out.parent and real_access(path, mode))
    err = refused([a.format(out=out, **files) for a in argv], capsys, f"slimrate {command}")
    assert err.startswith(f"slimrate {command}: {flag}: {out}") and OUTPUT_PLACES[where].format(tmp=tmp_path) in err


def test_a_write_refused_by_the_system_is_one_line(files, capsys):
    """A folder that passes the up-front check but refuses the write (sysfs refuses new files even to root, where
    the permission bits of a read-only folder do not): the write's OSError still ends as one line, exit 2."""
    target = Path("/sys/slimrate-cli-test.safetensors")
    try:
        target.write_bytes(b"")
    except OSError:
        pass
    else:
        target.unlink()
        pytest.skip("/sys accepts new files here")
    err = refused(["decompress", files["slim"], "-o", target], capsys, "slimrate decompress")
    assert str(target) in err and not target.exists()


@pytest.mark.parametrize("link", ["same-path", "dotted-path", "symlink", "hardlink"])
def test_decompress_refuses_to_overwrite_its_input(files, tmp_path, capsys, link):
    """As a folder output (the .slim file is not a folder) or, through a .safetensors link, as a file output."""
    before = files["slim"].read_bytes()
    out = {"same-path": files["slim"], "dotted-path": tmp_path / "." / "m.slim",
           "symlink": tmp_path / "link.safetensors", "hardlink": tmp_path / "hard.safetensors"}[link]
    if link == "symlink":
        out.symlink_to(files["slim"])
    elif link == "hardlink":
        os.link(files["slim"], out)
    err = refused(["decompress", files["slim"], "-o", out], capsys, "slimrate decompress")
    message = "is the input file" if out.suffix == ".safetensors" else "is a file, not a folder"
    assert f"--output: {out}" in err and message in err
    assert files["slim"].read_bytes() == before


def test_compress_refuses_to_overwrite_its_input(files, capsys):
    before = files["ckpt"].read_bytes()
    err = refused(["compress", files["ckpt"], "-o", files["ckpt"], "--step", "0.1"], capsys, "slimrate compress")
    assert "--output:" in err and "is the input file" in err
    assert files["ckpt"].read_bytes() == before


@pytest.mark.parametrize("out", ["o.safetensors", "folder"])
def test_decompress_refuses_a_tensor_name_safetensors_reserves(tmp_path, capsys, out):
    slim, out = raw_slim(tmp_path / "m.slim", names=("w", "__metadata__")), tmp_path / out
    err = refused(["decompress", slim, "-o", out], capsys, "slimrate decompress")
    assert f"{slim}: tensor name '__metadata__' is reserved by safetensors" in err and not out.exists()


def test_output_folders_must_be_folders(files, tmp_path, capsys):
    err = refused(["study", "schedules", "--quick", "-o", files["ckpt"]], capsys, "slimrate study schedules")
    assert f"--out: {files['ckpt']}: {files['ckpt']} is a file, not a folder" in err


def test_a_bug_keeps_its_traceback(files, monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr("slimrate.cli.model_files.run_inspect", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["inspect", str(files["slim"])])


def test_the_module_entry_point_prints_one_line_and_exits_2(files, tmp_path):
    done = subprocess.run([sys.executable, "-m", "slimrate.cli", "inspect", str(files["garbage"])],
                          capture_output=True, text=True, env=env_with_this_slimrate(), timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"slimrate inspect: {files['garbage']}: not a .slim file: magic b'this', expected " \
                          "b'SLIM'\n"


# --- training commands: checkpoint options, damaged checkpoints on resume ------------------------------------------

def commands(parser, path=()):
    """(command path, its parser) for every sub-command of ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def test_every_command_that_resumes_has_the_same_checkpoint_options():
    resumable = {name: sub for name, sub in commands(build_parser()) if "--resume" in sub._option_string_actions}
    assert ("dmb", "train") in resumable
    for name, sub in resumable.items():
        for flag in ("--checkpoint-every", "--keep-checkpoints"):
            assert flag in sub._option_string_actions, f"slimrate {' '.join(name)}: no {flag}"
            with pytest.raises(UsageError, match=f"{flag}: expected an integer > 0, got 0"):
                sub.parse_args([flag, "0"])


class GotConfig(Exception):
    """Raised by a stand-in for a command's work, carrying the config the command built."""


@pytest.mark.parametrize("argv,work", [
    (["demo"], "slimrate.demo.run_demo"),
    (["dmb", "train", "--data", "digits", "--budget", "1", "--out", "{out}"], "slimrate.dmb.driver.train_dmb"),
])
def test_training_commands_pass_parallel_to_their_config(argv, work, tmp_path, monkeypatch):
    def stand_in(config):
        raise GotConfig(config)

    monkeypatch.setattr(work, stand_in)
    argv = [a.format(out=tmp_path / "out") for a in argv]
    with pytest.raises(GotConfig) as got:
        main([*argv, "--parallel", "fsdp"])
    assert got.value.args[0].parallel == "fsdp"
    with pytest.raises(UsageError, match=r"--parallel: invalid choice: 'zero'"):
        build_parser().parse_args([*argv, "--parallel", "zero"])


def train_dmb_argv(out):
    return ["dmb", "train", "--data", "digits", "--budget", "4", "--out", str(out), "--model", "tiny", "--batch", "4",
            "--method", "sedd-uniform", "--checkpoint-every", "2", "--no-progress"]


def test_resume_skips_a_damaged_checkpoint_saying_so_in_one_line_each(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_dmb_argv(out)) == 0
    (out / "checkpoints" / "step-00000004" / "state.json").write_text("{}")
    capsys.readouterr()
    assert main(train_dmb_argv(out) + ["--resume"]) == 0
    refusal, fallback = capsys.readouterr().err.splitlines()
    assert refusal.startswith(f"slimrate dmb train: warning: resume: refusing checkpoint {out}/checkpoints/"
                              "step-00000004/state.json: SHA-256 ")
    assert fallback == (f"slimrate dmb train: warning: resume: resuming from {out}/checkpoints/step-00000002 (step 2), "
                        "the newest checkpoint that verifies")


def test_resume_with_no_checkpoint_that_verifies_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_dmb_argv(out)) == 0
    for step in (2, 4):
        (out / "checkpoints" / f"step-0000000{step}" / "manifest.json").write_text("[]")
    capsys.readouterr()
    err = refused(train_dmb_argv(out) + ["--resume"], capsys, "slimrate dmb train").splitlines()[-1]
    assert f"{out}/checkpoints: none of its 2 checkpoints verifies, so the run cannot resume: {out}/checkpoints/" \
           "step-00000004/manifest.json: expected a JSON object, got list; " in err
    assert err.endswith("; restore one, or move the folder away to start from step 0")


# --- checkpoint folders, several sources, output folders, inspect against stored dtypes ---------------------------

SHARD2 = "model-00002-of-00003.safetensors"


def sharded_checkpoint(folder: Path) -> Path:
    """Three shards (a, b | c | d) and their index."""
    state = {"a": torch.randn(10), "b": torch.randn(10), "c": torch.randn(25), "d": torch.randn(2, 3)}
    write_checkpoint([(n, t.shape, t.dtype, lambda t=t: t) for n, t in state.items()], folder, max_shard_size=80)
    return folder


@pytest.mark.parametrize("damage,message", [
    ("missing-shard", f"{SHARD2}: missing; {INDEX_FILE} names it for 1 tensors ('c', ...)"),
    ("truncated-shard", f"{SHARD2}: truncated: its header describes"),
    ("index-names-missing-tensor", f"{INDEX_FILE}: names tensor 'ghost' in {SHARD2}, which does not hold it"),
    ("index-names-missing-file", "model-00009-of-00009.safetensors: missing; "),
])
def test_compress_refuses_damaged_sharded_folders_before_the_work(tmp_path, capsys, damage, message):
    folder = sharded_checkpoint(tmp_path / "ckpt")
    shard, index = folder / SHARD2, folder / INDEX_FILE
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:-1])
    else:
        content = json.loads(index.read_text())
        content["weight_map"]["ghost"] = SHARD2 if damage.endswith("tensor") else "model-00009-of-00009.safetensors"
        index.write_text(json.dumps(content))
    out = tmp_path / "o.slim"
    err = refused(["compress", folder, "-o", out, "--step", "0.1"], capsys, "slimrate compress")
    assert f"slimrate compress: {folder}/" in err and message in err and not out.exists()


def test_compress_refuses_a_tensor_in_two_sources(files, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.randn(2, 2)}, other)
    err = refused(["compress", files["ckpt"], other, "-o", tmp_path / "o.slim", "--step", "0.1"], capsys,
                  "slimrate compress")
    assert f"{other}: tensor 'w' is also in {files['ckpt']}" in err


@pytest.mark.parametrize("case", ["existing-file", "read-only", "shard-size-of-a-file"])
def test_decompress_checks_its_output_folder(files, tmp_path, capsys, monkeypatch, case):
    out, flags = {"existing-file": (files["garbage"], []), "read-only": (tmp_path / "ro" / "model", []),
                  "shard-size-of-a-file": (tmp_path / "o.safetensors", ["--max-shard-size", "1GB"])}[case]
    if case == "read-only":
        out.parent.mkdir()
        out.parent.chmod(0o500)
        real_access = os.access  # root writes anyway: let os.access say what it says to other users
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out.parent and real_access(path, mode))
    err = refused(["decompress", files["slim"], "-o", out, *flags], capsys, "slimrate decompress")
    assert err.startswith(f"slimrate decompress: {'--max-shard-size' if flags else f'--output: {out}'}: ")
    assert {"existing-file": f"{out} is a file, not a folder", "read-only": f"folder {out.parent} is not writable",
            "shard-size-of-a-file": "splits a folder output"}[case] in err
    assert not out.exists() or case == "existing-file"


def test_inspect_reports_ratio_against_each_stored_dtype(tmp_path, capsys):
    """1-D tensors are stored raw, so each payload is its stored dtype's bytes: ratio 1, bits/param = dtype bits."""
    state = {"h": torch.randn(6).bfloat16(), "f": torch.randn(5), "i": torch.arange(7), "m": torch.rand(3) > 0.5}
    path = save_slim(state, tmp_path / "m.slim", step=0.1)
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert {name: (float(rows[name][-2]), float(rows[name][-1])) for name in state} == {
        name: (8.0 * t.element_size(), 1.0) for name, t in state.items()}
    stored, size = sum(t.numel() * t.element_size() for t in state.values()), path.stat().st_size
    assert lines[-1].endswith(f"{stored} bytes in the stored dtypes (ratio {stored / size:.2f})")


def test_compress_and_decompress_a_transformers_folder(tmp_path):
    """save_pretrained (sharded) → compress → decompress to a sharded folder → from_pretrained gives the quantized
    model's logits; the config and a binary tokenizer file come back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    source, slim, out = tmp_path / "source", tmp_path / "m.slim", tmp_path / "out"
    model.save_pretrained(source, max_shard_size="10KB")
    (source / "tokenizer.model").write_bytes(bytes(range(256)))
    assert main(["compress", str(source), "-o", str(slim), "--step", "0.01", "--coder", "rans"]) == 0
    assert main(["decompress", str(slim), "-o", str(out), "--max-shard-size", "8KB"]) == 0
    assert (out / INDEX_FILE).is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    quantized = transformers.AutoModelForCausalLM.from_config(config).eval()
    quantized.load_state_dict(slimrate.load_slim(slim))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, quantized(tokens).logits)
        assert not torch.equal(loaded(tokens).logits, model(tokens).logits)


PEAK_RSS_SCRIPT = """import resource, sys
from slimrate.cli import build_parser, main
from slimrate.cli.errors import UsageError
status = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # Linux counts KiB
sys.exit(status)"""


def peak_rss_mib(argv: list) -> int:
    """Peak resident memory (MiB) of `slimrate argv...` run in a fresh Python."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, *map(str, argv)], capture_output=True, text=True,
                          env=env_with_this_slimrate(), timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_compress_and_decompress_hold_a_few_tensors_not_the_model(tmp_path):
    """200 MiB of bf16 (50 tensors of 4 MiB, 2 shards): the peak memory of compress and decompress stays within
    that of inspect (the same imports, no tensors) plus a margin of half the input."""
    shape = (1024, 2048)

    def weights():
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)

    write_checkpoint([(f"w{i}", shape, torch.bfloat16, weights) for i in range(50)], tmp_path / "source",
                     max_shard_size="110MB")
    slim = tmp_path / "m.slim"
    compress = peak_rss_mib(["compress", tmp_path / "source", "-o", slim, "--step", "0.002", "--coder", "rans"])
    decompress = peak_rss_mib(["decompress", slim, "-o", tmp_path / "out"])
    imports = peak_rss_mib(["inspect", slim])
    assert compress - imports < 100 and decompress - imports < 100, (compress, decompress, imports)


@pytest.mark.parametrize("command", ["decompress", "run"])
def test_max_bytes_refuses_a_slim_file_that_decodes_to_more(files, tmp_path, capsys, command):
    out = tmp_path / "o.safetensors"
    argv = {"decompress": ["decompress", files["slim"], "-o", out], "run": ["run", files["slim"], "--arch", "digits"]}
    err = refused([*argv[command], "--max-bytes", "19"], capsys, f"slimrate {command}")  # w: 5 float32 = 20 bytes
    assert f": {files['slim']}: the index declares 20 bytes of decoded tensors" in err and "--max-bytes" in err
    assert err.count(str(files["slim"])) == 1 and not out.exists()
    err = refused([*argv[command], "--max-bytes", "5XB"], capsys, f"slimrate {command}")
    assert "--max-bytes: expected bytes as an int or a size like '5GB'" in err
    if command == "decompress":
        for limit in ["20", "1KiB", "inf"]:
            assert main([str(a) for a in argv[command]] + ["--max-bytes", limit]) == 0
