"""A stored delta as a LoRA adapter in PEFT's layout, for serving many fine-tunes on one base.

A factored layer already is a rank-k product ``ΔW = U Vᵀ`` of its (masked, int8-decoded) factors,
so it becomes a LoRA pair without another SVD: ``lora_B = U`` (out×k) and ``lora_A = Vᵀ`` (k×in)
for a linear map; the transposes for GPT-2's ``Conv1D``, which stores its weight in×out (PEFT's
``fan_in_fan_out``); ``lora_embedding_A = Uᵀ`` and ``lora_embedding_B = V`` for an embedding. Each
module keeps its own rank ``k`` (``rank_pattern``) with ``lora_alpha`` equal to it
(``alpha_pattern``), so PEFT's scaling alpha/r is 1 and the adapter adds exactly the stored delta.

Two profiles, recorded in ``osd-fleet-adapter.json`` beside PEFT's two files:

* ``peft``: full fidelity. Bias deltas of LoRA modules become PEFT's ``lora_only`` biases; every
  other module with a delta (norms, matrices stored dense, the task head) goes into
  ``modules_to_save`` with its fine-tuned values, base plus delta. ``merge_and_unload()`` then
  gives the weights ``reconstruct`` writes.
* ``vllm``: what vLLM's LoRA loader accepts: LoRA on linear modules only, one rank for all,
  padded with zero columns up to a rank vLLM serves, no ``modules_to_save`` and no biases. What
  it leaves out is listed, tensor by tensor, in the record and the command's report.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .artifact import DeltaArtifact
from .checkpoint import Checkpoint
from .config import ADAPTER_DTYPES, ADAPTER_PROFILES
from .errors import ArtifactError, ConfigError
from .layer import CompressedLayer
from .outputs import OutputDir, check_output, json_field
from .reconstruct import check_base_matches
from .roles import policy_for
from .safetensors_io import write_safetensors

PROFILES = ADAPTER_PROFILES
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = {name: getattr(torch, name) for name in ADAPTER_DTYPES}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD = "osd-fleet-adapter.json"
RECORD_FORMAT = "osd-fleet-lora-export"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterReport:
    """What an export wrote and what it could not carry."""

    out: str
    profile: str
    rank: int
    lora_modules: int
    saved_modules: tuple[str, ...]
    left_out: tuple[str, ...]
    delta_manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_adapter_output(out: str | Path, *, inputs: tuple[str | Path, ...] = (), overwrite: bool = False) -> None:
    """Raise now, before any work, unless an adapter may be written to ``out``."""
    check_output(Path(out), what="adapter", inputs=inputs, overwrite=overwrite, is_ours=is_adapter_dir)


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` holds an adapter this module exported (so ``--overwrite`` may replace it)."""
    return json_field(path / RECORD, "format") == RECORD_FORMAT


def export_adapter(
    base_dir: str | Path,
    delta_dir: str | Path,
    out_dir: str | Path,
    *,
    profile: str = "peft",
    dtype: str = "float16",
    overwrite: bool = False,
    check_base: bool = True,
) -> AdapterReport:
    """Write the delta in ``delta_dir`` as a PEFT LoRA adapter for the base in ``base_dir``."""
    if profile not in PROFILES:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = OutputDir(out_dir, what="adapter", inputs=(base_dir, delta_dir), overwrite=overwrite,
                       is_ours=is_adapter_dir)
    artifact = DeltaArtifact.open(delta_dir)
    base = Checkpoint.open(base_dir)
    if check_base:
        check_base_matches(base, artifact)
    plan = _plan(artifact, base, profile)
    cast = DTYPES[dtype]
    rank = max((k for _, _, k, _ in plan.lora.values()), default=0)
    if rank == 0:
        raise ArtifactError(f"{artifact.path}: the delta has no factored linear or embedding layer to export as LoRA")
    if profile == "vllm":
        rank = next((r for r in VLLM_RANKS if r >= rank), 0)
        if rank == 0:
            raise ArtifactError(f"{artifact.path}: rank {max(k for *_, k, _ in plan.lora.values())} exceeds the "
                                f"largest rank vLLM serves ({VLLM_RANKS[-1]})")
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b, k, kind) in sorted(plan.lora.items()):
        if profile == "vllm" and k < rank:  # zero columns add nothing to B·A
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        names = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{names[0]}"] = a.to(cast).contiguous()
        tensors[f"{PREFIX}{module}.{names[1]}"] = b.to(cast).contiguous()
    for module, bias in sorted(plan.biases.items()):
        tensors[f"{PREFIX}{module}.base_layer.bias"] = bias.to(cast).contiguous()
    for module, params in sorted(plan.saved.items()):
        for name, value in sorted(params.items()):
            tensors[f"{PREFIX}{module}.{name}"] = value.to(cast).contiguous()
    ranks = {module: k for module, (_, _, k, _) in plan.lora.items()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(plan.lora),
        "rank_pattern": {} if profile == "vllm" else {re.escape(m): k for m, k in sorted(ranks.items()) if k != rank},
        "alpha_pattern": {} if profile == "vllm" else {re.escape(m): k for m, k in sorted(ranks.items()) if k != rank},
        "fan_in_fan_out": plan.transposed,
        "bias": "lora_only" if plan.biases else "none",
        "modules_to_save": sorted(plan.saved) or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    report = AdapterReport(str(out_dir), profile, rank, len(plan.lora), tuple(sorted(plan.saved)),
                           tuple(plan.left_out), artifact.manifest_sha256)
    with output as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        record = {"format": RECORD_FORMAT, "dtype": dtype, **report.to_dict()}
        (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        output.publish()
    return report


@dataclass
class _Plan:
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, int, str]]  # module: (A, B, k, "linear" | "embedding")
    biases: dict[str, torch.Tensor]  # module: fine-tuned bias of a LoRA module (PEFT "lora_only")
    saved: dict[str, dict[str, torch.Tensor]]  # module: fine-tuned parameters (modules_to_save)
    left_out: list[str]
    transposed: bool


def _plan(artifact: DeltaArtifact, base: Checkpoint, profile: str) -> _Plan:
    """Decide, module by module, what the adapter carries: LoRA factors, biases or whole modules."""
    info = artifact.manifest.layers
    policy = policy_for(base.config)
    by_module: dict[str, dict[str, CompressedLayer]] = {}
    for layer in artifact.layers():
        if layer.new_rows:
            raise ConfigError(
                f"{artifact.path}: the fine-tune added {layer.new_rows} rows (tokens) to {layer.name!r}; a LoRA "
                "adapter cannot grow the base's vocabulary. Serve this fine-tune merged (osd-fleet reconstruct)")
        module, _, param = layer.name.rpartition(".")
        by_module.setdefault(module, {})[param] = layer
    plan = _Plan({}, {}, {}, [], False)
    shares = {source: target for target, source in policy.tied.items() if target not in info}
    for module, params in sorted(by_module.items()):
        weight = params.get("weight")
        role = info[weight.name].role if weight is not None else None
        if weight is not None and policy.is_expert_slice(weight.name):
            if profile == "peft":
                raise ConfigError(
                    f"{artifact.path}: tensor {weight.name!r} is one expert of a mixture-of-experts block; "
                    "transformers merges the experts into one parameter that PEFT's LoRA modules cannot target. "
                    "Serve this fine-tune merged (osd-fleet reconstruct), or export --profile vllm, which lists "
                    "the experts as left out")
            plan.left_out.extend(sorted(layer.name for layer in params.values() if layer.kind != "zero"))
            continue
        if weight is not None and weight.kind == "factored" and _as_lora(role, weight.name, policy.output, profile):
            u, v = weight.factors()
            if role == "embedding":
                plan.lora[module] = (u.T, v, weight.k, "embedding")
                if weight.name in shares:  # a tied output head reads this weight too: LoRA it alike
                    plan.lora[shares[weight.name].rpartition(".")[0]] = (v.T, u, weight.k, "linear")
            elif weight.name in policy.transposed:  # Conv1D: the weight is in×out, so ΔWᵀ = V Uᵀ = B A
                plan.lora[module] = (u.T, v, weight.k, "linear")
                plan.transposed = True
            else:
                plan.lora[module] = (v.T, u, weight.k, "linear")
            for name, layer in sorted(params.items()):
                if name == "weight" or layer.kind == "zero":
                    continue
                if name == "bias" and profile == "peft":
                    plan.biases[module] = _fine_tuned(base, layer)
                else:
                    plan.left_out.append(layer.name)
            continue
        changed = {name: layer for name, layer in params.items() if layer.kind != "zero"}
        if not changed:
            continue
        if profile == "vllm":
            plan.left_out.extend(sorted(layer.name for layer in changed.values()))
            continue
        values = {name: base.load(f"{module}.{name}").float() for name in _module_params(base, module)}
        values.update({name: _fine_tuned(base, layer) for name, layer in changed.items()})
        plan.saved[module] = values
    return plan


def _as_lora(role: str | None, name: str, output: str | None, profile: str) -> bool:
    """Whether a factored weight becomes a LoRA pair: vLLM serves LoRA on linear maps only, and not
    on the output embedding (``lm_head``); PEFT also on embeddings."""
    if profile == "vllm":
        return role == "linear" and name != output
    return role in ("linear", "embedding")


def _module_params(base: Checkpoint, module: str) -> list[str]:
    """The parameter names of ``module`` in the base checkpoint (its own, not its children's)."""
    prefix = f"{module}."
    return [name[len(prefix):] for name in base.tensors if name.startswith(prefix) and "." not in name[len(prefix):]]


def _fine_tuned(base: Checkpoint, layer: CompressedLayer) -> torch.Tensor:
    """Base plus delta of one tensor in float32 (the tensor itself for a head new in the fine-tune)."""
    if layer.kind == "replace":
        return layer.delta()
    return base.load(layer.name).float() + layer.delta().reshape(base.tensors[layer.name].shape)
