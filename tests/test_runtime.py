"""runtime.load_state_into: streaming (name, tensor) pairs into a module, against the module built eagerly and
loaded with torch's load_state_dict; runtime.load's limit on what a .slim file may decode to."""

import pytest
import torch
from torch import nn

from slimrate import runtime, save_slim
from slimrate.backslash import SlimFormatError
from slimrate.runtime import load_state_into


def frequencies(n: int) -> torch.Tensor:
    return 1.0 / 10_000 ** (torch.arange(n, dtype=torch.float32) / n)


class Frequencies(nn.Module):
    """Owns a buffer derived from its size (like a rotary embedding's inv_freq): never saved."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("inv", frequencies(n), persistent=False)


class Tiny(nn.Module):
    """Embedding tied to the head (one Parameter, two names), a frozen bias, a persistent buffer and a derived
    one that ``_init_weights`` recomputes, as transformers models do."""

    def __init__(self, recompute: bool = True):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight
        self.body.bias.requires_grad_(False)
        self.register_buffer("scale", torch.randn(5))
        self.freqs = Frequencies(5)
        self.recompute = recompute

    def _init_weights(self, module: nn.Module) -> None:
        if self.recompute and isinstance(module, Frequencies):
            module.inv.copy_(frequencies(module.inv.numel()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(ids))) * self.scale * self.freqs.inv)


def meta_tiny(**kwargs) -> Tiny:
    with torch.device("meta"):
        return Tiny(**kwargs)


def test_meta_model_gets_the_tensors_and_computes_like_the_eager_one():
    eager = Tiny()
    state = eager.state_dict()
    state.pop("head.weight")  # as save_pretrained does: a tied twin is saved once
    model = load_state_into(meta_tiny(), (pair for pair in state.items()))
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        assert not tensor.is_meta, name
    assert model.head.weight is model.emb.weight, "the tie must survive"
    assert isinstance(model.body.weight, nn.Parameter) and model.body.weight.requires_grad
    assert not model.body.bias.requires_grad, "requires_grad comes from the module, not the tensor"
    assert model.body.weight.data_ptr() == state["body.weight"].data_ptr(), "meta tensors are assigned, not copied"
    torch.testing.assert_close(model.freqs.inv, frequencies(5), rtol=0, atol=0)
    ids = torch.randint(0, 7, (3, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), eager(ids), rtol=0, atol=0)


def test_real_tensors_are_copied_into_in_place_in_their_dtype():
    model = Tiny()
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    source = Tiny().double()
    load_state_into(model, source.state_dict().items())
    reference = Tiny()
    reference.load_state_dict(source.float().state_dict())
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == pointers[name] and tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)


def test_strict_lists_missing_and_unexpected_names():
    state = Tiny().state_dict()
    state.pop("emb.weight")
    state.pop("head.weight")
    state["extra"] = torch.randn(2)
    with pytest.raises(ValueError, match=r"does not fit Tiny: missing 2 of its 5 tensors: \['emb.weight', "
                                         r"'head.weight'\]; tensors it does not have: \['extra'\]"):
        load_state_into(meta_tiny(), state.items())
    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(ValueError, match=r"missing 12 of its 12 tensors: \['0.weight', .*\] and 2 more"):
        load_state_into(many, [])


def test_non_strict_loads_the_rest_and_leaves_missing_tensors_as_they_were():
    state = Tiny().state_dict()
    state.pop("emb.weight")
    state.pop("head.weight")
    state["extra"] = torch.randn(2)
    model = load_state_into(meta_tiny(), state.items(), strict=False)
    assert model.emb.weight.is_meta and model.head.weight is model.emb.weight
    torch.testing.assert_close(model.body.weight, state["body.weight"], rtol=0, atol=0)


def test_a_derived_buffer_nobody_recomputes_stays_on_meta_and_is_reported():
    state = Tiny().state_dict()
    with pytest.raises(ValueError, match=r"on the meta device, that it does not recompute: \['freqs.inv'\]"):
        load_state_into(meta_tiny(recompute=False), state.items())
    model = load_state_into(meta_tiny(recompute=False), state.items(), strict=False)
    assert model.freqs.inv.is_meta and not model.body.weight.is_meta


@pytest.mark.parametrize("name,value,match", [
    ("body.weight", torch.randn(5, 4), r"'body.weight' has shape \(5, 4\), Tiny expects \(5, 5\)"),
    ("scale", torch.arange(5), r"'scale' is torch.int64, Tiny expects torch.float32"),
], ids=["shape", "int-into-float"])
def test_a_tensor_that_does_not_fit_is_named(name, value, match):
    state = {**Tiny().state_dict(), name: value}
    for model in (Tiny(), meta_tiny()):
        with pytest.raises(ValueError, match=match):
            load_state_into(model, state.items())


@pytest.mark.parametrize("model,items,strict,match", [
    (nn.Linear(2, 2).state_dict(), [], True, "model: expected an nn.Module, got OrderedDict"),
    (nn.Linear(2, 2), [("weight", [[1.0, 2.0]])], True, r"items: expected \(str, Tensor\) pairs, got \(str, list\)"),
    (nn.Linear(2, 2), ["weight"], True, r"items: expected \(str, Tensor\) pairs, got str"),
    (nn.Linear(2, 2), [], 1, "strict: expected a bool, got int"),
], ids=["model", "pair-value", "pair", "strict"])
def test_load_state_into_rejects_bad_arguments(model, items, strict, match):
    with pytest.raises(TypeError, match=match):
        load_state_into(model, items, strict=strict)


def test_load_refuses_a_slim_file_that_decodes_past_max_bytes_before_building_the_model(tmp_path):
    state = nn.Linear(4, 3).state_dict()
    path = save_slim(state, tmp_path / "m.slim", step={})  # stored raw: 48 + 12 bytes decoded
    built = []

    def factory() -> nn.Module:
        built.append(True)
        return nn.Linear(4, 3)

    with pytest.raises(SlimFormatError, match=f"^{path}: the index declares 60 bytes .* above the limit of 59 bytes"):
        runtime.load(path, model_factory=factory, max_bytes=59, sparse=False)
    assert built == []
    with pytest.raises(SlimFormatError, match="above the limit of 59 bytes"):
        runtime.read_tensors(path, max_bytes=59)  # the index is checked on the call, not at the first tensor
    model = runtime.load(path, model_factory=factory, max_bytes=60, sparse=False)
    torch.testing.assert_close(model.weight, state["weight"], rtol=0, atol=0)
    with pytest.raises(TypeError, match="max_bytes"):
        runtime.read_state_dict(state, max_bytes="1GB")
