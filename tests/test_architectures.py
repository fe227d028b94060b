"""Any transformers architecture compresses with default settings: roles come from the module tree.

Each case builds a tiny model of a real architecture with seeded random weights, saves it as a
base and as a perturbed fine-tune (``save_pretrained``, safetensors), then runs ``compress`` and
``reconstruct`` with no architecture-specific flag. The restored checkpoint loads with the model's
own auto class, and its logits equal those of the base with every decoded layer delta added
directly, so what was stored is exactly what is served. No tensor may be left unknown, and every
linear map must be factorised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from osd_cli.main import main
from safetensors.torch import load_file, save_file

from osd_core.adapters import export_adapter
from osd_core.artifact import DeltaArtifact
from osd_core.budget import layer_budget
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ConfigError
from osd_core.factorize import compress_matrix
from osd_core.reconstruct import reconstruct_checkpoint
from osd_core.roles import derive_policy
from tests.conftest import perturb

transformers = pytest.importorskip("transformers")

CAUSAL = "AutoModelForCausalLM"
CLASSIFIER = "AutoModelForSequenceClassification"
SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4}
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False}, CAUSAL),
    "llama-tied": ("LlamaConfig", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True}, CAUSAL),
    "qwen2": ("Qwen2Config", {**SMALL, "num_key_value_heads": 2}, CAUSAL),
    "mistral": ("MistralConfig", {**SMALL, "num_key_value_heads": 2, "sliding_window": 16}, CAUSAL),
    "gemma3_text": ("Gemma3TextConfig", {**SMALL, "num_key_value_heads": 2, "head_dim": 8,
                                         "sliding_window": 16}, CAUSAL),
    "phi3": ("Phi3Config", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}, CAUSAL),
    "gpt2": ("GPT2Config", {"vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                            "bos_token_id": 0, "eos_token_id": 0}, CAUSAL),
    "opt": ("OPTConfig", {"vocab_size": 96, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "word_embed_proj_dim": 32, "max_position_embeddings": 64,
                          "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0}, CAUSAL),
    # transformers 5 stores each block's experts as one experts × out × in tensor
    "qwen2_moe": ("Qwen2MoeConfig", {**SMALL, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}, CAUSAL),
    "roberta": ("RobertaConfig", {**SMALL, "max_position_embeddings": 64, "num_labels": 3, "pad_token_id": 1},
                CLASSIFIER),
    "bert": ("BertConfig", {**SMALL, "max_position_embeddings": 64, "num_labels": 3}, CLASSIFIER),
}
INPUT_IDS = torch.tensor([[3, 17, 42, 5, 88, 9, 31, 2]])


def save_pair(root: Path, config_class: str, settings: dict[str, Any], auto_class: str, *,
              dtype: torch.dtype = torch.float32, shard: str | None = None) -> tuple[Path, Path]:
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(config).to(dtype).eval()
    base, tuned = root / "base", root / "finetuned"
    options = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(base, **options)
    state = perturb({k: v.detach() for k, v in model.state_dict().items()}, seed=1)
    model.load_state_dict(state)
    model.save_pretrained(tuned, **options)
    return base, tuned


def logits(directory: Path, auto_class: str) -> torch.Tensor:
    model = getattr(transformers, auto_class).from_pretrained(directory, dtype="auto").eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def base_plus(base: Path, decoded: dict[str, torch.Tensor], out: Path) -> Path:
    """The base checkpoint with each decoded delta added to the stored tensor of its name, by hand:
    what the reconstruction must equal, computed without it."""
    weights = {}
    for path in base.glob("*.safetensors"):
        weights.update(load_file(path))
    for name, delta in decoded.items():
        weights[name] = (weights[name].float() + delta.reshape(weights[name].shape)).to(weights[name].dtype)
    out.mkdir()
    shutil.copyfile(base / "config.json", out / "config.json")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_an_architecture_round_trips_with_default_settings(tmp_path, arch):
    config_class, settings, auto_class = ARCHITECTURES[arch]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    report = compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    assert report.unknown == ()
    artifact = DeltaArtifact.open(tmp_path / "delta")
    kinds = {name: info.kind for name, info in artifact.manifest.layers.items()}
    roles = {name: info.role for name, info in artifact.manifest.layers.items()}
    k = CompressionConfig(rank=1).k
    linear = [name for name, role in roles.items() if role == "linear"]
    assert linear and all(kinds[name] == "factored" for name in linear  # a matrix thinner than k stays dense
                          if min(artifact.manifest.layers[name].shape) >= k), kinds
    assert all(kinds[name] == "experts" for name, role in roles.items() if role == "experts"), kinds
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    decoded = {layer.name: layer.delta() for layer in artifact.layers()}
    expected = logits(base_plus(base, decoded, tmp_path / "expected"), auto_class)
    got = logits(restored, auto_class)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, logits(base, auto_class), atol=1e-4)  # the delta did something


def test_experts_stored_as_one_3d_tensor_are_compressed_slice_by_slice(tmp_path):
    """Most MoE checkpoints store one 2-D tensor per expert (the round trip above); some store the
    experts × out × in tensor transformers 5 holds. Each slice then gets its own budget."""
    config_class, settings, auto_class = ARCHITECTURES["qwen2_moe"]
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(config).eval()
    base, tuned = tmp_path / "base", tmp_path / "finetuned"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    changed = perturb(state, seed=1)
    name = "model.layers.0.mlp.experts.down_proj"
    changed[name][2] = state[name][2]  # an expert the fine-tune never routed to keeps its base weights
    for directory, weights in ((base, state), (tuned, changed)):
        directory.mkdir()
        config.save_pretrained(directory)
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    compress_config = CompressionConfig(rank=1)
    report = compress_checkpoint(base, tuned, tmp_path / "delta", compress_config)
    assert report.unknown == ()
    artifact = DeltaArtifact.open(tmp_path / "delta")
    experts = {layer.name: layer for layer in artifact.layers() if layer.kind == "experts"}
    assert len(experts) == 2 * settings["num_hidden_layers"]  # gate_up_proj and down_proj of each block
    layer = experts[name]
    assert [part.kind for part in layer.slices()] == ["factored", "factored", "zero", "factored"]
    n, d = layer.shape[1:]
    assert layer.budget_bits == 4 * layer_budget(n, d, 1)
    delta = changed[name].float() - state[name].float()
    for e, part in enumerate(layer.slices()):
        alone = compress_matrix(f"{name}[{e}]", delta[e], compress_config)  # a 2-D layer of its own
        assert torch.equal(part.delta(), alone.delta())
        assert part.paper_bits <= layer_budget(n, d, 1)
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    decoded = {layer.name: layer.delta() for layer in artifact.layers()}
    expected = logits(base_plus(base, decoded, tmp_path / "expected"), auto_class)
    assert torch.allclose(logits(restored, auto_class), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_a_fine_tune_with_added_tokens_stores_the_new_rows_whole(tmp_path, arch):
    config_class, settings, auto_class = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = getattr(transformers, auto_class).from_config(config).eval()
    base, tuned = tmp_path / "base", tmp_path / "finetuned"
    model.save_pretrained(base)
    model.resize_token_embeddings(settings["vocab_size"] + 3)  # three added tokens
    state = perturb({k: v.detach() for k, v in model.state_dict().items()}, seed=1)
    model.load_state_dict(state)
    model.save_pretrained(tuned)
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    artifact = DeltaArtifact.open(tmp_path / "delta")
    grown = {name: info.new_rows for name, info in artifact.manifest.layers.items() if info.new_rows}
    tied = settings["tie_word_embeddings"]
    expected = {"model.embed_tokens.weight": 3} if tied else {"model.embed_tokens.weight": 3, "lm_head.weight": 3}
    assert grown == expected
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    original, before = load_file(tuned / "model.safetensors"), load_file(base / "model.safetensors")
    weights = load_file(restored / "model.safetensors")
    for layer in artifact.layers():
        if layer.new_rows:
            vocab = settings["vocab_size"]
            assert torch.equal(weights[layer.name][vocab:], original[layer.name][vocab:].half().float())
            assert torch.equal(weights[layer.name][:vocab], before[layer.name] + layer.delta())
    served = transformers.AutoModelForCausalLM.from_pretrained(restored).eval()
    assert served.config.vocab_size == settings["vocab_size"] + 3
    if tied:
        assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():  # an added token is served
        served(input_ids=torch.tensor([[settings["vocab_size"] + 2, 5]]))
    with pytest.raises(ConfigError, match=r"added 3 rows \(tokens\) to '(model\.embed_tokens|lm_head)\.weight'"):
        export_adapter(base, tmp_path / "delta", tmp_path / "adapter")


@pytest.mark.parametrize("method", ["dare", "bitdelta", "impart", "deltacome"])
def test_the_peer_methods_round_trip_on_a_decoder(tmp_path, method):
    config_class, settings, auto_class = ARCHITECTURES["llama"]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(method=method, rank=1))
    artifact = DeltaArtifact.open(tmp_path / "delta")
    kinds = {info.kind for info in artifact.manifest.layers.values() if info.role == "linear"}
    assert kinds == {{"dare": "sparse", "bitdelta": "sign", "impart": "factored", "deltacome": "factored"}[method]}
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    decoded = {layer.name: layer.delta() for layer in artifact.layers()}
    expected = logits(base_plus(base, decoded, tmp_path / "expected"), auto_class)
    assert torch.allclose(logits(restored, auto_class), expected, atol=1e-4, rtol=1e-4)


def test_a_tied_model_stays_tied_and_its_head_is_stored_once(tmp_path):
    config_class, settings, auto_class = ARCHITECTURES["llama-tied"]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    layers = DeltaArtifact.open(tmp_path / "delta").manifest.layers
    assert "model.embed_tokens.weight" in layers and "lm_head.weight" not in layers
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    model = transformers.AutoModelForCausalLM.from_pretrained(restored)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_sharded_bf16_pair_reconstructs_as_bf16_through_the_cli(capsys, tmp_path):
    config_class, settings, auto_class = ARCHITECTURES["llama"]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class, dtype=torch.bfloat16, shard="40KB")
    assert len(list(tuned.glob("model-*.safetensors"))) > 1
    assert main(["compress", "--base", str(base), "--finetuned", str(tuned), "--out", str(tmp_path / "delta")]) == 0
    assert main(["reconstruct", "--base", str(base), "--delta", str(tmp_path / "delta"),
                 "--out", str(tmp_path / "restored")]) == 0
    capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "restored", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    index = json.loads((tuned / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_roles_come_from_the_module_tree_not_from_names(tmp_path):
    gpt2 = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64).to_dict()
    policy = derive_policy({**gpt2, "architectures": ["GPT2LMHeadModel"]})
    assert policy.role("transformer.h.0.attn.c_attn.weight").value == "linear"  # Conv1D, stored transposed
    assert policy.role("transformer.h.0.attn.c_attn.bias").value == "dense"
    assert policy.role("transformer.wte.weight").value == "embedding"
    assert policy.role("h.0.mlp.c_fc.weight").value == "linear"  # saved from GPT2Model: no prefix
    assert policy.role("transformer.h.0.not_a_tensor").value == "unknown"
    llama = transformers.LlamaConfig(**SMALL, num_key_value_heads=2).to_dict()
    classifier = derive_policy({**llama, "architectures": ["LlamaForSequenceClassification"]})
    assert classifier.role("score.weight").value == "head"
    assert classifier.role("model.layers.1.mlp.down_proj.weight").value == "linear"


def test_derived_roles_are_cached_so_a_known_architecture_plans_without_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("OSD_FLEET_CACHE", str(tmp_path))
    config = {**transformers.LlamaConfig(**SMALL, num_key_value_heads=2).to_dict(),
              "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    probe = ("import json, sys; from osd_core.roles import derive_policy; "
             f"p = derive_policy(json.load(open({str(tmp_path / 'config.json')!r}))); "
             "print(json.dumps([sorted((k, v.value) for k, v in p.roles.items()), p.output, "
             "'transformers' in sys.modules]))")
    env = {**os.environ, "OSD_FLEET_CACHE": str(tmp_path)}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                               check=True).stdout) for _ in range(2))
    assert first[2] and not second[2]  # the second process never imported transformers
    assert first[:2] == second[:2] and ["lm_head.weight", "linear"] in first[0]
    (record,) = (tmp_path / "roles").glob("*.json")
    record.write_text('{"roles": 3}')  # a damaged record is derived again and replaced
    third = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert third[2] and third[:2] == first[:2] and json.loads(record.read_text())["output"] == "lm_head.weight"
