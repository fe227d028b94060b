"""Pairs read one ahead into reused memory (``osd_core.pair_buffers``): in order, into alternating
slots, errors at their own pair; and no byte of a delta changes, in one process or in the fleet's workers."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from osd_core.artifact import DeltaArtifact
from osd_core.checkpoint import Checkpoint
from osd_core.compress import compress_checkpoint, compress_tensor, plan_pair
from osd_core.config import CompressionConfig
from osd_core.errors import CheckpointError
from osd_core.pair_buffers import PairBuffers, PairRead, read_pairs, reused_for
from osd_io.sources import tensor_refs
from tests.conftest import write_bert_like
from workers.compress import compress_layer
from workers.jobs import LayerJob


def as_dtype(directory, dtype):
    path = directory / "model.safetensors"
    save_file({name: t.to(dtype) for name, t in load_file(path).items()}, str(path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_delta_read_through_reused_memory_equals_one_read_fresh(tmp_path, dtype):
    # Matrices of three sizes, in file order small and large alternately: a slot grows and is reused.
    base_state = write_bert_like(tmp_path / "base", layers=2, hidden=48, intermediate=96, vocab=70, seed=0)
    write_bert_like(tmp_path / "ft", layers=2, hidden=48, intermediate=96, vocab=70, seed=1, base=base_state)
    for directory in (tmp_path / "base", tmp_path / "ft"):
        as_dtype(directory, dtype)
    config = CompressionConfig(method="magtruncsvd", rank=2)
    compress_checkpoint(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", config, device="cpu")
    stored = {layer.name: layer for layer in DeltaArtifact.open(tmp_path / "delta").layers()}

    base, tuned = Checkpoint.open(tmp_path / "base"), Checkpoint.open(tmp_path / "ft")
    factorised = 0
    for plan in plan_pair(base, tuned, config):
        if plan.action != "factorise":
            continue
        fresh, _ = compress_tensor(plan, tuned.load(plan.name), base.load(plan.name), config, None)
        assert torch.equal(stored[plan.name].delta(), fresh.delta()), plan.name
        factorised += 1
    assert factorised == 13  # the embedding and 6 matrices a layer

    # A worker reads by reference, one pair ahead, into reused slots: here, the whole model as one group.
    tuned_refs, base_refs = tensor_refs(tuned), tensor_refs(base)
    jobs = [LayerJob(plan, tuned_refs[plan.name], base_refs[plan.name])
            for plan in plan_pair(base, tuned, config) if plan.action != "copy"]
    reads = [PairRead(job.finetuned, job.base, reused_for(job.plan.action)) for job in jobs]
    scratch = PairBuffers()
    for job, (tuned_tensor, base_tensor) in zip(jobs, read_pairs(reads, CPU), strict=True):
        layer, _ = compress_layer(job, tuned_tensor, base_tensor, config, None, None, torch.device("cpu"), scratch)
        assert torch.equal(stored[job.name].delta(), layer.delta()), job.name


def test_a_slot_holds_the_last_tensor_read_into_it_and_grows_to_the_largest(tmp_path):
    write_bert_like(tmp_path / "m", layers=1, hidden=8, intermediate=16, vocab=12, seed=0)
    checkpoint = Checkpoint.open(tmp_path / "m")
    buffers = PairBuffers()
    small = buffers.load("a", checkpoint, "bert.encoder.layer.0.attention.self.query.weight")
    assert torch.equal(small, checkpoint.load("bert.encoder.layer.0.attention.self.query.weight"))
    large = buffers.load("a", checkpoint, "bert.encoder.layer.0.intermediate.dense.weight")
    assert torch.equal(large, checkpoint.load("bert.encoder.layer.0.intermediate.dense.weight"))
    again = buffers.load("a", checkpoint, "bert.encoder.layer.0.attention.self.key.weight")
    assert again.data_ptr() == large.data_ptr()  # the grown memory, reused
    assert torch.equal(again, checkpoint.load("bert.encoder.layer.0.attention.self.key.weight"))
    delta = buffers.delta((16, 8))
    assert delta.dtype == torch.float32 and delta.shape == (16, 8)


CPU = torch.device("cpu")


class Recorded:
    """A stored tensor that says when it is read, and can be made to fail or to wait."""

    def __init__(self, value: float, *, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.value, self.fail, self.gate = value, fail, gate
        self.started, self.finished = threading.Event(), threading.Event()

    @property
    def nbytes(self) -> int:
        return 16

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail:
            raise CheckpointError(f"tensor {self.value}: truncated")
        out = torch.empty(4) if into is None else into[:16].view(torch.float32)
        out.fill_(self.value)
        self.finished.set()
        return out


def test_from_an_object_store_the_next_pair_is_read_while_the_caller_holds_this_one():
    tensors = [(Recorded(n), Recorded(-n)) for n in range(5)]
    pairs = read_pairs([PairRead(tuned, base, reuse=True) for tuned, base in tensors], CPU, local=False)
    seen = []
    for n, (tuned, base) in enumerate(pairs):
        if n + 1 < len(tensors):  # read ahead without being asked for it
            assert tensors[n + 1][1].finished.wait(timeout=10), f"pair {n + 1} was not read ahead"
        assert torch.equal(tuned, torch.full((4,), float(n))) and torch.equal(base, torch.full((4,), float(-n)))
        seen.append((tuned.data_ptr(), base.data_ptr()))
    assert seen[::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 2  # two slot sets
    assert seen[0] != seen[1] and len({pointer for pair in seen for pointer in pair}) == 4


def test_local_files_for_the_cpu_are_read_in_turn_into_one_set_of_slots():
    tensors = [(Recorded(n), Recorded(-n)) for n in range(3)]
    pairs = read_pairs([PairRead(tuned, base, reuse=True) for tuned, base in tensors], CPU)
    tuned, base = next(pairs)
    assert not tensors[1][0].started.wait(timeout=0.5)  # nothing read before it is asked for
    pointers = {(tuned.data_ptr(), base.data_ptr())} | {(t.data_ptr(), b.data_ptr()) for t, b in pairs}
    assert len(pointers) == 1


def test_pairs_not_reused_are_read_fresh_and_a_new_head_has_no_base():
    first, second = (Recorded(1), None), (Recorded(2), Recorded(3))
    got = list(read_pairs([PairRead(*first, reuse=False), PairRead(*second, reuse=False)], CPU, local=False))
    assert got[0][1] is None and torch.equal(got[0][0], torch.full((4,), 1.0))
    assert got[0][0].data_ptr() != got[1][0].data_ptr()


def test_a_read_error_surfaces_at_its_own_pair_after_the_pairs_before_it():
    reads = [PairRead(Recorded(0), Recorded(0), True), PairRead(Recorded(1), Recorded(1, fail=True), True),
             PairRead(Recorded(2), Recorded(2), True)]
    pairs = read_pairs(reads, CPU, local=False)
    tuned, _ = next(pairs)
    assert float(tuned[0]) == 0.0
    with pytest.raises(CheckpointError, match="tensor 1: truncated"):
        next(pairs)


def test_leaving_early_waits_for_the_read_under_way():
    gate = threading.Event()
    slow = Recorded(1, gate=gate)
    pairs = read_pairs([PairRead(Recorded(0), None, True), PairRead(slow, None, True)], CPU, local=False)
    next(pairs)
    assert slow.started.wait(timeout=10)
    threading.Timer(0.2, gate.set).start()
    pairs.close()  # returns only once the read into the slots is done
    assert slow.finished.is_set()
