"""Tensor pairs read one ahead into memory reused from matrix to matrix.

Why reuse: reading a checkpoint tensor by tensor into fresh tensors makes the kernel find, zero
and later free new pages for every one. On 8 Llama-2-7B-shaped layers (7.5 GB for the pair)
reading the 56 matrix pairs and taking their float32 deltas took 13.1–17.1 s with fresh tensors
and 8.6–9.0 s in reused memory, which is faulted in once. Only for work whose result never refers
to its inputs: a factorised matrix, whose SVD writes new tensors. Everything else is read fresh.

Why read ahead: compression alternates reading a pair (page cache, disk, or a ranged GET from an
object store) with computing on it, and done in turn the compute waits for every read. Where
that wait is a device's or a network's, :func:`read_pairs` reads the next pair on a thread while
the caller computes on this one, into the other of two sets of slots (``reads_ahead``). On a GPU
the slots are pinned, so the caller's copy of a pair to the device is a DMA transfer
(``non_blocking``) that does not hold the CPU, and the read of the pair after it goes on meanwhile.

The one rule this asks of a caller: be done with a pair (its tensors, and any copy still reading
them) before it asks for the pair after next, which is read into the same slots. Every caller
here finishes a pair with host values computed from it (a relative error, a damage curve), and a
device's queue cannot hand back those values before its copies out of the slots are done.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .checkpoint import Checkpoint


class Readable(Protocol):
    """A stored tensor: its size in bytes and a reader that fills fresh memory or ``into``'s."""

    @property
    def nbytes(self) -> int: ...

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of an open checkpoint, as a :class:`Readable`."""

    checkpoint: Checkpoint
    name: str

    @property
    def nbytes(self) -> int:
        entry = self.checkpoint.entry(self.name)
        return entry.end - entry.start

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.checkpoint.load(self.name, into=into)


@dataclass(frozen=True)
class PairRead:
    """What to read for one tensor: the fine-tune's, the base's (none for a new head), and whether
    into reused memory (``reused_for``)."""

    tuned: Readable
    base: Readable | None
    reuse: bool


def reads_ahead(device: torch.device, local: bool) -> bool:
    """Whether reading the next pair while this one is computed pays: on a GPU, whose compute the
    reads then overlap, or from an object store, whose latency they overlap. Not from local files
    on the CPU, where a read is a copy out of the page cache that competes with the SVD for the
    same cores: measured no faster on 2 cores, while holding one more pair."""
    return device.type == "cuda" or not local


def reused_for(action: str) -> bool:
    """Whether a pair planned for ``action`` is read into reused memory: a factorised matrix, whose
    SVD writes new tensors, so nothing made from it refers to the memory after."""
    return action == "factorise"


class PairBuffers:
    """Named slots of reusable CPU memory, each as large as the largest tensor put in it so far.

    ``pinned``: page-locked memory, from which a copy to a GPU runs as DMA without holding the CPU.
    """

    def __init__(self, pinned: bool = False) -> None:
        self.pinned = pinned
        self._memory: dict[str, torch.Tensor] = {}

    def load(self, slot: str, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        """``checkpoint``'s tensor ``name``, read into ``slot``: valid until the slot's next use."""
        tensor = StoredTensor(checkpoint, name)
        return tensor.read(into=self.memory(slot, tensor.nbytes))

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uninitialised float32 memory of ``shape`` for a delta: valid until the next call."""
        numel = math.prod(shape)
        return self.memory("delta", 4 * numel)[: 4 * numel].view(torch.float32).view(shape)

    def memory(self, slot: str, nbytes: int) -> torch.Tensor:
        """``slot``'s memory, 1-D ``uint8`` of at least ``nbytes``, for a reader that fills it
        (``safetensors_io.read_tensor``'s ``into``): valid until the slot's next use."""
        memory = self._memory.get(slot)
        if memory is None or memory.numel() < nbytes:
            self._memory.pop(slot, None)  # freed before its larger successor is allocated
            memory = self._memory[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return memory


Pair = tuple[torch.Tensor, torch.Tensor | None]


def read_pairs(pairs: Sequence[PairRead], device: torch.device, *, local: bool = True
               ) -> Generator[Pair, None, None]:
    """Each pair's (fine-tune, base) tensors in order, for work on ``device``; where
    ``reads_ahead(device, local)``, the next one is read on a thread meanwhile, and on a GPU into
    pinned memory. ``local``: whether the bytes come from local files rather than an object store.

    A reused pair is valid until the next pair is asked for, or when reading ahead the pair after
    next. A read's error is raised when its pair is asked for, so errors surface in the order the
    pairs are given. Leaving early (an error in the caller, ``close()``) waits for the read under
    way: no thread writes into the slots once this generator is done.
    """
    ahead, pinned = reads_ahead(device, local), device.type == "cuda"
    slots = (PairBuffers(pinned), PairBuffers(pinned)) if ahead else (PairBuffers(pinned),)

    def read(position: int) -> Pair:
        pair, memory = pairs[position], slots[position % len(slots)]
        if not pair.reuse:
            return pair.tuned.read(), None if pair.base is None else pair.base.read()
        tuned = pair.tuned.read(into=memory.memory("tuned", pair.tuned.nbytes))
        base = None if pair.base is None else pair.base.read(into=memory.memory("base", pair.base.nbytes))
        return tuned, base

    if not ahead:
        yield from (read(position) for position in range(len(pairs)))
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="osd-read")
    try:
        upcoming: list[Future[Pair]] = [pool.submit(read, 0)] if pairs else []
        for position in range(1, len(pairs) + 1):
            current = upcoming.pop()
            if position < len(pairs):
                upcoming.append(pool.submit(read, position))  # into the slots of the pair the caller is done with
            yield current.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
