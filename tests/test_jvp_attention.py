"""JVP attention (SPEC.md section 6): backends against each other, against finite differences of PyTorch's SDPA,
through forward-mode AD, vmap and backward."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_scm.jvp import attention, available_backends, jvp_attention


def _qkv(dtype, n_q=37, n_k=45, heads=3, d=8, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, n_q, d), (2, heads, n_k, d), (2, heads, n_k, dv)]
    primals = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    tangents = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return primals, tangents


def _masks(n_q, n_k, heads):
    g = torch.Generator().manual_seed(1)
    keep = torch.ones(2, n_k, dtype=torch.bool)
    keep[0, -7:] = False  # padded keys of the first sample
    additive = torch.randn(2, heads, n_q, n_k, generator=g)
    bool_full = torch.rand(2, 1, n_q, n_k, generator=g) > 0.3
    bool_full[..., 0] = True  # every query attends to at least one key
    return {"none": None, "key_padding": keep, "additive": additive, "bool": bool_full}


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "additive", "bool"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_blocked_equals_math(mask_kind, dtype, tol):
    (q, k, v), (dq, dk, dv) = _qkv(dtype)
    mask = _masks(q.shape[-2], k.shape[-2], q.shape[1])[mask_kind]
    out_m, dout_m = jvp_attention(q, k, v, dq, dk, dv, attn_mask=mask, backend="math")
    for block in (8, 16, 45, 512):  # blocks that do and do not divide the key length
        out_b, dout_b = jvp_attention(q, k, v, dq, dk, dv, attn_mask=mask, backend="blocked", block_size=block)
        torch.testing.assert_close(out_b, out_m, rtol=tol, atol=tol)
        torch.testing.assert_close(dout_b, dout_m, rtol=tol, atol=tol)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "additive"])
@pytest.mark.parametrize("backend", ["math", "blocked"])
def test_jvp_matches_finite_differences_of_sdpa(backend, mask_kind):
    (q, k, v), (dq, dk, dv) = _qkv(torch.float64, seed=3)
    mask = _masks(q.shape[-2], k.shape[-2], q.shape[1])[mask_kind]
    sdpa_mask = mask[:, None, None, :] if mask_kind == "key_padding" else mask
    sdpa_mask = sdpa_mask.double() if mask_kind == "additive" else sdpa_mask
    out, dout = jvp_attention(q, k, v, dq, dk, dv, attn_mask=mask, scale=0.3, backend=backend, block_size=16)
    h = 1e-6

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=sdpa_mask, scale=0.3)

    fd = (sdpa(q + h * dq, k + h * dk, v + h * dv) - sdpa(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    assert ((dout - fd).abs().max() / fd.abs().max()).item() < 1e-8


@pytest.mark.parametrize("backend", ["math", "blocked"])
def test_forward_ad_and_func_jvp_through_attention_op(backend):
    (q, k, v), (dq, dk, dv) = _qkv(torch.float64, seed=4)
    ref_out, ref_dout = jvp_attention(q, k, v, dq, dk, dv, backend="math")
    out, dout = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend=backend), (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dout, ref_dout)
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        dual = attention(fwad.make_dual(q, dq), k, fwad.make_dual(v, dv), backend=backend)
        _, tangent = fwad.unpack_dual(dual)
    _, ref_partial = jvp_attention(q, k, v, dq, None, dv, backend="math")
    torch.testing.assert_close(tangent, ref_partial)


def test_vmap_over_attention_and_its_jvp():
    (q, k, v), (dq, dk, dv) = _qkv(torch.float64, seed=5)

    def f(a, b, c):
        return attention(a, b, c, backend="blocked", block_size=16)

    batched = torch.func.vmap(f)(q, k, v)  # vmap over the batch dimension: each call sees (heads, N, d)
    torch.testing.assert_close(batched, torch.stack([f(q[i], k[i], v[i]) for i in range(2)]))
    _, dout = torch.func.vmap(lambda *x: torch.func.jvp(f, x[:3], x[3:]))(q, k, v, dq, dk, dv)
    torch.testing.assert_close(dout, jvp_attention(q, k, v, dq, dk, dv, backend="math")[1])


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "additive"])
def test_gradients_match_pytorch_sdpa(mask_kind):
    (q, k, v), _ = _qkv(torch.float64, seed=6)
    mask = _masks(q.shape[-2], k.shape[-2], q.shape[1])[mask_kind]
    sdpa_mask = mask[:, None, None, :] if mask_kind == "key_padding" else mask
    sdpa_mask = sdpa_mask.double() if mask_kind == "additive" else sdpa_mask
    weights = torch.randn(2, 3, q.shape[-2], v.shape[-1], dtype=torch.float64)
    grads = []
    for fn in (
        lambda a, b, c: attention(a, b, c, attn_mask=mask),
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=sdpa_mask),
    ):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (fn(*leaves) * weights).sum().backward()
        grads.append([x.grad for x in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_backend_errors_and_availability():
    (q, k, v), (dq, dk, dv) = _qkv(torch.float32)
    with pytest.raises(ValueError, match="Unknown JVP attention backend 'flash'"):
        jvp_attention(q, k, v, dq, dk, dv, backend="flash")
    with pytest.raises(RuntimeError, match="jvp-flash-attention"):
        jvp_attention(q, k, v, dq, dk, dv, backend="triton")  # CPU tensors
    assert available_backends("cpu") == ["math", "blocked"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree():
    (q, k, v), (dq, dk, dv) = _qkv(torch.float32, n_q=256, n_k=256, heads=4, d=64, dv=64)
    args = [x.cuda() for x in (q, k, v, dq, dk, dv)]
    out_m, dout_m = jvp_attention(*args, backend="math")
    for backend in available_backends("cuda")[1:]:
        out, dout = jvp_attention(*args, backend=backend)
        torch.testing.assert_close(out, out_m, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(dout, dout_m, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["math", "blocked"])
@pytest.mark.parametrize(
    "case",
    ["plain", "bool_mask", "additive_mask", "key_padding", "causal", "gqa", "scale", "causal_gqa"],
)
def test_sdpa_calls_inside_jvp_mode_match_float64_finite_differences(case, backend):
    """`F.scaled_dot_product_attention` as any processor calls it, intercepted by `jvp_mode`: every argument of
    SDPA (masks, is_causal, enable_gqa, scale) against central differences of PyTorch's own SDPA."""
    import torch.nn.functional as F

    from diffusers_scm.jvp import jvp_mode

    g = torch.Generator().manual_seed(4)
    kv_heads = 1 if "gqa" in case else 2
    q = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, 7, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, 7, 8, generator=g, dtype=torch.float64)
    kwargs = {}
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(2, 1, 7, 7, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True  # no fully masked row
    elif case == "additive_mask":
        kwargs["attn_mask"] = torch.randn(2, 2, 7, 7, generator=g, dtype=torch.float64)
    elif case == "key_padding":
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        mask[0, ..., 5:] = False
        kwargs["attn_mask"] = mask
    if "causal" in case:
        kwargs["is_causal"] = True
    if "gqa" in case:
        kwargs["enable_gqa"] = True
    if case == "scale":
        kwargs["scale"] = 0.21
    tangents = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v)]

    def f(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, **kwargs)

    with jvp_mode(backend=backend, block_size=3), torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(x, dx) for x, dx in zip((q, k, v), tangents)]
        out, tangent = torch.autograd.forward_ad.unpack_dual(f(*duals))
    h = 1e-6
    fd = (
        f(*[x + h * dx for x, dx in zip((q, k, v), tangents)]) - f(*[x - h * dx for x, dx in zip((q, k, v), tangents)])
    ) / (2 * h)
    torch.testing.assert_close(out, f(q, k, v), rtol=1e-12, atol=1e-12)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-7


def test_attention_dropout_inside_a_jvp_pass_is_a_clear_error():
    import torch.nn.functional as F

    from diffusers_scm.jvp import jvp_mode

    q = torch.randn(1, 1, 4, 8)
    with jvp_mode(), pytest.raises(ValueError, match="Attention dropout.*dropout_p=0.1"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: F.layer_norm(x, (8,), torch.linspace(0.5, 2, 8, dtype=x.dtype), torch.ones(8, dtype=x.dtype)),
        lambda x: F.layer_norm(x, (5, 8), eps=1e-6),
        lambda x: F.group_norm(x.reshape(2, 4, 5, 2), 2, torch.linspace(0.5, 2, 4, dtype=x.dtype)),
        lambda x: F.rms_norm(x, (8,), torch.linspace(0.5, 2, 8, dtype=x.dtype), eps=1e-6),
        lambda x: F.rms_norm(x, (5, 8)),
        lambda x: F.silu(x),
        lambda x: F.gelu(x),
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: F.linear(x, torch.linspace(-1, 1, 24, dtype=x.dtype).reshape(3, 8), torch.ones(3, dtype=x.dtype)),
    ],
)
def test_direct_forward_mode_rules_equal_pytorchs(op):
    """`jvp_mode`'s direct rules for linear, layer/group norm, SiLU and GELU (used in JVP passes without gradients)
    give PyTorch's own forward-mode derivative."""
    from diffusers_scm.jvp import jvp_mode

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fwad = torch.autograd.forward_ad

    def tangent(mode):
        with torch.no_grad(), fwad.dual_level():
            if mode:
                with jvp_mode():
                    return fwad.unpack_dual(op(fwad.make_dual(x, dx)))
            return fwad.unpack_dual(op(fwad.make_dual(x, dx)))

    ours, theirs = tangent(True), tangent(False)
    torch.testing.assert_close(ours.primal, theirs.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.tangent, theirs.tangent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["math", "blocked"])
def test_fully_masked_query_rows_give_zeros_and_leave_the_others_alone(backend):
    """A query row whose every key is masked: output and tangent 0 (as PyTorch's SDPA gives, not 0 / 0); the other
    rows equal attention of those queries alone."""
    (q, k, v), (dq, dk, dv) = _qkv(torch.float64)
    mask = torch.rand(2, 1, q.shape[-2], k.shape[-2], generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True
    mask[1, :, 5] = False  # query 5 of the second sample attends to nothing
    out, dout = jvp_attention(q, k, v, dq, dk, dv, attn_mask=mask, backend=backend, block_size=16)
    assert out[1, :, 5].abs().max() == 0 and dout[1, :, 5].abs().max() == 0
    keep = torch.arange(q.shape[-2]) != 5
    ref, dref = jvp_attention(
        q[1:, :, keep], k[1:], v[1:], dq[1:, :, keep], dk[1:], dv[1:], attn_mask=mask[1:, :, keep], backend="math"
    )
    torch.testing.assert_close(out[1:, :, keep], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dout[1:, :, keep], dref, rtol=1e-12, atol=1e-12)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, torch.nan_to_num(sdpa), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["math", "blocked"])
@pytest.mark.parametrize("missing", ["q", "k", "v", "kv", "qk", "qkv"])
def test_missing_tangents_equal_zero_tangents(backend, missing):
    """Cross-attention to a fixed text: keys and values carry no tangent (None), and the kernels skip their terms;
    the result equals the one with zero tangents, and the output the one of PyTorch's SDPA."""
    (q, k, v), tangents = _qkv(torch.float64)
    mask = _masks(q.shape[-2], k.shape[-2], q.shape[1])["key_padding"]
    given = [None if name in missing else t for name, t in zip("qkv", tangents)]
    zeros = [torch.zeros_like(t) if name in missing else t for name, t in zip("qkv", tangents)]
    out, dout = jvp_attention(q, k, v, *given, attn_mask=mask, backend=backend, block_size=16)
    ref_out, ref_dout = jvp_attention(q, k, v, *zeros, attn_mask=mask, backend="math")
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dout, ref_dout, rtol=1e-12, atol=1e-12)
    if missing == "qkv":
        assert dout.abs().max() == 0
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, sdpa, rtol=1e-10, atol=1e-10)
