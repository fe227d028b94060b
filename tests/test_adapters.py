"""A stored delta served as a LoRA adapter: PEFT loads it and computes what reconstruct writes.

Tiny models of real architectures with seeded random weights (a Llama decoder with an untied
head, a GPT-2 with transposed Conv1D layers, a BERT classifier with biases, norms and a new head)
are compressed with default settings, exported, and loaded with ``PeftModel.from_pretrained``.
Its logits must equal those of the reconstructed checkpoint, and ``merge_and_unload()`` must give
its weights. The ``vllm`` profile is checked against vLLM's published adapter rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from osd_cli.main import main
from osd_core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLLM_RANKS, export_adapter
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ConfigError
from osd_core.reconstruct import reconstruct_checkpoint
from osd_core.roles import policy_for
from tests.test_architectures import ARCHITECTURES, INPUT_IDS, save_pair

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def model(directory: Path, auto_class: str) -> torch.nn.Module:
    return getattr(transformers, auto_class).from_pretrained(directory).eval()


def run(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=INPUT_IDS).logits.float()


@pytest.fixture(params=["llama", "llama-tied", "gpt2", "bert"])
def exported(request, tmp_path):
    config_class, settings, auto_class = ARCHITECTURES[request.param]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    return request.param, base, tmp_path / "delta", restored, auto_class, tmp_path


def test_peft_loads_the_adapter_and_matches_reconstruct(exported):
    arch, base, delta, restored, auto_class, tmp_path = exported
    report = export_adapter(base, delta, tmp_path / "adapter", dtype="float32")
    assert report.left_out == () and report.lora_modules > 0
    served = peft.PeftModel.from_pretrained(model(base, auto_class), tmp_path / "adapter").eval()
    expected = run(model(restored, auto_class))
    assert torch.allclose(run(served), expected, atol=1e-4, rtol=1e-4), (run(served) - expected).abs().max()
    merged = served.merge_and_unload().state_dict()
    want = model(restored, auto_class).state_dict()
    # PEFT 0.21.2 merges the LoRA of both tied modules into their one shared weight, so a tied
    # embedding gets its delta twice when merged (served unmerged, as above, it is exact); a merged
    # tied model is what ``reconstruct`` is for.
    tied = policy_for(json.loads((base / "config.json").read_text())).tied
    shared = {*tied, *tied.values()}
    worst = max(float((merged[name].float() - value.float()).abs().max()) for name, value in want.items()
                if name not in shared)
    assert worst < 1e-4, arch


def test_a_half_precision_adapter_stays_within_half_precision_error(exported):
    arch, base, delta, restored, auto_class, tmp_path = exported
    export_adapter(base, delta, tmp_path / "adapter16", dtype="float16")
    served = peft.PeftModel.from_pretrained(model(base, auto_class), tmp_path / "adapter16").eval()
    expected = run(model(restored, auto_class))
    assert torch.allclose(run(served), expected, atol=2e-2, rtol=2e-2)


def test_the_vllm_profile_follows_vllms_adapter_rules(exported, reliability):
    arch, base, delta, restored, auto_class, tmp_path = exported
    report = export_adapter(base, delta, tmp_path / "vllm", profile="vllm")
    config = json.loads((tmp_path / "vllm" / ADAPTER_CONFIG).read_text())
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert config["modules_to_save"] is None and config["bias"] == "none"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    with safe_open(str(tmp_path / "vllm" / ADAPTER_WEIGHTS), "pt") as weights:
        keys = list(weights.keys())
        assert keys and all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in keys)
        assert all(config["r"] in weights.get_slice(key).get_shape() for key in keys)
    assert not any("embed" in module or module == "lm_head" for module in config["target_modules"])
    assert report.left_out  # norms, biases, embeddings or the head: listed, not silently dropped
    served = peft.PeftModel.from_pretrained(model(base, auto_class), tmp_path / "vllm").eval()
    assert torch.isfinite(run(served)).all()


def test_export_through_the_cli_reports_what_the_vllm_profile_leaves_out(capsys, tmp_path):
    config_class, settings, auto_class = ARCHITECTURES["llama"]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    assert main(["compress", "--base", str(base), "--finetuned", str(tuned), "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    args = ["export", "--delta", str(tmp_path / "d"), "--base", str(base), "--out", str(tmp_path / "a"),
            "--profile", "vllm", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"] == "vllm" and "lm_head.weight" in report["left_out"]
    assert main(args) == 2  # the adapter exists: refused without --overwrite
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_experts_of_a_moe_model_are_refused_by_peft_and_left_out_by_vllm(tmp_path):
    config_class, settings, auto_class = ARCHITECTURES["qwen2_moe"]
    base, tuned = save_pair(tmp_path, config_class, settings, auto_class)
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight' is one expert"):
        export_adapter(base, tmp_path / "delta", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    report = export_adapter(base, tmp_path / "delta", tmp_path / "vllm", profile="vllm")
    experts = [name for name in report.left_out if ".mlp.experts." in name]
    assert len(experts) == 3 * settings["num_experts"] * settings["num_hidden_layers"]
    config = json.loads((tmp_path / "vllm" / ADAPTER_CONFIG).read_text())
    assert not any(".experts." in module for module in config["target_modules"])
