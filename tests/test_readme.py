"""The README's ```python blocks run as written, so an example cannot drift from the API.

Blocks run in README order in one temporary working folder (a file one block writes, the next may read),
each in a fresh namespace holding what the README says the user brings: `model` (the digits MLP), its
`optimizer`, a `loader` of (x, y) batches, `x`, `w`, `bias` for the op call, and for the training loop
`loss_fn(model, batch)`, `get_batch(step, rank, world_size)`, `evaluate(model)`, `scheduler`, `constraint`.
Sizes are shrunk only where a block's comment says "test: ...", by the substitutions below.
"""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slimrate
from slimrate.backslash import RateConstraint
from slimrate.models.mlp import build_digits_mlp

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
TINY_MODEL = "<tiny model folder>"
# README text -> what the test runs instead; each must occur in a block marked "test:".
SUBSTITUTIONS = {'"path/to/local/model"': TINY_MODEL, "TrainConfig(steps=2000": "TrainConfig(steps=20"}


def user_objects() -> dict:
    """Fresh stand-ins for what a README reader brings: a small digits classifier and its training pieces."""
    model = build_digits_mlp(hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(torch.randn(16, 64), torch.randint(0, 10, (16,))) for _ in range(3)]
    w = torch.randn(24, 64) * (torch.rand(24, 64) > 0.8)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    def get_batch(step, rank, world_size):
        return batches[step % len(batches)]

    def evaluate(m):
        x, y = batches[0]
        return {"accuracy": (m(x).argmax(1) == y).float().mean().item()}

    return {"model": model, "optimizer": optimizer, "loader": batches, "x": batches[0][0], "w": w,
            "bias": torch.randn(24), "loss_fn": loss_fn, "get_batch": get_batch, "evaluate": evaluate,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            "constraint": RateConstraint(model, lam=1.0), "torch": torch, "slimrate": slimrate}


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 5, f"expected the README's examples, found {len(BLOCKS)} python blocks"


@pytest.mark.parametrize("original", sorted(SUBSTITUTIONS))
def test_each_substitution_matches_a_marked_readme_line(original):
    lines = [line for block in BLOCKS for line in block.splitlines() if original in line]
    assert len(lines) == 1 and "test:" in lines[0], f"{original!r}: expected on one README line marked 'test:'"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="the QLoRA example needs peft (installed by make)")
    from slimrate.qlora.tiny import save_tiny_base

    tiny = save_tiny_base(tmp_path / "tiny-model")
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(BLOCKS):
        for original, replacement in SUBSTITUTIONS.items():
            block = block.replace(original, repr(str(tiny)) if replacement == TINY_MODEL else replacement)
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), user_objects())
        except Exception as error:
            raise AssertionError(f"README python block {i} failed: {error!r}\n{block}") from error
