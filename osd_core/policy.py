"""Tensor roles, and the per-architecture overrides of the roles derived from the model.

Roles are derived from the module tree of the model class (``osd_core.roles``). An override, as
data, is kept only where the derivation would change what was measured: BERT's, whose rules
(pooler factorised, classifier a head, position and token-type ids copied) produced every result
in the README, and which match its checkpoints with or without the ``bert.`` prefix. Each
override declares full-name patterns for its tensors; a tensor that matches none is reported as
``unknown`` and stored dense, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    LINEAR = "linear"  # 2-D weight of a linear map: factorised
    EMBEDDING = "embedding"  # 2-D lookup table: factorised unless the config says otherwise
    EXPERTS = "experts"  # experts × out × in weights of a mixture-of-experts block: factorised per slice
    DENSE = "dense"  # norms, biases: the delta stored whole in a narrow float type
    HEAD = "head"  # task head: delta stored dense, or the tensor itself if the base lacks it
    BUFFER = "buffer"  # non-trainable buffer (position ids): copied from the base
    UNKNOWN = "unknown"  # matched no rule: stored dense and reported


@dataclass(frozen=True)
class ArchitecturePolicy:
    """Ordered ``(pattern, role)`` rules over full tensor names; the first full match wins."""

    model_type: str
    rules: tuple[tuple[str, Role], ...]
    transposed: frozenset[str] = frozenset()  # weights stored in×out (GPT-2's Conv1D); none here
    output: str | None = None  # the output embedding's weight, when the head is a language-model head
    tied: Mapping[str, str] = field(default_factory=dict)  # a tied weight: the weight it shares
    expert_slices: tuple[str, ...] = ()  # regexes of per-expert 2-D tensors (osd_core.roles); none here

    def is_expert_slice(self, name: str) -> bool:
        return is_expert_slice(self.expert_slices, name)

    def role(self, name: str) -> Role:
        for pattern, role in self.rules:
            if re.fullmatch(pattern, name):
                return role
        return Role.UNKNOWN


def is_expert_slice(patterns: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` is a per-expert 2-D tensor, which the live model holds inside a 3-D parameter."""
    return any(re.search(pattern, name) for pattern in patterns)


_BERT_PREFIX = r"(?:bert\.)?"
_BERT_LAYER = _BERT_PREFIX + r"encoder\.layer\.\d+\."
_BERT_LINEARS = (
    r"(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)

BERT = ArchitecturePolicy(
    model_type="bert",
    rules=(
        (_BERT_PREFIX + r"embeddings\.(?:word|position|token_type)_embeddings\.weight", Role.EMBEDDING),
        (_BERT_LAYER + _BERT_LINEARS + r"\.weight", Role.LINEAR),
        (_BERT_PREFIX + r"pooler\.dense\.weight", Role.LINEAR),
        (_BERT_PREFIX + r"embeddings\.(?:position_ids|token_type_ids)", Role.BUFFER),
        (_BERT_PREFIX + r"embeddings\.LayerNorm\.(?:weight|bias)", Role.DENSE),
        (_BERT_LAYER + r"(?:attention\.)?output\.LayerNorm\.(?:weight|bias)", Role.DENSE),
        (_BERT_LAYER + _BERT_LINEARS + r"\.bias", Role.DENSE),
        (_BERT_PREFIX + r"pooler\.dense\.bias", Role.DENSE),
        (r"classifier\.(?:weight|bias)", Role.HEAD),
    ),
)

OVERRIDES: dict[str, ArchitecturePolicy] = {policy.model_type: policy for policy in (BERT,)}
