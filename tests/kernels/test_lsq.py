"""LSQ fake quantization ("Learned Step Size Quantization", Esser et al., 2020): the Triton kernels (interpreter on
CPU) against the pure-torch reference, hand-computed values and torchao's range-learning fake quantizer."""

from __future__ import annotations

import math

import pytest
import torch

from hf_eff.kernels.quantization import lsq_fake_quantize, lsq_fake_quantize_reference, lsq_grad_scale, qrange

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The Triton backend runs on CUDA where there is a GPU, else in the interpreter on CPU (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(rows, columns, group_size, bits, symmetric, dtype=torch.float32, device=DEVICE, seed=0):
    """Random weight and steps small enough that some values clamp at each end, and offsets of either sign."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    groups = 1 if group_size is None else columns // group_size
    qn, qp = qrange(bits)
    # the codes span about +-1.5 standard deviations: a few percent of the weights clamp at each end
    step = (0.5 + torch.rand(rows, groups, generator=generator)) * (3.0 / (qp - qn))
    offset = None if symmetric else 0.3 * torch.randn(rows, groups, generator=generator)
    grad_out = torch.randn(rows, columns, generator=generator)

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return leaf(weight), leaf(step), leaf(offset), grad_out.to(device=device, dtype=dtype)


def _grads(out, grad_out, tensors):
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, present, grad_out)


def _clamp_fractions(weight, step, offset, bits, group_size):
    qn, qp = qrange(bits)
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    grouped = weight.detach().float().reshape(rows, -1, size)
    if offset is not None:
        grouped = grouped - offset.detach().float()[..., None]
    value = grouped / step.detach().float()[..., None]
    return (value < qn).float().mean().item(), (value > qp).float().mean().item()


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
@pytest.mark.parametrize("group_size", [None, 16], ids=["per_channel", "group16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_matches_reference_fp32(bits, group_size, symmetric):
    weight, step, offset, grad_out = _inputs(6, 48, group_size, bits, symmetric, seed=bits)
    below, above = _clamp_fractions(weight, step, offset, bits, group_size)
    assert below > 0 and above > 0
    out = lsq_fake_quantize(weight, step, offset, bits=bits, group_size=group_size, backend="triton")
    ref = lsq_fake_quantize_reference(weight, step, offset, bits=bits, group_size=group_size)
    # same float32 division and ties-to-even rounding: identical codes, values to the last bit or so
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    got = _grads(out, grad_out, (weight, step, offset))
    want = _grads(ref, grad_out, (weight, step, offset))
    # autograd through the reference multiplies by step / step: one float32 ulp off the exact straight-through
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    # group sums in another order of up to N terms as large as Qp times the incoming gradient (then times g)
    size = 48 if group_size is None else group_size
    atol = 1e-6 * size * qrange(bits)[1] * lsq_grad_scale(size, bits)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_half(dtype):
    weight, step, offset, grad_out = _inputs(5, 64, 32, 4, False, dtype=dtype, seed=7)
    out = lsq_fake_quantize(weight, step, offset, bits=4, group_size=32, backend="triton")
    ref = lsq_fake_quantize_reference(weight, step, offset, bits=4, group_size=32)
    assert out.dtype == dtype
    # both compute in float32 and round once to the half type; allow one half-precision ulp
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    got = _grads(out, grad_out, (weight, step, offset))
    want = _grads(ref, grad_out, (weight, step, offset))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_computed_values(backend):
    # bits=2: Qn=-2, Qp=1; step 0.5; v = w / s = [0.6, -2.8, 1.52, 4.0] -> clamp [0.6, -2, 1, 1] -> round [1, -2, 1, 1]
    device = DEVICE if backend == "triton" else "cpu"
    weight = torch.tensor([[0.3, -1.4, 0.76, 2.0]], device=device, requires_grad=True)
    step = torch.tensor([[0.5]], device=device, requires_grad=True)
    out = lsq_fake_quantize(weight, step, bits=2, group_size=None, grad_scale=1.0, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([[0.5, -1.0, 0.5, 0.5]]), rtol=0, atol=0)
    out.sum().backward()
    # straight-through inside, zero where clamped
    torch.testing.assert_close(weight.grad.cpu(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), rtol=0, atol=0)
    # (round(0.6) - 0.6) + Qn + Qp + Qp = 0.4 - 2 + 1 + 1
    torch.testing.assert_close(step.grad.cpu(), torch.tensor([[0.4]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_offset_gradient_hand_computed(backend):
    # bits=2, step 1, offset 0.5: v = w - 0.5 = [-0.3, 2.5, -3.5] -> only the first is inside
    device = DEVICE if backend == "triton" else "cpu"
    weight = torch.tensor([[0.2, 3.0, -3.0, 0.9]], device=device, requires_grad=True)
    step = torch.tensor([[1.0]], device=device, requires_grad=True)
    offset = torch.tensor([[0.5]], device=device, requires_grad=True)
    out = lsq_fake_quantize(weight, step, offset, bits=2, group_size=None, grad_scale=1.0, backend=backend)
    # codes round(clamp(v)) = [0, 1, -2, 0] -> codes * 1 + 0.5
    torch.testing.assert_close(out.cpu(), torch.tensor([[0.5, 1.5, -1.5, 0.5]]), rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(offset.grad.cpu(), torch.tensor([[2.0]]), rtol=0, atol=0)  # two clamped values
    torch.testing.assert_close(weight.grad.cpu(), torch.tensor([[1.0, 0.0, 0.0, 1.0]]), rtol=0, atol=0)


def test_default_gradient_scale_is_lsq():
    assert lsq_grad_scale(16, 4) == pytest.approx(1 / math.sqrt(16 * 7))
    weight, step, _, grad_out = _inputs(4, 32, 16, 4, True, seed=3)
    default = torch.autograd.grad(lsq_fake_quantize(weight, step, bits=4, group_size=16, backend="triton"), step,
                                  grad_out)[0]  # fmt: skip
    unscaled = torch.autograd.grad(
        lsq_fake_quantize(weight, step, bits=4, group_size=16, grad_scale=1.0, backend="triton"), step, grad_out
    )[0]
    torch.testing.assert_close(default, unscaled / math.sqrt(16 * 7), rtol=1e-6, atol=1e-7)


def _codes_away_from_clamp_ties(rows, columns, step_per_row, bits, generator):
    """w = (k + u) * step with |u| <= 0.4 and k in [Qn - 2, Qp + 2]; at k = Qp (Qn) u <= 0 (>= 0), so no value lies
    in (Qp, Qp + 0.5) or (Qn - 0.5, Qn), where rounding before or after clamping gives different gradients."""
    qn, qp = qrange(bits)
    k = torch.randint(qn - 2, qp + 3, (rows, columns), generator=generator).float()
    u = (torch.rand(rows, columns, generator=generator) - 0.5) * 0.8
    u = torch.where(k == qp, -u.abs(), torch.where(k == qn, u.abs(), u))
    return (k + u) * step_per_row


@pytest.mark.parametrize("group_size", [None, 16], ids=["per_channel", "group16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_torchao_range_learning(bits, group_size):
    # torchao is in the `test` extra, so a missing parity reference fails instead of skipping
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    generator = torch.Generator().manual_seed(bits)
    rows, columns = 4, 32
    groups = 1 if group_size is None else columns // group_size
    step = 0.05 + torch.rand(rows, groups, generator=generator)
    size = columns if group_size is None else group_size
    weight = _codes_away_from_clamp_ties(rows, columns, step.repeat_interleave(size, dim=1), bits, generator)
    grad_out = torch.randn(rows, columns, generator=generator)

    dtype = {2: torch.int2, 4: torch.int4, 8: torch.int8}[bits]
    granularity = "per_channel" if group_size is None else None
    config = IntxFakeQuantizeConfig(dtype, granularity, group_size=group_size, is_symmetric=True, is_dynamic=False,
                                    range_learning=True)  # fmt: skip
    quantizer = IntxFakeQuantizer(config)
    quantizer.scale = torch.nn.Parameter(step.clone())
    quantizer.zero_point = torch.zeros(rows, groups, dtype=torch.int32)
    quantizer._initialized = True
    theirs_w = weight.clone().requires_grad_()
    theirs = quantizer(theirs_w)
    their_grads = torch.autograd.grad(theirs, [theirs_w, quantizer.scale], grad_out)

    ours_w = weight.to(DEVICE).requires_grad_()
    ours_step = step.to(DEVICE).requires_grad_()
    # torchao learns the step with plain autograd, i.e. without LSQ's gradient scale
    ours = lsq_fake_quantize(ours_w, ours_step, bits=bits, group_size=group_size, grad_scale=1.0, backend="triton")
    our_grads = torch.autograd.grad(ours, [ours_w, ours_step], grad_out.to(DEVICE))

    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grads[0].cpu(), their_grads[0], rtol=1e-6, atol=1e-7)
    # sums of `size` terms up to Qp in magnitude, in another order
    torch.testing.assert_close(our_grads[1].cpu(), their_grads[1], rtol=1e-5, atol=1e-6 * size * qrange(bits)[1])


def test_bad_input_errors():
    weight = torch.randn(4, 32)
    step = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"`bits` must be one of \(2, 3, 4, 5, 6, 7, 8\), got 1"):
        lsq_fake_quantize(weight, step, bits=1, group_size=16)
    with pytest.raises(ValueError, match=r"`bits` must be one of .*got 9"):
        lsq_fake_quantize(weight, step, bits=9, group_size=16)
    with pytest.raises(
        ValueError, match=r"`weight` dtype must be one of float16, bfloat16, float32, got torch.float64"
    ):
        lsq_fake_quantize(weight.double(), step, bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"`group_size` must be None \(per channel\) or a positive divisor of the row"):
        lsq_fake_quantize(weight, step, bits=4, group_size=12)
    with pytest.raises(ValueError, match=r"`step` must have shape \(4, 2\), got \(4, 1\)"):
        lsq_fake_quantize(weight, torch.ones(4, 1), bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"`offset` must have shape \(4, 1\)"):
        lsq_fake_quantize(weight, torch.ones(4, 1), torch.ones(4, 2), bits=4, group_size=None)
    with pytest.raises(ValueError, match=r"`weight` must be a 2-D tensor"):
        lsq_fake_quantize(weight[None], step, bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"`backend` must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        lsq_fake_quantize(weight, step, bits=4, group_size=16, backend="cuda")
    with pytest.raises(ValueError, match=r"`grad_scale` must be None or a finite number > 0, got -1.0"):
        lsq_fake_quantize(weight, step, bits=4, group_size=16, grad_scale=-1.0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "offset"])
def test_kernel_matches_reference_bf16_gpu(symmetric):
    weight, step, offset, grad_out = _inputs(4096, 4096, 128, 4, symmetric, dtype=torch.bfloat16, device="cuda")
    out = lsq_fake_quantize(weight, step, offset, bits=4, group_size=128, backend="triton")
    ref = lsq_fake_quantize_reference(weight, step, offset, bits=4, group_size=128)
    # correctly rounded division and no fused multiply-add: the same codes; one bfloat16 ulp allowed for the cast
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    got = _grads(out, grad_out, (weight, step, offset))
    want = _grads(ref, grad_out, (weight, step, offset))
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=0, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
