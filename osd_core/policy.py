"""Which tensors of an architecture are factorised, stored dense, replaced or skipped: as data.

Each architecture declares full-name patterns for its tensors and the role they play. Nothing is
inferred from substrings at run time: a tensor that matches no pattern is reported as
``unknown`` and stored dense, never dropped silently. Add an architecture by adding a policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .errors import CheckpointError


class Role(StrEnum):
    LINEAR = "linear"  # 2-D weight of a linear map: factorised
    EMBEDDING = "embedding"  # 2-D lookup table: factorised unless the config says otherwise
    DENSE = "dense"  # norms, biases: the delta stored whole in a narrow float type
    HEAD = "head"  # task head: delta stored dense, or the tensor itself if the base lacks it
    BUFFER = "buffer"  # non-trainable buffer (position ids): copied from the base
    UNKNOWN = "unknown"  # matched no rule: stored dense and reported


@dataclass(frozen=True)
class ArchitecturePolicy:
    """Ordered ``(pattern, role)`` rules over full tensor names; the first full match wins."""

    model_type: str
    rules: tuple[tuple[str, Role], ...]

    def role(self, name: str) -> Role:
        for pattern, role in self.rules:
            if re.fullmatch(pattern, name):
                return role
        return Role.UNKNOWN


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

POLICIES: dict[str, ArchitecturePolicy] = {policy.model_type: policy for policy in (BERT,)}


def policy_for(model_type: str) -> ArchitecturePolicy:
    try:
        return POLICIES[model_type]
    except KeyError:
        raise CheckpointError(
            f"no tensor policy for model_type {model_type!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
