"""On-policy distillation (GKD; Agarwal et al., 2024): part of each batch is text the student writes.

A share of each micro-batch's rows keeps only its first `length - maxNewTokens` tokens as a prefix;
the student continues each prefix (sampled, KV-cached, no gradient), and the teacher scores the
student's own tokens with the method's divergence (reverse KL is the usual choice). The student so
learns where its own mistakes take it, not only where the corpus goes. The prefix is context, not a
target; the student's tokens get no cross-entropy (they are its own guesses, not the truth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..spec.models import OnPolicySpec
from .losses import IGNORE_INDEX


@dataclass(frozen=True)
class Piece:
    """Rows a micro-batch trains on in one forward: their labels, the loss's alpha and the rows' share."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    alpha: float | None  # None: the method's; 0 for student-written rows, scored by the teacher alone
    share: float


@torch.no_grad()
def student_written(
    student: nn.Module, rows: torch.Tensor, spec: OnPolicySpec, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rows` with their tails rewritten by the student, labels only where the student wrote)."""
    length = rows.shape[1]
    keep = length - spec.max_new_tokens
    was_training = student.training
    student.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # a resumed run writes the same text at the same step
    try:
        written = student.generate(
            input_ids=rows[:, :keep],
            attention_mask=torch.ones_like(rows[:, :keep]),
            max_new_tokens=spec.max_new_tokens,
            min_new_tokens=spec.max_new_tokens,
            do_sample=True,
            temperature=spec.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=0,
        )[:, :length]
    finally:
        torch.random.set_rng_state(generator_state)
        student.train(was_training)
    labels = torch.full_like(written, IGNORE_INDEX)
    labels[:, keep - 1 : length - 1] = written[:, keep:]
    return written, labels


def pieces(
    batch: torch.Tensor, labels: torch.Tensor, spec: OnPolicySpec | None, student: nn.Module, seed: int
) -> list[Piece]:
    """The micro-batch as the loss sees it: corpus rows, and (on-policy) the first rows rewritten by the student."""
    count = 0 if spec is None else round(spec.fraction * batch.shape[0])
    if count == 0:
        return [Piece(batch, labels, alpha=None, share=1.0)]
    share = count / batch.shape[0]
    on_policy = Piece(*student_written(student, batch[:count], spec, seed), alpha=0.0, share=share)
    if count == batch.shape[0]:
        return [on_policy]
    return [Piece(batch[count:], labels[count:], alpha=None, share=1 - share), on_policy]
