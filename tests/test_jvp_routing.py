"""Routing of "auto" JVP attention (SPEC.md section 6): `triton_fits` names the first property of a call that the
`jvp-flash-attention` kernel does not take, and `route` sends to "triton" only the calls that fit, everything else to
"blocked". On CPU: the kernel is reported available and replaced by a stand-in that checks the kernel's preconditions,
records the call and computes with the "blocked" backend, so no Triton code ever runs here."""

import collections
import importlib
import re
import sys
import types

import pytest
import torch
from families import FAMILIES, B, _padding, _text, tiny_chroma, tiny_flux, tiny_pixart, tiny_sana, tiny_sd3, tiny_wan

from diffusers_scm.jvp import jvp, jvp_attention


attention_module = importlib.import_module("diffusers_scm.jvp.attention")

KEY_PADDING = "(the kernel takes full (batch, heads, N, N) masks only)"


class _StandInKernel:
    """`jvp_flash_attention.jvp_attention.JVPAttn` (0.14) as this package calls it: `forward(q, k, v, q_t, k_t, v_t,
    attn_mask, dropout_p, causal, sm_scale)` returning `(o, (o_t, ...))`. It asserts what the real kernel needs (its
    own checks, the 32 x 32 tiles its forward reads, the contiguous layout of its TMA path, plain tensors), records the
    call, and computes the output and tangent with the "blocked" backend."""

    def __init__(self):
        self.calls, self.routes = [], []

    def forward(self, q, k, v, q_t, k_t, v_t, attn_mask=None, dropout_p=0.0, causal=False, sm_scale=None, **_):
        z, h, n, d = q.shape
        tensors = (q, k, v, q_t, k_t, v_t)
        assert all(x.shape == q.shape and x.dtype == q.dtype and x.is_contiguous() for x in tensors)
        assert not any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in tensors)
        assert q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert n % 32 == 0 and d in (32, 64, 128, 256)
        assert dropout_p == 0.0 and not causal and sm_scale is not None
        assert attn_mask is None or (attn_mask.shape == (z, h, n, n) and attn_mask.dtype == torch.bool)
        assert not torch.is_grad_enabled()
        self.calls.append({"shape": (z, h, n, d), "mask": attn_mask is not None, "sm_scale": sm_scale})
        out, tangent = jvp_attention(q, k, v, q_t, k_t, v_t, attn_mask, scale=sm_scale, backend="blocked")
        return out, (tangent, None)


@pytest.fixture
def kernel(monkeypatch):
    """The Triton kernel reported available (CUDA device check included) and replaced by the stand-in; every "auto"
    routing decision recorded as (Nq, Nk, head dim, backend, reason)."""
    stand_in = _StandInKernel()
    package = types.ModuleType("jvp_flash_attention")
    package.jvp_attention = types.ModuleType("jvp_flash_attention.jvp_attention")
    package.jvp_attention.JVPAttn = stand_in
    monkeypatch.setitem(sys.modules, "jvp_flash_attention", package)
    monkeypatch.setitem(sys.modules, "jvp_flash_attention.jvp_attention", package.jvp_attention)
    monkeypatch.setattr(attention_module, "_triton_available", lambda device: True)
    route = attention_module.route

    def recording_route(q, k, v, attn_mask=None, backend="auto", dropout_p=0.0):
        decision = route(q, k, v, attn_mask, backend, dropout_p)
        if backend == "auto":
            stand_in.routes.append((q.shape[-2], k.shape[-2], q.shape[-1], *decision))
        return decision

    monkeypatch.setattr(attention_module, "route", recording_route)
    return stand_in


def _qkv(n_q=64, n_k=None, d=32, dv=None, heads=2, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n_k = n_q if n_k is None else n_k
    shapes = [(B, heads, n_q, d), (B, heads, n_k, d), (B, heads, n_k, dv or d)]
    if device == "meta":
        return [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _misfit(**kwargs):
    mask, dropout_p = kwargs.pop("mask", None), kwargs.pop("dropout_p", 0.0)
    return attention_module.triton_fits(*_qkv(**kwargs), mask, dropout_p)


# ---- the kernel's limits, one property at a time -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, None),
        ({"n_q": 256, "d": 128, "dtype": torch.bfloat16}, None),
        ({"n_q": 32, "d": 256, "dtype": torch.float16}, None),
        ({"n_q": 16, "n_k": 77}, "query length 16 != key length 77 (cross-attention)"),
        ({"n_q": 16}, "sequence length 16 < 32"),
        ({"n_q": 48}, "sequence length 48 not a multiple of 32 (the kernel's block length)"),
        ({"n_q": 69}, "sequence length 69 not a multiple of 32 (the kernel's block length)"),
        ({"d": 40}, "head dim 40 not in (32, 64, 128, 256)"),
        ({"d": 16}, "head dim 16 not in (32, 64, 128, 256)"),
        ({"d": 32, "dv": 64}, "head dims differ (q 32, k 32, v 64)"),
        ({"dtype": torch.float64}, "dtype float64 (the kernel takes float16, bfloat16, float32)"),
        ({"dropout_p": 0.1}, "dropout_p=0.1 (the kernel has no dropout)"),
        ({"mask": torch.ones(B, 2, 64, 64, dtype=torch.bool)}, None),
        ({"mask": torch.ones(B, 64, dtype=torch.bool)}, f"key-padding mask of shape (2, 64) {KEY_PADDING}"),
        (
            {"mask": torch.ones(B, 1, 1, 64, dtype=torch.bool)},
            "broadcast mask of shape (2, 1, 1, 64) (the kernel takes full (2, 2, 64, 64) masks only)",
        ),
        (
            {"mask": torch.ones(B, 1, 64, 64, dtype=torch.bool)},
            "broadcast mask of shape (2, 1, 64, 64) (the kernel takes full (2, 2, 64, 64) masks only)",
        ),
        (
            {"mask": torch.ones(B, 1, 64, 64, dtype=torch.bool).expand(B, 2, 64, 64)},
            "expanded (stride-0) mask of shape (2, 2, 64, 64) (the kernel would copy it to full size)",
        ),
        (
            {"mask": torch.zeros(B, 2, 64, 64)},
            "additive float32 mask (the kernel adds a float mask before the softmax scale and rejects -inf; pass a "
            "boolean mask)",
        ),
    ],
)
def test_triton_fits_names_the_first_property_the_kernel_does_not_take(kwargs, expected):
    assert _misfit(**kwargs) == expected


def test_triton_fits_other_inputs():
    q, k, v = _qkv()
    assert attention_module.triton_fits(q[0], k[0], v[0]) == (
        "q, k, v of 3, 3, 3 dims (the kernel takes (batch, heads, N, head_dim))"
    )
    assert attention_module.triton_fits(q, k.double(), v) == "dtypes differ (q float32, k float64, v float32)"
    assert attention_module.triton_fits(q, k[:, :1], v[:, :1]) == (
        "batch or heads differ (q (2, 2, 64, 32), k (2, 1, 64, 32), v (2, 1, 64, 32))"
    )
    q.requires_grad_()
    with torch.no_grad():
        assert attention_module.triton_fits(q, k, v) is None  # the sCM JVP: no graph recorded
    assert attention_module.triton_fits(q, k, v) == (
        "inputs that require grad, with grad mode on (the kernel's tangent has no backward)"
    )
    seen = []
    torch.func.vmap(lambda a: seen.append(attention_module.triton_fits(a, a, a)) or a)(torch.randn(3, *k.shape))
    assert seen == ["inputs wrapped by a torch.func transform (the kernel takes plain tensors: use forward-mode AD)"]


def test_route_without_the_kernel_and_for_explicit_backends():
    q, k, v = _qkv()
    assert attention_module.available_backends("cpu") == ["math", "blocked"]
    assert attention_module.route(q, k, v) == ("blocked", "device cpu (the Triton kernel runs on CUDA only)")
    assert attention_module.route(q, k, v, backend="math") == ("math", "requested")
    assert attention_module.route(q, k, v, backend="blocked") == ("blocked", "requested")
    assert attention_module.resolve_backend("auto", q) == "blocked"
    with pytest.raises(RuntimeError, match="needs a CUDA device.*here device cpu"):
        attention_module.route(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="Unknown JVP attention backend 'flash'"):
        attention_module.route(q, k, v, backend="flash")
    assert "not installed" in attention_module._unavailable("cuda")


def test_route_with_the_kernel_available(kernel):
    q, k, v = _qkv()
    assert attention_module.route(q, k, v) == ("triton", "fits the kernel")
    assert attention_module.resolve_backend("auto", q) == "triton"
    assert attention_module.available_backends("cpu") == ["math", "blocked", "triton"]
    cross = _qkv(n_q=16, n_k=77)
    assert attention_module.route(*cross) == ("blocked", "query length 16 != key length 77 (cross-attention)")
    padding = torch.ones(B, 64, dtype=torch.bool)
    assert attention_module.route(q, k, v, padding) == ("blocked", f"key-padding mask of shape (2, 64) {KEY_PADDING}")


@pytest.mark.parametrize(
    "kwargs,property",
    [
        ({"n_q": 16, "n_k": 77}, "query length 16 != key length 77 (cross-attention)"),
        ({"n_q": 48}, "sequence length 48 not a multiple of 32 (the kernel's block length)"),
        ({"d": 40}, "head dim 40 not in (32, 64, 128, 256)"),
        ({"dtype": torch.float64}, "dtype float64 (the kernel takes float16, bfloat16, float32)"),
    ],
)
def test_explicit_triton_on_a_call_that_does_not_fit_raises_naming_the_property(kernel, kwargs, property):
    q, k, v = _qkv(**kwargs)
    message = f"The 'triton' JVP attention backend cannot take this call: {property}. Use backend='auto'"
    with pytest.raises(ValueError, match=re.escape(message)):
        jvp_attention(q, k, v, q, k, v, backend="triton")
    with pytest.raises(ValueError, match=re.escape(property)):
        attention_module.route(q, k, v, backend="triton")
    assert kernel.calls == []


def test_kernel_call_takes_the_scale_mask_and_missing_tangents(kernel):
    """What reaches the kernel: contiguous q, k, v (a transposed view here), zeros for a missing tangent, the full
    boolean mask, and a non-default softmax scale as `sm_scale`; the result equals the "math" backend's."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 64, 2, 32, generator=g).transpose(1, 2)  # (batch, heads, N, d), not contiguous
    k, v, dq, dv = (torch.randn(B, 2, 64, 32, generator=g) for _ in range(4))
    mask = torch.rand(B, 2, 64, 64, generator=g) > 0.3
    mask[..., 0] = True
    out, dout = jvp_attention(q, k, v, dq, None, dv, attn_mask=mask, scale=0.3)
    ref_out, ref_dout = jvp_attention(q, k, v, dq, None, dv, attn_mask=mask, scale=0.3, backend="math")
    assert kernel.calls == [{"shape": (B, 2, 64, 32), "mask": True, "sm_scale": 0.3}]
    assert kernel.routes == [(64, 64, 32, "triton", "fits the kernel")]
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dout, ref_dout, rtol=1e-5, atol=1e-5)
    jvp_attention(q, k, v, dq, None, dv, attn_mask=mask, backend="triton")
    assert kernel.calls[-1]["sm_scale"] == pytest.approx(32**-0.5, rel=1e-15)  # the default scale, said explicitly


def test_attention_op_routes_each_call_once(kernel):
    """The op inside networks: a forward-mode pass without gradients and one with grad mode on go to the kernel once
    each; one that records gradients through the tangent, or runs under `torch.func.jvp`, goes to "blocked". The
    tangents equal the "math" backend's every time."""
    fwad = torch.autograd.forward_ad
    (q, k, v), (dq, dk, dv) = _qkv(), _qkv(seed=1)
    _, ref = jvp_attention(q, k, v, dq, dk, dv, backend="math")

    def tangent(*primals):
        with fwad.dual_level():
            out = attention_module.attention(*(fwad.make_dual(x, dx) for x, dx in zip(primals, (dq, dk, dv))))
            return fwad.unpack_dual(out).tangent

    with torch.no_grad():
        torch.testing.assert_close(tangent(q, k, v), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent(q, k, v), ref, rtol=1e-5, atol=1e-5)
    assert len(kernel.calls) == 2
    differentiated = tangent(q.clone().requires_grad_(), k, v)
    assert differentiated.grad_fn is not None
    torch.testing.assert_close(differentiated, ref, rtol=1e-5, atol=1e-5)
    _, func_tangent = torch.func.jvp(attention_module.attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(func_tangent, ref, rtol=1e-5, atol=1e-5)
    assert len(kernel.calls) == 2
    assert [r[3:] for r in kernel.routes] == [
        ("triton", "fits the kernel"),
        ("triton", "fits the kernel"),
        ("blocked", "inputs that require grad, with grad mode on (the kernel's tangent has no backward)"),
        ("blocked", "inputs wrapped by a torch.func transform (the kernel takes plain tensors: use forward-mode AD)"),
    ]


# ---- which calls of real networks go where -------------------------------------------------------------------------
# The families' networks (tests/families.py) with one or two heads of 32 channels and latents of 32 or more tokens
# per attention, so that some calls fit the kernel: the calls, conditioning and masks are the families' own.
def _sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # attention at 8 x 8 = 64 tokens and mid 4 x 4
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=1,  # the number of heads, in UNet2DConditionModel's config: one head of 32 channels
        norm_num_groups=4,
    ).eval()


def _sd3():
    return tiny_sd3(attention_head_dim=32, num_attention_heads=1)


def _flux():
    return tiny_flux(attention_head_dim=32, num_attention_heads=1, axes_dims_rope=[8, 8, 16])


def _chroma():
    return tiny_chroma(attention_head_dim=32, axes_dims_rope=[8, 8, 16])


def _pixart():
    return tiny_pixart(sample_size=16, attention_head_dim=32, num_attention_heads=1, cross_attention_dim=32)


def _wan():
    return tiny_wan(num_attention_heads=1, attention_head_dim=32)


CROSS = "query length {} != key length {} (cross-attention)"
LENGTH = "sequence length {} not a multiple of 32 (the kernel's block length)"
BROADCAST = "broadcast mask of shape {} (the kernel takes full {} masks only)"
FITS = ("triton", "fits the kernel")


def _blocked(reason, *args):
    return ("blocked", reason.format(*args))


# family: (network, latent shape, text tokens (None: the family's 5), {(Nq, Nk, head dim, backend, reason): calls})
NETWORKS = {
    "sd15_unet": (
        _sd15_unet,
        (B, 2, 8, 8),
        None,
        {
            (64, 64, 32, *FITS): 3,  # self-attention at 8 x 8, down and up
            (64, 5, 32, *_blocked(CROSS, 64, 5)): 3,  # cross-attention to the text, with its padding mask
            (16, 16, 32, *_blocked("sequence length 16 < 32")): 1,  # mid block at 4 x 4
            (16, 5, 32, *_blocked(CROSS, 16, 5)): 1,
        },
    ),
    "sd3": (  # joint attention over 64 image + 5 text tokens
        _sd3,
        (B, 4, 8, 8),
        None,
        {(69, 69, 32, *_blocked(LENGTH, 69)): 1},
    ),
    "sd3_text32": (_sd3, (B, 4, 8, 8), 32, {(96, 96, 32, *FITS): 1}),
    "flux": (  # a double-stream and a single-stream block, joint attention over 64 + 5 tokens
        _flux,
        (B, 4, 16, 16),
        None,
        {(69, 69, 32, *_blocked(LENGTH, 69)): 2},
    ),
    "flux_text32": (_flux, (B, 4, 16, 16), 32, {(96, 96, 32, *FITS): 2}),
    "chroma_text32": (  # joint attention with the text padding mask as (batch, 1, N, N): broadcast over the heads
        _chroma,
        (B, 4, 16, 16),
        32,
        {(96, 96, 32, *_blocked(BROADCAST, (2, 1, 96, 96), (2, 2, 96, 96))): 2},
    ),
    "sana": (  # the family's own tiny network: linear self-attention (no SDPA), cross-attention with padding
        tiny_sana,
        (B, 4, 8, 8),
        None,
        {(64, 5, 4, *_blocked(CROSS, 64, 5)): 1},
    ),
    "pixart": (
        _pixart,
        (B, 4, 16, 16),
        None,
        {(64, 64, 32, *FITS): 1, (64, 5, 32, *_blocked(CROSS, 64, 5)): 1},
    ),
    "wan": (  # 2 frames x 4 x 4 patches = 32 tokens
        _wan,
        (B, 4, 2, 8, 8),
        None,
        {(32, 32, 32, *FITS): 1, (32, 5, 32, *_blocked(CROSS, 32, 5)): 1},
    ),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_which_calls_of_each_family_go_to_the_kernel(kernel, name):
    """One JVP pass of each family's network, as its pipeline calls it, with "auto" attention and the kernel
    available: the routing of every attention call, and the JVP equal to the one with the "math" backend."""
    make, shape, text_tokens, expected = NETWORKS[name]
    family = FAMILIES[name.split("_text")[0]]
    g = torch.Generator().manual_seed(0)
    cond = family.conditioning(g, torch.float32)
    if text_tokens is not None:
        cond["encoder_hidden_states"] = _text(g, torch.float32, text_tokens, cond["encoder_hidden_states"].shape[-1])
        if "encoder_attention_mask" in cond:
            cond["encoder_attention_mask"] = _padding(text_tokens, cond["encoder_attention_mask"].dtype == torch.bool)
    net = make()
    x, dx = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    timestep = torch.tensor([500.0])

    def f(latent):
        return family.pipeline_call(net, latent, timestep, cond)

    out, tangent = jvp(f, (x,), (dx,), module=net)
    assert collections.Counter(kernel.routes) == expected
    assert len(kernel.calls) == sum(n for route, n in expected.items() if route[3] == "triton")
    kernel.routes.clear()
    ref_out, ref_tangent = jvp(f, (x,), (dx,), module=net, backend="math")
    assert kernel.routes == []  # an explicit backend is not routed
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-5, atol=1e-5)


# ---- the same rule at the published sizes (shapes only: meta tensors) ----------------------------------------------
@pytest.mark.parametrize(
    "call,q,k,mask,expected",
    [
        # SD 1.5 at 512 px: 8 heads of 40, 80, 160 channels; 77 CLIP tokens
        ("sd15 self 64x64", (8, 4096, 40), None, None, "head dim 40 not in (32, 64, 128, 256)"),
        ("sd15 cross", (8, 4096, 40), (8, 77, 40), (1, 1, 77), "query length 4096 != key length 77 (cross-attention)"),
        # SDXL at 1024 px: heads of 64 channels at 64 x 64 and 32 x 32
        ("sdxl self 64x64", (10, 4096, 64), None, None, None),
        ("sdxl self 32x32", (20, 1024, 64), None, None, None),
        # SD3 at 1024 px: 4096 image + 77 CLIP + 256 T5 tokens, heads of 64
        (
            "sd3 joint",
            (24, 4429, 64),
            None,
            None,
            LENGTH.format(4429),
        ),
        # Flux at 1024 px: 4096 image + 512 T5 tokens, heads of 128
        ("flux joint", (24, 4608, 128), None, None, None),
        # Chroma at 1024 px: Flux's attention with the text padding mask as (batch, 1, N, N)
        (
            "chroma joint",
            (24, 4608, 128),
            None,
            (1, 4608, 4608),
            BROADCAST.format((2, 1, 4608, 4608), (2, 24, 4608, 4608)),
        ),
        # PixArt-Sigma at 1024 px: 16 heads of 72; 300 T5 tokens with padding
        ("pixart self", (16, 4096, 72), None, None, "head dim 72 not in (32, 64, 128, 256)"),
        (
            "pixart cross",
            (16, 4096, 72),
            (16, 300, 72),
            (1, 1, 300),
            "query length 4096 != key length 300 (cross-attention)",
        ),
        # Sana 1600M at 1024 px: linear self-attention (no SDPA); cross-attention to 300 Gemma tokens
        (
            "sana cross",
            (20, 1024, 112),
            (20, 300, 112),
            (1, 1, 300),
            "query length 1024 != key length 300 (cross-attention)",
        ),
        # Wan 2.1 at 480 x 832, 81 frames: 21 x 30 x 52 tokens, heads of 128; 512 umT5 tokens
        (
            "wan self",
            (12, 32760, 128),
            None,
            None,
            LENGTH.format(32760),
        ),
        (
            "wan cross",
            (12, 32760, 128),
            (12, 512, 128),
            None,
            "query length 32760 != key length 512 (cross-attention)",
        ),
    ],
)
def test_routing_at_published_sizes(call, q, k, mask, expected):
    q = torch.empty(B, *q, device="meta")
    k = q if k is None else torch.empty(B, *k, device="meta")
    mask = None if mask is None else torch.empty(B, *mask, dtype=torch.bool, device="meta")
    assert attention_module.triton_fits(q, k, k, mask) == expected, call
