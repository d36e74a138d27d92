"""Tiny random instances of diffusers' own network classes, one per family, with the call each family's pipeline makes
(written here from the pipelines, with their own packing helpers), as the oracle for `diffusers_scm.adapters`.

Each `Family` gives:
    make()                      the network (random weights, eval mode), float32
    shape                       the unpacked latent (B, C, H, W) or (B, C, F, H, W)
    conditioning(g, dtype)      the adapter's conditioning (padding masks where the family has them)
    pipeline_call(model, x, timestep, cond)
                                the family pipeline's network call at scheduler timestep `timestep`, returning the
                                prediction handed to its scheduler (unpacked, variance dropped, sign as the pipeline)
    parameterization            the TrigFlow parameterization of a teacher of that family
"""

import dataclasses
from typing import Callable

import torch
from conftest import tiny_cond_unet, tiny_dit, tiny_unet


B = 2


@dataclasses.dataclass
class Family:
    name: str
    make: Callable
    shape: tuple
    conditioning: Callable
    pipeline_call: Callable
    parameterization: str = "flow_matching"
    masked: bool = False  # the conditioning holds a padding mask


def _text(g, dtype, length, dim):
    return torch.randn(B, length, dim, generator=g, dtype=dtype)


def _padding(length, bool_mask=False):
    mask = torch.ones(B, length)
    mask[0, length - 2 :] = 0  # the first prompt is two tokens shorter
    return mask.bool() if bool_mask else mask


def _out(o):
    return o[0] if isinstance(o, tuple) else o.sample


# ---- UNets, DiT, PixArt: the scheduler's timestep as it is ---------------------------------------------------------
def _unet_call(model, x, timestep, cond):
    return _out(model(x, timestep.expand(x.shape[0]), **cond, return_dict=False))


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 + 6 * 4,  # pooled text (6) + 6 micro-conditions x 4
    ).eval()


def _sdxl_cond(g, dtype):
    return {
        "encoder_hidden_states": _text(g, dtype, 5, 12),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(B, 6, generator=g, dtype=dtype),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * B, dtype=dtype),
        },
    }


def _dit_call(model, x, timestep, cond):
    out = _out(model(x, timestep.expand(x.shape[0]), **cond, return_dict=False))
    return out.chunk(2, dim=1)[0]  # DiTPipeline: learned sigma


def tiny_pixart(**overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "num_layers": 1,
        "patch_size": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "caption_channels": 32,
        "in_channels": 4,
        "cross_attention_dim": 16,
        "out_channels": 8,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }
    return PixArtTransformer2DModel(**{**config, **overrides}).eval()


def _pixart_call(model, x, timestep, cond):  # PixArtSigmaPipeline
    out = model(
        x,
        encoder_hidden_states=cond["encoder_hidden_states"],
        encoder_attention_mask=cond["encoder_attention_mask"],
        timestep=timestep.expand(x.shape[0]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    return out.chunk(2, dim=1)[0]


# ---- flow-matching transformers ------------------------------------------------------------------------------------
def tiny_sd3(**overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    config = {
        "sample_size": 8,
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 32,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 64,
        "out_channels": 4,
    }
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def _sd3_call(model, x, timestep, cond):  # StableDiffusion3Pipeline
    return model(hidden_states=x, timestep=timestep.expand(x.shape[0]), **cond, return_dict=False)[0]


def tiny_flux(guidance_embeds=False, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    config = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": [4, 4, 8],
        "guidance_embeds": guidance_embeds,
    }
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


def _flux_call(model, x, timestep, cond, pipeline="FluxPipeline"):  # FluxPipeline / ChromaPipeline
    import diffusers

    pipe = getattr(diffusers, pipeline)
    b, c, h, w = x.shape
    vae_scale = 8  # the pipelines' helpers take pixel sizes
    kwargs = dict(cond)
    if "guidance" in kwargs:
        kwargs["guidance"] = torch.full([1], float(kwargs["guidance"]), dtype=torch.float32).expand(b)
    out = model(
        hidden_states=pipe._pack_latents(x, b, c, h, w),
        timestep=timestep.expand(b).to(x.dtype) / 1000,
        img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
        txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3, dtype=x.dtype),
        **kwargs,
        return_dict=False,
    )[0]
    return pipe._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)


def tiny_chroma(**overrides):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    config = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "axes_dims_rope": [4, 4, 8],
        "approximator_num_channels": 8,
        "approximator_hidden_dim": 16,
        "approximator_layers": 1,
    }
    return ChromaTransformer2DModel(**{**config, **overrides}).eval()


def _chroma_call(model, x, timestep, cond):  # ChromaPipeline: the text mask joined with the image tokens
    from diffusers import ChromaPipeline

    cond = dict(cond)
    text_mask = cond.pop("encoder_attention_mask")
    image_tokens = x.shape[-2] * x.shape[-1] // 4
    cond["attention_mask"] = ChromaPipeline._prepare_attention_mask(None, x.shape[0], image_tokens, x.dtype, text_mask)
    return _flux_call(model, x, timestep, cond, "ChromaPipeline")


def tiny_sana(guidance_embeds=False):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
        guidance_embeds=guidance_embeds,
    ).eval()


def _sana_call(model, x, timestep, cond):  # SanaPipeline
    t = timestep.expand(x.shape[0]) * model.config.timestep_scale
    return model(x, timestep=t, **cond, return_dict=False)[0]


def tiny_qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def _qwen_call(model, x, timestep, cond):  # QwenImagePipeline
    from diffusers import QwenImagePipeline as pipe

    b, c, h, w = x.shape
    out = model(
        hidden_states=pipe._pack_latents(x, b, c, h, w),
        timestep=timestep.expand(b).to(x.dtype) / 1000,
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        **cond,
        return_dict=False,
    )[0]
    return pipe._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]  # (B, C, 1, H, W) -> (B, C, H, W)


def tiny_wan(**overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 1,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    }
    return WanTransformer3DModel(**{**config, **overrides}).eval()


def _wan_call(model, x, timestep, cond):  # WanPipeline
    return model(hidden_states=x, timestep=timestep.expand(x.shape[0]), **cond, return_dict=False)[0]


def tiny_lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=3,
        num_kv_heads=1,  # grouped-query attention
        multiple_of=2,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128),
        cap_feat_dim=8,
    ).eval()


def _lumina2_call(model, x, timestep, cond):  # Lumina2Pipeline: time 1 - t / 1000, negated prediction
    current = (1 - timestep / 1000).expand(x.shape[0])
    return -model(x, current, **cond, return_dict=False)[0]


def tiny_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    return AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    ).eval()


def _auraflow_call(model, x, timestep, cond):  # AuraFlowPipeline
    t = (timestep / 1000).expand(x.shape[0]).to(x.dtype)
    return model(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t, return_dict=False)[0]


FAMILIES = {
    f.name: f
    for f in [
        Family("unet", tiny_unet, (B, 1, 8, 8), lambda g, d: {}, _unet_call, "vp_epsilon"),
        Family(
            "sd15_unet",
            tiny_cond_unet,
            (B, 2, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 12), "encoder_attention_mask": _padding(5)},
            _unet_call,
            "vp_epsilon",
            masked=True,
        ),
        Family("sdxl_unet", tiny_sdxl_unet, (B, 2, 8, 8), _sdxl_cond, _unet_call, "vp_v"),
        Family(
            "dit", tiny_dit, (B, 4, 8, 8), lambda g, d: {"class_labels": torch.tensor([1, 7])}, _dit_call, "vp_epsilon"
        ),
        Family(
            "pixart",
            tiny_pixart,
            (B, 4, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 32), "encoder_attention_mask": _padding(5)},
            _pixart_call,
            "vp_epsilon",
            masked=True,
        ),
        Family(
            "sd3",
            tiny_sd3,
            (B, 4, 8, 8),
            lambda g, d: {
                "encoder_hidden_states": _text(g, d, 5, 32),
                "pooled_projections": torch.randn(B, 64, generator=g, dtype=d),
            },
            _sd3_call,
        ),
        Family(
            "flux",
            tiny_flux,
            (B, 4, 8, 8),
            lambda g, d: {
                "encoder_hidden_states": _text(g, d, 5, 32),
                "pooled_projections": torch.randn(B, 32, generator=g, dtype=d),
            },
            _flux_call,
        ),
        Family(
            "flux_guidance",
            lambda: tiny_flux(guidance_embeds=True),
            (B, 4, 8, 8),
            lambda g, d: {
                "encoder_hidden_states": _text(g, d, 5, 32),
                "pooled_projections": torch.randn(B, 32, generator=g, dtype=d),
                "guidance": 3.5,
            },
            _flux_call,
        ),
        Family(
            "chroma",
            tiny_chroma,
            (B, 4, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 32), "encoder_attention_mask": _padding(5, True)},
            _chroma_call,
            masked=True,
        ),
        Family(
            "sana",
            tiny_sana,
            (B, 4, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 8), "encoder_attention_mask": _padding(5)},
            _sana_call,
            masked=True,
        ),
        Family(
            "qwenimage",
            tiny_qwen,
            (B, 4, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 16), "encoder_hidden_states_mask": _padding(5)},
            _qwen_call,
            masked=True,
        ),
        Family(
            "wan",
            tiny_wan,
            (B, 4, 2, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 16)},
            _wan_call,
        ),
        Family(
            "lumina2",
            tiny_lumina2,
            (B, 4, 8, 8),
            lambda g, d: {
                "encoder_hidden_states": _text(g, d, 5, 8),
                "encoder_attention_mask": _padding(5, bool_mask=True),
            },
            _lumina2_call,
            masked=True,
        ),
        Family(
            "auraflow",
            tiny_auraflow,
            (B, 4, 8, 8),
            lambda g, d: {"encoder_hidden_states": _text(g, d, 5, 32)},
            _auraflow_call,
        ),
    ]
}
