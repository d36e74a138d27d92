"""JVP-capable attention processors for diffusers' `Attention` modules, and `jvp_mode` to install them.

Inside `jvp_mode(model)` every attention module of `model` computes attention through `attention` (SPEC.md
section 6), whose forward-mode derivative exists; sinusoidal time embeddings run at the precision of their input
(float64 inputs stay float64, so float64 finite differences can check the JVP); group norms accept the channels-last
activations of attention blocks under forward-mode AD. On exit, even on error, the original
processors and embeddings are restored, so ordinary forward and backward passes keep the fused kernels.
"""

import contextlib
import math

import torch
from torch import nn

from .attention import BACKENDS, attention


__all__ = ["JVPAttnProcessor", "jvp_mode", "SUPPORTED_PROCESSORS"]

# Processors that compute plain scaled dot-product attention with diffusers' usual projections and norms.
SUPPORTED_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU")


class JVPAttnProcessor:
    """Attention processor equivalent to diffusers' `AttnProcessor2_0`, with attention through `attention`.

    Args:
        backend (`str`, defaults to "auto"): the JVP attention backend ("math", "blocked", "triton", "auto").
        block_size (`int`, *optional*): key block length of the "blocked" backend.
    """

    def __init__(self, backend: str = "auto", block_size: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"Unknown JVP attention backend {backend!r}: choose one of {BACKENDS}.")
        self.backend = backend
        self.block_size = block_size

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, Nq, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = getattr(attn, "scale", None) if getattr(attn, "scale_qk", True) else 1.0
        hidden_states = attention(
            query, key, value, attn_mask=attention_mask, scale=scale, backend=self.backend, block_size=self.block_size
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:  # channels-last layout, as diffusers' processor returns (dropout masks follow layout)
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _timesteps_forward(self, timesteps: torch.Tensor) -> torch.Tensor:
    # diffusers' sinusoidal `Timesteps` embedding, computed in float32 or the input's wider precision
    dtype = torch.promote_types(timesteps.dtype, torch.float32) if timesteps.is_floating_point() else torch.float32
    half_dim = self.num_channels // 2
    exponent = -math.log(10000) * torch.arange(half_dim, dtype=dtype, device=timesteps.device)
    freqs = torch.exp(exponent / (half_dim - self.downscale_freq_shift))
    emb = self.scale * timesteps[:, None].to(dtype) * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if self.flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if self.num_channels % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


def _group_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
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
    out = torch.nn.functional.group_norm(input.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _unsupported(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"Module '{name}' ({type(module).__name__}) cannot run under a JVP: {why}. Replace it with a diffusers "
        "`Attention` using the default processor (`model.set_default_attn_processor()`), or use "
        "`jvp(..., method='finite_difference')`."
    )


@contextlib.contextmanager
def jvp_mode(model: nn.Module, backend: str = "auto", block_size: int | None = None):
    """Install JVP-capable attention on every attention module of `model` for the duration of the block.

    Args:
        model (`nn.Module`): any module (a diffusers network, a `TrigFlowDenoiser`, ...).
        backend (`str`, defaults to "auto"): JVP attention backend.
        block_size (`int`, *optional*): key block length of the "blocked" backend.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import Timesteps

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = ()

    processor = JVPAttnProcessor(backend=backend, block_size=block_size)
    swapped, patched = [], []
    try:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                current = module.processor
                if isinstance(current, JVPAttnProcessor):
                    continue
                if type(current).__name__ not in SUPPORTED_PROCESSORS:
                    raise _unsupported(name, module, f"its processor {type(current).__name__} has no JVP version")
                swapped.append((module, current))
                module.set_processor(processor)
            elif AttentionModuleMixin and isinstance(module, AttentionModuleMixin):
                raise _unsupported(name, module, "attention dispatched by diffusers' attention backends")
            elif isinstance(module, nn.MultiheadAttention):
                raise _unsupported(name, module, "nn.MultiheadAttention uses fused attention without forward AD")
            elif isinstance(module, Timesteps) and "forward" not in module.__dict__:
                module.forward = _timesteps_forward.__get__(module)
                patched.append(module)
            elif isinstance(module, nn.GroupNorm) and "forward" not in module.__dict__:
                module.forward = _group_norm_forward.__get__(module)
                patched.append(module)
        yield model
    finally:
        for module, original in swapped:
            module.set_processor(original)
        for module in patched:
            del module.forward
