"""The tiny random text-to-image pipelines of tests/t2i_pipelines.py: each family's own diffusers pipeline generates
32x32 images from prompts, its `encode_prompt` returns what the pipeline consumes, the tokenizers hold the small
vocabulary as whole words, and a saved pipeline reloads offline to identical images."""

import inspect
import json

import pytest
import torch
from diffusers import DiffusionPipeline
from t2i_pipelines import (
    FAMILIES,
    FAMILY_SPECS,
    IMAGE_SIZE,
    VAE_SCALE_FACTOR,
    WORDS,
    call_kwargs,
    clip_tokenizer,
    gemma_tokenizer,
    save_tiny_pipeline,
    t5_tokenizer,
    tiny_pipeline,
)


PROMPTS = ["a red fox", "digit seven"]
LATENT = IMAGE_SIZE // VAE_SCALE_FACTOR


def generate(pipe, family, **kwargs):
    """`pipe(prompt=PROMPTS, ...)` at 32x32 with 2 steps and the family's guidance scale; kwargs override."""
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 2, "output_type": "pt", **call_kwargs(family), **kwargs}
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


# ---- tokenizers -----------------------------------------------------------------------------------------------------
TOKENIZERS = {"clip": clip_tokenizer, "t5": t5_tokenizer, "gemma": gemma_tokenizer}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_tokenizer_words_and_round_trip(kind, tmp_path):
    tokenizer = TOKENIZERS[kind]()
    specials = set(tokenizer.all_special_ids)
    for word in WORDS:  # every vocabulary word is one token (after the first word, for Gemma's "▁word" form too)
        for text in (word, f"a {word}"):
            ids = [i for i in tokenizer(text).input_ids if i not in specials]
            assert len(ids) == len(text.split()), (kind, text, tokenizer.convert_ids_to_tokens(ids))
    texts = PROMPTS + ["A Squirrel, eating an éclair!", ""]
    encoded = tokenizer(texts).input_ids
    assert tokenizer.batch_decode(tokenizer(PROMPTS).input_ids, skip_special_tokens=True) == PROMPTS

    tokenizer.save_pretrained(tmp_path)
    loaded = type(tokenizer).from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(texts).input_ids == encoded
    assert loaded.model_max_length == tokenizer.model_max_length
    assert loaded.special_tokens_map == tokenizer.special_tokens_map


def test_special_tokens():
    clip, t5, gemma = clip_tokenizer(), t5_tokenizer(), gemma_tokenizer()
    ids = clip("a red fox", padding="max_length", max_length=clip.model_max_length).input_ids
    assert ids[0] == clip.bos_token_id and ids[4] == clip.eos_token_id and ids[5:] == [clip.pad_token_id] * 27
    assert (clip.bos_token, clip.eos_token, clip.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert t5("a red fox").input_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert t5.convert_ids_to_tokens(t5("a red fox").input_ids) == ["▁a", "▁red", "▁fox", "</s>"]
    assert gemma("a red fox").input_ids[0] == gemma.bos_token_id and gemma.pad_token_id == 0
    assert gemma.convert_ids_to_tokens(gemma("a red fox").input_ids) == ["<bos>", "a", "▁red", "▁fox"]
    assert gemma.decode(gemma("é!").input_ids, skip_special_tokens=True) == "é!"  # byte fallback, no <unk>


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_clip_pools_at_the_end_token(family):
    # eos_token_id is not 2, so transformers pools at the first "<|endoftext|>" (not at the largest id, CLIP's legacy)
    pipe = tiny_pipeline(family)
    encoder = pipe.text_encoder_2 if family == "sdxl" else pipe.text_encoder
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    eos = torch.tensor([4, 3])  # "<bos> a red fox <eos>", "<bos> digit seven <eos>"
    last = out.last_hidden_state[torch.arange(2), eos]
    if family == "sdxl":
        torch.testing.assert_close(out.text_embeds, encoder.text_projection(last))
    else:
        torch.testing.assert_close(out.pooler_output, last)


# ---- pipelines ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_generates(family):
    spec = FAMILY_SPECS[family]
    pipe = tiny_pipeline(family)
    assert type(pipe) is spec.pipeline_class
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert not component.training, name
            assert all(p.dtype == torch.float32 for p in component.parameters()), name
    vae = pipe.vae.config
    assert vae.latent_channels == spec.latent_channels and pipe.vae_scale_factor == VAE_SCALE_FACTOR
    assert vae.scaling_factor == spec.scaling_factor and vae.get("shift_factor") == spec.shift_factor
    assert spec.guidance_scale > 1

    images = generate(pipe, family)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a constant or saturated image

    latents = generate(pipe, family, output_type="latent")
    if family == "flux":  # FluxPipeline returns its packed latents: 2x2 patches as tokens
        assert latents.shape == (2, (LATENT // 2) ** 2, 4 * spec.latent_channels)
    else:
        assert latents.shape == (2, spec.latent_channels, LATENT, LATENT)


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_fixes_the_weights(family):
    state = torch.random.get_rng_state()
    first, again, other = tiny_pipeline(family, seed=0), tiny_pipeline(family, seed=0), tiny_pipeline(family, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    network = "unet" if "unet" in first.components else "transformer"
    for name in (network, "text_encoder", "vae"):
        a, b, c = (dict(p.components[name].named_parameters()) for p in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name
    assert torch.equal(generate(first, family), generate(again, family))


def _encode(pipe, family):
    if family == "sd3":
        out = pipe.encode_prompt(PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True)
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    elif family == "flux":
        out = pipe.encode_prompt(PROMPTS, prompt_2=None)
        names = ["prompt_embeds", "pooled_prompt_embeds", "text_ids"]
    elif family == "sana":  # the pipeline's call prepends its complex human instruction, encode_prompt's default not
        chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        out = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, complex_human_instruction=chi)
        names = ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"]
    elif family == "pixart_sigma":
        out = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
        names = ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"]
    elif family == "sd15":
        out = pipe.encode_prompt(PROMPTS, "cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        names = ["prompt_embeds", "negative_prompt_embeds"]
    else:  # sdxl
        out = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, out, strict=True))  # named by the pipeline keywords that take them back


L_CLIP = 32  # CLIP tokenizer.model_max_length
EXPECTED_SHAPES = {  # (batch, sequence length, width) of the text embeddings, (batch, width) of the pooled ones
    "sd3": {"prompt_embeds": (2, L_CLIP + 256, 64), "pooled_prompt_embeds": (2, 16 + 32)},  # CLIP ++ T5 (256)
    "flux": {"prompt_embeds": (2, 512, 32), "pooled_prompt_embeds": (2, 32), "text_ids": (512, 3)},
    "sana": {"prompt_embeds": (2, 300, 16), "prompt_attention_mask": (2, 300)},
    "pixart_sigma": {"prompt_embeds": (2, 300, 32), "prompt_attention_mask": (2, 300)},
    "sd15": {"prompt_embeds": (2, L_CLIP, 32)},
    "sdxl": {"prompt_embeds": (2, L_CLIP, 16 + 32), "pooled_prompt_embeds": (2, 32)},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompt(family):
    pipe = tiny_pipeline(family)
    with torch.no_grad():
        out = _encode(pipe, family)
    for name, shape in EXPECTED_SHAPES[family].items():
        assert out[name].shape == shape, name
        negative = name.replace("prompt", "negative_prompt", 1)
        if negative in out:
            assert out[negative].shape == shape, negative
    assert all(torch.isfinite(v).all() for v in out.values())
    embeds = out["prompt_embeds"]
    assert embeds.dtype == torch.float32 and not torch.allclose(embeds[0], embeds[1])

    if family == "sd3":  # the CLIP states (16 + 32 wide) are zero-padded to the T5 width (64)
        assert not embeds[:, :L_CLIP, :48].eq(0).all() and embeds[:, :L_CLIP, 48:].eq(0).all()
    if family == "pixart_sigma":  # "▁a ▁red ▁fox </s>", "▁digit ▁seven </s>"
        assert out["prompt_attention_mask"].sum(1).tolist() == [4, 3]
        assert out["negative_prompt_attention_mask"].sum(1).tolist() == [1, 1]  # "</s>"
    if family == "sana":  # the negative prompt "" is "<bos>"; without the instruction, the prompts are 4 and 3 tokens
        assert out["negative_prompt_attention_mask"].sum(1).tolist() == [1, 1]
        plain = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[1]
        assert plain.sum(1).tolist() == [4, 3]  # "<bos> a ▁red ▁fox", "<bos> digit ▁seven"
    if family == "sdxl":  # force_zeros_for_empty_prompt
        assert out["negative_prompt_embeds"].eq(0).all() and out["negative_pooled_prompt_embeds"].eq(0).all()

    # the pipeline given these embeddings makes the images it makes from the prompts
    embeddings = {k: v for k, v in out.items() if k != "text_ids"}
    if family in ("sana", "pixart_sigma"):  # their negative_prompt defaults to "", which excludes negative embeddings
        embeddings["negative_prompt"] = None
    from_prompts = generate(pipe, family)
    from_embeddings = generate(pipe, family, prompt=None, **embeddings)
    torch.testing.assert_close(from_embeddings, from_prompts, atol=1e-6, rtol=0)


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}  # not _use_default_values and the like


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_offline(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = save_tiny_pipeline(family, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))

    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name, component in pipe.components.items():
        assert type(loaded.components[name]) is type(component), name
        if hasattr(component, "get_vocab"):
            assert loaded.components[name].get_vocab() == component.get_vocab(), name
            assert loaded.components[name].model_max_length == component.model_max_length, name
        if isinstance(component, torch.nn.Module):
            assert not loaded.components[name].training, name
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    assert torch.equal(generate(loaded, family), generate(pipe, family))
