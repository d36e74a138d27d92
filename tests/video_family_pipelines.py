"""Tiny random LTX-Video, HunyuanVideo and HunyuanVideo 1.5 pipelines of diffusers' own classes, built offline
(nothing is downloaded).

    tiny_pipeline(kind, seed=0)              kind in KINDS: "ltx" (LTXPipeline), "hunyuan" (HunyuanVideoPipeline),
                                             "hunyuan15" (HunyuanVideo15Pipeline); float32, eval mode
    save_tiny_pipeline(kind, folder, seed)   saved (safetensors) and checked to load back offline as its class
    call_kwargs(kind)                        the size arguments (height, width, num_frames) and the sequence length
    latent_shape(kind, n)                    (n, C, F', h, w) of SIZE[kind] x SIZE[kind] videos of NUM_FRAMES[kind] frames

The networks and VAEs follow diffusers' tests/pipelines/ltx/test_ltx.py, hunyuan_video/test_hunyuan_video.py and
hunyuan_video1_5/test_hunyuan_1_5.py (`get_dummy_components`), with three changes that make the tests see more: the
LTX VAE's `latents_mean` / `latents_std` buffers (zeros and ones when constructed) are set away from 0 and 1, so
the codec's normalization shows; the LTX VAE decodes with `timestep_conditioning` (as LTX-Video 0.9.1 and later);
and the tokenizers are built here over a small vocabulary (the prompt words and
the words of each pipeline's prompt template, so that the template's tokens are as many as the pipeline crops):

- LTX: a T5 unigram tokenizer and a T5 v1.1 encoder (d_model 32, the transformer's `caption_channels`);
- HunyuanVideo: a Llama BPE tokenizer (byte fallback, Llama-3 header tokens) and a `LlamaModel` (hidden size 16),
  a CLIP tokenizer and `CLIPTextModel` (hidden size 8, the pooled projection);
- HunyuanVideo 1.5: a Qwen2 byte-level BPE tokenizer with Qwen2.5's chat template and a `Qwen2_5_VLTextModel`
  (hidden size 16), the ByT5 tokenizer (bytes, no files) and a T5 encoder (d_model 32), a `ClassifierFreeGuidance`
  guider.
"""

import os
import re

import numpy as np
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from qwen_chroma_pipelines import qwen2_tokenizer
from t2i_pipelines import (
    WORDS,
    _seed,
    add_special_tokens,
    build_tiny,
    byte_fallback_vocab,
    save_and_reload,
)
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
)

from diffusers_scm.training.data import text_encoders


__all__ = [
    "KINDS",
    "PIPELINES",
    "SIZE",
    "NUM_FRAMES",
    "SEQUENCE_LENGTH",
    "call_kwargs",
    "latent_shape",
    "tiny_pipeline",
    "save_tiny_pipeline",
]

KINDS = ("ltx", "hunyuan", "hunyuan15")
PIPELINES = {"ltx": "LTXPipeline", "hunyuan": "HunyuanVideoPipeline", "hunyuan15": "HunyuanVideo15Pipeline"}
SIZE = {"ltx": 32, "hunyuan": 16, "hunyuan15": 16}  # pixels (LTXPipeline takes multiples of 32)
# frames: 4k + 1 (LTX, HunyuanVideo: 4x temporal compression), 2k + 1 (the 1.5 test VAE: 2x)
NUM_FRAMES = {"ltx": 5, "hunyuan": 5, "hunyuan15": 5}
# (C, F', h, w) of SIZE x SIZE videos of NUM_FRAMES frames: LTX 4x4x4 VAE, HunyuanVideo 8x8x4, 1.5's test VAE 4x4x2
LATENT = {"ltx": (8, 2, 8, 8), "hunyuan": (4, 2, 2, 2), "hunyuan15": (4, 3, 4, 4)}
# the tokenizers' model_max_length, so the `max_sequence_length` every call uses (PromptEncoding.sequence_length);
# HunyuanVideo 1.5's encode_prompt has no such argument (its lengths are fixed: 1000 Qwen and 256 ByT5 tokens)
SEQUENCE_LENGTH = {"ltx": 16, "hunyuan": 16, "hunyuan15": None}
LTX_LATENTS_MEAN = [0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.0, 0.15]
LTX_LATENTS_STD = [1.5, 0.8, 1.2, 2.0, 0.9, 1.1, 1.3, 0.7]

_LETTERS = re.compile(r"[A-Za-z]+")


def call_kwargs(kind: str) -> dict:
    """The family pipeline's size arguments for the tiny videos, and its `max_sequence_length` where it has one."""
    kwargs = {"height": SIZE[kind], "width": SIZE[kind], "num_frames": NUM_FRAMES[kind]}
    if SEQUENCE_LENGTH[kind] is not None:
        kwargs["max_sequence_length"] = SEQUENCE_LENGTH[kind]
    return kwargs


def latent_shape(kind: str, n: int = 2) -> tuple[int, ...]:
    return (n, *LATENT[kind])


# ---- tokenizers -----------------------------------------------------------------------------------------------------
LLAMA_SPECIAL = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>")
LLAMA_HEADERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _template_words(text: str) -> list[str]:
    return list(dict.fromkeys(_LETTERS.findall(text)))


def llama_tokenizer(model_max_length: int = SEQUENCE_LENGTH["hunyuan"]) -> LlamaTokenizer:
    """A `LlamaTokenizer` (BPE over "▁"-marked words with byte fallback) over the 256 bytes, the characters, one token
    for each of `WORDS` and of the words of HunyuanVideo's prompt template (with and without the word mark), and the
    Llama-3 header tokens of the template. Ids: 0 "<unk>", 1 "<|begin_of_text|>" (bos), 2 "<|end_of_text|>" (eos),
    3 "<pad>"."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    words = [*WORDS, *_template_words(DEFAULT_PROMPT_TEMPLATE["template"])]
    vocab, merges = byte_fallback_vocab(LLAMA_SPECIAL, words)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    return add_special_tokens(tokenizer, LLAMA_HEADERS)


QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (  # Qwen2.5's layout (string contents)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` (byte-level BPE) over the 256 byte symbols, Qwen's chat tokens and one token for each of
    `WORDS` and of the words of HunyuanVideo 1.5's system message (after a space, "Ġword", and not), with Qwen2.5's
    chat template. Id 0 "<|endoftext|>" (eos, pad)."""
    import inspect

    # the pipeline's system message (`_get_mllm_prompt_embeds`'s default, the one its __init__ sets)
    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    words = [*WORDS, *_template_words(system), "system", "user", "assistant"]
    spaces = ["ĠĠ", "ĠĠĠĠ", "ĠĠĠĠĠĠĠĠ"]
    return qwen2_tokenizer(words, QWEN_SPECIAL, 32768, extra=spaces, chat_template=QWEN_CHAT_TEMPLATE)


# ---- the pipelines --------------------------------------------------------------------------------------------------
def _ltx(seed):
    _seed(seed, 0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    _seed(seed, 1)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=True,  # as LTX-Video 0.9.1 and later: the decoder takes a decode timestep
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.latents_mean.copy_(torch.tensor(LTX_LATENTS_MEAN))
    vae.latents_std.copy_(torch.tensor(LTX_LATENTS_STD))
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    tokenizer = text_encoders.t5_tokenizer(WORDS, SEQUENCE_LENGTH["ltx"])
    _seed(seed, 2)
    text_encoder = text_encoders.t5_text_encoder(tokenizer, 32)
    scheduler = FlowMatchEulerDiscreteScheduler(  # Lightricks/LTX-Video's scheduler_config.json
        base_image_seq_len=1024,
        base_shift=0.95,
        max_image_seq_len=4096,
        max_shift=2.05,
        shift_terminal=0.1,
        use_dynamic_shifting=True,
    )
    return LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _hunyuan(seed):
    _seed(seed, 0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    _seed(seed, 1)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    tokenizer = llama_tokenizer()
    _seed(seed, 2)
    text_encoder = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            vocab_size=len(tokenizer),
            hidden_act="silu",
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = text_encoders.clip_tokenizer(WORDS, 77)  # the pipeline pads CLIP prompts to 77 tokens
    _seed(seed, 3)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
        )
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _hunyuan15(seed):
    _seed(seed, 0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # the latents, zero condition latents and a zero mask (text-to-video)
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )
    _seed(seed, 1)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    tokenizer = qwen_tokenizer()
    _seed(seed, 2)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = ByT5Tokenizer()
    _seed(seed, 3)
    text_encoder_2 = text_encoders.t5_text_encoder(tokenizer_2, 32)
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )


_BUILDERS = {"ltx": _ltx, "hunyuan": _hunyuan, "hunyuan15": _hunyuan15}


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny pipeline of `kind` (float32, eval mode, progress bar off); the same `seed` gives the same weights.
    The global torch RNG is left as it was."""
    return build_tiny(_BUILDERS, kind, seed)


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> DiffusionPipeline:
    """Save `tiny_pipeline(kind, seed)` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained`
    loads it back offline as the same class with the same components. Returns the pipeline that was saved."""
    pipe = tiny_pipeline(kind, seed)
    loaded = save_and_reload(pipe, folder)
    if kind == "ltx" and not np.allclose(loaded.vae.latents_std.numpy(), LTX_LATENTS_STD):
        raise RuntimeError(f"{folder}: the LTX VAE's latents_std did not load back.")
    return pipe
