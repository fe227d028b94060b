"""Causal LMs end to end: row shapes, log-likelihood scores, perplexity and calibration gradients.

A tiny random Llama pair with a word-level tokenizer built here (and a chat template) stands in
for a decoder fine-tune: nothing is downloaded. Every score is checked against a plain
computation written out in the test, one row and one choice at a time, with no batching or
padding, so the scorer's batching, masking and boundary handling must agree with it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from osd_cli.main import main
from osd_core.calibration_data import GradientFile
from osd_core.config import CompressionConfig
from osd_core.errors import CalibrationError
from tests.conftest import word_tokenizer
from workloads.calibration import calibration_gradients
from workloads.errors import DataFormatError
from workloads.evaluate import score_checkpoint
from workloads.task_rows import CHAT, CHOICE, COMPLETION, TEXT, read_task_rows

transformers = pytest.importorskip("transformers")

def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def loglik(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | context), token by token, for one pair: the reference computation."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"]) if context else len(tokenizer("")["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    positions = range(max(start, 1), len(whole))
    return sum(float(logprobs[t - 1, whole[t]]) for t in positions), len(positions)


CHOICES = [
    {"prompt": "the cat sat on the", "choices": [" mat", " big red rug", " dog"], "label": 0},
    {"prompt": "a dog ran under a", "choices": [" rug", " small blue mat"], "label": 1},
    {"prompt": "is the cat red", "choices": [" yes", " no", " yes and then no"], "label": 2},
    {"prompt": "the big dog", "choices": [" sat", " ran", " was"], "label": 1},
]
TEXTS = [{"text": "the cat sat on the mat"}, {"text": "a big blue dog ran and then sat"}, {"text": "yes"}]


def test_choice_accuracy_acc_norm_and_choice_loss_match_a_plain_computation(lm_pair, tmp_path):
    _, tuned = lm_pair
    score = score_checkpoint(tuned, write_rows(tmp_path / "mc.jsonl", CHOICES), batch_size=3, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned).eval()
    tokenizer = word_tokenizer()
    right = right_norm = 0
    losses = []
    for row in CHOICES:
        lls = [loglik(model, tokenizer, row["prompt"], choice)[0] for choice in row["choices"]]
        right += max(range(len(lls)), key=lls.__getitem__) == row["label"]
        right_norm += max(range(len(lls)), key=lambda c: lls[c] / len(row["choices"][c])) == row["label"]
        losses.append(-math.log(math.exp(lls[row["label"]]) / sum(math.exp(ll) for ll in lls)))
    assert (score.metric, score.n, score.higher_is_better) == ("acc", 4, True)
    assert score.value == right / 4 and score.extra["acc_norm"] == right_norm / 4
    assert score.losses == pytest.approx(losses, rel=1e-4)
    assert score.extra["choice_loss"] == pytest.approx(sum(losses) / 4, rel=1e-4)


def test_perplexity_matches_a_plain_computation_and_lower_is_better(lm_pair, tmp_path):
    _, tuned = lm_pair
    score = score_checkpoint(tuned, write_rows(tmp_path / "text.jsonl", TEXTS), batch_size=2, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned).eval()
    parts = [loglik(model, word_tokenizer(), "", row["text"]) for row in TEXTS]
    expected = math.exp(-sum(ll for ll, _ in parts) / sum(n for _, n in parts))
    assert (score.metric, score.higher_is_better) == ("perplexity", False)
    assert score.value == pytest.approx(expected, rel=1e-5) and score.extra["tokens"] == sum(n for _, n in parts)


def test_row_shapes_are_recognised_and_mixed_or_unknown_ones_refused(tmp_path):
    chat = {"messages": [{"role": "user", "content": "is the cat red"}, {"role": "assistant", "content": "no"}]}
    shapes = {TEXT: TEXTS[0], COMPLETION: {"prompt": "the cat", "completion": " sat"}, CHAT: chat, CHOICE: CHOICES[0]}
    for kind, row in shapes.items():
        assert read_task_rows(write_rows(tmp_path / f"{kind}.jsonl", [row, row])).kind == kind
    bad = {
        "mixed": ([TEXTS[0], CHOICES[0]], r"mixed.jsonl:2: a choice row in a file of text rows"),
        "unknown": ([{"question": "?"}], r"unknown.jsonl:1: keys \['question'\] match no row shape"),
        "label": ([{**CHOICES[0], "label": 3}], r"label.jsonl:1: label 3 is outside \[0, 3\): the row has 3 choices"),
        "chat": ([{"messages": chat["messages"][:1]}], r"chat.jsonl:1: the last message must be the assistant's"),
    }
    for name, (rows, message) in bad.items():
        with pytest.raises(DataFormatError, match=message):
            read_task_rows(write_rows(tmp_path / f"{name}.jsonl", rows))


def reference_gradient(directory: Path, pairs: list[tuple[str, str]], name: str) -> torch.Tensor:
    """The mean over rows of each row's mean next-token loss on its continuation, by autograd.

    A row with no token to predict (one token long) has no loss and is left out.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = word_tokenizer()
    spans = []
    for context, continuation in pairs:
        whole = tokenizer(context + continuation)["input_ids"]
        start = max(len(tokenizer(context)["input_ids"]) if context else len(tokenizer("")["input_ids"]), 1)
        if start < len(whole):
            spans.append((whole, start))
    for whole, start in spans:
        logits = model(input_ids=torch.tensor([whole])).logits[0]
        targets = torch.tensor(whole[start:], dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(logits[start - 1 : len(whole) - 1], targets) / len(spans)
        loss.backward()
    return dict(model.named_parameters())[name].grad


@pytest.mark.parametrize("shape", [TEXT, COMPLETION, CHAT, CHOICE])
def test_calibration_gradients_are_the_loss_gradient_of_the_target_tokens(lm_pair, tmp_path, shape):
    base, tuned = lm_pair
    chat = [{"role": "user", "content": "is the cat red"}, {"role": "assistant", "content": "no the cat is blue"}]
    rows, pairs = {
        TEXT: (TEXTS, [("", row["text"]) for row in TEXTS]),
        COMPLETION: ([{"prompt": "the cat", "completion": " sat on the mat"}], [("the cat", " sat on the mat")]),
        CHAT: ([{"messages": chat}], [("user : is the cat red assistant :", " no the cat is blue")]),
        CHOICE: (CHOICES[:2], [("the cat sat on the", " mat"), ("a dog ran under a", " small blue mat")]),
    }[shape]
    out = calibration_gradients(base, tuned, write_rows(tmp_path / "calib.jsonl", rows),
                                CompressionConfig(method="osd", rank=1), tmp_path / "grads.safetensors",
                                batch_size=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(GradientFile(out)[name], reference_gradient(tuned, pairs, name), atol=1e-6, rtol=1e-4)


def test_calibration_gradients_do_not_depend_on_the_batch_size(lm_pair, tmp_path):
    base, tuned = lm_pair
    longer = [{"text": "the small red cat ran under the big blue mat and sat"}, {"text": "no"}]
    rows = write_rows(tmp_path / "calib.jsonl", TEXTS + longer)  # rows of unequal lengths, padded in a batch
    config = CompressionConfig(method="osd", rank=1)
    one, three = (GradientFile(calibration_gradients(base, tuned, rows, config, tmp_path / f"g{size}.safetensors",
                                                     batch_size=size)) for size in (1, 3))
    assert one.keys() == three.keys()
    for name in one:
        assert torch.allclose(one[name], three[name], atol=1e-6, rtol=1e-4), name


def test_a_causal_lm_refuses_classifier_rows_and_the_cli_scores_it(lm_pair, tmp_path, capsys):
    base, tuned = lm_pair
    labelled = write_rows(tmp_path / "labelled.jsonl", [{"text": "the cat", "label": 1}])
    with pytest.raises(CalibrationError, match=r"labelled.jsonl:1: \{text, label\} rows are for sequence classifiers"):
        calibration_gradients(base, tuned, labelled, CompressionConfig(method="osd", rank=1), tmp_path / "g")
    assert main(["compress", "--base", str(base), "--finetuned", str(tuned), "--out", str(tmp_path / "delta")]) == 0
    capsys.readouterr()
    data = write_rows(tmp_path / "mc.jsonl", CHOICES)
    assert main(["evaluate", "--base", str(base), "--delta", str(tmp_path / "delta"), "--data", str(data),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "acc" and 0 <= result["value"] <= 1 and "acc_norm" in result
