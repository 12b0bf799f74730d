"""Knowledge-distillation loss, computed chunk by chunk over tokens.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_teacher^T, p_student^T)

alpha weighs hard labels (the corpus' next tokens) against soft labels (the teacher's
distribution softened by temperature T): alpha = 1 is plain fine-tuning, alpha = 0 pure
imitation of the teacher. T^2 keeps the soft term's gradient scale independent of T (Hinton
et al., 2015). D is one of

    forwardKL  KL(p_t || p_s)   mean-seeking: the student covers every mode of the teacher
    reverseKL  KL(p_s || p_t)   mode-seeking: the student commits to the teacher's main modes
    jsd        beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),  m = beta * p_t + (1 - beta) * p_s

Full-vocabulary logits of a batch are the largest tensors of a KD step (8 x 1024 tokens x
49,152 words in fp32 is 1.6 GB, twice: teacher and student, plus softmaxes). `ChunkedKDLoss`
never materializes them: it projects `chunk_size` tokens (fewer for a vocabulary over 65,536 words:
`tokens_per_chunk`) through both lm-heads at a time,
computes the loss and its gradient for that chunk at once, and keeps only the gradients for the
hidden states and the lm-head weight, so backward needs no second projection. Peak memory is a
few chunks of logits plus one lm-head gradient, whatever the batch and sequence length.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..spec.memory import tokens_per_chunk
from .teacher_cache import TopKTargets, student_buckets

IGNORE_INDEX = -100
DIVERGENCES = ("forwardKL", "reverseKL", "jsd")


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Softmaxes run in at least fp32, whatever the autocast dtype of the projection."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence between the temperature-softened distributions, shape [tokens]."""
    student_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    teacher_logp = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    return divergence_of(student_logp, teacher_logp, divergence, beta)


LOG_PROB_FLOOR = -1e4  # exp() of it is 0 in fp32: an outcome of no probability, kept finite for autograd


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row. Log-probabilities are floored so that an outcome neither side gives any
    probability (a cached teacher's empty tail bucket, log-prob -inf) adds 0, with a finite gradient."""
    p_logp, q_logp = p_logp.clamp_min(LOG_PROB_FLOOR), q_logp.clamp_min(LOG_PROB_FLOOR)
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def divergence_of(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """Per-row divergence between two distributions given as log-probabilities over the same outcomes
    (the whole vocabulary, or a cached teacher's top-k tokens and the bucket of all the others)."""
    if divergence == "forwardKL":
        return _kl(teacher_logp, student_logp)
    if divergence == "reverseKL":
        return _kl(student_logp, teacher_logp)
    if divergence == "jsd":
        mixture_logp = torch.logsumexp(
            torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
        )
        return beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)
    raise ValueError(f"divergence {divergence!r}: accepted {', '.join(DIVERGENCES)}")


def _chunk_loss_sums(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKTargets | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    divergence: str,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the valid tokens of one chunk: (cross-entropy, T^2-scaled divergence). `teacher`: its full
    logits, or its cached top-k targets (at `temperature` already)."""
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(_upcast(student_logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if teacher is None or alpha == 1:
        return ce, ce.new_zeros(())
    if isinstance(teacher, TopKTargets):
        student_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
        per_token = divergence_of(student_buckets(student_logp, teacher.ids), teacher.log_probs, divergence, beta)
    else:
        per_token = token_divergence(student_logits, teacher, divergence, temperature, beta)
    return ce, temperature**2 * per_token[valid].sum()


def _log_softmax_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in at least fp32, in a tensor of its own (the caller may write into it)."""
    if temperature == 1:  # the upcast inside the softmax kernel: no fp32 copy of the logits first
        return F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def _forward_kl_closed_form(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKTargets,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    row_weight: torch.Tensor,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, T^2-scaled forward KL sum) over one chunk's labelled tokens, and the gradient of
    alpha * CE + (1 - alpha) * T^2 * KL with respect to the student's logits, each row weighed by `row_weight`
    (0 where a token has no label), in `grad_dtype`; `teacher`: its logits, or a cache's top-k targets.
    Forward KL is the default divergence and most of a step's elementwise work: its gradient written out
    (T times the gradient with respect to the softened logits, plus alpha (softmax(z) - onehot) for the CE) takes
    a few in-place passes over the chunk's logits where autograd of the plain formula takes dozens, every
    factor is applied in one of them, and nothing depends on the data's values, so that torch.compile can fuse
    the passes into one or two loops (`training.compile`)."""
    labelled = labels != IGNORE_INDEX
    known = labels.clamp_min(0).unsqueeze(-1)
    student_logp = _log_softmax_at(student_logits, temperature)
    plain_logp = student_logp if temperature == 1 else _log_softmax_at(student_logits, 1.0)
    ce = -torch.where(labelled, plain_logp.gather(-1, known).squeeze(-1), 0.0).sum()
    # At T = 1 the CE's softmax is the KD's own: (1 - alpha)(p_s - p_t) + alpha p_s = p_s - (1 - alpha) p_t,
    # one gradient with the teacher's share scaled; at other temperatures the CE's softmax is added apart.
    shared = temperature == 1
    teacher_share = 1 - alpha if shared else 1.0
    factor = (row_weight if shared else row_weight * ((1 - alpha) * temperature)).unsqueeze(-1)
    plain_p = plain_logp.exp() if alpha and not shared else None  # before student_logp is overwritten
    if isinstance(teacher, TopKTargets):
        kd, grad = _bucket_kl_and_gradient(student_logp, teacher, teacher_share, factor)
    else:
        kd, grad = _full_kl_and_gradient(student_logp, _log_softmax_at(teacher, temperature), teacher_share, factor)
    if plain_p is not None:
        grad.addcmul_(plain_p, row_weight.unsqueeze(-1), value=alpha)
    if alpha:
        grad.scatter_add_(-1, known, (-alpha * row_weight).unsqueeze(-1))
    return ce, temperature**2 * torch.where(labelled, kd, 0.0).sum(), grad.to(grad_dtype)


def _full_kl_and_gradient(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, teacher_share: float, factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(p_t || p_s) and factor (p_s - teacher_share p_t): with both 1, its gradient with respect to
    the student's (softened) logits; `factor` is per row, [N, 1]. Both inputs are overwritten."""
    teacher_p = teacher_logp.exp()
    kd = teacher_logp.sub_(student_logp).mul_(teacher_p).sum(-1)
    return kd, student_logp.exp_().sub_(teacher_p, alpha=teacher_share).mul_(factor)


def _bucket_kl_and_gradient(
    student_logp: torch.Tensor, targets: TopKTargets, teacher_share: float, factor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL over a cache's k + 1 outcomes (as `student_buckets` forms them) and, with `teacher_share` and
    `factor` 1, its gradient with respect to the student's (softened) logits: p_s - p_t at the top-k ids;
    elsewhere p_s (1 - t_tail / q_tail), q_tail being the student's probability outside the top k (the tail's
    share moves by the ratio, its shape is the student's own). The teacher's probabilities weigh `teacher_share`
    in the gradient, all of which is multiplied by `factor` (per row, [N, 1]). `student_logp` is overwritten: its
    exp, with the top k zeroed, is the tail whose sum q_tail is, and then the gradient."""
    top_logp = student_logp.gather(-1, targets.ids)
    tail_p = student_logp.exp_().scatter_(-1, targets.ids, 0.0)
    student_rest = tail_p.sum(-1)
    buckets = torch.cat([top_logp, student_rest.log().unsqueeze(-1)], dim=-1)
    kd = divergence_of(buckets, targets.log_probs, "forwardKL")
    teacher_p = targets.log_probs.exp()
    teacher_tail = teacher_p[:, -1]
    tail_ratio = torch.where(
        teacher_tail > 0, teacher_tail / student_rest.clamp_min(torch.finfo(student_rest.dtype).tiny), 0.0
    )
    grad = tail_p.mul_(factor * (1 - teacher_share * tail_ratio).unsqueeze(-1))
    top_gradient = factor * (top_logp.exp() - teacher_share * teacher_p[:, :-1])
    return kd, grad.scatter_(-1, targets.ids, top_gradient)


@functools.cache
def _compiled_closed_form():
    """One compiled function per process: its graphs (one per teacher kind, alpha, temperature and dtype; the
    chunk's length dynamic once a second one is seen) serve every step and every stage."""
    return torch.compile(_forward_kl_closed_form)


PADDING_LOGIT = -1e4  # exp() of it is 0 at any temperature in use: no teacher probability there


def align_vocabulary(teacher_logits: torch.Tensor, student_rows: int) -> torch.Tensor:
    """Teacher logits with the student's number of rows. Models of one tokenizer may pad their output
    matrices to different sizes: rows past the student's are padding the student cannot emit (dropped);
    student rows past the teacher's are padding the teacher gives no probability."""
    teacher_rows = teacher_logits.shape[-1]
    if teacher_rows >= student_rows:
        return teacher_logits[..., :student_rows]
    return F.pad(_upcast(teacher_logits), (0, student_rows - teacher_rows), value=PADDING_LOGIT)


class ChunkedKDLoss(torch.autograd.Function):
    """Fused lm-head projection + KD loss; returns (loss, ce, kd), the last two detached."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_hidden: torch.Tensor,  # [N, H]
        student_weight: torch.Tensor,  # [V, H]
        teacher_hidden: torch.Tensor | None,  # [N, Ht]
        teacher_weight: torch.Tensor | None,  # [Vt, Ht]: Vt may differ from V by padding (align_vocabulary)
        teacher_targets: TopKTargets | None,  # instead of teacher_hidden and teacher_weight: a cache's, [N]
        labels: torch.Tensor,  # [N], IGNORE_INDEX where no loss
        alpha: float,
        temperature: float,
        divergence: str,
        beta: float,
        chunk_size: int,
        compiled: bool,  # the closed-form loss's passes fused by torch.compile
    ):
        chunk_size = tokens_per_chunk(chunk_size, student_weight.shape[0])
        labelled = labels != IGNORE_INDEX
        valid_tokens = max(int(labelled.sum()), 1)
        grad_hidden = torch.zeros_like(student_hidden)
        accumulate = torch.promote_types(student_weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(student_weight, dtype=accumulate)
        total_ce = torch.zeros((), dtype=accumulate, device=student_hidden.device)
        total_kd = torch.zeros_like(total_ce)
        # Under autocast each chunk's three products run in its dtype, as autograd's would; the weight is cast
        # once for all chunks and each chunk's gradient once for both backward products, where every product
        # cast its operands anew (a third of a bf16 step of a small student went to those copies).
        device = student_hidden.device.type
        products = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else student_weight.dtype
        weight = student_weight.detach().to(products)
        closed_form = _compiled_closed_form() if compiled else _forward_kl_closed_form
        row_weights = labelled.to(accumulate) / valid_tokens  # the closed form's: each labelled token weighs alike
        for start in range(0, labels.shape[0], chunk_size):
            chunk_labels = labels[start : start + chunk_size]
            if not bool(labelled[start : start + chunk_size].any()):
                continue
            hidden = student_hidden[start : start + chunk_size].detach()
            teacher = None
            if teacher_targets is not None:
                teacher = teacher_targets[start : start + chunk_size]
            elif teacher_hidden is not None and alpha < 1:
                teacher = align_vocabulary(
                    teacher_hidden[start : start + chunk_size] @ teacher_weight.detach().T, weight.shape[0]
                )
            if teacher is not None and alpha < 1 and divergence == "forwardKL":
                ce, kd, grad_logits = closed_form(
                    hidden @ weight.T,
                    teacher,
                    chunk_labels,
                    alpha,
                    temperature,
                    row_weights[start : start + chunk_size],
                    products,
                )
            else:
                with torch.enable_grad():
                    logits = _upcast(hidden @ weight.T).requires_grad_()
                    ce, kd = _chunk_loss_sums(logits, teacher, chunk_labels, alpha, temperature, divergence, beta)
                    chunk_loss = (alpha * ce + (1 - alpha) * kd) / valid_tokens
                    (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
                grad_logits = grad_logits.to(products)
            grad_hidden[start : start + chunk_size] = grad_logits @ weight
            grad_weight += grad_logits.T @ hidden
            total_ce += ce.detach()
            total_kd += kd.detach()
        ctx.save_for_backward(grad_hidden, grad_weight.to(student_weight.dtype))
        ce_mean, kd_mean = total_ce / valid_tokens, total_kd / valid_tokens
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return alpha * ce_mean + (1 - alpha) * kd_mean, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, *([None] * 10)


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    divergence: str = "forwardKL",
    beta: float = 0.5,
    chunk_size: int = 256,
    teacher_targets: TopKTargets | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean CE, mean scaled divergence) over valid tokens; hidden states are [N, H]. The teacher is
    `teacher_hidden` through `teacher_weight`, or `teacher_targets` cached at `temperature`."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: accepted {', '.join(DIVERGENCES)}")
    return ChunkedKDLoss.apply(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        teacher_targets,
        labels,
        alpha,
        temperature,
        divergence,
        beta,
        chunk_size,
        compiled,
    )


def reference_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 1.0,
    divergence: str = "forwardKL",
    beta: float = 0.5,
) -> torch.Tensor:
    """The same loss on full logits, written plainly: the yardstick for tests and benchmarks."""
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(_upcast(student_logits), labels, ignore_index=IGNORE_INDEX)
    per_token = token_divergence(student_logits, teacher_logits, divergence, temperature, beta)
    kd = temperature**2 * per_token[valid].mean()
    return alpha * ce + (1 - alpha) * kd


@torch.no_grad()
def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 256):
    """(sum of token negative log-likelihoods, token count) without materializing all logits."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    chunk_size = tokens_per_chunk(chunk_size, weight.shape[0])
    for start in range(0, labels.shape[0], chunk_size):
        logits = _upcast(hidden[start : start + chunk_size] @ weight.T)
        total += F.cross_entropy(
            logits, labels[start : start + chunk_size], ignore_index=IGNORE_INDEX, reduction="sum"
        ).double()
    return total, int((labels != IGNORE_INDEX).sum())
