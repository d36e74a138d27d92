"""Tiny random Lumina-Image 2.0, CogView4 and AuraFlow pipelines (`Lumina2Pipeline`, `CogView4Pipeline`,
`AuraFlowPipeline`) of diffusers' own classes, built offline (nothing is downloaded).

    tiny_pipeline(kind, seed=0)        "lumina2", "cogview4" or "auraflow": the pipeline, float32, eval mode
    save_tiny_pipeline(kind, folder)   saves it (safetensors) and checks that it loads back offline as the same class
    call_kwargs(kind)                  the call arguments of a 32x32 image (size, sequence length)

The networks follow diffusers' own tests (`tests/pipelines/lumina2/test_pipeline_lumina2.py`,
`cogview4/test_cogview4.py`, `aura_flow/test_pipeline_aura_flow.py`, `get_dummy_components`), with text widths set
to the tiny text encoders': `Lumina2Transformer2DModel` over a `Gemma2Model` (hidden size 16),
`CogView4Transformer2DModel` over a `GlmModel` (hidden size 32, as the test's), `AuraFlowTransformer2DModel` over a
`UMT5EncoderModel` (d_model 32).
The VAEs are `AutoencoderKL`s: Lumina2Pipeline fixes its `vae_scale_factor` at 8, so its VAE has four levels (32x32
pixels <-> 4x4 latents); the other two pipelines read the factor from the VAE, which has three levels here (8x8
latents). CogView4's VAE carries a `shift_factor` that its pipeline does not use (it decodes z = x0 / scaling_factor):
the codec must ignore it too. The schedulers are those of the released checkpoints (Lumina-Image 2.0: shift 6;
CogView4: dynamic shifting with the linear time shift; AuraFlow: shift 1.73).

Tokenizers: Lumina 2's `GemmaTokenizer` (BPE with byte fallback) has one token per word of `WORDS` and of the
pipeline's system prompt, so that the system prompt and " <Prompt Start> " take 26 tokens with "<bos>"; CogView4's
is a byte-level BPE `PreTrainedTokenizerFast` that prepends GLM-4's "[gMASK]<sop>" and pads on the left, as GLM-4's;
AuraFlow's is the `T5Tokenizer` of `t2i_pipelines`. `model_max_length` is the sequence length every call uses
(`SEQUENCE_LENGTH`; the pipelines' defaults, 256 and 1024, are longer). CogView4's 16 tokens make every prompt
exactly 16 tokens long (its pipeline pads a batch to its longest prompt, then on the left to a multiple of 16).
"""

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
)
from t2i_pipelines import (
    IMAGE_SIZE,
    WORDS,
    _autoencoder_kl,
    _gemma2_encoder,
    build_tiny,
    byte_fallback_vocab,
    byte_level_vocab,
    save_and_reload,
    t5_tokenizer,
    umt5_encoder,
)
from transformers import GemmaTokenizer, GlmConfig, GlmModel, PreTrainedTokenizerFast


__all__ = [
    "KINDS",
    "LATENT_CHANNELS",
    "LATENT_SIZE",
    "SEQUENCE_LENGTH",
    "GUIDANCE_SCALE",
    "call_kwargs",
    "glm_tokenizer",
    "lumina2_tokenizer",
    "save_tiny_pipeline",
    "tiny_pipeline",
]

KINDS = ("lumina2", "cogview4", "auraflow")
PIPELINES = {"lumina2": "Lumina2Pipeline", "cogview4": "CogView4Pipeline", "auraflow": "AuraFlowPipeline"}
LATENT_CHANNELS = {"lumina2": 4, "cogview4": 4, "auraflow": 4}
LATENT_SIZE = {"lumina2": IMAGE_SIZE // 8, "cogview4": IMAGE_SIZE // 4, "auraflow": IMAGE_SIZE // 4}
SEQUENCE_LENGTH = {"lumina2": 48, "cogview4": 16, "auraflow": 32}  # the tokenizers' model_max_length
GUIDANCE_SCALE = {"lumina2": 4.0, "cogview4": 5.0, "auraflow": 3.5}  # the pipelines' defaults (AuraFlow: 3.5)

# Lumina2Pipeline's system prompt (its `system_prompt`), and the words between it and the prompt
LUMINA2_SYSTEM_WORDS = tuple(
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts. <Prompt Start>".split()
)


def lumina2_tokenizer(model_max_length: int = SEQUENCE_LENGTH["lumina2"]) -> GemmaTokenizer:
    """A Gemma BPE tokenizer with byte fallback: "▁word" and "word" tokens for `WORDS` and the words of
    Lumina2Pipeline's system prompt. Ids: 0 "<pad>", 1 "<eos>", 2 "<bos>" (prepended), 3 "<unk>", 4 "<mask>"."""
    vocab, merges = byte_fallback_vocab(
        ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"), [*WORDS, *LUMINA2_SYSTEM_WORDS]
    )
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


GLM_SPECIAL = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")


def glm_tokenizer(model_max_length: int = SEQUENCE_LENGTH["cogview4"]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as GLM-4's: the 256 byte symbols, GLM's special tokens, one token per word of
    `WORDS` (after a space, "Ġword", and not); "[gMASK]<sop>" prepended to every sequence, padding ("<|endoftext|>")
    on the left."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = byte_level_vocab(GLM_SPECIAL, WORDS)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIAL])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=model_max_length,
    )


# ---- the pipelines --------------------------------------------------------------------------------------------------
def _lumina2(seed):
    tokenizer = lumina2_tokenizer()
    torch.manual_seed(1000 * seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=LATENT_SIZE["lumina2"],
        patch_size=2,
        in_channels=LATENT_CHANNELS["lumina2"],
        hidden_size=8,
        num_layers=2,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=16,  # the text encoder's hidden size
    )
    torch.manual_seed(1000 * seed + 1)
    vae = AutoencoderKL(  # four levels: Lumina2Pipeline's vae_scale_factor is 8
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS["lumina2"],
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,  # the test's (Flux VAE's) factors
        scaling_factor=1.5035,
    )
    torch.manual_seed(1000 * seed + 2)
    text_encoder = _gemma2_encoder(tokenizer, 16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)  # Alpha-VLLM/Lumina-Image-2.0's
    return Lumina2Pipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def _cogview4(seed):
    tokenizer = glm_tokenizer()
    torch.manual_seed(1000 * seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=LATENT_CHANNELS["cogview4"],
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=LATENT_CHANNELS["cogview4"],
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    torch.manual_seed(1000 * seed + 1)
    vae = _autoencoder_kl(LATENT_CHANNELS["cogview4"], 0.8, shift_factor=0.1)  # the pipeline ignores the shift
    torch.manual_seed(1000 * seed + 2)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = GlmModel(config)
    scheduler = FlowMatchEulerDiscreteScheduler(  # THUDM/CogView4-6B's
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return CogView4Pipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def _auraflow(seed):
    tokenizer = t5_tokenizer(SEQUENCE_LENGTH["auraflow"])
    torch.manual_seed(1000 * seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=LATENT_SIZE["auraflow"],
        patch_size=2,
        in_channels=LATENT_CHANNELS["auraflow"],
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,  # UMT5 d_model
        out_channels=LATENT_CHANNELS["auraflow"],
        pos_embed_max_size=256,
    )
    torch.manual_seed(1000 * seed + 1)
    text_encoder = umt5_encoder(tokenizer, 32)
    torch.manual_seed(1000 * seed + 2)
    vae = _autoencoder_kl(LATENT_CHANNELS["auraflow"], 0.13025)  # SDXL's VAE factor, as fal/AuraFlow
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)  # fal/AuraFlow's
    return AuraFlowPipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


_BUILDERS = {"lumina2": _lumina2, "cogview4": _cogview4, "auraflow": _auraflow}


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny random pipeline of `kind` (float32, eval mode, progress bar off); the same `seed` gives the same
    weights. The global torch RNG is left as it was."""
    return build_tiny(_BUILDERS, kind, seed)


def call_kwargs(kind: str, size: int = IMAGE_SIZE) -> dict:
    """The family pipeline's call arguments for a `size` x `size` image: the size and the sequence length every call
    of this package uses (the tokenizer's `model_max_length`)."""
    return {"height": size, "width": size, "max_sequence_length": SEQUENCE_LENGTH[kind]}


def noise(kind: str, seed: int, n: int = 2) -> torch.Tensor:
    """Unit noise of the latent shape of `kind` at IMAGE_SIZE, (n, C, h, w)."""
    shape = (n, LATENT_CHANNELS[kind], LATENT_SIZE[kind], LATENT_SIZE[kind])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def save_tiny_pipeline(kind: str, folder, seed: int = 0) -> DiffusionPipeline:
    """Save `tiny_pipeline(kind, seed)` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained`
    loads it back offline as the same class with the same components. Returns the pipeline that was saved."""
    pipe = tiny_pipeline(kind, seed)
    save_and_reload(pipe, folder)
    return pipe
