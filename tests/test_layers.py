"""The package layering of pyproject.toml's import-linter contract holds (what `make lint` checks too):
each sub-package imports only from the layers below it, so ops never reach up into a method package."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency (make installs it)")
    monkeypatch.chdir(ROOT)
    status = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == 0, capsys.readouterr().out
