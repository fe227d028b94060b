"""Task-loss gradients of a model's compressible weights, from a few calibration rows.

OSD ranks factor entries by a Taylor estimate built from the layer gradient ``G = ∂L/∂W``. We take
the gradient of the task loss averaged over calibration rows: the cross-entropy of the label for a
sequence classifier, and for a causal LM each row's mean next-token cross-entropy over its target
tokens (every token of ``{text}``, the completion of ``{prompt, completion}``, the assistant's last
message of ``{messages}``, the right choice of ``{prompt, choices, label}``; ``workloads.task_rows``).
Rows weigh the same however they are batched, so the batch size is only a memory knob: gradients
accumulate over batches, and activations scale with one batch.

Memory is the model, one gradient buffer per compressible weight (only those require gradients),
one batch's activations, and the statistics the output-error metric reads (``METRIC_STATISTICS``).
Gradients are written to a safetensors file tensor by tensor, and workers read it lazily by
reference (``GradientFile``).

It runs the model (``transformers``, imported on use), like the evaluators beside it, so it lives
here and not in ``osd_core``, which stays pure torch: workers read its output with
``osd_core.calibration_data`` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from osd_core.calibration_data import INPUT_COV, METRIC_STATISTICS, OUTPUT_FISHER, ROW_WEIGHT
from osd_core.checkpoint import Checkpoint
from osd_core.compress import FACTORISED_ACTIONS, plan_pair
from osd_core.config import CALIBRATION_BATCH, CompressionConfig
from osd_core.errors import CalibrationError, MissingTensorError
from osd_core.safetensors_io import write_safetensors
from osd_core.svd import truncated_svd
from workloads.errors import DataFormatError
from workloads.task_rows import IGNORE, TaskRows, encode_pairs, is_causal_lm, lm_pairs, read_rows_for, token_logprobs

log = logging.getLogger(__name__)

PATH_POINTS = 4


def calibration_gradients(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    calibration: str | Path,
    config: CompressionConfig,
    out_path: str | Path,
    *,
    batch_size: int = CALIBRATION_BATCH,
    max_length: int = 64,
    statistics: Collection[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the mean loss gradient of every factorised weight over the calibration rows.

    Where (``config.gradient_at``): at the fine-tuned weights; at base plus the rank-k truncated
    SVD of each factorised delta ("reconstruction", closer to where masking happens); or averaged
    along the straight path from base to fine-tune ("path", midpoints of ``PATH_POINTS`` segments),
    so that ``Δ ⊙ Ḡ`` attributes the loss reduction the fine-tune bought to each entry (integrated
    gradients), instead of probing a minimum where the gradient is near zero.

    ``statistics`` are the output-error statistics to gather; by default what ``config.metric``
    reads.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base, finetuned = Checkpoint.open(base_dir), Checkpoint.open(finetuned_dir)
    names = [p.name for p in plan_pair(base, finetuned, config) if p.action in FACTORISED_ACTIONS]
    causal = is_causal_lm(finetuned.config)
    rows = _calibration_rows(calibration, finetuned.config)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(str(finetuned.local_dir), use_safetensors=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(finetuned.local_dir))
    pairs = _scorable(lm_pairs(rows, tokenizer), tokenizer, max_length, rows) if causal else None
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise MissingTensorError(f"{finetuned.local_dir}: model has no parameter {missing[0]!r} to take a gradient of")
    for name, param in params.items():
        param.requires_grad_(name in names)
    model.eval()  # no dropout: the gradient of the model as it will be served
    _recompute_layer_activations(model)
    wanted = METRIC_STATISTICS[config.metric] if statistics is None else tuple(statistics)
    stats = _OutputErrorWeights(model, names, wanted)
    count = len(rows.rows) if pairs is None else len(pairs)
    batches = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
    points = _gradient_points(params, base, finetuned, names, config)
    for point, load_point in enumerate(points):
        load_point()
        stats.enabled = point == len(points) - 1  # activation statistics from one pass: the last point
        for done, batch in enumerate(batches, start=1):
            if pairs is not None:
                lm = encode_pairs(tokenizer, [pairs[i] for i in batch], max_length)
                encoded = {"input_ids": lm.input_ids, "attention_mask": lm.attention_mask}
                stats.observe(encoded)
                sums, scored = token_logprobs(model, lm)  # each row's mean target-token cross-entropy
                loss = -(sums / scored.clamp(min=1)).sum()
            else:
                encoded = tokenizer(
                    [rows.rows[i]["text"] for i in batch], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt",
                )
                labels = torch.tensor([rows.rows[i]["label"] for i in batch])
                stats.observe(encoded)
                loss = model(**encoded, labels=labels).loss * len(batch)
            (loss / (count * len(points))).backward()
            if progress is not None:
                progress(point * len(batches) + done, len(points) * len(batches))
    stats.close()
    grads = {name: params[name].grad.detach().contiguous() for name in names if params[name].grad is not None}
    for name in names:
        grads.setdefault(name, torch.zeros_like(params[name]))
    grads.update(stats.tensors())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    write_safetensors(tmp, grads, {"rows": str(count), "gradient_at": config.gradient_at})
    tmp.replace(out_path)
    return out_path


def _recompute_layer_activations(model: Any) -> None:
    """Keep only each layer's input through the forward pass and recompute the layer in backward.

    Activations would otherwise be the largest part of calibration's memory after the model and
    its gradients (SmolLM2-135M: ~160 MiB a row at 64 tokens, over 30 layers). transformers
    checkpoints a layer only while that layer is in training mode, so only the layer modules are
    flagged as training: their children (dropout, attention) stay in eval mode, and the gradient
    is the served model's, as without recomputation.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def _scorable(pairs: list[tuple[str, str]], tokenizer: Any, max_length: int, rows: TaskRows
              ) -> list[tuple[str, str]]:
    """The pairs with at least one target token (a one-token text has none: nothing predicts it)."""
    kept = [pair for pair in pairs if bool((encode_pairs(tokenizer, [pair], max_length).labels[0, 1:] != IGNORE).any())]
    if not kept:
        raise CalibrationError(f"{rows.path}: no row has a token to take the loss on (each needs two or more)")
    if len(kept) < len(pairs):
        log.warning("%s: %d row(s) with no target token left out of calibration", rows.path, len(pairs) - len(kept))
    return kept


def _calibration_rows(path: str | Path, config: dict[str, Any]) -> TaskRows:
    """The rows the model can take, data errors reported as calibration errors (naming file and line)."""
    try:
        return read_rows_for(path, config)
    except DataFormatError as exc:
        raise CalibrationError(str(exc).replace("no such file", "calibration file does not exist")) from None


class _OutputErrorWeights:
    """Statistics of the output error a delta causes, gathered during the calibration pass.

    A linear map's output error for input ``x`` is ``(Δ - Δ̂) x``; averaged over calibration tokens
    its squared norm is ``tr(E C Eᵀ)`` with ``C = E[x xᵀ]`` (``input_cov``, as in activation-aware
    compression). How much an output unit's error costs in loss is weighed by the mean squared
    loss gradient at that unit (``output_fisher``, the diagonal of the output-side Kronecker factor
    of the Fisher, as in Fisher-weighted SVD). An embedding table's rows are read by token id, so
    row ``t`` is weighed by how often token ``t`` occurs (``row_weight``). Padding is excluded.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], wanted: Collection[str]):
        self.enabled = True
        self._mask: torch.Tensor | None = None
        self._sums: dict[tuple[str, str], torch.Tensor] = {}
        self._counts: dict[tuple[str, str], float] = {}
        self._handles = []
        for name in names:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, torch.nn.Linear) and INPUT_COV in wanted:
                self._handles.append(module.register_forward_hook(self._linear_hook(name)))
            elif isinstance(module, torch.nn.Embedding) and ROW_WEIGHT in wanted:
                self._handles.append(module.register_forward_hook(self._embedding_hook(name, module.num_embeddings)))
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and OUTPUT_FISHER in wanted:
                self._handles.append(module.register_full_backward_hook(self._output_grad_hook(name)))

    def observe(self, encoded: Mapping[str, torch.Tensor]) -> None:
        self._mask = encoded.get("attention_mask")

    def _tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of ``tensor`` for real tokens only (padding dropped), flattened to (tokens, -1)."""
        if self._mask is not None and tensor.shape[:2] == self._mask.shape:
            tensor = tensor[self._mask.bool()]
        return tensor.reshape(-1, *tensor.shape[-1:]) if tensor.is_floating_point() else tensor.reshape(-1)

    def _linear_hook(self, name: str):
        def hook(module, inputs, output):
            x = self._tokens(inputs[0].detach().float())
            self._add(name, INPUT_COV, x.T @ x, x.shape[0])
        return hook

    def _embedding_hook(self, name: str, rows: int):
        def hook(module, inputs, output):
            ids = self._tokens(inputs[0].detach())
            self._add(name, ROW_WEIGHT, torch.bincount(ids, minlength=rows).float(), ids.numel())
        return hook

    def _output_grad_hook(self, name: str):
        def hook(module, grad_inputs, grad_outputs):
            g = self._tokens(grad_outputs[0].detach().float())
            self._add(name, OUTPUT_FISHER, (g * g).sum(0), g.shape[0])
        return hook

    def _add(self, name: str, stat: str, total: torch.Tensor, count: int) -> None:
        if not self.enabled:
            return
        key = (name, stat)
        if key in self._sums:
            self._sums[key].add_(total)
        else:
            self._sums[key] = total
        self._counts[key] = self._counts.get(key, 0) + count

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}::{stat}": (total / max(self._counts[(name, stat)], 1)).contiguous()
                for (name, stat), total in self._sums.items()}


def _gradient_points(
    params: Mapping[str, torch.nn.Parameter],
    base: Checkpoint,
    finetuned: Checkpoint,
    names: Sequence[str],
    config: CompressionConfig,
) -> list[Callable[[], None]]:
    """Loaders that set the factorised weights to each point where gradients are taken."""
    if config.gradient_at == "finetuned":
        return [lambda: None]
    if config.gradient_at == "reconstruction":
        return [lambda: _load_rank_k_point(params, base, finetuned, names, config)]

    def along_path(t: float) -> Callable[[], None]:
        def load() -> None:
            with torch.no_grad():
                for name in names:
                    start = base.load(name).float()
                    params[name].copy_(start + t * (finetuned.load(name).float() - start))
        return load

    return [along_path((i + 0.5) / PATH_POINTS) for i in range(PATH_POINTS)]


def _load_rank_k_point(
    params: Mapping[str, torch.nn.Parameter],
    base: Checkpoint,
    finetuned: Checkpoint,
    names: Sequence[str],
    config: CompressionConfig,
) -> None:
    """Set each factorised weight to base + rank-k reconstruction of its delta, in place."""
    with torch.no_grad():
        for name in names:
            base_w = base.load(name).float()
            factors = truncated_svd(
                finetuned.load(name).float() - base_w, config.k, method=config.svd,
                power_iters=config.power_iters, seed=config.seed,
            )
            params[name].copy_(base_w + (factors.u * factors.s) @ factors.v.T)
