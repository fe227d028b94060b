"""Task-loss gradients of a model's compressible weights, from a few labelled calibration rows.

OSD ranks factor entries by a Taylor estimate built from the layer gradient ``G = ∂L/∂W``. We take
the mean gradient of the cross-entropy over calibration batches, for sequence classification (the
first model family; ``loss_fn`` is the seam for others). Only the compressible weights require
gradients, so memory is the model plus one gradient buffer per such weight. Gradients are written
to a safetensors file that workers read lazily by reference (``GradientFile``).

This module needs ``transformers`` (imported on use); the rest of ``osd_core`` does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import Checkpoint
from .compress import plan_pair
from .config import CompressionConfig
from .errors import CalibrationError, MissingTensorError
from .safetensors_io import read_header, read_tensor
from .svd import truncated_svd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledRow:
    text: str
    label: int


def read_rows(path: str | Path, *, num_labels: int | None = None) -> list[LabelledRow]:
    """Read ``{"text": str, "label": int}`` JSONL rows, naming the file and line of any bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read calibration file ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or type(record.get("label")) is not int:
            raise CalibrationError(f"{path}:{number}: expected an object with a string 'text' and an integer 'label'")
        if num_labels is not None and not 0 <= record["label"] < num_labels:
            raise CalibrationError(
                f"{path}:{number}: label {record['label']} is outside the model's {num_labels} classes [0, {num_labels})"
            )
        rows.append(LabelledRow(record["text"], record["label"]))
    if not rows:
        raise CalibrationError(f"{path}: calibration file holds no rows")
    return rows


class GradientFile(Mapping[str, torch.Tensor]):
    """A safetensors file of gradients, read one tensor at a time on access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries = read_header(self.path).tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise MissingTensorError(f"{self.path}: no gradient for tensor {name!r}")
        return read_tensor(self._entries[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def calibration_gradients(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    calibration: str | Path,
    config: CompressionConfig,
    out_path: str | Path,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the mean loss gradient of every factorised weight over the calibration rows.

    Gradients are taken at the fine-tuned weights, or (``config.gradient_at="reconstruction"``) at
    base plus the rank-k truncated SVD of each factorised delta: closer to where masking happens.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, finetuned = Checkpoint.open(base_dir), Checkpoint.open(finetuned_dir)
    names = [p.name for p in plan_pair(base, finetuned, config) if p.action == "factorise"]
    model = AutoModelForSequenceClassification.from_pretrained(
        str(finetuned.path), use_safetensors=True, torch_dtype=torch.float32
    )
    rows = read_rows(calibration, num_labels=model.config.num_labels)
    tokenizer = AutoTokenizer.from_pretrained(str(finetuned.path))
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise MissingTensorError(f"{finetuned.path}: model has no parameter {missing[0]!r} to take a gradient of")
    for name, param in params.items():
        param.requires_grad_(name in names)
    if config.gradient_at == "reconstruction":
        _load_rank_k_point(params, base, finetuned, names, config)
    model.eval()  # no dropout: the gradient of the model as it will be served
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for done, batch in enumerate(batches, start=1):
        encoded = tokenizer(
            [row.text for row in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        labels = torch.tensor([row.label for row in batch])
        loss = model(**encoded, labels=labels).loss * (len(batch) / len(rows))
        loss.backward()
        if progress is not None:
            progress(done, len(batches))
    grads = {name: params[name].grad.detach().contiguous() for name in names if params[name].grad is not None}
    for name in names:
        grads.setdefault(name, torch.zeros_like(params[name]))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    save_file(grads, str(tmp), metadata={"rows": str(len(rows)), "gradient_at": config.gradient_at})
    tmp.replace(out_path)
    return out_path


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
