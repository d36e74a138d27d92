"""Tiny random text-to-image pipelines of diffusers' own classes, built entirely offline (nothing is downloaded).

    tiny_pipeline(family, seed=0)       the family's diffusers pipeline, float32, eval mode, random weights
    save_tiny_pipeline(family, folder)  saves it (safetensors) and checks that `DiffusionPipeline.from_pretrained`
                                        loads the folder back, offline, as the same class
    call_kwargs(family)                 the call arguments for a 32x32 image: the family's guidance scale, the size,
                                        and what the pipeline needs at that size (no resolution binning)
    clip_tokenizer(), t5_tokenizer(), gemma_tokenizer()
                                        the tokenizers, over the small vocabulary `WORDS` written here

Families: "sd3", "flux", "sana", "pixart_sigma", "sd15", "sdxl". Each pipeline holds the components its class expects,
with the family's latent channels, VAE scaling/shift factors and scheduler (`FAMILY_SPECS`); the networks follow the
configs of diffusers' pipeline tests (`get_dummy_components`). Every VAE downsamples by 4 (`VAE_SCALE_FACTOR`), so a
32x32 image has an 8x8 latent. The tokenizers are the families' own transformers classes (`CLIPTokenizer`,
`T5Tokenizer`, `GemmaTokenizer`) whose vocabularies hold every word of `WORDS` as one token (CLIP and Gemma: BPE merges
built here; T5: unigram pieces); other words fall back to characters (CLIP, Gemma: bytes) or `<unk>` (T5).
"""

import dataclasses
import os
import string
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from diffusers_scm.training.data import text_encoders


__all__ = [
    "FAMILIES",
    "FAMILY_SPECS",
    "IMAGE_SIZE",
    "VAE_SCALE_FACTOR",
    "WORDS",
    "add_special_tokens",
    "build_tiny",
    "byte_fallback_vocab",
    "byte_level_vocab",
    "call_kwargs",
    "clip_tokenizer",
    "finish_tiny",
    "flux_scheduler",
    "gemma_tokenizer",
    "save_and_reload",
    "save_tiny_pipeline",
    "t5_tokenizer",
    "tiny_pipeline",
    "umt5_encoder",
]

# ---- vocabulary and tokenizers --------------------------------------------------------------------------------------
WORDS = tuple(
    "a an the of in on with and red blue green yellow white black fox cat dog bird bowl soup photo painting picture "
    "squirrel eating burger small large digit zero one two three four five six seven eight nine".split()
)
CLIP_MAX_LENGTH = 32  # tokenizer.model_max_length: the CLIP sequence length of every family
# as released T5 / Gemma tokenizers: longer than the pipelines' max_sequence_length (256, 300, 512), which they keep
T5_MAX_LENGTH = 512
GEMMA_MAX_LENGTH = 512
_ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (byte-level, lower-cased, "</w>" word ends) over the 256 byte symbols and `WORDS`, each one
    token (the package's builder over this vocabulary). Ids: 0 "<|startoftext|>" (bos), 1 "<|endoftext|>" (eos, pad
    and unk, as in CLIP)."""
    return text_encoders.clip_tokenizer(WORDS, model_max_length)


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A T5 unigram tokenizer: "▁word" pieces for `WORDS` (score -1) and single characters (score -5), no sentinel
    tokens (the package's builder over this vocabulary). Ids: 0 "<pad>", 1 "</s>" (appended to every sequence), 2
    "<unk>"."""
    return text_encoders.t5_tokenizer(WORDS, model_max_length)


def byte_fallback_vocab(special, words) -> tuple[dict, list]:
    """The vocabulary and merges of a BPE tokenizer with byte fallback (Gemma, Llama, Mistral): `special` tokens
    first (ids 0, 1, ...), the 256 "<0xXX>" bytes, "▁" and the characters, and one token for each of `words` with and
    without the word mark "▁"."""
    vocab = {token: i for i, token in enumerate(special)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for c in ["▁"] + _ALPHABET:
        vocab[c] = len(vocab)
    words = list(dict.fromkeys(words))
    return vocab, text_encoders._word_merges(vocab, words + ["▁" + w for w in words], end_of_word_suffix="")


def byte_level_vocab(special, words, extra=()) -> tuple[dict, list]:
    """The vocabulary and merges of a byte-level BPE tokenizer (Qwen, GLM): `special` tokens first, the 256 byte
    symbols, and one token for each of `words` after a space ("Ġword") and not, and for each of `extra`."""
    from tokenizers import pre_tokenizers

    vocab = {token: i for i, token in enumerate(special)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    words = list(dict.fromkeys(words))
    merges = text_encoders._word_merges(vocab, words + ["Ġ" + w for w in words] + list(extra), end_of_word_suffix="")
    return vocab, merges


def add_special_tokens(tokenizer, tokens):
    """`tokenizer` with `tokens` added as special tokens (never split, not normalized)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in tokens], special_tokens=True)
    return tokenizer


def gemma_tokenizer(model_max_length: int = GEMMA_MAX_LENGTH) -> GemmaTokenizer:
    """A Gemma BPE tokenizer with byte fallback: "▁word" and "word" (first word) tokens for `WORDS`. Ids: 0 "<pad>",
    1 "<eos>", 2 "<bos>" (prepended to every sequence), 3 "<unk>", 4 "<mask>"."""
    vocab, merges = byte_fallback_vocab(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"), WORDS)
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


# ---- text encoders (random weights) ---------------------------------------------------------------------------------
def _clip_text_encoder(tokenizer, hidden_size, projection_dim=None, hidden_act="quick_gelu"):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # SD3/SDXL read hidden_states[-2]
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2: the pooled output is taken at the first eos token
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)


def _t5_encoder(tokenizer, d_model, umt5=False):
    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as the T5-XXL these families use
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config)


def umt5_encoder(tokenizer, d_model: int = 32) -> UMT5EncoderModel:
    """A `UMT5EncoderModel` (AuraFlow's and Wan's text encoder) of `d_model`, configured as `_t5_encoder`'s T5."""
    return _t5_encoder(tokenizer, d_model, umt5=True)


def _gemma2_encoder(tokenizer, hidden_size):
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # one sliding-window and one global layer
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as Gemma-2
        head_dim=8,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Gemma2Model(config)


# ---- VAEs -----------------------------------------------------------------------------------------------------------
VAE_SCALE_FACTOR = 4  # three VAE levels: 32x32 pixels <-> 8x8 latents
IMAGE_SIZE = 32


def _autoencoder_kl(latent_channels, scaling_factor, shift_factor=None, quant_conv=True):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _autoencoder_dc(latent_channels, scaling_factor):
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32),  # the shortcuts need latent_channels | the last width
        decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=scaling_factor,
    )


# ---- the families ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What sets a family apart: its pipeline class, guidance scale, VAE latents, and extra call arguments."""

    pipeline_class: type
    guidance_scale: float  # the pipeline's default guidance scale
    latent_channels: int
    scaling_factor: float
    shift_factor: float | None
    extra_call_kwargs: dict = dataclasses.field(default_factory=dict)


_NO_BINNING = {"use_resolution_binning": False}  # binning maps 32x32 to the closest 1024-class size
FAMILY_SPECS = {
    "sd3": FamilySpec(StableDiffusion3Pipeline, 7.0, 16, 1.5305, 0.0609),
    "flux": FamilySpec(FluxPipeline, 3.5, 16, 0.3611, 0.1159),
    "sana": FamilySpec(SanaPipeline, 4.5, 32, 0.41407, None, _NO_BINNING),
    "pixart_sigma": FamilySpec(PixArtSigmaPipeline, 4.5, 4, 0.13025, None, {**_NO_BINNING, "clean_caption": False}),
    "sd15": FamilySpec(StableDiffusionPipeline, 7.5, 4, 0.18215, None),
    "sdxl": FamilySpec(StableDiffusionXLPipeline, 5.0, 4, 0.13025, None),
}
FAMILIES = tuple(FAMILY_SPECS)


def _seed(seed: int, component: int):
    """Seed the weights of one component: `seed` picks the pipeline, `component` keeps its components independent."""
    torch.manual_seed(1000 * seed + component)


def _sd3(spec, seed):
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    _seed(seed, 0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5 d_model
        pooled_projection_dim=16 + 32,  # the two CLIP projections, concatenated
        pos_embed_max_size=16,
    )
    _seed(seed, 1)
    text_encoder = _clip_text_encoder(tokenizer, 16, projection_dim=16)
    _seed(seed, 2)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, 32, projection_dim=32, hidden_act="gelu")
    _seed(seed, 3)
    text_encoder_3 = _t5_encoder(tokenizer_3, 64)
    _seed(seed, 4)
    vae = _autoencoder_kl(spec.latent_channels, spec.scaling_factor, spec.shift_factor, quant_conv=False)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def flux_scheduler(**kwargs) -> FlowMatchEulerDiscreteScheduler:
    """Flux's released scheduler (also Chroma's and FLUX.2's, with `kwargs` on top): shift 3 and dynamic shifting,
    mu from the image sequence length."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        **kwargs,
    )


def _flux(spec, seed):
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    _seed(seed, 0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,  # 2x2 latent patches packed into tokens
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP pooled output
        axes_dims_rope=[4, 6, 6],
        guidance_embeds=True,  # FLUX.1-dev: guidance-distilled
    )
    _seed(seed, 1)
    text_encoder = _clip_text_encoder(tokenizer, 32)
    _seed(seed, 2)
    text_encoder_2 = _t5_encoder(tokenizer_2, 32)
    _seed(seed, 3)
    vae = _autoencoder_kl(spec.latent_channels, spec.scaling_factor, spec.shift_factor, quant_conv=False)
    scheduler = flux_scheduler()
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "vae": vae,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _sana(spec, seed):
    tokenizer = gemma_tokenizer()
    _seed(seed, 0)
    transformer = SanaTransformer2DModel(
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,  # Gemma-2 hidden size
        sample_size=8,
        patch_size=1,
    )
    _seed(seed, 1)
    text_encoder = _gemma2_encoder(tokenizer, 16)
    _seed(seed, 2)
    vae = _autoencoder_dc(spec.latent_channels, spec.scaling_factor)
    scheduler = DPMSolverMultistepScheduler(  # as Sana's checkpoints ship it
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": scheduler,
    }


def _pixart_sigma(spec, seed):
    tokenizer = t5_tokenizer()
    _seed(seed, 0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,  # T5 d_model
        in_channels=spec.latent_channels,
        out_channels=2 * spec.latent_channels,  # learned variance
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    _seed(seed, 1)
    text_encoder = _t5_encoder(tokenizer, 32)
    _seed(seed, 2)
    vae = _autoencoder_kl(spec.latent_channels, spec.scaling_factor)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    }


_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _sd15(spec, seed):
    tokenizer = clip_tokenizer()
    _seed(seed, 0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,  # CLIP hidden size
        attention_head_dim=4,
        norm_num_groups=4,
    )
    _seed(seed, 1)
    text_encoder = _clip_text_encoder(tokenizer, 32)
    _seed(seed, 2)
    vae = _autoencoder_kl(spec.latent_channels, spec.scaling_factor)
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sdxl(spec, seed):
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    _seed(seed, 0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32,  # the two CLIP hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + 6 micro-conditions x 8
        norm_num_groups=4,
    )
    _seed(seed, 1)
    text_encoder = _clip_text_encoder(tokenizer, 16)
    _seed(seed, 2)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, 32, projection_dim=32, hidden_act="gelu")
    _seed(seed, 3)
    vae = _autoencoder_kl(spec.latent_channels, spec.scaling_factor)
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "vae": vae,
        "scheduler": EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }


_BUILDERS = {
    "sd3": _sd3,
    "flux": _flux,
    "sana": _sana,
    "pixart_sigma": _pixart_sigma,
    "sd15": _sd15,
    "sdxl": _sdxl,
}


def _spec(family: str) -> FamilySpec:
    if family not in FAMILY_SPECS:
        raise ValueError(f"Unknown family {family!r}: use one of {', '.join(FAMILIES)}.")
    return FAMILY_SPECS[family]


def finish_tiny(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`pipe` with every network in eval mode and its progress bar off."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny(builders: dict, kind: str, seed: int) -> DiffusionPipeline:
    """`builders[kind](seed)`, a tiny pipeline, built with the global torch RNG left as it was and finished by
    `finish_tiny`."""
    if kind not in builders:
        raise ValueError(f"Unknown kind {kind!r}: use one of {', '.join(builders)}.")
    with torch.random.fork_rng(devices=[]):
        pipe = builders[kind](seed)
    return finish_tiny(pipe)


def tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny random pipeline of `family` (its diffusers class, float32, eval mode, progress bar off); the same
    `seed` gives the same weights. The global torch RNG is left as it was."""
    spec = _spec(family)
    with torch.random.fork_rng(devices=[]):
        components = _BUILDERS[family](spec, seed)
    return finish_tiny(spec.pipeline_class(**components))


def call_kwargs(family: str, size: int = IMAGE_SIZE) -> dict:
    """Pipeline call arguments for a `size` x `size` image: the family's default guidance scale (> 1), the size, and
    `use_resolution_binning=False` (Sana, PixArt) / `clean_caption=False` (PixArt)."""
    spec = _spec(family)
    return {"guidance_scale": spec.guidance_scale, "height": size, "width": size, **spec.extra_call_kwargs}


@contextmanager
def _hub_offline():
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0) -> DiffusionPipeline:
    """Save `tiny_pipeline(family, seed)` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained`
    loads it back offline as the same class with the same components. Returns the pipeline that was saved."""
    pipe = tiny_pipeline(family, seed)
    save_and_reload(pipe, folder)
    return pipe


def save_and_reload(pipe: DiffusionPipeline, folder: str | os.PathLike) -> DiffusionPipeline:
    """Save `pipe` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained` loads it back offline
    as the same class with components of the same classes. Returns the pipeline loaded back."""
    pipe.save_pretrained(folder, safe_serialization=True)
    with _hub_offline():
        loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if type(loaded) is not type(pipe):
        raise RuntimeError(f"{folder} loads as {type(loaded).__name__}, not {type(pipe).__name__}.")
    saved = {k: type(v) for k, v in pipe.components.items()}
    reloaded = {k: type(v) for k, v in loaded.components.items()}
    if saved != reloaded:
        raise RuntimeError(f"{folder} loads back with components {reloaded}, not {saved}.")
    return loaded
