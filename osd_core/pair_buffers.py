"""Memory for one tensor pair and its float32 delta, reused from matrix to matrix.

Why: reading a checkpoint tensor by tensor into fresh tensors makes the kernel find, zero and
later free new pages for every one. On 8 Llama-2-7B-shaped layers (7.5 GB for the pair) reading
the 56 matrix pairs and taking their float32 deltas took 13.1–17.1 s with fresh tensors and
8.6–9.0 s in reused memory, which is faulted in once. Only for work whose result never refers to
its inputs: a factorised matrix, whose SVD writes new tensors. Everything else is read fresh.
The fleet's workers read by reference (byte ranges of local files or S3 objects) into the same
slots, one set per layer group.
"""

from __future__ import annotations

import math

import torch

from .checkpoint import Checkpoint


def reused_for(action: str, device: torch.device) -> bool:
    """Whether a pair planned for ``action`` and compressed on ``device`` is read into reused
    memory: a factorised matrix on the CPU (on a GPU the pair is moved there as stored)."""
    return action == "factorise" and device.type == "cpu"


class PairBuffers:
    """Named slots of reusable CPU memory, each as large as the largest tensor put in it so far."""

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}

    def load(self, slot: str, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        """``checkpoint``'s tensor ``name``, read into ``slot``: valid until the slot's next use."""
        entry = checkpoint.entry(name)
        return checkpoint.load(name, into=self.memory(slot, entry.end - entry.start))

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
            memory = self._memory[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return memory
