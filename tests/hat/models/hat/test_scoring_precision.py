"""Half-precision inputs of hat.models.hat.alignment.scan_similarity.

Half inputs are scored with fp32 accumulation and an fp32 result. On CUDA the token GEMM
runs in fp16/bf16 with fp32 output; on CPU the inputs are upcast per tile. Both are
checked here on CPU; the CUDA GEMM numerics are emulated by forcing the half GEMM
(with half *output*, the worse case of the fallback path).

Tolerance: the acceptance bound is 1e-3 absolute on a score. bf16 keeps 8 significant
bits (relative rounding <= 2^-9 ~ 2e-3 per feature or raw score); these perturbations
average out over D = 64..768 products and over the softmax, and measured deviations
are <= 2e-4 (D = 768, random and correlated features), so 1e-3 leaves a 5x margin.
"""
import pytest
import torch

import hat.models.hat.alignment as alignment
from hat.models.hat.alignment import scan_similarity

DIRECTIONS = ["i2t", "t2i"]
HALVES = [torch.bfloat16, torch.float16]


def make_features(seed, n_images=5, regions=49, n_captions=12, max_len=32, dim=256, shared=0.5):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)  # a shared direction: realistic, peaked attention
    images = torch.randn(n_images, regions, dim, generator=g) + shared * common
    captions = torch.randn(n_captions, max_len, dim, generator=g) + shared * common
    lengths = torch.randint(8, max_len + 1, (n_captions,), generator=g)
    lengths[0], lengths[1] = max_len, 2
    return images, captions, lengths


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("half", HALVES)
def test_half_inputs_on_cpu_are_scored_in_fp32(direction, half):
    images, captions, lengths = make_features(0)
    out = scan_similarity(images.to(half), captions.to(half), lengths, direction=direction,
                          image_tile=2, caption_tile=5)
    assert out.dtype == torch.float32
    # the same (rounded) values in fp32: identical up to summation order
    same_values = scan_similarity(images.to(half).float(), captions.to(half).float(), lengths,
                                  direction=direction, image_tile=2, caption_tile=5)
    torch.testing.assert_close(out, same_values, rtol=1e-5, atol=1e-6)
    # against the unrounded fp32 features: the rounding of the features, within 1e-3
    full = scan_similarity(images, captions, lengths, direction=direction)
    assert (out - full).abs().max() < 1e-3


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("half", HALVES)
def test_half_gemm_path_within_1e_3_of_fp32(direction, half, monkeypatch):
    # force the CUDA code path on CPU: the GEMM in half (here with half output, as the
    # autograd / no-fp32-output fallback does), the rest in fp32
    monkeypatch.setattr(alignment, "_gemm_dtype", lambda dtype, device: dtype)
    images, captions, lengths = make_features(1)
    images, captions = images.to(half), captions.to(half)
    out = scan_similarity(images, captions, lengths, direction=direction)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = scan_similarity(images.float(), captions.float(), lengths, direction=direction)
    assert (out - ref).abs().max() < 1e-3
    # and the autograd form of the same path
    leaf = images.clone().requires_grad_(True)
    grad_out = scan_similarity(leaf, captions, lengths, direction=direction)
    torch.testing.assert_close(grad_out.detach(), out, rtol=0, atol=1e-5)
    grad_out.sum().backward()
    assert leaf.grad.dtype == half and torch.isfinite(leaf.grad.float()).all()


def test_half_rows_on_cuda_request_fp32_output(monkeypatch):
    # the no-grad half GEMM asks torch.mm for fp32 output (CUDA: fp32 accumulation and
    # result); where that kernel is missing (CPU) it falls back to half output, upcast
    calls = []
    real_mm = torch.mm

    def spy(a, b, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        return real_mm(a, b, **kwargs)
    monkeypatch.setattr(torch, "mm", spy)
    alignment.has_fp32_output_mm.cache_clear()  # the capability is probed once per device and dtype
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    out = alignment._token_scores(a, b, grad=False)
    assert calls[0] == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, (a.float() @ b.float().t()), rtol=1e-2, atol=1e-2)
    calls.clear()
    alignment._token_scores(a, b, grad=True)
    assert calls == [None]  # mm.dtype has no derivative: half output under autograd


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_autocast_does_not_change_the_result(direction):
    images, captions, lengths = make_features(2)
    plain = scan_similarity(images, captions, lengths, direction=direction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = scan_similarity(images, captions, lengths, direction=direction)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-7)


def test_a_failing_fp32_output_product_is_not_retried_on_another_kernel(monkeypatch):
    """Only the one-time probe may find the fp32-output kernel missing; a real product that
    fails (out of memory) raises instead of silently running again in half precision."""
    real_mm = torch.mm

    def mm(a, b, **kwargs):
        if kwargs.get("out_dtype") is not None and a.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_mm(a, b)  # the probe (2 x 2) passes: the kernel exists
    monkeypatch.setattr(torch, "mm", mm)
    alignment.has_fp32_output_mm.cache_clear()
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="out of memory"):
        alignment._token_scores(a, b, grad=False)
    alignment.has_fp32_output_mm.cache_clear()
