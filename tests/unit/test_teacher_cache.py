"""KD from a cached teacher: top-k log-probabilities plus a tail bucket, stored compressed."""

import pytest
import torch

from potential_meme.engine.losses import IGNORE_INDEX, chunked_kd_loss, divergence_of, reference_kd_loss
from potential_meme.engine.teacher_cache import (
    bytes_per_token,
    decode,
    encode,
    sampled_targets,
    student_buckets,
    top_k_targets,
)

TOKENS, VOCAB, HIDDEN = 96, 300, 24


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    student_weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    teacher_logits = torch.randn(TOKENS, VOCAB, generator=generator) * 3  # peaked, as a trained teacher's
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    labels[::7] = IGNORE_INDEX
    return student_hidden, student_weight, teacher_logits, labels


def loss_and_gradients(targets=None, teacher_logits=None, divergence="forwardKL", temperature=2.0):
    student_hidden, student_weight, logits, labels = batch()
    hidden, weight = student_hidden.requires_grad_(), student_weight.requires_grad_()
    if targets is None:
        # the online path: teacher logits = teacher hidden @ its lm-head, here an identity head over logits
        teacher_hidden, teacher_weight = (logits if teacher_logits is None else teacher_logits), torch.eye(VOCAB)
    else:
        teacher_hidden = teacher_weight = None
    loss, _, kd = chunked_kd_loss(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        alpha=0.3,
        temperature=temperature,
        divergence=divergence,
        chunk_size=40,
        teacher_targets=targets,
    )
    loss.backward()
    return loss.detach(), kd, hidden.grad, weight.grad


@pytest.mark.parametrize("divergence", ["forwardKL", "reverseKL", "jsd"])
def test_a_full_vocabulary_cache_gives_the_online_loss_and_gradients(divergence):
    *_, teacher_logits, _ = batch()
    full = top_k_targets(teacher_logits, k=VOCAB, temperature=2.0)
    assert torch.all(full.log_probs[:, -1] == -torch.inf)  # nothing left for the tail
    cached = loss_and_gradients(full, divergence=divergence)
    online = loss_and_gradients(divergence=divergence)
    for from_cache, from_teacher in zip(cached, online, strict=True):
        torch.testing.assert_close(from_cache, from_teacher, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(gradient).all() for gradient in cached[2:])
    student_hidden, student_weight, _, labels = batch()
    plain = reference_kd_loss(
        student_hidden @ student_weight.T, teacher_logits, labels, alpha=0.3, temperature=2.0, divergence=divergence
    )
    torch.testing.assert_close(cached[0], plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forwardKL", "reverseKL", "jsd"])
@pytest.mark.parametrize("k,temperature", [(8, 2.0), (1, 1.0), (VOCAB - 1, 1.0)])
def test_a_top_k_cache_gives_the_loss_and_gradients_of_the_bucket_formula(divergence, k, temperature):
    """Forward KL's gradient is written out in closed form; every divergence must equal autograd through the
    plain formula over the k + 1 outcomes, a tail holding most of the mass or almost none."""
    student_hidden, student_weight, teacher_logits, labels = batch()
    targets = top_k_targets(teacher_logits, k=k, temperature=temperature)
    cached = loss_and_gradients(targets, divergence=divergence, temperature=temperature)

    hidden, weight = student_hidden.requires_grad_(), student_weight.requires_grad_()
    logits = hidden @ weight.T
    buckets = student_buckets(torch.log_softmax(logits / temperature, dim=-1), targets.ids)
    valid = labels != IGNORE_INDEX
    kd = temperature**2 * divergence_of(buckets, targets.log_probs, divergence)[valid].mean()
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    loss = 0.3 * ce + 0.7 * kd
    loss.backward()
    for got, expected in zip(cached, (loss.detach(), kd.detach(), hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_the_tail_bucket_holds_exactly_the_mass_outside_the_top_k():
    *_, teacher_logits, _ = batch()
    targets = top_k_targets(teacher_logits, k=8, temperature=1.0)
    probabilities = torch.softmax(teacher_logits, dim=-1)
    outside = probabilities.sum(-1) - probabilities.gather(-1, targets.ids).sum(-1)
    torch.testing.assert_close(targets.log_probs[:, -1].exp(), outside)
    torch.testing.assert_close(targets.log_probs.exp().sum(-1), torch.ones(TOKENS))  # k + 1 outcomes, one whole
    # the student's buckets: its own probabilities at the teacher's ids, and all the rest in one
    student = torch.log_softmax(torch.randn(TOKENS, VOCAB), dim=-1)
    buckets = student_buckets(student, targets.ids)
    torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(TOKENS))
    torch.testing.assert_close(buckets[:, :-1], student.gather(-1, targets.ids))


def test_a_top_k_cache_approaches_the_online_loss_as_k_grows():
    *_, teacher_logits, _ = batch()
    online_kd = loss_and_gradients(teacher_logits=teacher_logits)[1]
    gaps = [
        abs(float(loss_and_gradients(top_k_targets(teacher_logits, k, 2.0))[1] - online_kd)) for k in (4, 32, 128, 299)
    ]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4 < gaps[0]


@pytest.mark.parametrize("vocabulary", [300, 49152, 128256, 152064])
def test_stored_targets_round_trip_within_the_quantization_step(vocabulary):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(TOKENS, vocabulary, generator=generator) * 4
    targets = top_k_targets(logits, k=32, temperature=2.0)
    arrays = encode(targets, vocabulary)
    stored = sum(array.numel() * array.element_size() for array in arrays.values())
    assert stored == TOKENS * bytes_per_token(32, vocabulary)
    restored = decode(arrays, vocabulary)
    assert torch.equal(restored.ids, targets.ids)  # ids past 65,535 survive their 3-byte packing
    assert (restored.log_probs - targets.log_probs).abs().max() < 0.05  # 1/32 nat steps, fp16, renormalized
    assert bytes_per_token(32, 49152) == 100 <= 120 and bytes_per_token(32, 128256) == 132


def test_kd_from_stored_targets_is_close_to_kd_from_exact_ones():
    *_, teacher_logits, _ = batch()
    exact = top_k_targets(teacher_logits, k=32, temperature=2.0)
    stored = decode(encode(exact, VOCAB), VOCAB)
    exact_kd, stored_kd = loss_and_gradients(exact)[1], loss_and_gradients(stored)[1]
    assert abs(float(stored_kd - exact_kd)) < 0.01 * float(exact_kd)


def test_sampled_targets_estimate_the_teacher_distribution_and_its_kd_gradient_without_bias():
    """Averaged over draws, the shares of k sampled tokens approach the teacher's probabilities, and forward KL's
    gradient from them the online one, their error halving for four times the draws (noise, no bias); the top k
    at the same k miss the tail's shape for good."""
    *_, teacher_logits, _ = batch()
    k = 8
    probs = torch.softmax(teacher_logits / 2.0, dim=-1)
    online = loss_and_gradients()[3]

    def errors(shares: torch.Tensor, gradient: torch.Tensor) -> tuple[float, float]:
        """(L1 distance to the teacher's distribution, a token; relative distance to the online gradient)"""
        return float((shares - probs).abs().sum(-1).mean()), float((gradient - online).norm() / online.norm())

    mean_shares, mean_gradient, measured = torch.zeros_like(probs), torch.zeros(VOCAB, HIDDEN), {}
    for seed in range(800):
        targets = sampled_targets(teacher_logits, k, 2.0, torch.Generator().manual_seed(seed))
        mean_shares += torch.zeros_like(probs).scatter_(-1, targets.ids, targets.log_probs[:, :-1].exp())
        mean_gradient += loss_and_gradients(targets)[3]
        if seed + 1 in (200, 800):
            measured[seed + 1] = errors(mean_shares / (seed + 1), mean_gradient / (seed + 1))
    top = top_k_targets(teacher_logits, k, 2.0)
    top_shares = torch.zeros_like(probs).scatter_(-1, top.ids, top.log_probs[:, :-1].exp())
    top_errors = errors(top_shares, loss_and_gradients(top)[3])
    for few, many, fixed in zip(measured[200], measured[800], top_errors, strict=True):
        assert many < 0.6 * few and many < fixed / 4, (measured, top_errors)


def test_sampled_targets_round_trip_as_shares_of_the_draws():
    *_, teacher_logits, _ = batch()
    targets = sampled_targets(teacher_logits, 32, 1.0, torch.Generator().manual_seed(0))
    shares = targets.log_probs[:, :-1].exp()
    assert torch.allclose(shares.sum(-1), torch.ones(TOKENS))  # every draw counted once
    assert torch.allclose(shares * 32, (shares * 32).round(), atol=1e-4)  # counts of the 32 draws
    assert bool((shares[:, :-1] >= shares[:, 1:]).all())  # the most drawn first: encode measures from it
    stored = decode(encode(targets, VOCAB), VOCAB)
    assert torch.equal(stored.ids, targets.ids) and bool((stored.log_probs[:, -1] == -torch.inf).all())
    drawn = shares > 0
    assert (stored.log_probs[:, :-1][drawn] - targets.log_probs[:, :-1][drawn]).abs().max() < 0.05
    assert stored.log_probs[:, :-1][~drawn].exp().max() < 1e-6  # the floor: 16 nats below the top share
