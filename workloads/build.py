"""Seeded, cached builder of real base/fine-tune pairs.

Each workload is a directory ``<cache>/workloads/<name>-<recipe key>/`` holding the base and the
fine-tune as ``BertForSequenceClassification`` checkpoints with identical key sets (the base gets
the same seeded head the fine-tune starts from, so every tensor has a base to subtract), the
calibration / validation / evaluation rows as JSONL, and ``workload.json`` with the recipe and
measured scores. A build writes into a temporary sibling directory and renames it into place,
so a directory with the final name is always complete.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from osd_core import disk_cache
from osd_core.outputs import remove_stale
from workloads.data import DATASETS, Splits, load_splits, package_file
from workloads.errors import MissingPackageError, WorkloadError, WorkloadNotBuiltError
from workloads.evaluate import EvalResult, evaluate_model
from workloads.jsonl import write_jsonl
from workloads.recipes import BASES, CACHE_FORMAT, BaseSpec, Recipe, workload_recipe
from workloads.train import fine_tune

log = logging.getLogger(__name__)

METADATA_FILE = "workload.json"
_VERSIONED = ("torch", "transformers", "tokenizers", "safetensors", "numpy")


class WorkloadFiles:
    """Where a built workload's files are under its ``root``: one layout for every kind of workload,
    so benches, the demo and the flows take any of them."""

    root: Path

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def finetuned_dir(self) -> Path:
        return self.root / "finetuned"

    @property
    def calib_path(self) -> Path:
        return self.root / "calib.jsonl"

    @property
    def val_path(self) -> Path:
        return self.root / "val.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.root / "eval.jsonl"


@dataclass(frozen=True)
class Workload(WorkloadFiles):
    """A built workload: where its files are and what was measured when it was built."""

    recipe: Recipe
    root: Path
    label_names: tuple[str, ...]
    scores: dict[str, dict[str, EvalResult]] = field(hash=False)
    build_seconds: float
    versions: dict[str, str] = field(hash=False)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def key(self) -> str:
        return self.recipe.key()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else osd-fleet's cache root (``osd_core.disk_cache``).

    Workloads live in its ``workloads/`` subdirectory; other parts of osd-fleet share the root.
    """
    return Path(cache_dir) if cache_dir is not None else disk_cache.cache_root()


class KeyedRecipe(Protocol):
    """What names a cache entry: a classification ``Recipe`` or a decoder ``LMRecipe``."""

    name: str

    def key(self) -> str: ...


def workload_dir(recipe: KeyedRecipe, cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "workloads" / f"{recipe.name}-{recipe.key()}"


def read_metadata(recipe: KeyedRecipe, root: Path, cache_format: int) -> dict[str, Any]:
    """``workload.json`` of the workload built at ``root``, checked to be of ``recipe`` and the format."""
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise WorkloadNotBuiltError(
            f"workload {recipe.name!r} is not built under {root}; run: python -m workloads build {recipe.name}"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != cache_format or meta.get("key") != recipe.key():
        raise WorkloadError(
            f"{meta_path}: format {meta.get('format')} / key {meta.get('key')} does not match "
            f"format {cache_format} / key {recipe.key()}; delete {root} and rebuild"
        )
    return meta


def load_workload(name: str, cache_dir: Path | None = None) -> Workload:
    """Return the cached workload ``name``; raise :class:`WorkloadNotBuiltError` if absent."""
    recipe = workload_recipe(name)
    root = workload_dir(recipe, cache_dir)
    meta = read_metadata(recipe, root, CACHE_FORMAT)
    return Workload(
        recipe=recipe,
        root=root,
        label_names=tuple(meta["label_names"]),
        scores={
            model: {split: EvalResult(**result) for split, result in splits.items()}
            for model, splits in meta["scores"].items()
        },
        build_seconds=meta["build_seconds"],
        versions=meta["versions"],
    )


def build_workload(
    name: str,
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    num_threads: int | None = None,
) -> Workload:
    """Build workload ``name`` unless it is cached; return it either way.

    ``num_threads`` sets ``torch.set_num_threads`` for the build and is restored after (the
    count is recorded: it changes float summation order and so the last bits of the weights).
    """
    recipe = workload_recipe(name)
    root = workload_dir(recipe, cache_dir)
    if (root / METADATA_FILE).is_file():
        log.info("workload %s: cached at %s", name, root)
        return load_workload(name, cache_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(root.parent, f".tmp-{root.name}-*", lambda p: p.name.rsplit("-", 1)[-1])
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("workload %s: building into %s", name, tmp)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(num_threads or threads_before)
        _build_into(tmp, recipe, progress=progress)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / METADATA_FILE).is_file():
                raise
            log.info("workload %s: another process finished first; keeping its copy", name)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("workload %s: done at %s", name, root)
    return load_workload(name, cache_dir)


def _build_into(out: Path, recipe: Recipe, *, progress: bool) -> None:
    start = time.perf_counter()
    spec = DATASETS[recipe.dataset]
    splits = load_splits(recipe.dataset, recipe.sizes, recipe.seed)
    out.mkdir(parents=True)
    for split in ("calib", "val", "eval"):
        write_jsonl(getattr(splits, split), out / f"{split}.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(recipe.base), local_files_only=True)
    model = load_base_model(recipe, spec.label_names)

    scores = {"base": _save_and_score(model, tokenizer, out / "base", splits, recipe, progress)}
    trained = fine_tune(model, tokenizer, splits.train, recipe, progress=progress)
    scores["finetuned"] = _save_and_score(
        model, tokenizer, out / "finetuned", splits, recipe, progress
    )
    _check_same_keys(out / "base", out / "finetuned")
    meta = {
        "format": CACHE_FORMAT,
        "name": recipe.name,
        "key": recipe.key(),
        "recipe": recipe.to_json(),
        "seed": recipe.seed,
        "num_labels": spec.num_labels,
        "label_names": list(spec.label_names),
        "rows": {split: len(getattr(splits, split)) for split in ("train", "calib", "val", "eval")},
        "scores": scores,
        "train": {**asdict(trained), "num_threads": torch.get_num_threads()},
        "build_seconds": time.perf_counter() - start,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(recipe),
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _save_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    splits: Splits,
    recipe: Recipe,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Save model and tokenizer (safetensors only) to ``out``; score on the eval and val rows.

    The tokenizer is saved from a fresh load: using it (padding, truncation) changes what
    ``save_pretrained`` writes, and a fine-tune whose tokenizer files differ from the base's
    carries them in every compressed delta.
    """
    model.save_pretrained(out)
    type(tokenizer).from_pretrained(tokenizer.name_or_path, local_files_only=True).save_pretrained(out)
    scores = {}
    for split in ("eval", "val"):
        result = evaluate_model(
            model,
            tokenizer,
            getattr(splits, split),
            max_length=recipe.max_length,
            progress=progress,
            desc=f"evaluate {recipe.name} {out.name} on {split}",
        )
        log.info(
            "workload %s: %s %s accuracy %.4f, macro-F1 %.4f",
            recipe.name,
            out.name,
            split,
            result.accuracy,
            result.macro_f1,
        )
        scores[split] = result.scores()
    return scores


def _base_model_path(base: str) -> Path:
    """The packaged model directory of ``base``, or its ONNX file for an ONNX base."""
    spec = BASES[base]
    if spec.onnx_file is not None:
        return package_file(spec.module, spec.requirement, spec.onnx_file)
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        raise MissingPackageError(
            spec.module, spec.requirement, f"the base model {base!r}"
        ) from exc
    return Path(module.get_model_path())


def _tokenizer_dir(base: str) -> Path:
    spec = BASES[base]
    return _base_model_path(spec.tokenizer_from or base)


def _base_config(spec: BaseSpec, label_names: tuple[str, ...]) -> PretrainedConfig:
    labels: dict[str, Any] = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {label: index for index, label in enumerate(label_names)},
    }
    if spec.onnx_file is not None:
        return BertConfig(**dict(spec.config), **labels)
    return AutoConfig.from_pretrained(
        _base_model_path(spec.name), **labels, local_files_only=True
    )


def _base_weights(spec: BaseSpec, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], Path]:
    """The packaged encoder weights under ``model.base_model``'s names, and the file they are from."""
    path = _base_model_path(spec.name)
    if spec.onnx_file is not None:
        from workloads.onnx_bert import TENSOR_MAPS, load_onnx_state_dict

        expected = {k: tuple(v.shape) for k, v in model.base_model.state_dict().items()}
        state = load_onnx_state_dict(
            path, TENSOR_MAPS[spec.name], expected, not_shipped=spec.not_shipped
        )
        return state, path
    weights_path = path / "model.safetensors"
    state = load_file(weights_path)
    for name in spec.legacy_buffers:
        state.pop(name, None)
    return state, weights_path


def load_base_model(recipe: Recipe, label_names: tuple[str, ...]) -> PreTrainedModel:
    """The packaged encoder, loaded strictly, under a classification head seeded by the recipe.

    Loading the encoder's state dict ourselves (instead of ``from_pretrained(num_labels=...)``)
    makes a missing or unexpected tensor an error and draws the head from an explicit generator.
    The base's ``not_shipped`` encoder parameters are drawn from the same generator, after the
    head, as transformers initialises a Linear: normal(0, initializer_range) weights, zero bias.
    """
    base = BASES[recipe.base]
    config = _base_config(base, label_names)
    model = AutoModelForSequenceClassification.from_config(config)
    state, weights_path = _base_weights(base, model)
    try:
        result = model.base_model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when not strict
        raise WorkloadError(
            f"{weights_path}: does not match {type(model).__name__}: {exc}"
        ) from exc
    missing = sorted(set(result.missing_keys) - set(base.not_shipped))
    if missing or result.unexpected_keys:
        raise WorkloadError(
            f"{weights_path}: does not match {type(model).__name__}: missing {missing}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    head = getattr(model, base.head)
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        head.weight.normal_(0.0, config.initializer_range, generator=generator)
        head.bias.zero_()
        for name in base.not_shipped:
            param = model.base_model.get_parameter(name)
            if param.ndim >= 2:
                param.normal_(0.0, config.initializer_range, generator=generator)
            else:
                param.zero_()
    return model.eval()


def _check_same_keys(base_dir: Path, finetuned_dir: Path) -> None:
    """Every fine-tuned tensor needs a base tensor of the same shape to form a delta."""

    def header(directory: Path) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        return shapes

    base, tuned = header(base_dir), header(finetuned_dir)
    if base != tuned:
        differ = sorted(set(base) ^ set(tuned)) or sorted(k for k in base if base[k] != tuned[k])
        raise WorkloadError(f"{base_dir} and {finetuned_dir} differ in tensors: {differ[:10]}")


def _versions(recipe: Recipe) -> dict[str, str]:
    spec = DATASETS[recipe.dataset]
    base = BASES[recipe.base]
    requirements = [base.requirement, spec.requirement]
    if base.tokenizer_from is not None:
        requirements.append(BASES[base.tokenizer_from].requirement)
    names = [*_VERSIONED, *(req.split("==")[0] for req in requirements)]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
