import pytest
import torch

from potential_meme.engine.losses import IGNORE_INDEX, chunked_kd_loss, chunked_nll, reference_kd_loss
from potential_meme.engine.teacher_cache import top_k_targets


def _inputs(seed=0, tokens=37, hidden=16, teacher_hidden=24, vocab=50):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    student_weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 0.5
    teacher_h = torch.randn(tokens, teacher_hidden, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, teacher_hidden, generator=generator, dtype=torch.float64) * 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::5] = IGNORE_INDEX
    return student_hidden, student_weight, teacher_h, teacher_weight, labels


def _reference(sh, sw, th, tw, labels, **kw):
    return reference_kd_loss(sh @ sw.T, th @ tw.T, labels, **kw)


@pytest.mark.parametrize("divergence", ["forwardKL", "reverseKL", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
@pytest.mark.parametrize("alpha,temperature,beta", [(0.5, 2.0, 0.5), (0.0, 1.0, 0.1), (0.9, 4.0, 0.9), (0.5, 1.0, 0.5)])
def test_chunked_matches_reference_values_and_gradients(divergence, chunk_size, alpha, temperature, beta):
    sh, sw, th, tw, labels = _inputs()
    kw = dict(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta)

    ref_sh, ref_sw = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    expected = _reference(ref_sh, ref_sw, th, tw, labels, **kw)
    expected.backward()

    got_sh, got_sw = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    loss, ce, kd = chunked_kd_loss(got_sh, got_sw, th, tw, labels, chunk_size=chunk_size, **kw)
    (loss * 3).backward()  # a non-unit upstream gradient must scale the result

    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha * ce + (1 - alpha) * kd, loss.detach())
    torch.testing.assert_close(got_sh.grad, 3 * ref_sh.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_sw.grad, 3 * ref_sw.grad, rtol=1e-5, atol=1e-7)


def test_divergences_are_distinct_and_zero_when_teacher_equals_student():
    sh, sw, th, tw, labels = _inputs()
    values = {}
    for divergence in ("forwardKL", "reverseKL", "jsd"):
        _, _, kd = chunked_kd_loss(sh, sw, th, tw, labels, alpha=0.0, temperature=2.0, divergence=divergence)
        _, _, same = chunked_kd_loss(sh, sw, sh, sw, labels, alpha=0.0, temperature=2.0, divergence=divergence)
        values[divergence] = float(kd)
        assert float(same) == pytest.approx(0.0, abs=1e-10)
        assert float(kd) > 0
    assert len({round(v, 6) for v in values.values()}) == 3


def test_alpha_one_is_plain_cross_entropy():
    sh, sw, _, _, labels = _inputs()
    loss, ce, kd = chunked_kd_loss(sh, sw, None, None, labels, alpha=1.0)
    expected = torch.nn.functional.cross_entropy(sh @ sw.T, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    assert float(kd) == 0.0
    total, count = chunked_nll(sh, sw, labels, chunk_size=7)
    assert count == int((labels != IGNORE_INDEX).sum())
    assert float(total) / count == pytest.approx(float(expected))


@pytest.mark.parametrize("divergence", ["forwardKL", "reverseKL", "jsd"])
def test_output_matrices_padded_differently_are_aligned_on_the_shared_vocabulary(divergence):
    sh, sw, th, tw, labels = _inputs()
    padding = torch.randn(5, tw.shape[1])
    # A teacher with 5 more (padding) rows teaches exactly what it teaches without them.
    wider_teacher = chunked_kd_loss(sh, sw, th, torch.cat([tw, padding]), labels, alpha=0.5, divergence=divergence)
    same = chunked_kd_loss(sh, sw, th, tw, labels, alpha=0.5, divergence=divergence)
    torch.testing.assert_close(wider_teacher, same)
    # A student with 5 more rows than the teacher: the teacher gives them no probability.
    student_weight = torch.cat([sw, torch.randn(5, sw.shape[1])]).requires_grad_()
    loss, _, _ = chunked_kd_loss(sh, student_weight, th, tw, labels, alpha=0.5, divergence=divergence, chunk_size=7)
    teacher_logits = torch.nn.functional.pad(th @ tw.T, (0, 5), value=-1e4)
    expected = reference_kd_loss(sh @ student_weight.T, teacher_logits, labels, alpha=0.5, divergence=divergence)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student_weight.grad[-5:].abs().sum() > 0  # the padding rows are taught, not ignored


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The most numbers any tensor computed under it holds."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize(
    "vocab,chunk_size,tokens_per_chunk", [(152_064, 4096, 110), (128_256, 256, 130), (512, 64, 64)]
)
def test_a_large_vocabulary_takes_fewer_tokens_per_chunk(vocab, chunk_size, tokens_per_chunk):
    """Whatever chunkSize asks, no tensor of the loss or of perplexity holds a chunk of logits of more than 2^24
    numbers (the full logits of 300 tokens at 152,064 words are 45.6M), and the results are the reference's."""
    from potential_meme.spec.memory import CHUNK_LOGITS

    sh, sw, th, tw, labels = (t.float() if t.is_floating_point() else t for t in _inputs(tokens=300, vocab=vocab))
    kw = dict(alpha=0.5, temperature=2.0, divergence="forwardKL", beta=0.5)
    with _LargestTensor() as watched:
        loss, _, _ = chunked_kd_loss(sh, sw, th, tw, labels, chunk_size=chunk_size, **kw)
        nll, _ = chunked_nll(sh, sw, labels, chunk_size=chunk_size)
    assert watched.largest == tokens_per_chunk * vocab <= CHUNK_LOGITS  # a chunk's logits, the largest tensor
    torch.testing.assert_close(loss, _reference(sh, sw, th, tw, labels, **kw), rtol=1e-4, atol=1e-5)
    expected_nll = torch.nn.functional.cross_entropy(sh @ sw.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(nll.float(), expected_nll, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_under_bf16_autocast_the_products_run_in_bf16_as_autograd_runs_them(alpha):
    sh, sw, th, tw, labels = (tensor.float() if tensor.is_floating_point() else tensor for tensor in _inputs())
    kw = dict(alpha=alpha, temperature=1.0, divergence="forwardKL")
    ref_sh, ref_sw = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    got_sh, got_sw = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(ref_sh, ref_sw, th, tw, labels, **kw)
        loss, _, _ = chunked_kd_loss(got_sh, got_sw, th, tw, labels, chunk_size=8, **kw)
    expected.backward()
    loss.backward()
    assert got_sw.grad.dtype == got_sh.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got_sh.grad, ref_sh.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got_sw.grad, ref_sw.grad, rtol=2e-2, atol=2e-3)
    fp32_sw = sw.clone().requires_grad_()
    chunked_kd_loss(sh, fp32_sw, th, tw, labels, chunk_size=8, **kw)[0].backward()
    assert not torch.allclose(fp32_sw.grad, got_sw.grad, rtol=1e-4, atol=1e-5)  # bf16 products did run


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
def test_the_compiled_closed_form_gives_the_eager_loss_and_gradients(cached):
    """training.compile fuses the closed-form forward KL's passes: the same values, chunks of two sizes, labelled
    rows and rows without labels, at T = 1 (the CE shares the KD's softmax) and T = 2 (it does not)."""
    sh, sw, th, tw, labels = (tensor.float() if tensor.is_floating_point() else tensor for tensor in _inputs())
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for alpha, temperature in [(0.5, 1.0), (0.3, 2.0)]:
        targets = top_k_targets(th @ tw.T, k=8, temperature=temperature) if cached else None
        results = []
        for compiled in (False, True):
            hidden, weight = sh.clone().requires_grad_(), sw.clone().requires_grad_()
            loss, ce, kd = chunked_kd_loss(
                hidden,
                weight,
                None if cached else th,
                None if cached else tw,
                labels,
                alpha=alpha,
                temperature=temperature,
                chunk_size=16,  # 37 tokens: chunks of 16, 16 and 5
                teacher_targets=targets,
                compiled=compiled,
            )
            loss.backward()
            results.append((loss.detach(), ce, kd, hidden.grad, weight.grad))
        for eager, fused in zip(*results, strict=True):
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # it did compile
