"""The `slimrate` command line's error boundary: every bad flag value, input file and output path exits with
status 2 and one line on stderr that names the command and the file or flag, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import slimrate
from slimrate import save_slim
from slimrate.cli import main
from slimrate.models.mlp import DigitsMLP

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
    (["run", "{ckpt}", "--arch", "digits", "--batch", "0"], "slimrate run", "--batch: expected an integer > 0"),
    (["run", "{ckpt}", "--arch", "resnet"], "slimrate run", "--arch: invalid choice"),
    (["dmb", "eval", "{folder}", "--sequences", "-3"], "slimrate dmb eval", "--sequences: expected an integer > 0"),
    (["demo", "--bogus"], "slimrate", "unrecognized arguments: --bogus"),
    (["frobnicate"], "slimrate", "invalid choice: 'frobnicate'"),
], ids=["step0", "step-neg", "both", "neither", "coder", "step-text", "batch0", "arch", "sequences", "unknown-flag",
        "unknown-command"])
def test_bad_flag_values_exit_2_naming_the_flag(files, tmp_path, capsys, args, prog, message):
    err = refused([a.format(out=tmp_path / "o.slim", **files) for a in args], capsys, prog)
    assert message in err and f"see {prog} --help" in err


@pytest.mark.parametrize("args,message", [
    (["compress", "{missing}"], "nope.slim: no such file"),
    (["compress", "{pt}"], "model.pt: pickle checkpoints are not read"),
    (["compress", "{garbage}"], "g.dat: not a valid safetensors file (Error while deserializing header"),
    (["compress", "{empty}"], "empty.safetensors: not a valid safetensors file"),
    (["compress", "{no_tensors}"], "none.safetensors: no tensors in the file, nothing to compress"),
    (["compress", "{nan}"], "nan.safetensors: w: x: expected finite"),
], ids=["missing", "pickle", "garbage", "empty-file", "no-tensors", "nan"])
def test_compress_refuses_bad_checkpoints(files, tmp_path, capsys, args, message):
    out = tmp_path / "o.slim"
    err = refused([a.format(**files) for a in args] + ["-o", out, "--step", "0.1"], capsys, "slimrate compress")
    assert message in err and not out.exists()


SLIM_DAMAGES = {"missing": "nope.slim: no such file", "garbage": "g.dat: not a .slim file",
                "truncated": "m.slim: truncated or corrupt: the file ends with",
                "header-cut": "m.slim: truncated: 30 bytes",
                "header-checksum": "m.slim: header checksum mismatch",
                "flipped": "m.slim: tensor 'w': payload checksum mismatch"}


@pytest.mark.parametrize("command,damage", [(command, damage) for command in ("inspect", "decompress")
                                            for damage in SLIM_DAMAGES
                                            if (command, damage) != ("inspect", "flipped")])  # inspect reads headers
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
    "decompress": (["decompress", "{slim}", "-o", "{out}"], "--output"),
    "schedules plot": (["schedules", "plot", "--total", "20", "-o", "{out}"], "--output"),
    "demo": (["demo", "--steps", "1", "--json", "{out}"], "--json"),
}


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
@pytest.mark.parametrize("where,message", [
    ("folder", "is a folder; pass a file path"),
    ("missing-folder", "folder {tmp}/no/such does not exist"),
    ("read-only-folder", "folder {tmp}/ro is not writable"),
])
def test_unwritable_outputs_are_refused_before_the_work(files, tmp_path, capsys, monkeypatch, command, where,
                                                        message):
    monkeypatch.setattr("slimrate.demo.run_demo", lambda config: pytest.fail("the demo ran before the check"))
    out = {"folder": tmp_path, "missing-folder": tmp_path / "no" / "such" / "o.bin",
           "read-only-folder": tmp_path / "ro" / "o.bin"}[where]
    argv, flag = OUTPUT_COMMANDS[command]
    if where == "read-only-folder":
        out.parent.mkdir()
        out.parent.chmod(0o500)
        if os.access(out.parent, os.W_OK):  # root writes anyway: let os.access say what it says to other users
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out.parent and real_access(path, mode))
    err = refused([a.format(out=out, **files) for a in argv], capsys, f"slimrate {command}")
    assert err.startswith(f"slimrate {command}: {flag}: {out}") and message.format(tmp=tmp_path) in err


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
    before = files["slim"].read_bytes()
    out = {"same-path": files["slim"], "dotted-path": tmp_path / "." / "m.slim", "symlink": tmp_path / "link.slim",
           "hardlink": tmp_path / "hard.slim"}[link]
    if link == "symlink":
        out.symlink_to(files["slim"])
    elif link == "hardlink":
        os.link(files["slim"], out)
    err = refused(["decompress", files["slim"], "-o", out], capsys, "slimrate decompress")
    assert f"--output: {out} is the input file {files['slim']}" in err
    assert files["slim"].read_bytes() == before


def test_compress_refuses_to_overwrite_its_input(files, capsys):
    before = files["ckpt"].read_bytes()
    err = refused(["compress", files["ckpt"], "-o", files["ckpt"], "--step", "0.1"], capsys, "slimrate compress")
    assert "--output:" in err and "is the input file" in err
    assert files["ckpt"].read_bytes() == before


def test_decompress_refuses_a_tensor_name_safetensors_reserves(tmp_path, capsys):
    slim, out = raw_slim(tmp_path / "m.slim", names=("w", "__metadata__")), tmp_path / "o.safetensors"
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(slimrate.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "slimrate.cli", "decompress", str(files["garbage"]), "-o",
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"slimrate decompress: {files['garbage']}: not a .slim file: magic b'this', expected " \
                          "b'SLIM'\n"
