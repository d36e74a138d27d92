"""Tiny random FLUX.2 pipelines (`Flux2Pipeline`, `Flux2KleinPipeline`) of diffusers' own classes, built offline.

    tiny_pipeline(kind, seed=0)        "flux2" or "klein": the pipeline, float32, eval mode, random weights
    save_tiny_pipeline(kind, folder)   saves it (safetensors) and checks that it loads back offline as the same class
    call_kwargs(kind)                  the call arguments of a 32x32 image (guidance scale, size, sequence length)
    mistral_tokenizer(), qwen_tokenizer()
                                       the tokenizers over the small vocabulary `WORDS` (and the system message)

The networks follow diffusers' own tests (`tests/pipelines/flux2/test_pipeline_flux2.py`, `..._klein.py`:
`Flux2Transformer2DModel` with 1 + 1 blocks, `AutoencoderKLFlux2`), with a VAE of three levels (32x32 pixels <-> 8x8
latents <-> 4x4 patchified latents of 4 * `LATENT_CHANNELS` channels, 16 tokens) whose batch-norm running statistics
are random (the pipelines normalize the patchified latents with them), and the scheduler configuration of the released
checkpoints (dynamic shifting, with the pipelines' empirical mu). The text encoders are deep enough for the layers the
pipelines read by default (`text_encoder_out_layers`: Mistral's 10, 20, 30; Qwen3's 9, 18, 27) and narrow (16), so
the network reads 3 * 16 = 48 wide text tokens.

Tokenizers: the families' transformers classes built from vocabularies written here, nothing downloaded. Klein's is a
`Qwen2Tokenizer` (byte-level BPE) with Qwen3's chat template (`enable_thinking`); Flux.2 [dev] ships a
`PixtralProcessor`, which transformers builds only with torchvision (its image processor), so its tiny pipeline holds
the processor's tokenizer instead, a `LlamaTokenizer` (BPE with byte fallback) carrying a Mistral chat template of the
same layout ([SYSTEM_PROMPT] ... [/SYSTEM_PROMPT][INST] ... [/INST]): `Flux2Pipeline.encode_prompt` calls only its
`apply_chat_template`, which a processor forwards to its tokenizer for text-only messages. `pixtral_processor()`
wraps it in the processor where torchvision is installed.
"""

import os

import torch
from diffusers import (
    AutoencoderKLFlux2,
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from t2i_pipelines import (
    IMAGE_SIZE,
    WORDS,
    _seed,
    add_special_tokens,
    byte_fallback_vocab,
    byte_level_vocab,
    finish_tiny,
    flux_scheduler,
    save_and_reload,
)
from transformers import (
    LlamaTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)


__all__ = [
    "KINDS",
    "LATENT_CHANNELS",
    "SEQUENCE_LENGTH",
    "TEXT_WIDTH",
    "call_kwargs",
    "mistral_tokenizer",
    "pixtral_processor",
    "qwen_tokenizer",
    "save_tiny_pipeline",
    "tiny_pipeline",
]

KINDS = ("flux2", "klein")
LATENT_CHANNELS = 4  # the VAE's; x0 has 4 * 4 = 16 channels (2x2 patches)
TEXT_WIDTH = 16  # the text encoders' hidden size; the network reads three of their layers, 48 wide
# tokenizer.model_max_length, so the sequence length every call uses (the pipelines' default, 512, is longer): the
# system message and template take about 40 Mistral tokens and 15 Qwen tokens, the test prompts 2 to 5
SEQUENCE_LENGTH = {"flux2": 56, "klein": 32}
GUIDANCE_SCALE = {"flux2": 4.0, "klein": 4.0}  # the pipelines' defaults

# ---- tokenizers -----------------------------------------------------------------------------------------------------
_SYSTEM_WORDS = tuple(dict.fromkeys(SYSTEM_MESSAGE.split()))
MISTRAL_SPECIAL = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{% else %}{{ text + eos_token }}{% endif %}{% endfor %}"
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_CHAT_TEMPLATE = (  # Qwen3's layout: a generation prompt with an empty thinking block when thinking is off
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def mistral_tokenizer(model_max_length: int = SEQUENCE_LENGTH["flux2"]) -> LlamaTokenizer:
    """A `LlamaTokenizer` (BPE over "▁"-marked words with byte fallback) whose vocabulary holds the 256 bytes, the
    characters, Mistral's control tokens and one token for each of `WORDS` and of the words of Flux.2's system message
    (with and without the word mark); a Mistral chat template. Ids: 0 "<unk>", 1 "<s>" (bos), 2 "</s>" (eos), 3
    "<pad>"."""
    vocab, merges = byte_fallback_vocab(MISTRAL_SPECIAL, [*WORDS, *_SYSTEM_WORDS])
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return add_special_tokens(tokenizer, MISTRAL_SPECIAL[4:])


def pixtral_processor(tokenizer=None):
    """Flux.2's processor class over `mistral_tokenizer()` (needs torchvision for its image processor)."""
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    tokenizer = tokenizer or mistral_tokenizer()
    return PixtralProcessor(
        image_processor=PixtralImageProcessorPil(patch_size={"height": 6, "width": 6}),
        tokenizer=tokenizer,
        patch_size=6,
        chat_template=tokenizer.chat_template,
    )


def qwen_tokenizer(model_max_length: int = SEQUENCE_LENGTH["klein"]) -> Qwen2Tokenizer:
    """A `Qwen2Tokenizer` (byte-level BPE) whose vocabulary holds the 256 byte symbols, Qwen's control tokens and one
    token for each of `WORDS` and the chat roles (after a space, "Ġword", and not); Qwen3's chat template. Id 0 "<|endoftext|>" (eos,
    pad)."""
    # the chat roles, one token each as in Qwen's vocabulary
    vocab, merges = byte_level_vocab(QWEN_SPECIAL, [*WORDS, "user", "assistant"])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return add_special_tokens(tokenizer, QWEN_SPECIAL[1:])


# ---- text encoders (random weights) ---------------------------------------------------------------------------------
def _mistral3(tokenizer):
    """Mistral3ForConditionalGeneration as in diffusers' test, 30 language layers (Flux.2 reads 10, 20 and 30)."""
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "max_position_embeddings": 512,
            "num_attention_heads": 4,
            "num_hidden_layers": 30,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    return Mistral3ForConditionalGeneration(config)


def _qwen3(tokenizer):
    """Qwen3ForCausalLM as in diffusers' test, 27 layers (Klein reads 9, 18 and 27)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3ForCausalLM(config)


# ---- network, VAE, scheduler ----------------------------------------------------------------------------------------
def _transformer(guidance_embeds: bool):
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2x2 patchified latents, one token each
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three text-encoder layers, stacked
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,  # Flux.2 [dev]: guidance-distilled; Klein (base): true CFG
    )


def _vae():
    vae = AutoencoderKLFlux2(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
    )
    channels = vae.bn.num_features  # 4 * LATENT_CHANNELS: the statistics of the patchified latents
    vae.bn.running_mean.copy_(0.3 * torch.randn(channels))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels))
    return vae


def _scheduler():
    """The released checkpoints' scheduler: dynamic shifting with mu from the pipeline (`compute_empirical_mu`)."""
    return flux_scheduler(time_shift_type="exponential")


def _components(kind: str, seed: int) -> dict:
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}: use one of {', '.join(KINDS)}.")
    tokenizer = mistral_tokenizer() if kind == "flux2" else qwen_tokenizer()
    _seed(seed, 0)
    transformer = _transformer(guidance_embeds=kind == "flux2")
    _seed(seed, 1)
    text_encoder = _mistral3(tokenizer) if kind == "flux2" else _qwen3(tokenizer)
    _seed(seed, 2)
    with torch.no_grad():
        vae = _vae()
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": _scheduler(),
    }


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """The tiny random `Flux2Pipeline` ("flux2") or `Flux2KleinPipeline` ("klein"), float32, eval mode, progress bar
    off; the same `seed` gives the same weights. The global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        components = _components(kind, seed)
    return finish_tiny((Flux2Pipeline if kind == "flux2" else Flux2KleinPipeline)(**components))


def call_kwargs(kind: str, size: int = IMAGE_SIZE) -> dict:
    """Pipeline call arguments for a `size` x `size` image: the default guidance scale (> 1), the size, and the
    sequence length this package uses for the tiny tokenizers (`SEQUENCE_LENGTH`)."""
    return {
        "guidance_scale": GUIDANCE_SCALE[kind],
        "height": size,
        "width": size,
        "max_sequence_length": SEQUENCE_LENGTH[kind],
    }


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> DiffusionPipeline:
    """Save `tiny_pipeline(kind, seed)` to `folder` (safetensors) and check that `DiffusionPipeline.from_pretrained`
    loads it back offline as the same class with the same components. Returns the pipeline that was saved."""
    pipe = tiny_pipeline(kind, seed)
    save_and_reload(pipe, folder)
    return pipe
