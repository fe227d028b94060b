"""Tensor roles derived from the model itself: the transformers module that owns each tensor.

Any architecture transformers knows (Llama, Qwen, Mistral, Gemma, GPT-2, OPT, Phi, BERT, RoBERTa,
...) is planned without a hand-written list: ``config.json`` names the model class, which is
built on the meta device (no weights, no download, milliseconds of work even for 7B shapes), and
every parameter takes its role from the module that owns it:

* ``nn.Linear`` and GPT-2's ``Conv1D`` (the same map, stored transposed): weights are factorised,
  biases stored dense;
* ``nn.Embedding``: an embedding, factorised unless ``compress_embeddings`` is off;
* anything else of at most two dimensions (norms, scales): stored dense;
* the task head (a top-level module beside the backbone, such as ``classifier`` or ``score``):
  stored dense, or whole when the base lacks it; a causal LM's ``lm_head`` is the model's output
  embedding, a large linear map, and is factorised;
* registered buffers: copied from the base.

* a 3-D weight of a mixture-of-experts block (transformers 5 holds a block's experts as one
  experts × out × in tensor in a module named ``...Experts``): factorised slice by slice, each
  expert a matrix with its own budget. Most checkpoints store those experts one 2-D tensor each
  (``mlp.experts.3.down_proj.weight``), the layout transformers merges on load with its
  checkpoint conversion mapping; the mapping's source patterns make each such tensor a linear map
  of its own, so it is factorised within its own budget too.

Any other tensor of three or more dimensions is left ``unknown``: stored dense and reported,
never dropped. So is a checkpoint tensor the module tree lacks. Checkpoints saved from the
backbone class alone (no ``model.`` or ``bert.`` prefix) are matched with or without the class's
``base_model_prefix``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import disk_cache
from .errors import CheckpointError
from .policy import OVERRIDES, ArchitecturePolicy, Role, is_expert_slice


@dataclass(frozen=True)
class DerivedPolicy:
    """Roles of every parameter and buffer of one model class, by full name."""

    model_type: str
    roles: Mapping[str, Role]
    prefix: str
    transposed: frozenset[str] = frozenset()  # weights of Conv1D modules, stored in×out
    output: str | None = None  # the output embedding's weight (a causal LM's ``lm_head.weight``)
    tied: Mapping[str, str] = field(default_factory=dict)  # a tied weight: the weight it shares
    expert_slices: tuple[str, ...] = ()  # regexes of the per-expert 2-D tensors a checkpoint may store

    def role(self, name: str) -> Role:
        """The role of checkpoint tensor ``name``, trying it with and without the backbone's prefix."""
        for candidate in (name, f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")):
            if candidate in self.roles:
                return self.roles[candidate]
        return Role.LINEAR if self.is_expert_slice(name) else Role.UNKNOWN

    def is_expert_slice(self, name: str) -> bool:
        return is_expert_slice(self.expert_slices, name)


def policy_for(config: Mapping[str, Any]) -> ArchitecturePolicy | DerivedPolicy:
    """The tensor roles of a checkpoint: its architecture's override where one exists, else derived."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError("config.json has no 'model_type' string")
    if model_type in OVERRIDES:
        return OVERRIDES[model_type]
    return derive_policy(config)


def derive_policy(config: Mapping[str, Any]) -> DerivedPolicy:
    """The roles of the model ``config`` (a parsed ``config.json``) describes.

    Kept on disk (``osd_core.disk_cache``), keyed by the configuration, the transformers version
    and this module's code, so only the first run per architecture imports transformers: that
    was about 4 s of every compression.
    """
    return _cached(json.dumps(dict(config), sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _cached(config_json: str) -> DerivedPolicy:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "absent"  # _derive's import then fails with transformers' own message
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # a change to this code re-derives
    key = hashlib.sha256(f"{source}\n{version}\n{config_json}".encode()).hexdigest()[:32]
    record = disk_cache.load_record("roles", key)
    if record is not None:
        try:
            return _from_record(record)
        except (AttributeError, KeyError, TypeError, ValueError):
            pass  # a record of another shape: derive it again and replace it
    policy = _derive(config_json)
    disk_cache.store_record("roles", key, _to_record(policy))
    return policy


def _to_record(policy: DerivedPolicy) -> dict[str, Any]:
    return {"model_type": policy.model_type, "roles": {name: role.value for name, role in policy.roles.items()},
            "prefix": policy.prefix, "transposed": sorted(policy.transposed), "output": policy.output,
            "tied": dict(policy.tied), "expert_slices": list(policy.expert_slices)}


def _from_record(record: dict[str, Any]) -> DerivedPolicy:
    output = record["output"]
    tied = record["tied"]
    if not (isinstance(record["prefix"], str) and (output is None or isinstance(output, str))
            and isinstance(tied, dict) and all(isinstance(x, str) for x in (*tied, *tied.values()))):
        raise ValueError("malformed roles record")
    return DerivedPolicy(str(record["model_type"]), {str(name): Role(role) for name, role in record["roles"].items()},
                         record["prefix"], frozenset(map(str, record["transposed"])), output, tied,
                         tuple(map(str, record["expert_slices"])))


def _derive(config_json: str) -> DerivedPolicy:
    import torch
    import transformers
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    config = json.loads(config_json)
    model_type = config.get("model_type")
    try:
        settings = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"model_type {model_type!r}: transformers cannot build its configuration ({exc})"
        ) from None
    model_class = _model_class(transformers, config, settings)
    try:
        with torch.device("meta"):
            model = model_class.from_config(settings) if hasattr(model_class, "from_config") else model_class(settings)
    except Exception as exc:  # a model class refusing its own configuration: report, do not guess
        raise CheckpointError(
            f"model_type {model_type!r}: cannot build {getattr(model_class, '__name__', model_class)} from config.json "
            f"to derive tensor roles ({type(exc).__name__}: {exc})"
        ) from None
    prefix = getattr(model, "base_model_prefix", "") or ""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    has_backbone = bool(prefix) and hasattr(model, prefix)
    roles: dict[str, Role] = {}
    transposed, output_name = set(), None
    for module_name, module in model.named_modules(remove_duplicate=False):
        top = module_name.split(".", 1)[0]
        is_head = has_backbone and module_name != "" and top != prefix and module is not output \
            and not _inside(model, top, output)
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            roles[full] = _role(module, param_name, param.ndim, is_head, nn, Conv1D)
            if isinstance(module, Conv1D) and param_name == "weight":
                transposed.add(full)
            if module is output and param_name == "weight":
                output_name = full
    for name, _ in model.named_buffers(remove_duplicate=False):
        roles.setdefault(name, Role.BUFFER)
    tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict) or not getattr(settings, "tie_word_embeddings", False):
        tied = {}
    experts = tuple(name for name, role in roles.items() if role is Role.EXPERTS)
    return DerivedPolicy(str(model_type), roles, prefix, frozenset(transposed), output_name, dict(tied),
                         _expert_slice_patterns(str(model_type), experts))


def _expert_slice_patterns(model_type: str, experts: tuple[str, ...]) -> tuple[str, ...]:
    """Regexes of the per-expert tensors transformers' conversion mapping merges into ``experts``."""
    if not experts:
        return ()
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # a transformers without conversion mappings stores experts as its modules are
        return ()
    patterns = []
    for converter in get_checkpoint_conversion_mapping(model_type) or ():
        if not isinstance(converter, WeightConverter):
            continue
        targets = [target.lstrip(".") for target in converter.target_patterns]
        if any(name.endswith(target) for name in experts for target in targets):
            patterns += [re.escape(source.lstrip(".")).replace(r"\*", r"\d+") + "$"
                         for source in converter.source_patterns]
    return tuple(patterns)


def _model_class(transformers: Any, config: Mapping[str, Any], settings: Any) -> Any:
    """The class ``config.json`` names, else the causal-LM or plain auto class for its model type."""
    for name in config.get("architectures") or ():
        found = getattr(transformers, str(name), None)
        if found is not None:
            return found
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return transformers.AutoModelForCausalLM if settings.model_type in causal else transformers.AutoModel


def _inside(model: Any, top: str, output: Any) -> bool:
    """Whether the output embedding lives under the top-level module ``top`` (a head holding ``lm_head``)."""
    if output is None:
        return False
    child = getattr(model, top, None)
    return child is not None and any(module is output for module in child.modules())


def _role(module: Any, param_name: str, ndim: int, is_head: bool, nn: Any, conv1d: type) -> Role:
    if is_head:
        return Role.HEAD
    if isinstance(module, nn.Linear | conv1d):
        return Role.LINEAR if param_name == "weight" and ndim == 2 else Role.DENSE
    if isinstance(module, nn.Embedding) and param_name == "weight":
        return Role.EMBEDDING
    if ndim == 3 and type(module).__name__.endswith("Experts"):
        return Role.EXPERTS
    return Role.DENSE if ndim <= 2 else Role.UNKNOWN
