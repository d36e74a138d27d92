"""Tiny random Qwen-Image and Chroma pipelines (`QwenImagePipeline`, `ChromaPipeline`) of diffusers' own classes,
built offline (nothing is downloaded).

    tiny_pipeline(kind, seed=0)        "qwenimage" or "chroma": the pipeline, float32, eval mode, random weights
    save_tiny_pipeline(kind, folder)   saves it (safetensors) and checks that it loads back offline as the same class
    call_kwargs(kind)                  the call arguments of a 32x32 image (size, sequence length)
    qwen_tokenizer()                   Qwen-Image's `Qwen2Tokenizer` over the small vocabulary (and its prompt template)

The networks follow diffusers' own tests (`tests/pipelines/qwenimage/test_qwenimage.py`,
`tests/pipelines/chroma/test_pipeline_chroma.py`, `get_dummy_components`): `QwenImageTransformer2DModel` with two
blocks over a `Qwen2_5_VLForConditionalGeneration` text encoder (hidden size 16) and an `AutoencoderKLQwenImage`
(a video VAE with a frame axis, 4 latent channels, per-channel `latents_mean` / `latents_std`, here not 0 and 1 so
that the normalization is exercised); `ChromaTransformer2DModel` with 1 + 1 blocks over a T5 encoder and Flux's
`AutoencoderKL` (16 latent channels, scaling and shift factors). Both VAEs downsample by 4: a 32x32 image has an 8x8
latent, 16 packed 2x2 tokens. The schedulers are those of the released checkpoints (dynamic shifting; Qwen-Image's
exponential time shift with `shift_terminal`).

Tokenizers: Qwen-Image's `Qwen2Tokenizer` is a byte-level BPE whose vocabulary holds the 256 byte symbols, Qwen's
control tokens and one token for each of `WORDS` and of the words of the pipeline's prompt template, so that the
template's system part is 34 tokens, as with the released tokenizer (`QwenImagePipeline` drops its first
`prompt_template_encode_start_idx` = 34 hidden states). Chroma's is the `T5Tokenizer` of `t2i_pipelines`.
`model_max_length` is the sequence length every call uses (`SEQUENCE_LENGTH`; the pipelines' default, 512, is longer).
"""

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from t2i_pipelines import (
    IMAGE_SIZE,
    WORDS,
    _autoencoder_kl,
    _t5_encoder,
    add_special_tokens,
    build_tiny,
    byte_level_vocab,
    flux_scheduler,
    save_and_reload,
    t5_tokenizer,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer


__all__ = [
    "KINDS",
    "LATENT_CHANNELS",
    "SEQUENCE_LENGTH",
    "call_kwargs",
    "qwen2_tokenizer",
    "qwen_tokenizer",
    "save_tiny_pipeline",
    "tiny_pipeline",
]

KINDS = ("qwenimage", "chroma")
LATENT_CHANNELS = {"qwenimage": 4, "chroma": 16}  # the VAEs' (x0's) channels; the networks read 2x2 packed tokens
# the text tokens every call pads or truncates to (`max_sequence_length`): Chroma's T5 tokenizer's `model_max_length`;
# Qwen-Image's tokenizer's `model_max_length` (64) less the 34 tokens of its template's system part
SEQUENCE_LENGTH = {"qwenimage": 30, "chroma": 32}
QWEN_MODEL_MAX_LENGTH = 64
GUIDANCE_SCALE = {"qwenimage": 4.0, "chroma": 5.0}  # QwenImagePipeline's true_cfg_scale, ChromaPipeline's guidance
# Qwen-Image's VAE statistics (per latent channel), away from 0 and 1 so that the codec's normalization shows
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.05]
LATENTS_STD = [1.5, 0.8, 1.2, 2.0]

# ---- Qwen-Image's tokenizer -----------------------------------------------------------------------------------------
QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# QwenImagePipeline's prompt template (`prompt_template_encode`): its system message and the chat roles
TEMPLATE_WORDS = tuple(
    "system Describe the image by detailing color shape size texture quantity text spatial relationships of "
    "objects and background user assistant".split()
)


def qwen2_tokenizer(words, special, model_max_length: int, extra=(), **kwargs) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` over `byte_level_vocab(special[:1], words, extra)`: `special[0]`, "<|endoftext|>" (id 0),
    is its eos and pad token (no bos, no unk), `special[1:]` are added as special tokens; `kwargs` (a chat template)
    go to the tokenizer."""
    vocab, merges = byte_level_vocab(special[:1], words, extra)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=special[0],
        pad_token=special[0],
        model_max_length=model_max_length,
        **kwargs,
    )
    return add_special_tokens(tokenizer, special[1:])


def qwen_tokenizer(model_max_length: int = QWEN_MODEL_MAX_LENGTH) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` (byte-level BPE): the 256 byte symbols, Qwen's control and vision tokens, and one token for
    each of `WORDS` and of the template's words (after a space, "Ġword", and not). Id 0 "<|endoftext|>" (eos, pad)."""
    return qwen2_tokenizer([*WORDS, *TEMPLATE_WORDS], QWEN_SPECIAL, model_max_length)


def _qwen_text_encoder(tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """diffusers' test configuration (hidden size 16, two layers, multimodal RoPE sections) over `tokenizer`'s ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.pad_token_id,  # as Qwen's: "<|endoftext|>"
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


# ---- the pipelines --------------------------------------------------------------------------------------------------
def _qwenimage(seed):
    tokenizer = qwen_tokenizer()
    torch.manual_seed(1000 * seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS["qwenimage"],  # 2x2 latent patches packed into tokens
        out_channels=LATENT_CHANNELS["qwenimage"],
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,  # the text encoder's hidden size
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(1000 * seed + 1)
    z_dim = LATENT_CHANNELS["qwenimage"]
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],  # two spatial downsamplings: 32x32 pixels <-> 8x8 latents
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    torch.manual_seed(1000 * seed + 2)
    text_encoder = _qwen_text_encoder(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image's scheduler_config.json
        base_image_seq_len=256,
        base_shift=float(np.log(3)),
        max_image_seq_len=8192,
        max_shift=float(np.log(3)),
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def _chroma(seed):
    tokenizer = t5_tokenizer(SEQUENCE_LENGTH["chroma"])
    torch.manual_seed(1000 * seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS["chroma"],
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        axes_dims_rope=[4, 6, 6],
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    torch.manual_seed(1000 * seed + 1)
    text_encoder = _t5_encoder(tokenizer, 32)
    torch.manual_seed(1000 * seed + 2)
    vae = _autoencoder_kl(LATENT_CHANNELS["chroma"], 0.3611, 0.1159, quant_conv=False)  # Flux's VAE factors
    scheduler = flux_scheduler()  # lodestones/Chroma's (Flux's) scheduler
    return ChromaPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


_BUILDERS = {"qwenimage": _qwenimage, "chroma": _chroma}


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny random pipeline of `kind` (float32, eval mode, progress bar off); the same `seed` gives the same
    weights. The global torch RNG is left as it was."""
    return build_tiny(_BUILDERS, kind, seed)


def call_kwargs(kind: str, size: int = IMAGE_SIZE) -> dict:
    """The family pipeline's call arguments for a `size` x `size` image: the size and the sequence length every call
    of this package uses (the tokenizer's `model_max_length`)."""
    return {"height": size, "width": size, "max_sequence_length": SEQUENCE_LENGTH[kind]}


def save_tiny_pipeline(kind: str, folder, seed: int = 0) -> DiffusionPipeline:
    """Save `tiny_pipeline(kind, seed)` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained`
    loads it back offline as the same class with the same components. Returns the pipeline that was saved."""
    pipe = tiny_pipeline(kind, seed)
    save_and_reload(pipe, folder)
    return pipe
