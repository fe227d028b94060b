"""Score a committed delta (download it, rebuild the fine-tune on its base) or the fine-tune itself on JSONL rows.

Evaluation uses the one evaluator of ``workloads.evaluate``, so catalog accuracies are
comparable with the workloads' own base and fine-tune scores.
"""

from __future__ import annotations

from pathlib import Path

from osd_core.outputs import scratch_dir
from osd_core.reconstruct import reconstruct_checkpoint
from osd_io.artifacts import download_delta
from osd_io.sources import fetch_file, materialize
from workers.compress import store_at
from workers.jobs import EvalJob, EvalRecord


def evaluate(job: EvalJob) -> EvalRecord:
    from workloads.evaluate import score_checkpoint  # imports transformers: only here

    with scratch_dir("eval") as scratch:
        root = Path(scratch)
        if job.prefix is None:  # the fine-tune itself
            model = materialize(job.pair.finetuned, job.pair.finetuned_identity["sha256"])
        else:
            delta = download_delta(
                store_at(job.store), job.prefix, root / "delta", expected_sha256=job.manifest_sha256
            )
            base = materialize(job.pair.base, job.pair.base_identity["sha256"])
            model = reconstruct_checkpoint(base, delta, root / "model", expected_sha256=job.manifest_sha256)
        score = score_checkpoint(model, fetch_file(job.data, root / "data"), progress=False)
    return EvalRecord(score.metric, score.value, score.higher_is_better, score.extra, score.n, score.seconds)
