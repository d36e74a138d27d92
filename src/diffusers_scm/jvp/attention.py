"""Attention with a forward-mode derivative (SPEC.md section 6).

With S = Q K^T * scale (+ mask bias), P = softmax(S), O = P V and tangents dQ, dK, dV:

    dS = (dQ K^T + Q dK^T) * scale
    dO = P dV + (P * dS) V - rowsum(P * dS) * O

Backends of `jvp_attention`:
    "math"     materializes the attention matrix: memory O(N^2) (reference, small sizes);
    "blocked"  the online-softmax form over key blocks in plain PyTorch: memory O(N x block), CPU and GPU;
    "triton"   the `jvp-flash-attention` Triton kernel on CUDA (optional extra `flash`), for the calls it takes;
    "auto"     "triton" for the calls that fit the kernel (`triton_fits`) where it is available, else "blocked"
               (`route` decides, and says why).

`attention` is the op for use inside networks: an `autograd.Function` whose primal pass is PyTorch's fused SDPA,
whose forward-mode rule is `jvp_attention`, and whose backward recomputes through SDPA. `torch.func.jvp`,
`torch.autograd.forward_ad`, `torch.func.vmap` and ordinary backward all work through it.

Shapes: q (batch, heads, Nq, d), k (batch, heads, Nk, d), v (batch, heads, Nk, dv) (or any leading dims).
Masks: a boolean mask (True = attend) or an additive float bias, broadcastable to (batch, heads, Nq, Nk); a 2-D mask
of shape (batch, Nk) is taken as a key-padding mask.
"""

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F


__all__ = ["attention", "jvp_attention", "available_backends", "resolve_backend", "route", "triton_fits", "BACKENDS"]

BACKENDS = ("auto", "math", "blocked", "triton")
DEFAULT_BLOCK_SIZE = 512

# What the `jvp-flash-attention` kernel (version 0.14) takes, read from its source. Its own checks admit any even
# length >= 32 and head dims {16, ..., 256}, but its forward runs with 32 x 32 tiles (`MIN_SEQUENCE_LENGTH`) loaded
# without bounds checks, so a length that is not a multiple of 32 reads keys (and writes outputs) past the end of a
# head, and `tl.static_assert(BLOCK_N <= HEAD_DIM)` fails to compile for head dim 16.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (32, 64, 128, 256)
TRITON_BLOCK = 32


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("jvp_flash_attention") is not None


def _triton_available(device) -> bool:
    return torch.device(device).type == "cuda" and _triton_installed()


def available_backends(device="cpu") -> list[str]:
    """The concrete backends that can run on `device`."""
    return ["math", "blocked"] + (["triton"] if _triton_available(device) else [])


def _transformed(*tensors) -> bool:
    """Whether any tensor is wrapped by a `torch.func` transform (vmap, jvp, grad): the kernel reads plain memory."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(isinstance(x, torch.Tensor) and wrapped(x) for x in tensors)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def triton_fits(q, k, v, attn_mask=None, dropout_p: float = 0.0) -> str | None:
    """The first property of an attention call that the `jvp-flash-attention` kernel does not take, in words, or
    None when the call fits (SPEC.md section 6). Reads shapes, dtypes and strides only (no data, no device).

    The kernel takes plain tensors q, k, v of one shape (batch, heads, N, d) and dtype float16/bfloat16/float32, N a
    multiple of 32, d in {32, 64, 128, 256}, no dropout, and a mask only as a full boolean (batch, heads, N, N) tensor:
    a key-padding or broadcast mask does not fit, since expanding it to N x N per head would cost the memory the
    kernel saves. Its tangent has no backward, so a pass that records gradients through it does not fit either. Any
    softmax scale fits (it is passed to the kernel as `sm_scale`).

    Args:
        q, k, v (`torch.Tensor`): queries (..., Nq, d), keys (..., Nk, d), values (..., Nk, dv).
        attn_mask (`torch.Tensor`, *optional*): the mask as `jvp_attention` takes it.
        dropout_p (`float`, defaults to 0.0): attention dropout probability.
    """
    if _transformed(q, k, v, attn_mask):
        return "inputs wrapped by a torch.func transform (the kernel takes plain tensors: use forward-mode AD)"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return "inputs that require grad, with grad mode on (the kernel's tangent has no backward)"
    if dropout_p:
        return f"dropout_p={dropout_p} (the kernel has no dropout)"
    if not q.ndim == k.ndim == v.ndim == 4:
        return f"q, k, v of {q.ndim}, {k.ndim}, {v.ndim} dims (the kernel takes (batch, heads, N, head_dim))"
    if not q.dtype == k.dtype == v.dtype:
        return f"dtypes differ (q {_dtype_name(q.dtype)}, k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)})"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {_dtype_name(q.dtype)} (the kernel takes float16, bfloat16, float32)"
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q != n_k:
        return f"query length {n_q} != key length {n_k} (cross-attention)"
    if not q.shape[:2] == k.shape[:2] == v.shape[:2]:
        return f"batch or heads differ (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    if n_q < TRITON_BLOCK:
        return f"sequence length {n_q} < {TRITON_BLOCK}"
    if n_q % TRITON_BLOCK:
        return f"sequence length {n_q} not a multiple of {TRITON_BLOCK} (the kernel's block length)"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        return f"head dims differ (q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]})"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {TRITON_HEAD_DIMS}"
    if attn_mask is not None:
        shape, full = tuple(attn_mask.shape), (*q.shape[:2], n_q, n_k)
        if attn_mask.ndim == 2 and shape == (k.shape[0], n_k):
            return f"key-padding mask of shape {shape} (the kernel takes full (batch, heads, N, N) masks only)"
        if shape != full:
            return f"broadcast mask of shape {shape} (the kernel takes full {full} masks only)"
        if any(stride == 0 and size > 1 for stride, size in zip(attn_mask.stride(), shape)):
            return f"expanded (stride-0) mask of shape {shape} (the kernel would copy it to full size)"
        if attn_mask.dtype != torch.bool:
            return (
                f"additive {_dtype_name(attn_mask.dtype)} mask (the kernel adds a float mask before the softmax "
                "scale and rejects -inf; pass a boolean mask)"
            )
    return None


def _unavailable(device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device.type} (the Triton kernel runs on CUDA only)"
    return "the `jvp-flash-attention` package is not installed (`pip install diffusers-scm[flash]`)"


def route(q, k, v, attn_mask=None, backend: str = "auto", dropout_p: float = 0.0) -> tuple[str, str]:
    """The concrete backend for one attention call and the reason: `(backend, reason)`.

    "math" and "blocked" are kept as requested. "auto" is "triton" where the kernel is available (CUDA, package
    installed) and the call fits it (`triton_fits`), else "blocked", with the first property that decided. An
    explicit "triton" raises a `RuntimeError` where the kernel is not available and a `ValueError` naming the property
    where the call does not fit.

    Args:
        q, k, v (`torch.Tensor`): queries (..., Nq, d), keys (..., Nk, d), values (..., Nk, dv).
        attn_mask (`torch.Tensor`, *optional*): the mask as `jvp_attention` takes it.
        backend (`str`, defaults to "auto"): "math", "blocked", "triton" or "auto".
        dropout_p (`float`, defaults to 0.0): attention dropout probability.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown JVP attention backend {backend!r}: choose one of {BACKENDS}.")
    if backend in ("math", "blocked"):
        return backend, "requested"
    if not _triton_available(q.device):
        if backend == "triton":
            raise RuntimeError(
                "The 'triton' JVP attention backend needs a CUDA device and the `jvp-flash-attention` package: "
                f"here {_unavailable(q.device)}. `pip install diffusers-scm[flash]`, or use backend='blocked'."
            )
        return "blocked", _unavailable(q.device)
    misfit = triton_fits(q, k, v, attn_mask, dropout_p)
    if misfit is None:
        return "triton", "fits the kernel"
    if backend == "triton":
        raise ValueError(
            f"The 'triton' JVP attention backend cannot take this call: {misfit}. Use backend='auto', which sends "
            "such calls to 'blocked', or backend='blocked'."
        )
    return "blocked", misfit


def resolve_backend(backend: str, q: torch.Tensor, k=None, v=None, attn_mask=None) -> str:
    """The concrete backend `route` picks (keys and values default to the queries: self-attention)."""
    k = q if k is None else k
    return route(q, k, k if v is None else v, attn_mask, backend)[0]


def _mask_to_bias(attn_mask, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype):
    """A broadcastable additive bias (0 / -inf for boolean masks), or None."""
    if attn_mask is None:
        return None
    if attn_mask.ndim == 2 and q.ndim == 4 and attn_mask.shape == (k.shape[0], k.shape[-2]):
        attn_mask = attn_mask[:, None, None, :]  # key-padding mask (batch, Nk)
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _scaled_queries(q, dq, dk, scale):
    """(Q scale, dQ scale, [dQ scale, Q scale]): the scale applied to the (N, d) queries, not to the (N, N) scores.
    A missing tangent stays None (keys and values of cross-attention to a fixed text carry none); the concatenation
    for `_scores`' one-matmul dS is formed only when the keys' tangent `dk` is there too."""
    q = q * scale
    dq = None if dq is None else dq * scale
    return q, dq, None if dq is None or dk is None else torch.cat([dq, q], dim=-1)


def _scores(queries, k, dk):
    """S = Q K^T scale and dS = (dQ K^T + Q dK^T) scale (`_scaled_queries`), dS as one matmul [dQ, Q] [K, dK]^T when
    both tangents are there, one matmul of width d when one is, None when neither is."""
    q, dq, q_cat = queries
    s = q @ k.transpose(-1, -2)
    if dk is None:
        return s, None if dq is None else dq @ k.transpose(-1, -2)
    if dq is None:
        return s, q @ dk.transpose(-1, -2)
    return s, q_cat @ torch.cat([k, dk], dim=-1).transpose(-1, -2)


def _math(q, k, v, dq, dk, dv, bias, scale, out=None):
    # SPEC.md section 6, materialized: S, P and dS are (..., Nq, Nk). `out`: the attention output when already known
    # (the forward's), else P V. Missing tangents (None) are zero.
    s, ds = _scores(_scaled_queries(q, dq, dk, scale), k, dk)
    if bias is not None:
        s = s + bias
    p = torch.softmax(s, dim=-1)
    if bias is not None:  # rows with every key masked: zeros, as PyTorch's SDPA returns (not 0 / 0)
        dead = torch.isneginf(bias).all(dim=-1, keepdim=True)  # from the (often broadcast) mask, not the N x N scores
        if dead.any():
            p = p.masked_fill(dead, 0.0)
    out = p @ v if out is None else out
    dout = None if dv is None else p @ dv
    if ds is not None:
        pds = ds.mul_(p)
        term = (pds @ v).sub_(pds.sum(-1, keepdim=True) * out)
        dout = term if dout is None else dout.add_(term)
    return out, torch.zeros_like(out) if dout is None else dout


def _blocked(q, k, v, dq, dk, dv, bias, scale, block_size):
    # SPEC.md section 6, online softmax over key blocks j: running max m, normalizer l, accumulators
    # A = sum_j exp(S_j - m) V_j,  B = sum_j exp(S_j - m) (dS_j V_j + dV_j),  C = sum_j exp(S_j - m) dS_j.
    n_k = k.shape[-2]
    if n_k <= block_size:  # a single key block: the online recurrence reduces to the materialized form
        return _math(q, k, v, dq, dk, dv, bias, scale)
    lead = q.shape[:-1]
    m = torch.full((*lead, 1), float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros((*lead, 1), dtype=q.dtype, device=q.device)
    acc_a = torch.zeros((*lead, v.shape[-1]), dtype=q.dtype, device=q.device)
    acc_b = torch.zeros_like(acc_a)
    acc_c = torch.zeros_like(l)
    if bias is not None:
        bias = bias.expand(*q.shape[:-2], q.shape[-2], n_k) if bias.ndim == q.ndim else bias
    queries = _scaled_queries(q, dq, dk, scale)
    for start in range(0, n_k, block_size):
        block = slice(start, min(start + block_size, n_k))
        k_j, v_j = k[..., block, :], v[..., block, :]
        s_j, ds_j = _scores(queries, k_j, None if dk is None else dk[..., block, :])  # (..., Nq, block)
        if bias is not None:
            s_j = s_j + bias[..., block]
        m_new = torch.maximum(m, s_j.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows masked so far
        alpha = torch.exp(m - m_safe)
        p_j = torch.exp(s_j - m_safe)
        l = alpha * l + p_j.sum(-1, keepdim=True)
        acc_a = alpha * acc_a + p_j @ v_j
        acc_b = alpha * acc_b
        if dv is not None:
            acc_b = acc_b + p_j @ dv[..., block, :]
        if ds_j is not None:
            pds_j = ds_j.mul_(p_j)
            acc_b = acc_b + pds_j @ v_j
            acc_c = alpha * acc_c + pds_j.sum(-1, keepdim=True)
        m = m_new
    l = torch.where(l == 0, torch.ones_like(l), l)  # rows with every key masked: zeros, as SDPA returns
    out = acc_a / l
    dout = acc_b / l - (acc_c / l) * out
    return out, dout


def _triton(q, k, v, dq, dk, dv, attn_mask, scale):
    # jvp-flash-attention 0.14's `JVPAttn.forward` called as a function: the output and its tangent from one kernel
    # launch, with no forward-AD level of its own (this runs inside one). Its TMA path reads q, k, v and the tangents as
    # contiguous (batch heads N, d) matrices; a missing tangent is zero. `scale` is passed as the kernel's `sm_scale`,
    # which scales both the scores and their tangent.
    from jvp_flash_attention.jvp_attention import JVPAttn

    primals = [x.contiguous() for x in (q, k, v)]
    tangents = [
        torch.zeros_like(x) if dx is None else dx.to(dtype=x.dtype, memory_format=torch.contiguous_format)
        for x, dx in zip(primals, (dq, dk, dv))
    ]
    with torch.no_grad():
        out, (dout, *_) = JVPAttn.forward(
            *primals, *tangents, attn_mask=attn_mask, dropout_p=0.0, causal=False, sm_scale=scale
        )
    return out, dout


def jvp_attention(q, k, v, dq, dk, dv, attn_mask=None, scale=None, backend="auto", block_size=None, out=None):
    """Attention output and its forward-mode derivative along (dq, dk, dv): returns `(out, dout)`.

    Args:
        q, k, v (`torch.Tensor`): queries (..., Nq, d), keys (..., Nk, d), values (..., Nk, dv).
        dq, dk, dv (`torch.Tensor`): their tangents (same shapes); `None` means zero.
        attn_mask (`torch.Tensor`, *optional*): boolean (True = attend) or additive mask, broadcastable to
            (..., Nq, Nk); a (batch, Nk) mask is a key-padding mask.
        scale (`float`, *optional*): softmax scale; defaults to 1/sqrt(d).
        backend (`str`, defaults to "auto"): "math", "blocked", "triton" or "auto" (see `route`).
        block_size (`int`, *optional*): key block length of the "blocked" backend (default 512).
        out (`torch.Tensor`, *optional*): the attention output, when the caller has it (the "math" backend then
            skips its P V product).
    """
    backend, _ = route(q, k, v, attn_mask, backend)
    if backend == "triton":
        return _triton(q, k, v, dq, dk, dv, attn_mask, _scale(q, scale))
    bias = _mask_to_bias(attn_mask, q, k, q.dtype)
    if backend == "math":
        return _math(q, k, v, dq, dk, dv, bias, _scale(q, scale), out)
    return _blocked(q, k, v, dq, dk, dv, bias, _scale(q, scale), block_size or DEFAULT_BLOCK_SIZE)


def _sdpa(q, k, v, attn_mask, scale):
    if attn_mask is not None and attn_mask.ndim == 2 and q.ndim == 4 and attn_mask.shape == (k.shape[0], k.shape[-2]):
        attn_mask = attn_mask[:, None, None, :]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class _JVPAttention(torch.autograd.Function):
    """SDPA forward and backward, with the forward-mode rule of SPEC.md section 6."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, attn_mask, scale, backend, block_size):
        return _sdpa(q, k, v, attn_mask, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, scale, backend, block_size = inputs
        ctx.scale, ctx.backend, ctx.block_size = scale, backend, block_size
        ctx.has_mask = attn_mask is not None
        ctx.out_dtype = output.dtype
        saved = (q, k, v, attn_mask) if attn_mask is not None else (q, k, v)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved, output)

    @staticmethod
    def jvp(ctx, dq, dk, dv, d_mask, d_scale, d_backend, d_block):
        q, k, v, *mask, out = ctx.saved_tensors
        # Half-precision inputs (autocast, bf16 models) are differentiated in float32 (SPEC.md pitfall 6); the tangent
        # takes the dtype of the primal output. The forward's output serves the tangent when it is at that precision.
        work = torch.promote_types(q.dtype, torch.float32)
        args = [None if x is None else x.to(work) for x in (q, k, v, dq, dk, dv)]
        out = out if out.dtype == work else None
        with torch.autocast(q.device.type, enabled=False):
            mask = mask[0] if ctx.has_mask else None
            _, dout = jvp_attention(*args, mask, ctx.scale, ctx.backend, ctx.block_size, out=out)
        return dout.to(ctx.out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *mask = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(n) for x, n in zip((q, k, v), needs)]
            out = _sdpa(*inputs, mask[0] if ctx.has_mask else None, ctx.scale)
            wanted = [x for x, n in zip(inputs, needs) if n]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*[next(grads) if n else None for n in needs], None, None, None, None)


def attention(q, k, v, attn_mask=None, scale=None, backend="auto", block_size=None):
    """Scaled dot-product attention that forward-mode AD (and vmap, and backward) differentiates.

    Same arguments as `jvp_attention`, without tangents; returns the attention output.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown JVP attention backend {backend!r}: choose one of {BACKENDS}.")
    direct = _jvp_only_attention(q, k, v, attn_mask, scale, backend, block_size)
    if direct is not None:
        return direct
    return _JVPAttention.apply(q, k, v, attn_mask, scale, backend, block_size)


def _jvp_only_attention(q, k, v, attn_mask, scale, backend, block_size):
    """In a forward-mode pass without gradients (the sCM JVP) at float32/float64: the output and its tangent from one
    pass of the routed backend, which computes the output on the way, instead of PyTorch's SDPA for the output and
    then that pass for the tangent. None elsewhere (gradients, half precision, no tangent)."""
    if torch.is_grad_enabled() or q.dtype not in (torch.float32, torch.float64):
        return None
    unpack = torch.autograd.forward_ad.unpack_dual
    (qp, dq), (kp, dk), (vp, dv) = (unpack(x)[:2] for x in (q, k, v))
    if (dq is None and dk is None and dv is None) or not (qp.dtype == kp.dtype == vp.dtype):
        return None
    backend, _ = route(qp, kp, vp, attn_mask, backend)
    out, dout = jvp_attention(qp, kp, vp, dq, dk, dv, attn_mask, scale, backend, block_size)
    return torch.autograd.forward_ad.make_dual(out, dout)
