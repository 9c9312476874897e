"""The QLoRA fine-tuning driver (`slimrate qlora train`): both phases end to end on the tiny model,
its outputs, chat JSONL reading and assistant-only labels, the markdown checker, and bad inputs."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from slimrate.cli import main  # noqa: E402
from slimrate.data.advising import advising_phase1, advising_phase2, overview_answer  # noqa: E402
from slimrate.qlora import FinetuneConfig, finetune, load_4bit, markdown_problems, normalize_answer  # noqa: E402
from slimrate.qlora.chat import (  # noqa: E402
    IGNORE_INDEX,
    ChatBatches,
    encode_chat,
    read_chat_jsonl,
    write_chat_jsonl,
)
from slimrate.qlora.evaluate import mean_token_loss  # noqa: E402
from slimrate.qlora.tiny import build_char_tokenizer  # noqa: E402
from slimrate.train import read_jsonl  # noqa: E402

from helpers import rel_err  # noqa: E402

FAST = ["--steps", "3", "--batch", "4", "--max-new-tokens", "8", "--eval-limit", "4", "--max-length", "256",
        "--backend", "reference", "--no-progress"]


def test_driver_runs_both_phases_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["qlora", "train", "--out", str(out), "--merge", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "TINY MODEL" in printed and "mean nothing about real models" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiny_model"] and summary["fused_layers"] == 14
    assert [p["phase"] for p in summary["phases"]] == ["phase1", "phase2"]
    for phase in summary["phases"]:
        for key in ("train_loss_before", "train_loss_after", "heldout_loss", "median_samples_per_s"):
            assert phase[key] > 0, key
        assert 0 <= phase["markdown_share"] <= 1 and 0 <= phase["exact_accuracy"] <= 1
        folder = out / phase["phase"]
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert (folder / "tensorboard").is_dir()
        records = read_jsonl(folder / "metrics.jsonl")
        assert records[-1]["step"] == 3 and "eval/heldout_loss" in records[-1]
    assert "TINY MODEL" in (out / "summary.md").read_text()
    # phase 2 starts from phase 1's adapter: its loss before training is that of base + phase 1's saved adapter
    after_phase1 = load_4bit(out / "tiny-base", out / "phase1" / "adapter", compute_dtype=torch.float32).eval()
    probe = ChatBatches.from_records(AutoTokenizer.from_pretrained(out / "tiny-base"),
                                     read_chat_jsonl(out / "data" / "phase2.jsonl"), max_length=256)
    probe.examples = probe.examples[:FinetuneConfig.loss_examples]
    assert mean_token_loss(after_phase1, probe) == pytest.approx(summary["phases"][1]["train_loss_before"], rel=1e-5)
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config and (out / "merged" / "tokenizer.json").is_file()
    # the merged model = the 4-bit base + phase 2's saved adapter (LoRA and the tiny model's trained lm_head)
    tuned = load_4bit(out / "tiny-base", out / "phase2" / "adapter", compute_dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ids = torch.randint(6, 100, (2, 9))
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        assert rel_err(merged(input_ids=ids).logits, expected.double()) < 1e-5


def test_driver_trains_lora_from_user_files_unfused(tmp_path):
    """User JSONL for one phase (held-out share split off), peft + bitsandbytes layers: lora_B moves
    away from its zero start (gradients flowed through every step)."""
    from safetensors.torch import load_file

    write_chat_jsonl(tmp_path / "a.jsonl", advising_phase1()[:20])
    summary = finetune(FinetuneConfig(out_dir=str(tmp_path / "run"), phase1=str(tmp_path / "a.jsonl"), steps=2, batch=2,
                                      fused=False, progress=False, max_new_tokens=4))
    assert [p["phase"] for p in summary["phases"]] == ["phase1"] and summary["fused_layers"] == 0
    assert summary["heldout_chats"] == 2 and summary["phases"][0]["train_chats"] == 18
    assert summary["phases"][0]["exact_accuracy"] is None  # no question set given
    weights = load_file(tmp_path / "run" / "phase1" / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 14 and all(w.abs().sum() > 0 for w in lora_b)


def test_phase2_without_phase1_is_refused(tmp_path, capsys):
    write_chat_jsonl(tmp_path / "b.jsonl", advising_phase2()[:4])
    assert main(["qlora", "train", "--out", str(tmp_path / "o"), "--phase2", str(tmp_path / "b.jsonl")]) == 2
    assert "--phase2: needs --phase1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="phase2: given without phase1"):
        FinetuneConfig(out_dir=str(tmp_path), phase2=str(tmp_path / "b.jsonl"))


def test_missing_files_are_refused(tmp_path, capsys):
    assert main(["qlora", "train", "--out", str(tmp_path / "o"), "--phase1", str(tmp_path / "nope.jsonl")]) == 2
    assert "--phase1: " in capsys.readouterr().err
    assert main(["qlora", "train", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "--model: " in err and "nothing is downloaded" in err
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": []}', "non-empty \"messages\" list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\]"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, line, message):
    good = json.dumps(advising_phase1()[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{message}"):
        read_chat_jsonl(path)
    assert main(["qlora", "train", "--out", str(tmp_path / "o"), "--phase1", str(path), *FAST]) == 2
    assert "bad.jsonl:3: " in capsys.readouterr().err


def test_question_records_need_an_answer(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "How long?"}]}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: expected an \"answer\""):
        read_chat_jsonl(path, need_answer=True)


def test_labels_cover_only_assistant_tokens():
    tokenizer = build_char_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "## A\n- b"}, {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No."}]
    ids, labels = encode_chat(tokenizer, messages, max_length=512)
    assert len(ids) == len(labels)
    learned = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert learned == "## A\n- b</s>No.</s>"
    ids_cut, labels_cut = encode_chat(tokenizer, messages, max_length=10)
    assert len(ids_cut) == 10 and all(lab == IGNORE_INDEX for lab in labels_cut)


def test_markdown_checker_accepts_the_answer_format():
    assert markdown_problems(overview_answer({"degree": "MSc X", "university": "U", "duration": "2 years",
                                              "ielts": "6.5", "deadline": "March", "tuition": "1 EUR"})) == []
    assert markdown_problems("# Plan\n\nSome **bold** text.\n\n1. one\n   \n2. two\n   - nested\n     - deeper\n"
                             "   - more\n3. three\n\n## Next\n```\n#not a heading\n```") == []


@pytest.mark.parametrize("text,problem", [
    ("", "empty"),
    ("Just a sentence.", "no heading and no list item"),
    ("##Plan\n- a", "malformed heading"),
    ("####### Too deep", "malformed heading"),
    ("# A\n### C", "heading level 3 after level 1"),
    ("- a\n-b", "malformed list item"),
    ("1. a\n3. b", "numbered 3, expected 2"),
    ("- a\n* b", "list marker"),
    ("- a\n   - odd indent", "indented by 3"),
    ("- a\n    - two levels", "indented by 4"),
    ("1. a\n  - under the number", "indented by 2"),
    ("2. starts at two", "expected 1"),
    ("## A\n- **bold", "unclosed"),
    ("## A\n```\ncode", "unclosed ``` code block"),
    ("## A\n-", "malformed list item"),
])
def test_markdown_checker_rejects_malformed(text, problem):
    assert any(problem in p for p in markdown_problems(text)), markdown_problems(text)


def test_markdown_checker_agrees_with_a_commonmark_parser():
    markdown_it = pytest.importorskip("markdown_it")
    parser = markdown_it.MarkdownIt("commonmark")
    for text in ["## A\n- b\n- c", "# T\n\n1. x\n2. y\n\n## U"]:
        assert markdown_problems(text) == []
        kinds = {t.type for t in parser.parse(text)}
        assert "heading_open" in kinds and kinds & {"bullet_list_open", "ordered_list_open"}
    nested = [(t.type, t.level) for t in parser.parse("## A\n1. x\n   - y\n2. z") if t.type.endswith("list_open")]
    assert markdown_problems("## A\n1. x\n   - y\n2. z") == [] and nested == [("ordered_list_open", 0),
                                                                            ("bullet_list_open", 2)]


def test_normalize_answer():
    assert normalize_answer("  6.5. ") == normalize_answer("6.5") == "6.5"
    assert normalize_answer("2  Years") == "2 years"
    assert normalize_answer("6.5") != normalize_answer("6")


def test_driver_rejects_a_tokenizer_without_chat_template(tmp_path):
    from slimrate.qlora.tiny import build_tiny_mistral

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    build_tiny_mistral(len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        finetune(FinetuneConfig(out_dir=str(tmp_path / "o"), model=str(tmp_path / "m"), steps=1, progress=False))
