"""`jvp_mode`: forward-mode AD through any diffusers network, whatever its attention (SPEC.md section 6).

Inside `jvp_mode()` attention is intercepted at the function level, so no processor list is needed:

- a `TorchFunctionMode` routes every `torch.nn.functional.scaled_dot_product_attention` call (diffusers'
  `AttnProcessor2_0`, `JointAttnProcessor2_0`, the "native" route of `dispatch_attention_fn`, user processors, ...)
  to `diffusers_scm.jvp.attention`, which has a forward-mode rule (masks: boolean, additive, key padding;
  `is_causal`, `enable_gqa`, `scale`);
- diffusers' attention dispatcher (`AttentionModuleMixin` modules: Flux, Wan, Qwen-Image, ...) sends every backend,
  the per-module ones set by `set_attention_backend` included, to its "native" route, which reaches that call;
- processors that call xformers (or an NPU kernel) directly are switched to their SDPA equivalent for the pass, or
  get a clear error naming the module and the fix; plain-op attention (Sana's linear attention, diffusers'
  `AttnProcessor`) needs nothing;
- float64 stays float64 (`float64_precision`): sinusoidal time embeddings (`get_timestep_embedding`, `Timesteps`) run
  at the precision of their input, and casts of float64 activations to float32 inside a network (rotary embeddings,
  Sana's linear attention, float32 norms) keep float64, so float64 finite differences can check the JVP of every
  family; float32 and half-precision networks are not affected;
- group norms accept the channels-last activations of attention blocks under forward-mode AD;
- in JVP passes without gradients (the sCM JVP), linear layers, convolutions, norms, GELU/SiLU and arithmetic
  (`diffusers_scm.jvp.elementwise`) get direct forward-mode rules: one extra matmul or convolution for frozen
  weights, the fused backward kernels of norms and activations with the forward's statistics, no zero tangents for
  constants. PyTorch's generic rules cost several times more on CPU (README, "JVP / forward" table).

On exit, even on error, everything is restored, so ordinary forward and backward passes keep the fused kernels.
"""

import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import BACKENDS, attention
from .elementwise import elementwise_jvp, make_dual


__all__ = ["JVPFunctionMode", "jvp_mode", "float64_precision"]


def get_timestep_embedding_at_input_precision(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """diffusers' sinusoidal `get_timestep_embedding`, computed in float32 or the input's wider precision."""
    dtype = torch.promote_types(timesteps.dtype, torch.float32) if timesteps.is_floating_point() else torch.float32
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=dtype, device=timesteps.device)
    freqs = torch.exp(exponent / (half_dim - downscale_freq_shift))
    emb = scale * timesteps[:, None].to(dtype) * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


@contextlib.contextmanager
def _time_embeddings_at_input_precision():
    """Every diffusers module that uses `get_timestep_embedding` (the `Timesteps` class of all families, and the
    transformers that call it directly) computes it at its input's precision for the block."""
    try:
        from diffusers.models import embeddings
    except ImportError:
        yield
        return
    original = embeddings.get_timestep_embedding
    if original is get_timestep_embedding_at_input_precision:  # nested
        yield
        return
    patched = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("diffusers.") and getattr(module, "get_timestep_embedding", None) is original
    ]
    for module in patched:
        module.get_timestep_embedding = get_timestep_embedding_at_input_precision
    try:
        yield
    finally:
        for module in patched:
            module.get_timestep_embedding = original


@contextlib.contextmanager
def _fused_rms_norm_modules():
    """diffusers' `RMSNorm` module (its forward spells the norm in elementwise ops, each with its own forward-mode
    rule) computes a float32/float64 input that carries a tangent with `F.rms_norm` for the block, the same norm,
    whose tangent `JVPFunctionMode` takes in one rule. Other inputs keep diffusers' own forward."""
    try:
        from diffusers.models.normalization import RMSNorm
    except ImportError:
        yield
        return
    original = RMSNorm.forward
    if getattr(original, "_jvp_fused", False):  # nested
        yield
        return

    def forward(self, hidden_states):
        weight, bias = self.weight, getattr(self, "bias", None)
        if (
            not torch.is_grad_enabled()
            and hidden_states.dtype in (torch.float32, torch.float64)
            and (weight is None or weight.dtype == hidden_states.dtype)
            and _carries_tangent(hidden_states)
        ):
            out = F.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, self.eps)
            return out if bias is None else out + bias
        return original(self, hidden_states)

    forward._jvp_fused = True
    RMSNorm.forward = forward
    try:
        yield
    finally:
        RMSNorm.forward = original


_NARROWED = {torch.float64: torch.float32, torch.complex128: torch.complex64}
_CASTS = (torch.Tensor.float, torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as)


def _keep_float64(func, args, kwargs):
    """`func(*args, **kwargs)` for a cast method, with a float64 (complex128) tensor kept at its precision where the
    cast would narrow it to float32 (complex64); None when the call is not such a cast."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dtype not in _NARROWED:
        return None
    x, narrow = args[0], _NARROWED[args[0].dtype]
    if func is torch.Tensor.float:
        return x
    if func is torch.Tensor.type_as:
        return x if args[1].dtype == narrow else None
    if func is torch.Tensor.type:
        target = args[1] if len(args) > 1 else kwargs.get("dtype")
        return x if target == narrow else None
    # Tensor.to(dtype), to(device, dtype), to(other), to(dtype=...), to(device=..., dtype=...)
    rest = list(args[1:])
    for i, a in enumerate(rest):
        if a == narrow and isinstance(a, torch.dtype):
            rest[i] = x.dtype
            return torch.Tensor.to(x, *rest, **kwargs)
        if isinstance(a, torch.Tensor) and a.dtype == narrow:
            rest[i] = a.device
            return torch.Tensor.to(x, *rest, **kwargs)
    if kwargs.get("dtype") == narrow:
        return torch.Tensor.to(x, *rest, **{**kwargs, "dtype": x.dtype})
    return None


class _Float64Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CASTS:
            kept = _keep_float64(func, args, kwargs)
            if kept is not None:
                return kept
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_precision():
    """Within the block, float64 computations stay float64 inside diffusers networks: sinusoidal time embeddings run
    at their input's precision and casts of float64 (complex128) tensors to float32 (complex64) keep the wider type.
    For checking JVPs against float64 finite differences; float32 and half-precision networks are not affected.
    `jvp_mode` includes it."""
    with _time_embeddings_at_input_precision(), _Float64Mode():
        yield


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    # Two gaps in torch's forward-mode rule of group_norm, closed here with the same result as the fused kernel:
    # - under autocast, group_norm runs in float32 but the tangent of a half-precision input is not cast with it:
    #   cast explicitly, as autocast's float32 policy for group_norm would;
    # - the rule views the tangent, which fails for the channels-last activations that attention blocks return:
    #   normalize a contiguous copy, then give the result the layout the fused kernel returns (the layout decides
    #   which dropout mask a later layer draws, which must match the gradient pass).
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        input = input.float()
    channels_last = (
        input.ndim == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)
    )
    out = F.group_norm(input.contiguous(), num_groups, weight, bias, eps)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _sdpa_with_jvp(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, _mode=None
):
    # F.scaled_dot_product_attention's arguments, computed by `attention` (SPEC.md section 6)
    if dropout_p:
        raise ValueError(
            f"Attention dropout (dropout_p={dropout_p}) inside a JVP pass: the JVP attention has no dropout. Set the "
            "attention dropout of the network to 0 (e.g. `model.eval()` for processors that use it only in training)."
        )
    if is_causal:  # SDPA's causal mask: query i sees keys j <= i (top-left aligned)
        n_q, n_k = query.shape[-2], key.shape[-2]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
        attn_mask = causal if attn_mask is None else _combine_masks(attn_mask, causal, query.dtype)
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query attention: repeat the key/value heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    return attention(
        query, key, value, attn_mask=attn_mask, scale=scale, backend=_mode.backend, block_size=_mode.block_size
    )


class _JVPLinear(torch.autograd.Function):
    """`F.linear` with the forward-mode rule d(x W^T + b) = dx W^T (+ x dW^T + db): one extra matmul. PyTorch's own
    rule for batched (3-D) inputs costs about 4.7x a forward matmul on CPU, this one 2x."""

    @staticmethod
    def forward(x, weight, bias, params_dual):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, params_dual = inputs
        ctx.has_bias, ctx.out_dtype, ctx.params_dual = bias is not None, output.dtype, params_dual
        ctx.save_for_forward(x, weight)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight = ctx.saved_tensors
        out = None if dx is None else F.linear(dx, weight)
        if not ctx.params_dual:  # weights without tangents (the sCM JVP): PyTorch passes zeros for them
            return out.to(ctx.out_dtype)
        if dweight is not None:
            out = F.linear(x, dweight) if out is None else out + F.linear(x, dweight)
        if dbias is not None:
            out = dbias.expand(*x.shape[:-1], dbias.shape[-1]) if out is None else out + dbias
        return out.to(ctx.out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ weight.to(grad.dtype)) if need_x else None
        grad_w = (flat.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)) if need_w else None
        grad_b = flat.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None


def _jvp_only(x: torch.Tensor, op: str, args: tuple) -> torch.Tensor:
    """Elementwise and normalization ops with a direct forward-mode rule, for JVP passes without gradients (the
    stop-gradient JVP of sCD/sCT). PyTorch's generic rules for them cost 10-40x the op on CPU; these cost 2-4x. `op`
    names the rule; the primal is PyTorch's own op (for the norms, its kernel that also returns the statistics the
    rule reuses, so the tangent costs one fused backward kernel). The result is made a dual tensor directly: no
    `autograd.Function`, whose Python bookkeeping costs about 0.1 ms a call."""
    x, dx = torch.autograd.forward_ad.unpack_dual(x)[:2]
    out, *stats = _as_tuple(_PRIMAL[op](x, *args))
    work = torch.promote_types(x.dtype, torch.float32)
    return make_dual(out, _TANGENT[op](x.to(work), dx.to(work), *stats, *args))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _dims(x, normalized_shape) -> tuple:
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _layer_norm_primal(x, normalized_shape, weight, bias, eps):
    """PyTorch's layer norm with its statistics (mean, rstd) at the working precision of the tangent."""
    work = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == work and (weight is None or weight.dtype == work) and (bias is None or bias.dtype == work):
        return torch.ops.aten.native_layer_norm(x, list(normalized_shape), weight, bias, eps)
    out = F.layer_norm(x, normalized_shape, weight, bias, eps)  # reduced precision: stats recomputed in float32
    var, mean = torch.var_mean(x.to(work), _dims(x, normalized_shape), unbiased=False, keepdim=True)
    return out, mean, torch.rsqrt(var + eps)


def _group_norm_primal(x, num_groups, weight, bias, eps):
    """`_group_norm` with its statistics (mean, rstd per sample and group) at the working precision of the tangent."""
    work = torch.promote_types(x.dtype, torch.float32)
    if x.dtype != work or (weight is not None and weight.dtype != work) or (bias is not None and bias.dtype != work):
        out = _group_norm(x, num_groups, weight, bias, eps)  # reduced precision: stats recomputed in float32
        var, mean = torch.var_mean(x.to(work).reshape(x.shape[0], num_groups, -1), -1, unbiased=False)
        return out, mean, torch.rsqrt(var + eps)
    n, c = x.shape[:2]
    # the kernel takes channels-last activations as they are, and returns that layout as F.group_norm does
    x = x.contiguous(memory_format=_group_norm_layout(x))
    return torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), num_groups, eps)


def _group_norm_layout(x):
    """The memory format the group-norm kernels run in for `x`: channels-last where `x` has it, else contiguous (the
    forward and backward kernels need their inputs in one layout). Only exact NHWC strides count: the kernels refuse
    an ambiguous size-1 dimension's stride that `is_contiguous(memory_format=...)` accepts."""
    if x.ndim == 4 and not x.is_contiguous():
        n, c, h, w = x.shape
        if x.stride() == (h * w * c, 1, w * c, c):
            return torch.channels_last
    return torch.contiguous_format


def _rms_norm_primal(x, normalized_shape, weight, eps):
    """PyTorch's RMS norm with its rstd at the working precision of the tangent."""
    work = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == work and (weight is None or weight.dtype == work):
        return torch.ops.aten._fused_rms_norm(x, list(normalized_shape), weight, eps)
    out = F.rms_norm(x, normalized_shape, weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return out, torch.rsqrt(x.to(work).pow(2).mean(_dims(x, normalized_shape), keepdim=True) + eps)


# Normalization without the affine part has a symmetric Jacobian, rstd (I - 1/N - xhat xhat^T / N) over the
# normalized elements (rstd (I - xhat xhat^T / N) for RMS norm), so its JVP d((x - mean) / std) = (dx - mean(dx) -
# xhat mean(dx xhat)) / std is its VJP: one fused kernel of PyTorch's backward with the statistics of the forward,
# instead of a chain of elementwise ops.
def _layer_norm_tangent(x, dx, mean, rstd, normalized_shape, weight, bias, eps):
    out = torch.ops.aten.native_layer_norm_backward(
        dx.contiguous(), x.contiguous(), list(normalized_shape), mean, rstd, None, None, [True, False, False]
    )[0]
    return out if weight is None else out * weight


def _group_norm_tangent(x, dx, mean, rstd, num_groups, weight, bias, eps):
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    layout = _group_norm_layout(x)
    x, dx = x.contiguous(memory_format=layout), dx.contiguous(memory_format=layout)
    out = torch.ops.aten.native_group_norm_backward(
        dx, x, mean, rstd, None, n, c, hw, num_groups, [True, False, False]
    )[0]
    return out if weight is None else out * weight.reshape(1, c, *([1] * (x.ndim - 2)))


def _rms_norm_tangent(x, dx, rstd, normalized_shape, weight, eps):
    if x.is_cuda:  # PyTorch's fused backward kernel (CUDA only)
        out = torch.ops.aten._fused_rms_norm_backward(
            dx.contiguous(), x.contiguous(), list(normalized_shape), rstd, None, [True, False]
        )[0]
    else:  # rstd dx - xhat mean(xhat dx) rstd
        xhat = x * rstd
        out = torch.addcmul(
            dx * rstd, xhat, (xhat * dx).mean(_dims(x, normalized_shape), keepdim=True) * rstd, value=-1
        )
    return out if weight is None else out * weight


# Elementwise activations: the JVP f'(x) dx is the VJP, PyTorch's fused backward kernel (one pass).
def _silu_tangent(x, dx):
    return torch.ops.aten.silu_backward(dx, x)


def _gelu_tangent(x, dx, approximate="none"):
    return torch.ops.aten.gelu_backward(dx, x, approximate=approximate)


_PRIMAL = {
    "layer_norm": _layer_norm_primal,
    "group_norm": _group_norm_primal,
    "rms_norm": _rms_norm_primal,
    "silu": lambda x: F.silu(x),
    "gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
}
_TANGENT = {
    "layer_norm": _layer_norm_tangent,
    "group_norm": _group_norm_tangent,
    "rms_norm": _rms_norm_tangent,
    "silu": _silu_tangent,
    "gelu": _gelu_tangent,
}


def _bind(func, args, kwargs):
    """`(op name, x, the op's other arguments in order)` for the ops with a direct rule, or None."""
    if func is F.layer_norm:
        names, defaults = ("normalized_shape", "weight", "bias", "eps"), (None, None, None, 1e-5)
    elif func is F.group_norm:
        names, defaults = ("num_groups", "weight", "bias", "eps"), (None, None, None, 1e-5)
    elif func is F.rms_norm:
        names, defaults = ("normalized_shape", "weight", "eps"), (None, None, None)
    elif func is F.silu:
        names, defaults = ("inplace",), (False,)
    elif func is F.gelu:
        names, defaults = ("approximate",), ("none",)
    else:
        return None
    x = args[0] if args else kwargs.get("input")
    rest = list(args[1:]) + [kwargs.get(n, d) for n, d in zip(names[len(args) - 1 :], defaults[len(args) - 1 :])]
    if func is F.silu:
        if rest[0]:  # in-place: PyTorch's own rule
            return None
        rest = []
    return func.__name__, x, tuple(rest)


def _fast_jvp(func, args, kwargs):
    """The op through `_jvp_only` when its input carries a tangent and no gradient is recorded; else None."""
    if torch.is_grad_enabled():
        return None
    bound = _bind(func, args, kwargs)
    if bound is None or not _carries_tangent(bound[1]):
        return None
    op, x, rest = bound
    return _jvp_only(x, op, rest)


def _frozen_weights_jvp(func, x: torch.Tensor, weight: torch.Tensor, params: tuple) -> torch.Tensor:
    """`F.linear` or a convolution for JVP passes without gradients whose weights carry no tangent (the sCM JVP):
    d op(x; W, b) = op(dx; W, no bias), one extra matmul or convolution. PyTorch's own rule for a convolution also
    convolves x with the weight's zero tangent and adds the bias's: about 3x a forward convolution instead of 2x."""
    x, dx = torch.autograd.forward_ad.unpack_dual(x)[:2]
    return make_dual(func(x, weight, *params), func(dx, weight, None, *params[1:]))  # params[0] is the bias


def _carries_tangent(x) -> bool:
    return isinstance(x, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def _linear(input, weight, bias=None):
    if not _carries_tangent(input):
        return F.linear(input, weight, bias)
    params_dual = _carries_tangent(weight) or _carries_tangent(bias)
    if not params_dual and not torch.is_grad_enabled():
        return _frozen_weights_jvp(F.linear, input, weight, (bias,))
    return _JVPLinear.apply(input, weight, bias, params_dual)


_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)


def _convolution(func, args, kwargs):
    """A convolution of an input with a tangent by weights without one, in a JVP pass without gradients; else None."""
    if torch.is_grad_enabled() or kwargs or len(args) < 2:
        return None
    x, weight, params = args[0], args[1], args[2:] or (None,)
    if not _carries_tangent(x) or _carries_tangent(weight) or _carries_tangent(params[0]):
        return None
    return _frozen_weights_jvp(func, x, weight, params)


def _combine_masks(attn_mask, causal, dtype):
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.to(dtype).masked_fill(~causal, float("-inf"))


_FAST_JVP_OPS = (F.layer_norm, F.group_norm, F.rms_norm, F.silu, F.gelu)


class JVPFunctionMode(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` to the JVP-capable `attention` and `F.group_norm` to a version whose
    forward-mode rule handles channels-last inputs and autocast, keeps float64 activations float64, and gives linear
    layers, convolutions, norms, activations and arithmetic their direct rules in JVP passes without gradients (see
    `jvp_mode`).

    Args:
        backend (`str`, defaults to "auto"): the JVP attention backend ("math", "blocked", "triton", "auto").
        block_size (`int`, *optional*): key block length of the "blocked" backend.
        keep_float64 (`bool`, defaults to `False`): keep float64 tensors float64 where the network casts them to
            float32 (for float64 networks only: see `float64_precision`).
    """

    def __init__(self, backend: str = "auto", block_size: int | None = None, keep_float64: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Unknown JVP attention backend {backend!r}: choose one of {BACKENDS}.")
        self.backend, self.block_size, self.keep_float64 = backend, block_size, keep_float64
        self.attention_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.keep_float64 and func in _CASTS:
            kept = _keep_float64(func, args, kwargs)
            if kept is not None:
                return kept
        if func is F.scaled_dot_product_attention:
            self.attention_calls += 1
            return _sdpa_with_jvp(*args, **kwargs, _mode=self)
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func in _CONVOLUTIONS:
            out = _convolution(func, args, kwargs)
            if out is not None:
                return out
        if func in _FAST_JVP_OPS:
            out = _fast_jvp(func, args, kwargs)
            if out is not None:
                return out
        if func is F.group_norm:
            return _group_norm(*args, **kwargs)
        out = elementwise_jvp(func, args, kwargs)
        if out is not None:
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def _native_attention_dispatch():
    """Send every backend of diffusers' `dispatch_attention_fn` (the active one and those set per module) to the
    "native" route, which calls `F.scaled_dot_product_attention`."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:  # older diffusers: no dispatcher
        yield
        return
    registry, native = _AttentionBackendRegistry, AttentionBackendName.NATIVE
    saved = {k: getattr(registry, k) for k in ("_active_backend", "_backends", "_constraints", "_supported_arg_names")}
    names = list(saved["_backends"])
    registry._active_backend = native
    registry._backends = dict.fromkeys(names, saved["_backends"][native])
    registry._constraints = {name: [] for name in names}
    registry._supported_arg_names = dict.fromkeys(names, saved["_supported_arg_names"][native])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(registry, k, v)


def _sdpa_equivalent(processor):
    """The SDPA processor that computes what `processor` (which calls xformers or an NPU kernel directly) computes,
    or None when there is none that can be built without weights of its own."""
    from diffusers.models import attention_processor

    name = type(processor).__name__
    if not any(tag in name for tag in ("XFormers", "NPU")):
        return None
    base = name.replace("XFormers", "").replace("_NPU", "").replace("NPU", "")
    for candidate in (base + "2_0", base.replace("2_0", "") + "2_0", base):
        cls = getattr(attention_processor, candidate, None)
        if cls is not None and candidate != name:
            try:
                return cls()
            except TypeError:  # needs arguments (e.g. IP-Adapter weights)
                return None
    return None


def _direct_kernel_processor(processor) -> bool:
    name = type(processor).__name__
    return any(tag in name for tag in ("XFormers", "NPU", "FlashAttn", "SageAttn"))


@contextlib.contextmanager
def _sdpa_processors(model: nn.Module | None):
    """Switch processors that call xformers / NPU kernels directly to their SDPA equivalent for the block."""
    swapped = []
    try:
        for name, module in model.named_modules() if model is not None else ():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(module, "set_processor") or not _direct_kernel_processor(processor):
                continue
            replacement = _sdpa_equivalent(processor)
            if replacement is None:
                raise ValueError(
                    f"Module '{name}' ({type(module).__name__}) uses {type(processor).__name__}, which calls an "
                    "attention kernel without forward-mode AD and has no SDPA equivalent here. Give it an SDPA "
                    "processor for training (e.g. `module.set_processor(AttnProcessor2_0())`, or "
                    "`model.set_default_attn_processor()` where the model has it), or use "
                    "`jvp(..., method='finite_difference')`."
                )
            swapped.append((module, processor))
            module.processor = replacement
        yield
    finally:
        for module, processor in swapped:
            module.processor = processor


def _is_float64(model: nn.Module | None) -> bool:
    param = next((p for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    return param is not None and param.dtype == torch.float64


@contextlib.contextmanager
def jvp_mode(
    model: nn.Module | None = None,
    backend: str = "auto",
    block_size: int | None = None,
    keep_float64: bool | None = None,
):
    """Forward-mode AD through any diffusers attention for the duration of the block (see the module docstring).

    Args:
        model (`nn.Module`, *optional*): the network (a diffusers model, a `TrigFlowDenoiser`, ...); only needed to
            switch processors that call xformers or NPU kernels directly. Attention interception, the dispatcher
            route and the time-embedding precision apply to everything called inside the block.
        backend (`str`, defaults to "auto"): JVP attention backend ("math", "blocked", "triton", "auto").
        block_size (`int`, *optional*): key block length of the "blocked" backend.
        keep_float64 (`bool`, *optional*): keep float64 activations float64 where the network casts them to float32
            (`float64_precision`); default: when `model`'s parameters are float64.
    """
    keep_float64 = _is_float64(model) if keep_float64 is None else keep_float64
    mode = JVPFunctionMode(backend=backend, block_size=block_size, keep_float64=keep_float64)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sdpa_processors(model))
        stack.enter_context(_native_attention_dispatch())
        stack.enter_context(_time_embeddings_at_input_precision())
        stack.enter_context(_fused_rms_norm_modules())
        stack.enter_context(mode)
        yield mode
