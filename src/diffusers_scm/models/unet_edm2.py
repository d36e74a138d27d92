"""EDM2's magnitude-preserving UNet as a diffusers model (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"; SPEC.md section 10).

`EDM2UNet2DModel` is the raw network F(c_in x, c_noise, class_labels) of EDM2's preconditioning
D(x; sigma) = c_skip x + c_out F(...), together with the uncertainty head of EDM2's loss: the log-variance
u(c_noise) = linear(MP-Fourier(c_noise)) (`return_logvar=True`). It takes c_in x as `sample` and
c_noise = ln(sigma) / 4 as `timestep`, so the "edm" parameterization gives its TrigFlow output -F (SPEC.md section 2).
Every layer preserves magnitudes at initialization (unit-variance inputs give unit-variance activations):

- weights are normalized in every forward pass, w_i / ||w_i||, with gain / sqrt(fan_in) (Eq. 47), and in training mode
  the stored weight itself is first re-normalized in place ("forced weight normalization", Eq. 66). The in-place
  update bypasses autograd's version counter, so forward-mode AD, several forward passes before one backward pass and
  gradient checkpointing all work; once normalized, the weight changes by O(eps^2) per pass. Inside `torch.func`
  transforms (which forbid mutating captured tensors) and `functional_call` with tensors in place of the parameters
  the stored weight is left alone: the forward pass normalizes it anyway, and the output differs by O(eps) at most
  (O(eps^2) for a weight normalized before);
- MP-SiLU (Eq. 81), MP-sum (Eq. 88), MP-concatenation (Eq. 103), MP-Fourier features (Eq. 75);
- pixel norm after every encoder skip, cosine attention (pixel-normed q, k, v; Section 3.2 and Figure 21);
- learned gains, zero at initialization, on the embedding's modulation and on the output. They are stored with shape
  (1,), where NVlabs stores 0-dim tensors, so that FSDP2 (`fully_shard`, which shards every parameter along its first
  dimension) shards them too; 0-dim values (NVlabs' layout, folders saved before) load into them unchanged
  (`scalar_gains_as_vectors`).

Class labels are indices (`class_labels`, LongTensor) or one-hot rows (floating, `(batch, num_classes)`); absent labels
are zero rows (the label embedding vanishes), as NVlabs' Precond passes them. Attention calls
`F.scaled_dot_product_attention`: fused kernels normally, the JVP-capable attention inside
`diffusers_scm.jvp.jvp_mode`.
Presets of the published sizes: `EDM2_PRESETS` (img512-xs ... img512-xxl on 4x64x64 latents, img64-s ... img64-xl on
3x64x64 pixels, 1000 classes).

Layout of NVlabs' checkpoints (`training/networks_edm2.py`), for the converter: inside `Precond`,
    NVlabs key "unet.<name>"  ->  "<name>" here;   "logvar_fourier.*", "logvar_linear.*"  ->  unchanged
with every <name> unchanged: `out_gain`, `emb_fourier.{freqs,phases}`, `emb_noise.weight`, `emb_label.weight`,
`enc.<res>x<res>_{conv,down,block<i>}` and `dec.<res>x<res>_{in0,in1,up,block<i>}` (ModuleDicts in NVlabs' order), and
inside a block `emb_gain`, `conv_res0`, `emb_linear`, `conv_res1`, `conv_skip`, `attn_qkv`, `attn_proj` (each a
`weight`). Init kwargs keep NVlabs' names (those of Precond, UNet and Block) except those of
`diffusers_scm.models.unet_edm.NVLABS_CONFIG_NAMES` (`img_resolution` -> `sample_size`, `img_channels` ->
`in_channels`, `label_dim` -> `num_classes`, `attn_resolutions` -> `attention_resolutions`); `use_fp16` and
`sigma_data` belong to the Precond and the parameterization, not to the network.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .unet_edm import class_labels_to_rows, per_sample_time, resample_2d, resample_kernel


__all__ = [
    "EDM2UNet2DModel",
    "EDM2UNet2DOutput",
    "EDM2_PRESETS",
    "normalize",
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "scalar_gains_as_vectors",
]

GAINS = ("emb_gain", "out_gain")  # the learned scalar gains (NVlabs: 0-dim tensors; here shape (1,))

# The published sizes (EDM2's train_edm2.py presets; channels and dropout per size; SPEC.md section 10 lists their
# parameter counts: 124.7M/280.2M/497.8M/777.5M/1119.3M/1523.2M for img512 XS..XXL)
_IMG512 = {"sample_size": 64, "in_channels": 4, "num_classes": 1000}
_IMG64 = {"sample_size": 64, "in_channels": 3, "num_classes": 1000}
EDM2_PRESETS = {
    "img512-xs": {**_IMG512, "model_channels": 128, "dropout": 0.0},
    "img512-s": {**_IMG512, "model_channels": 192, "dropout": 0.0},
    "img512-m": {**_IMG512, "model_channels": 256, "dropout": 0.1},
    "img512-l": {**_IMG512, "model_channels": 320, "dropout": 0.1},
    "img512-xl": {**_IMG512, "model_channels": 384, "dropout": 0.1},
    "img512-xxl": {**_IMG512, "model_channels": 448, "dropout": 0.1},
    "img64-s": {**_IMG64, "model_channels": 192, "dropout": 0.0},
    "img64-m": {**_IMG64, "model_channels": 256, "dropout": 0.1},
    "img64-l": {**_IMG64, "model_channels": 320, "dropout": 0.1},
    "img64-xl": {**_IMG64, "model_channels": 384, "dropout": 0.1},
}


def scalar_gains_as_vectors(state_dict: dict, prefix: str = "") -> dict:
    """`state_dict` (in place, and returned) with the 0-dim gains under `prefix` (`emb_gain`, `out_gain`: NVlabs'
    layout, and folders saved before the gains had shape (1,)) reshaped to (1,), the shape of this module's gains."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.rsplit(".", 1)[-1] in GAINS]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            state_dict[key] = value.reshape(1)
    return state_dict


def _gain() -> nn.Parameter:
    """A learned gain, zero at initialization; shape (1,) so that FSDP2 can shard it (NVlabs: 0-dim)."""
    return nn.Parameter(torch.zeros([1]))


@dataclass
class EDM2UNet2DOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`): the raw network output F.
        logvar (`torch.Tensor` of shape `(batch_size, 1, 1, 1)`, *optional*): the uncertainty u(c_noise) of EDM2's
            loss, when asked for with `return_logvar=True`.
    """

    sample: torch.Tensor
    logvar: torch.Tensor | None = None


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS(x)) over `dim` (default: all but the first), the RMS in float32 or wider (Algorithm 1)."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    size = math.prod(x.shape[d] for d in ((dim,) if isinstance(dim, int) else dim))
    rms = torch.linalg.vector_norm(work, dim=dim, keepdim=True) / math.sqrt(size)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: silu(x) / 0.596, unit second moment for x ~ N(0, 1) (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation, the parts weighted (1 - t) : t per channel group (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f_i c + phi_i)), f_i ~ N(0, bandwidth^2),
    phi_i ~ U[0, 1) (Eq. 75), computed in float32 or wider."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        y = x.to(work)[:, None] * self.freqs.to(work)[None] + self.phases.to(work)[None]
        return y.cos() * math.sqrt(2)


def _inside_functorch_transform() -> bool:
    """Whether a `torch.func` transform (jvp, vjp, grad, vmap) is running: they forbid mutating captured tensors."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or fully connected layer (kernel ()): normalized weights times
    gain / sqrt(fan_in) (Eq. 47), with forced weight normalization of the stored weight in training mode (Eq. 66,
    Algorithm 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def normalize_stored_weight_(self, weight: torch.Tensor | None = None):
        """Forced weight normalization of the stored weight (default `self.weight`), in place (Eq. 66). A weight
        sharded by FSDP2 (a DTensor) is normalized shard by shard: it is sharded along its first dimension, the output
        channels, so every process holds whole rows. `diffusers_scm.training.machinery.fsdp` calls this with the
        sharded weight before FSDP gathers it (the forward pass computes with a gathered copy, and a write into that
        copy would be dropped at resharding)."""
        weight = self.weight if weight is None else weight
        placements = getattr(weight, "placements", ())
        if any(not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in placements):
            raise ValueError(
                f"EDM2's forced weight normalization needs whole rows on each process: the weight is sharded as "
                f"{placements}; shard it along its first dimension (FSDP2's default)."
            )
        with torch.no_grad():
            local = weight._local_tensor if placements else weight.data
            work = local.to(torch.float32) if local.dtype != torch.float64 else local
            local.copy_(normalize(work))

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.weight.to(torch.float32) if self.weight.dtype != torch.float64 else self.weight
        if self.training and isinstance(self.weight, nn.Parameter) and not _inside_functorch_transform():
            with torch.no_grad():  # forced weight normalization (Eq. 66)
                self.weight.data.copy_(normalize(w.detach()))
        w = normalize(w)  # weight normalization in the forward pass (Eq. 47)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, None, 1, w.shape[-1] // 2)


class EDM2Block(nn.Module):
    """Encoder or decoder block with optional resampling and cosine self-attention (Figure 21)."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        emb_channels: int,  # embedding channels
        flavor: str = "enc",  # "enc" (skip conv and pixel norm before the residual branch) or "dec"
        resample_mode: str = "keep",  # "keep", "up" or "down"
        resample_filter=(1, 1),  # FIR taps of the resampling
        attention: bool = False,  # cosine self-attention after the residual branch
        channels_per_head: int = 64,  # channels per attention head
        dropout: float = 0.0,  # dropout inside the residual branch (training)
        res_balance: float = 0.3,  # MP-sum weight of the residual branch
        attn_balance: float = 0.3,  # MP-sum weight of the attention branch
        clip_act: float | None = 256,  # clamp the output to [-clip_act, clip_act]; None = no clamp
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}.")
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_mode, self.dropout = resample_mode, dropout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.resample_filter = list(resample_filter)
        self.emb_gain = _gain()
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scalar_gains_as_vectors(state_dict, prefix)  # NVlabs' 0-dim gain
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # main branch: resample; in the encoder, 1x1 conv to the new width and pixel norm (Figure 21)
        if self.resample_mode != "keep":
            x = resample_2d(x, resample_kernel(self.resample_filter).to(x.device), self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        # residual branch: MP-SiLU, conv, modulation by 1 + gain * linear(emb), MP-SiLU, dropout, conv
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (batch, out_channels)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:  # cosine attention: q, k, v pixel-normed per head, softmax(q^T k / sqrt(c)) v
            n, _, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)  # (N, heads, c, 3, HW)
            q, k, v = normalize(qkv, dim=2).transpose(2, 4).unbind(3)  # each (N, heads, HW, c)
            y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(n, -1, h, w).contiguous()
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet2DModel(ModelMixin, ConfigMixin):
    """
    EDM2's magnitude-preserving UNet (Figure 21) with its uncertainty head: the raw network F(c_in x, c_noise, labels).
    Called like diffusers' `UNet2DModel`: `model(sample, timestep, class_labels=None).sample`, with `timestep` =
    c_noise; `return_logvar=True` adds `.logvar`, the log-variance u(c_noise) of EDM2's loss (a start for the sCM
    adaptive weighting, SPEC.md section 3). Published sizes: `EDM2_PRESETS`, `from_preset("img512-s")`.

    Args:
        sample_size (`int`, defaults to 64): resolution of the input (names the encoder/decoder levels).
        in_channels (`int`, defaults to 4), out_channels (`int`, *optional*): channels (out defaults to in).
        num_classes (`int`, defaults to 0): class-label dimension; 0 = unconditional.
        model_channels (`int`, defaults to 192): base channel count.
        channel_mult (`list[int]`, defaults to [1, 2, 3, 4]): channel multiplier per resolution.
        channel_mult_noise (`int`, *optional*): noise-embedding width in units of `model_channels` (default: the
            first level's multiplier).
        channel_mult_emb (`int`, *optional*): embedding width in units of `model_channels` (default: the largest
            multiplier).
        num_blocks (`int`, defaults to 3): blocks per resolution (the decoder has one more).
        attention_resolutions (`list[int]`, defaults to [16, 8]): resolutions with self-attention (the decoder's
            first block always has it).
        label_balance (`float`, defaults to 0.5): MP-sum weight of the class embedding against the noise embedding.
        concat_balance (`float`, defaults to 0.5): MP-cat weight t of the decoder inputs: 1 - t on the main path, t on
            the skip connection.
        channels_per_head (`int`, defaults to 64): channels per attention head.
        dropout (`float`, defaults to 0.0): dropout inside the blocks (training).
        res_balance (`float`, defaults to 0.3), attn_balance (`float`, defaults to 0.3): MP-sum weights of the
            residual and attention branches.
        clip_act (`float`, *optional*, defaults to 256): clamp block outputs to [-clip_act, clip_act]; None = off.
        resample_filter (`list[int]`, defaults to [1, 1]): FIR taps of the resampling.
        logvar_channels (`int`, defaults to 128): Fourier features of the uncertainty head.
    """

    _no_split_modules = ["EDM2Block"]  # the FSDP units
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_classes: int = 0,
        model_channels: int = 192,
        channel_mult: list = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attention_resolutions: list = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        resample_filter: list = (1, 1),
        logvar_channels: int = 128,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kwargs = {
            "resample_filter": list(resample_filter),
            "channels_per_head": channels_per_head,
            "dropout": dropout,
            "res_balance": res_balance,
            "attn_balance": attn_balance,
            "clip_act": clip_act,
        }
        self.out_gain = _gain()

        # embedding: MP-Fourier features of c_noise, linear; MP-sum with the class embedding; MP-SiLU
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(num_classes, cemb, kernel=()) if num_classes else None

        # encoder: the input with a constant channel, a conv, then blocks (downsampling blocks between levels)
        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, channels in enumerate(cblock):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, cemb, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attention_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, cemb, "enc", attention=attn, **block_kwargs)

        # decoder: two blocks at the lowest resolution, then per level an upsampling block and blocks fed MP-cat skips
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = sample_size >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, cemb, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attention_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, cemb, "dec", attention=attn, **block_kwargs)
        self.out_conv = MPConv(cout, out_channels, kernel=(3, 3))

        # uncertainty head: u(c_noise) = linear(MP-Fourier(c_noise)) (EDM2, Eq. 21)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())
        self.gradient_checkpointing = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EDM2UNet2DModel":
        """A network of a published size: "img512-xs" ... "img512-xxl", "img64-s" ... "img64-xl" (`EDM2_PRESETS`)."""
        if name not in EDM2_PRESETS:
            raise ValueError(f"Unknown EDM2 preset {name!r}: choose one of {', '.join(EDM2_PRESETS)}.")
        return cls(**{**EDM2_PRESETS[name], **overrides})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scalar_gains_as_vectors(state_dict, prefix)  # NVlabs' 0-dim gains (`load_state_dict`)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        super()._fix_state_dict_keys_on_load(state_dict)
        scalar_gains_as_vectors(state_dict)  # folders saved with 0-dim gains (`from_pretrained`)

    def embedding(self, timestep, class_labels, sample: torch.Tensor) -> torch.Tensor:
        """MP-SiLU(MP-sum(linear(MP-Fourier(c_noise)), linear(sqrt(num_classes) one-hot))) (Figure 21)."""
        c_noise = per_sample_time(timestep, sample.shape[0], sample)
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            rows = class_labels_to_rows(class_labels, self.config.num_classes, sample.shape[0], emb.dtype, emb.device)
            emb = mp_sum(emb, self.emb_label(rows * math.sqrt(rows.shape[1])), t=self.config.label_balance)
        return mp_silu(emb)

    def logvar(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The uncertainty u(c_noise) of EDM2's loss, shape (batch, 1, 1, 1) (EDM2, Eq. 21)."""
        c_noise = per_sample_time(timestep, sample.shape[0], sample)
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def _block(self, block, x, emb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

    def forward(self, sample, timestep, class_labels=None, return_logvar: bool = False, return_dict: bool = True):
        """
        Args:
            sample (`torch.Tensor`): (batch, in_channels, height, width), the network input c_in x.
            timestep (`torch.Tensor` or `float`): c_noise, one per sample or one for all.
            class_labels (`torch.Tensor`, *optional*): (batch,) indices or (batch, num_classes) one-hot rows; None =
                zero rows.
            return_logvar (`bool`, defaults to `False`): also return the log-variance u(c_noise).
            return_dict (`bool`, defaults to `True`): return an `EDM2UNet2DOutput` or a tuple (sample[, logvar]).
        """
        with torch.autocast(sample.device.type, enabled=False):  # the embedding in float32 (SPEC.md pitfall 6)
            emb = self.embedding(timestep, class_labels, sample)
        x = torch.cat([sample, torch.ones_like(sample[:, :1])], dim=1)  # a constant channel (Figure 21)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else self._block(block, x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.config.concat_balance)
            x = self._block(block, x, emb)
        out = self.out_conv(x, gain=self.out_gain)
        logvar = None
        if return_logvar:
            with torch.autocast(sample.device.type, enabled=False):
                logvar = self.logvar(timestep, sample)
        if not return_dict:
            return (out,) if logvar is None else (out, logvar)
        return EDM2UNet2DOutput(sample=out, logvar=logvar)
