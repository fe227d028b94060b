"""Compress → reconstruct on real checkpoints of a real pre-trained model (all-MiniLM-L6-v2)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from osd_core.artifact import DeltaArtifact
from workloads.calibration import calibration_gradients
from osd_core.calibration_data import GradientFile
from osd_core.checkpoint import Checkpoint
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.reconstruct import reconstruct_checkpoint


def load_model(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True).eval()


def logits(model, texts=("a gripping, tender film", "tedious beyond words")):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    with torch.inference_mode():
        return model(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits


def test_full_rank_round_trip_restores_the_finetune(synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    # full rank of every matrix, the vectors in fp16
    config = CompressionConfig(method="truncsvd", rank=32, svd="exact", dense_dtype="float16")
    report = compress_checkpoint(base, tuned, tmp_path / "delta", config)
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    original, rebuilt = load_file(tuned / "model.safetensors"), load_file(restored / "model.safetensors")
    assert original.keys() == rebuilt.keys()
    for name, tensor in original.items():
        assert rebuilt[name].dtype == tensor.dtype, name
        # fp32 round-off on factorised weights; vectors and the head are stored in fp16
        assert torch.allclose(rebuilt[name], tensor, atol=2e-5, rtol=1e-4), name
    assert max(layer.rel_error for layer in report.layers if layer.kind == "factored") < 1e-5


def test_transformers_loads_the_restored_model_and_logits_match_direct_application(
    real_pair, tmp_path, calibration_file
):
    base, tuned = real_pair
    config = CompressionConfig(method="osd", rank=1, extra_rank=2)
    grads = calibration_gradients(base, tuned, calibration_file, config, tmp_path / "g.safetensors", batch_size=4)
    report = compress_checkpoint(base, tuned, tmp_path / "delta", config, gradients=GradientFile(grads))
    assert report.paper_bits <= report.budget_bits
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")

    direct = load_model(base)
    state = direct.state_dict()
    for layer in DeltaArtifact.open(tmp_path / "delta").layers():
        state[layer.name] = state[layer.name].float() + layer.delta().reshape(state[layer.name].shape)
    direct.load_state_dict(state)
    direct.name_or_path = str(base)
    assert torch.allclose(logits(load_model(restored)), logits(direct), atol=1e-5)
    assert json.loads((restored / "config.json").read_text())["id2label"] == {"0": "rotten", "1": "fresh"}
    # and the approximation is not the base: the delta did something
    assert not torch.allclose(logits(load_model(restored)), logits(load_model(base)), atol=1e-4)


def test_each_method_respects_every_layer_budget_on_a_real_model(real_pair, tmp_path):
    base, tuned = real_pair
    for method in ("truncsvd", "magtruncsvd", "sparse"):
        config = CompressionConfig(method=method, rank=1, extra_rank=2)
        report = compress_checkpoint(base, tuned, tmp_path / method, config)
        factorised = [layer for layer in report.layers if layer.kind in ("factored", "sparse")]
        # 6 linears per block, pooler, word and position embeddings; the 2-row token-type table
        # only where the factor rank fits in it (k <= 2) or the method does not factor
        assert len(factorised) == 6 * 6 + 1 + 2 + (method != "magtruncsvd")
        assert all(layer.paper_bits <= layer.budget_bits for layer in factorised)
        assert report.unknown == ()


def test_gradients_cover_every_factorised_tensor(real_pair, tmp_path, calibration_file):
    base, tuned = real_pair
    config = CompressionConfig(method="osd", rank=1, extra_rank=1, gradient_at="reconstruction")
    grads = GradientFile(calibration_gradients(base, tuned, calibration_file, config, tmp_path / "g.safetensors"))
    assert "bert.encoder.layer.3.intermediate.dense.weight" in grads
    assert "classifier.weight" not in grads  # heads are stored dense, no gradient needed
    g = grads["bert.embeddings.word_embeddings.weight"]
    assert torch.isfinite(g).all() and 0 < int((g.abs().sum(1) > 0).sum()) < g.shape[0]  # row-sparse


def test_calibration_gradients_are_the_served_models_loss_gradient(real_pair, tmp_path, calibration_file):
    """Layers recomputed in backward, in batches of 3: still the eval-mode model's gradient of the mean loss."""
    from transformers import AutoTokenizer

    base, tuned = real_pair
    grads = GradientFile(calibration_gradients(base, tuned, calibration_file, CompressionConfig(method="osd", rank=1),
                                               tmp_path / "g.safetensors", batch_size=3))
    rows = [json.loads(line) for line in calibration_file.read_text().splitlines()]
    model = load_model(tuned)
    encoded = AutoTokenizer.from_pretrained(str(tuned))([row["text"] for row in rows], padding=True,
                                                        truncation=True, max_length=64, return_tensors="pt")
    model(**encoded, labels=torch.tensor([row["label"] for row in rows])).loss.backward()
    for name in ("bert.encoder.layer.2.attention.self.query.weight", "bert.encoder.layer.5.output.dense.weight"):
        expected = model.get_parameter(name).grad
        assert torch.allclose(grads[name], expected, atol=1e-7, rtol=1e-4), name


def test_frozen_embeddings_store_nothing_for_them(real_pair, tmp_path):
    base, tuned = real_pair
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    state = load_file(tuned / "model.safetensors")
    base_state = load_file(base / "model.safetensors")
    for name in state:
        if "embeddings" in name:
            state[name] = base_state[name]
    from safetensors.torch import save_file

    save_file(state, str(frozen / "model.safetensors"))
    (frozen / "config.json").write_bytes((tuned / "config.json").read_bytes())
    report = compress_checkpoint(base, frozen, tmp_path / "delta", CompressionConfig(method="magtruncsvd"))
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["bert.embeddings.word_embeddings.weight"] == "zero"
    assert all(layer.rel_error == layer.rel_error for layer in report.layers)  # no NaN anywhere


def test_sharded_checkpoints_round_trip(real_pair, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base, tuned = real_pair
    sharded = tmp_path / "sharded"
    AutoModelForSequenceClassification.from_pretrained(str(tuned)).save_pretrained(sharded, max_shard_size="20MB")
    assert len(Checkpoint.open(sharded).shards) > 1
    compress_checkpoint(base, sharded, tmp_path / "delta", CompressionConfig(method="truncsvd", rank=2))
    restored = reconstruct_checkpoint(base, tmp_path / "delta", tmp_path / "restored")
    assert torch.allclose(logits(load_model(restored)), logits(load_model(restored)))
    assert set(Checkpoint.open(restored).tensors) == set(Checkpoint.open(tuned).tensors)


def test_compressing_twice_gives_byte_identical_artifacts(synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    config = CompressionConfig(method="magtruncsvd", rank=1, extra_rank=2, svd="randomized")
    compress_checkpoint(base, tuned, tmp_path / "one", config)
    compress_checkpoint(base, tuned, tmp_path / "two", config)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files and all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_reconstruct_refuses_a_different_base(synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(method="truncsvd"))
    from osd_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="differ from the base this delta was made against"):
        reconstruct_checkpoint(tuned, tmp_path / "delta", tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_calibration_records_the_output_error_statistics_its_metric_reads(real_pair, tmp_path, calibration_file):
    base, tuned = real_pair
    config = CompressionConfig(method="osd", rank=1, extra_rank=1, gradient_at="path", metric="kfac")
    grads = GradientFile(calibration_gradients(base, tuned, calibration_file, config, tmp_path / "g.safetensors"))
    query = grads.statistics("bert.encoder.layer.0.attention.self.query.weight")
    assert query["input_cov"].shape == (384, 384) and torch.allclose(query["input_cov"], query["input_cov"].T)
    assert query["output_fisher"].shape == (384,) and bool((query["output_fisher"] >= 0).all())
    table = grads.statistics("bert.embeddings.word_embeddings.weight")
    assert table["row_weight"].shape == (30522,) and float(table["row_weight"].sum()) == pytest.approx(1.0)
    assert "bert.embeddings.word_embeddings.weight" in grads and all("::" not in name for name in grads)
    fisher = GradientFile(calibration_gradients(base, tuned, calibration_file, replace(config, metric="fisher"),
                                                tmp_path / "fisher.safetensors"))
    assert set(fisher.statistics("bert.encoder.layer.0.attention.self.query.weight")) == {"output_fisher"}
    query_name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(fisher[query_name], grads[query_name], atol=1e-7)


def test_a_global_allocation_respends_the_uniform_total_where_it_cuts_more_error(real_pair, tmp_path):
    base, tuned = real_pair
    config = CompressionConfig(rank=0.5)  # int8, k = 2 at the uniform budget
    uniform = compress_checkpoint(base, tuned, tmp_path / "uniform", config)
    spread = compress_checkpoint(base, tuned, tmp_path / "global", config, allocation="global")
    manifest = DeltaArtifact.open(tmp_path / "global").manifest
    recorded = manifest.provenance["global_allocation"]
    assert manifest.allocation == "global"
    total = sum(layer.budget_bits for layer in uniform.layers if layer.kind in ("factored", "sparse", "zero"))
    assert recorded["total_bits"] == total and spread.budget_bits == recorded["bits"] <= total
    assert all(layer.paper_bits <= layer.budget_bits for layer in spread.layers if layer.kind == "factored")
    ranks = {layer.k for layer in spread.layers if layer.kind == "factored"}
    assert len(ranks) > 1 and max(ranks) > config.k  # k follows each layer's bits

    original = load_file(tuned / "model.safetensors")
    names = [layer.name for layer in uniform.layers if layer.kind in ("factored", "sparse", "zero")]

    def squared_error(delta_dir):
        restored = load_file(reconstruct_checkpoint(base, delta_dir, delta_dir.with_suffix(".restored"))
                             / "model.safetensors")
        return sum(float((original[n].float() - restored[n].float()).pow(2).sum()) for n in names)

    spent_globally = squared_error(tmp_path / "global")
    assert spent_globally < squared_error(tmp_path / "uniform")
    assert recorded["estimated_damage"] == pytest.approx(spent_globally, rel=0.05)


def test_global_all_spends_the_same_total_on_the_1d_deltas_too(real_pair, tmp_path):
    """The biases and norms come inside the matrices' total instead of beside it: fewer bytes, same budget."""
    base, tuned = real_pair
    config = CompressionConfig(rank=0.25)
    beside = compress_checkpoint(base, tuned, tmp_path / "global", config, allocation="global")
    inside = compress_checkpoint(base, tuned, tmp_path / "all", config, allocation="global-all")
    manifest = DeltaArtifact.open(tmp_path / "all").manifest
    recorded = manifest.provenance["global_allocation"]
    assert manifest.allocation == "global-all"
    total = DeltaArtifact.open(tmp_path / "global").manifest.provenance["global_allocation"]["total_bits"]
    assert recorded["total_bits"] == total and inside.budget_bits == manifest.totals["budget_bits"] <= total
    vectors = [layer for layer in inside.layers if len(layer.shape) == 1]
    assert len(vectors) == 64 and all(layer.budget_bits is not None for layer in vectors)
    assert all(layer.kind in ("zero", "dense") and layer.bytes * 8 <= (layer.budget_bits or 0) + 64 for layer in vectors)
    assert all(layer.budget_bits is None and layer.kind == "dense" for layer in beside.layers if len(layer.shape) == 1)
    assert inside.bytes_written < beside.bytes_written - 10_000  # the 1-D deltas were 16 KB beside the budget

    original = load_file(tuned / "model.safetensors")
    restored = load_file(reconstruct_checkpoint(base, tmp_path / "all", tmp_path / "restored") / "model.safetensors")
    allocated = [name for name, layer in manifest.layers.items() if layer.budget_bits is not None]
    damage = sum(float((original[n].float() - restored[n].float()).pow(2).sum()) for n in allocated)
    assert recorded["estimated_damage"] == pytest.approx(damage, rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_compressed_on_the_gpu_matches_the_cpu(real_pair, tmp_path):
    """Pairs are read one ahead into pinned memory, move to the GPU as stored and their deltas are
    taken there; the record comes back to the CPU."""
    base, tuned = real_pair
    config = CompressionConfig(rank=2)
    on_cpu = compress_checkpoint(base, tuned, tmp_path / "cpu", config, device="cpu")
    on_gpu = compress_checkpoint(base, tuned, tmp_path / "gpu", config, device="cuda")
    assert [r.name for r in on_gpu.layers] == [r.name for r in on_cpu.layers]
    for gpu, cpu in zip(on_gpu.layers, on_cpu.layers, strict=True):
        assert (gpu.kind, gpu.bytes) == (cpu.kind, cpu.bytes)
        assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-3, abs=1e-6)
    reconstruct_checkpoint(base, tmp_path / "gpu", tmp_path / "restored")
    assert Checkpoint.open(tmp_path / "restored").tensors.keys() == Checkpoint.open(tuned).tensors.keys()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_global_allocation_measured_on_the_gpu_spends_the_model_bits_as_on_the_cpu(real_pair, tmp_path):
    """The measuring pass reads ahead and takes deltas on the GPU too. Its damages differ from the
    CPU's in the last digits, so a tie may be broken the other way: the totals are compared."""
    base, tuned = real_pair
    config = CompressionConfig(rank=0.25)
    recorded = {}
    for device in ("cpu", "cuda"):
        compress_checkpoint(base, tuned, tmp_path / device, config, device=device, allocation="global-all")
        recorded[device] = DeltaArtifact.open(tmp_path / device).manifest.provenance["global_allocation"]
    assert recorded["cuda"]["total_bits"] == recorded["cpu"]["total_bits"]
    assert recorded["cuda"]["bits"] <= recorded["cuda"]["total_bits"]
    assert recorded["cuda"]["estimated_damage"] == pytest.approx(recorded["cpu"]["estimated_damage"], rel=1e-2)
