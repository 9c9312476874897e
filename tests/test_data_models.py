"""Text data (text8 normalisation, corpus, splits) and the small models (char LM, digits MLP)."""

import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimrate.data.text import (
    TEXT8_ALPHABET,
    char_splits,
    decode,
    encode,
    load_text_corpus,
    normalize_text8,
)
from slimrate.models.char_lm import CharLM, CharLMConfig, bits_per_char, evaluate_lm, get_lm_batch
from slimrate.models.mlp import DigitsMLP, build_digits_mlp

# Characters the normaliser must handle: ASCII letters, digits, punctuation, whitespace, and
# non-ASCII letters whose str.lower() is an ASCII letter (Kelvin sign, dotted capital I) or that
# look like ASCII letters (é, ß, Cyrillic а), CJK, an emoji.
CHAR_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n\r\x0b\x0c.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"
    "éÉßçñüØ\u212a\u0130а中文😀\u00a0\u2003"
)
TINY_LM = CharLMConfig(context=16, d_model=32, n_heads=4, n_layers=2)


def normalize_text8_regex(text: str) -> str:
    """Independent reference: the text8 rule written as regular expressions."""
    lowered = re.sub(r"[A-Z]", lambda m: m.group().lower(), text)  # ASCII letters only
    return re.sub(r" +", " ", re.sub(r"[^a-z]", " ", lowered)).strip(" ")


def random_text(n: int, pool: str = CHAR_POOL) -> str:
    return "".join(pool[i] for i in torch.randint(0, len(pool), (n,)).tolist())


def random_text8(n: int) -> str:
    return random_text(n, TEXT8_ALPHABET)


# ---- text ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 7, 123, 5000], ids=lambda n: f"len={n}")
def test_normalize_text8_matches_regex_reference(length):
    for _ in range(20):
        text = random_text(length)
        got, want = normalize_text8(text), normalize_text8_regex(text)
        assert got == want, f"text {text!r}: got {got!r}, want {want!r}"
        assert set(got) <= set(TEXT8_ALPHABET)


@pytest.mark.parametrize(("text", "want"), [
    ("Hello, World!  42\n", "hello world"),
    ("  café  crème ", "caf cr me"),
    ("\u212aelvin \u0130stanbul", "elvin stanbul"),  # non-ASCII capitals are not letters here
    ("1234 !?", ""),
    ("", ""),
])
def test_normalize_text8_examples(text, want):
    assert normalize_text8(text) == want


@pytest.mark.parametrize("length", [0, 1, 1000], ids=lambda n: f"len={n}")
def test_encode_decode_round_trip(length):
    text = random_text8(length)
    ids = encode(text)
    assert ids.dtype == torch.uint8 and ids.shape == (length,)
    assert decode(ids) == text
    assert decode(ids.long().tolist()) == text
    assert [TEXT8_ALPHABET[i] for i in ids.tolist()] == list(text)


@pytest.mark.parametrize("text", ["abc Def", "caf\u00e9"], ids=["uppercase", "non-ascii"])
def test_encode_rejects_characters_outside_alphabet(text):
    with pytest.raises(ValueError, match="normalize_text8"):
        encode(text)


@pytest.mark.parametrize("ids", [[0, 27], [-1, 3]], ids=["too-large", "negative"])
def test_decode_rejects_out_of_range_ids(ids):
    with pytest.raises(ValueError, match="ids"):
        decode(torch.tensor(ids))


def test_embedded_corpus_is_large_text8_and_cached():
    corpus = load_text_corpus()
    assert len(corpus) > 300_000
    assert set(corpus) <= set(TEXT8_ALPHABET)
    assert "  " not in corpus and corpus == corpus.strip()
    assert load_text_corpus() is corpus
    assert corpus.startswith("the assert statement")  # sorted topic keys: "assert" first


def test_load_text_corpus_reads_and_normalises_a_user_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Hello,\nWörld 123 — Text8!\n", encoding="utf-8")
    assert load_text_corpus(str(path)) == "hello w rld text"
    assert load_text_corpus(path) == "hello w rld text"


def test_load_text_corpus_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_text8"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_text_corpus(str(path))


def test_load_text_corpus_rejects_a_file_without_letters(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("123 456\n!?\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no letters"):
        load_text_corpus(str(path))


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_char_splits_are_contiguous_with_validation_last(val_fraction):
    corpus = random_text8(1001)
    train_ids, val_ids = char_splits(corpus, val_fraction)
    assert len(val_ids) == round(val_fraction * 1001)
    assert torch.equal(torch.cat([train_ids, val_ids]), encode(corpus))


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1])
def test_char_splits_rejects_bad_fraction(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        char_splits("abc def", val_fraction)


# ---- char LM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 5, TINY_LM.context], ids=lambda t: f"T={t}")
def test_char_lm_output_shape(T):
    model = CharLM(TINY_LM)
    logits = model(torch.randint(0, 27, (3, T)))
    assert logits.shape == (3, T, 27) and logits.dtype == torch.float32


def test_char_lm_rejects_sequences_longer_than_context():
    with pytest.raises(ValueError, match="context"):
        CharLM(TINY_LM)(torch.randint(0, 27, (2, TINY_LM.context + 1)))


def test_char_lm_head_is_tied_to_token_embedding():
    model = CharLM(TINY_LM)
    assert model.head.weight is model.tok_emb.weight


@pytest.mark.parametrize("t", [0, 7, TINY_LM.context - 1], ids=lambda t: f"t={t}")
def test_char_lm_is_causal(t):
    model = CharLM(TINY_LM).eval()
    idx = torch.randint(0, 27, (4, TINY_LM.context))
    changed = idx.clone()
    changed[:, t:] = (idx[:, t:] + 1 + torch.randint(0, 26, idx[:, t:].shape)) % 27  # every future token differs
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :t], after[:, :t]), "logits before the changed position moved"
    assert not torch.equal(before[:, t], after[:, t])


def test_char_lm_loss_is_mean_cross_entropy_in_nats():
    model = CharLM(TINY_LM)
    x, y = (torch.randint(0, 27, (5, 11)) for _ in range(2))
    loss = model.loss(x, y)
    logits = model(x).double()
    nll = -logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (B, T), nats
    torch.testing.assert_close(loss.double(), nll.mean(), rtol=1e-6, atol=0)  # fp32 vs fp64 log-softmax
    assert torch.equal(loss, F.cross_entropy(model(x).reshape(-1, 27), y.reshape(-1)))


def test_bits_per_char_converts_nats():
    assert bits_per_char(math.log(2)) == pytest.approx(1.0)
    assert bits_per_char(math.log(27)) == pytest.approx(math.log2(27))
    torch.testing.assert_close(bits_per_char(torch.tensor([math.log(4)])), torch.tensor([2.0]))


def test_char_lm_overfits_a_repeated_string():
    text = "the quick brown fox jumps over the lazy dog " * 30
    counts = Counter(text)
    unigram_nats = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())  # ≈ 2.9 nats
    ids = encode(text)
    model = CharLM(TINY_LM)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = get_lm_batch(ids, 16, TINY_LM.context, batches)
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = evaluate_lm(model, ids, TINY_LM.context)
    assert final < 0.5 * unigram_nats, f"loss {final:.3f} nats after 40 steps, unigram entropy {unigram_nats:.3f}"


def test_evaluate_lm_is_deterministic_and_matches_window_loss():
    model = CharLM(TINY_LM).train()
    T = TINY_LM.context
    val_ids = encode(random_text8(10 * T + 5))
    first = evaluate_lm(model, val_ids, T, batch_size=3)
    assert evaluate_lm(model, val_ids, T, batch_size=7) == pytest.approx(first, rel=1e-6)
    assert evaluate_lm(model, val_ids, T, batch_size=3) == first
    assert model.training, "evaluate_lm must restore the training mode"
    starts = torch.arange(10) * T  # the 10 non-overlapping windows
    window = val_ids[starts[:, None] + torch.arange(T + 1)].long()
    with torch.no_grad():
        want = F.cross_entropy(model.eval()(window[:, :-1]).reshape(-1, 27), window[:, 1:].reshape(-1))
    assert first == pytest.approx(float(want), rel=1e-6)


def test_evaluate_lm_max_batches_uses_a_fixed_spread_subset():
    model = CharLM(TINY_LM)
    T = TINY_LM.context
    val_ids = encode(random_text8(40 * T + 1))
    subset = evaluate_lm(model, val_ids, T, batch_size=4, max_batches=2)
    assert subset == evaluate_lm(model, val_ids, T, batch_size=4, max_batches=2)
    starts = torch.linspace(0, 39, 8).round().long() * T  # 8 evenly spaced of the 40 windows
    window = val_ids[starts[:, None] + torch.arange(T + 1)].long()
    with torch.no_grad():
        want = model.eval().loss(window[:, :-1], window[:, 1:])
    assert subset == pytest.approx(float(want), rel=1e-6)


def test_get_lm_batch_windows_and_shift():
    ids = torch.arange(200)
    x, y = get_lm_batch(ids, 6, 9, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (6, 9) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(9)), "each row is a contiguous window"
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 199
    again = get_lm_batch(ids, 6, 9, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x), "a seeded generator gives the same batch"


def test_get_lm_batch_widens_uint8_ids():
    ids = encode(random_text8(100))
    x, y = get_lm_batch(ids, 4, 10)
    assert x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_get_lm_batch_rejects_too_short_ids():
    with pytest.raises(ValueError, match="context"):
        get_lm_batch(torch.arange(8), 2, 8)


# ---- digits MLP ---------------------------------------------------------------------------------

def test_digits_mlp_has_the_demo_layout_and_weights():
    torch.manual_seed(3)
    model = build_digits_mlp(32)
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    assert isinstance(model, DigitsMLP)
    assert [type(m) for m in model] == [type(m) for m in plain]
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True))
    assert model(torch.rand(5, 64)).shape == (5, 10)
