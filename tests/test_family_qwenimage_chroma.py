"""Qwen-Image and Chroma end to end against their own diffusers pipelines (SPEC.md section 8): the prompt encoding,
the latent codec, the teacher's guided ODE (Qwen-Image's true CFG with its norm rescale, Chroma's with its text mask),
the student folder in `SCMPipeline` and in the family pipeline, distillation with `examples/distill.py` and the latent
cache. Tiny random pipelines from tests/qwen_chroma_pipelines.py; nothing is downloaded. The adapters' JVPs against
float64 differences are in test_architectures.py (`qwen`, `chroma`)."""

import functools
import math

import pytest
import torch
from conftest import load_script
from family_checks import (
    RUN,
    SD,
    cache_batches,
    captioned_data_dir,
    check_losses,
    check_student,
    distill_from_cache,
    family_pipeline,
    prepare_cache,
    rel,
    scm_pipeline,
    teacher_ode,
    two_process_distillation,
)
from qwen_chroma_pipelines import GUIDANCE_SCALE, LATENT_CHANNELS, SEQUENCE_LENGTH, call_kwargs, save_tiny_pipeline
from qwen_chroma_pipelines import tiny_pipeline as tiny
from t2i_pipelines import IMAGE_SIZE

from diffusers_scm import SCMPipeline, TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.adapters import pack_latents, unpack_latents
from diffusers_scm.families import get_family, prompt_encoding
from diffusers_scm.training.objectives.common import teacher_velocity
from diffusers_scm.training.teacher import TextToImageTeacher


PROMPTS = ["a red fox", "a bowl of soup with a small blue bird"]  # different lengths: Qwen-Image pads the batch
KINDS = ("qwenimage", "chroma")
LATENT = IMAGE_SIZE // 4  # both VAEs downsample by 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(kind, seed, n=len(PROMPTS)):
    return torch.randn(n, LATENT_CHANNELS[kind], LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _guidance_kwargs(kind, w):
    """The family pipeline's classifier-free guidance at w against the empty prompt: Qwen-Image guides only with a
    negative prompt (`true_cfg_scale`), Chroma with `guidance_scale` > 1."""
    if kind == "qwenimage":
        return {"true_cfg_scale": w, **({"negative_prompt": ""} if w > 1 else {})}
    return {"guidance_scale": w}


def _native(kind, pipe, noise, output_type="latent", **kwargs):
    """The family pipeline from `noise` (B, C, h, w), packed as it takes latents; latents come back unpacked."""
    out = pipe(prompt=PROMPTS, latents=pack_latents(noise), output_type=output_type, **call_kwargs(kind), **kwargs)
    return unpack_latents(out.images, LATENT, LATENT) if output_type == "latent" else out.images


def test_the_family_declarations():
    qwen, chroma = get_family("QwenImagePipeline"), get_family("ChromaPipeline")
    assert qwen.codec.__name__ == "QwenImageCodec" and chroma.codec is None
    assert qwen.own_sampler == chroma.own_sampler == "sigmas" and not (qwen.video or chroma.video)
    pipe = tiny("qwenimage")
    system = pipe.tokenizer(pipe.prompt_template_encode.format("")).input_ids[: pipe.prompt_template_encode_start_idx]
    assert pipe.tokenizer.decode(system).endswith("<|im_start|>user\n")  # the tiny tokenizer drops what Qwen's does


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_encoding_is_the_family_encode_prompt(kind):
    pipe = tiny(kind)
    encoding = prompt_encoding(pipe)
    assert encoding.sequence_length() == SEQUENCE_LENGTH[kind]
    cond, uncond = encoding.encode(PROMPTS, device="cpu")
    if kind == "qwenimage":  # padded to the fixed length, with the mask; the pipeline pads to the longest prompt
        pe, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQUENCE_LENGTH[kind])
        n = pe.shape[1]
        assert cond["encoder_hidden_states"].shape == (2, SEQUENCE_LENGTH[kind], 16) and n < SEQUENCE_LENGTH[kind]
        torch.testing.assert_close(cond["encoder_hidden_states"][:, :n], pe)
        assert (cond["encoder_hidden_states"][:, n:] == 0).all()
        torch.testing.assert_close(cond["encoder_hidden_states_mask"][:, :n], mask)
        assert cond["encoder_hidden_states_mask"][:, n:].sum() == 0 and mask[0].sum() < mask[1].sum()
        npe, _ = pipe.encode_prompt([""] * 2, max_sequence_length=SEQUENCE_LENGTH[kind])
        torch.testing.assert_close(uncond["encoder_hidden_states"][:, : npe.shape[1]], npe)
        given = {"prompt_embeds": pe, "prompt_embeds_mask": mask}
    else:
        pe, _, mask, npe, _, nmask = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQUENCE_LENGTH[kind])
        torch.testing.assert_close(cond["encoder_hidden_states"], pe)
        torch.testing.assert_close(cond["encoder_attention_mask"], mask)
        torch.testing.assert_close(uncond["encoder_hidden_states"], npe)
        torch.testing.assert_close(uncond["encoder_attention_mask"], nmask)
        given = {"prompt_embeds": pe, "prompt_attention_mask": mask}
    from_embeds, _ = encoding.encode(None, device="cpu", guidance=False, **given)
    for key, value in cond.items():
        torch.testing.assert_close(from_embeds[key], value)
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])


@pytest.mark.parametrize("kind", KINDS)
def test_latent_codec_is_the_pipelines_own(kind):
    """x0 -> image equals the family pipeline's own decode of the same latents (its `__call__` after 1 step), and
    encode is its img2img encode (Qwen-Image: the frame axis, (z - latents_mean) / latents_std)."""
    pipe = tiny(kind)
    codec = get_family(pipe).latent_codec(pipe.vae, sample=False)
    assert (codec.latent_channels, codec.scale_factor) == (LATENT_CHANNELS[kind], 4)
    with torch.no_grad():  # 2 steps: Qwen-Image's terminal stretch of a 1-step grid divides by 0
        latents = _native(kind, pipe, _noise(kind, 0), num_inference_steps=2, **_guidance_kwargs(kind, 1.0))
        images = _native(kind, pipe, _noise(kind, 0), "pt", num_inference_steps=2, **_guidance_kwargs(kind, 1.0))
    torch.testing.assert_close((codec.decode(latents) / 2 + 0.5).clamp(0, 1), images, rtol=1e-5, atol=1e-5)
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = codec.encode(pixels)
    assert x0.shape == (2, LATENT_CHANNELS[kind], LATENT, LATENT)
    if kind == "qwenimage":
        from diffusers import QwenImageImg2ImgPipeline

        img2img = QwenImageImg2ImgPipeline(**pipe.components)
        z = img2img._encode_vae_image(pixels[:, :, None], generator=None)  # sampled posterior: compare the mode
        mode = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(x0, ((mode - mean) / std)[:, :, 0])
        assert z.shape == (2, LATENT_CHANNELS[kind], 1, LATENT, LATENT)
    else:
        raw = pipe.vae.encode(pixels).latent_dist.mode()
        cfg = pipe.vae.config
        torch.testing.assert_close(x0, (raw - cfg.shift_factor) * cfg.scaling_factor)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_guided_ode_from_a_prompt_equals_the_family_pipeline(kind, guidance):
    """The package's teacher ODE (SCMPipeline + TrigFlowODEScheduler over the teacher's network, prompts through the
    family's encode_prompt, guidance combined by the adapter) equals the family pipeline with its own scheduler
    (FlowMatchEuler with dynamic shifting, Qwen-Image's exponential shift and terminal stretch) on the same grid;
    Qwen-Image's guidance rescales by the norm ratio."""
    pipe = tiny(kind)
    noise = _noise(kind, 0)
    with torch.no_grad():
        native = _native(kind, pipe, noise, num_inference_steps=4, **_guidance_kwargs(kind, guidance))
    mine, teacher = teacher_ode(
        pipe, PROMPTS, noise, guidance, network=pipe.transformer, height=IMAGE_SIZE, width=IMAGE_SIZE
    )
    p = teacher.denoiser.parameterization
    assert p.name == "flow_matching"
    assert rel(mine.images, native) < 1e-4
    if guidance == 1.0:
        return
    # the training velocity (sCD's teacher, SPEC.md section 3) guides the same way: sd F of the pipeline's combination
    x_t = noise * 0.8
    t = torch.full((2,), 0.7)
    cond, uncond = teacher.encoding.encode(PROMPTS, device="cpu")
    dxdt = teacher_velocity(teacher.denoiser, x_t, t, None, None, SD, guidance, cond, uncond)
    sample, timestep = p.model_inputs(x_t, t)
    raw = [pipe.transformer(**_call(kind, pipe, sample, timestep, c)) for c in _native_conditioning(kind, pipe)]
    raw_c, raw_u = (unpack_latents(r[0], LATENT, LATENT) for r in raw)
    combined = raw_u + guidance * (raw_c - raw_u)
    if kind == "qwenimage":  # QwenImagePipeline.__call__: comb * |cond| / |comb| over each packed token
        c, g = pack_latents(raw_c), pack_latents(combined)
        combined = unpack_latents(g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True)), LATENT, LATENT)
    expected = SD * p.to_trigflow(combined, x_t, t)
    torch.testing.assert_close(dxdt, expected, rtol=1e-4, atol=1e-5)
    linear = SD * p.to_trigflow(raw_u + guidance * (raw_c - raw_u), x_t, t)
    assert (kind == "qwenimage") == (not torch.allclose(dxdt, linear, rtol=1e-3, atol=1e-4))


@pytest.mark.parametrize("backend", ["math", "blocked"])
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_with_the_familys_own_conditioning_matches_float64_finite_differences(kind, backend):
    """The student's tangent (sCD's JVP, SPEC.md section 6) through the network called with the conditioning this
    package gives it (Qwen-Image's padded text and its integer mask, Chroma's floating mask added to the scores)
    equals float64 central differences."""
    from diffusers_scm.jvp import float64_precision, jvp

    pipe = tiny(kind)
    cond, _ = prompt_encoding(pipe).encode(PROMPTS, device="cpu", guidance=False)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    p = TextToImageTeacher(pipe).denoiser.parameterization
    den = TrigFlowDenoiser(pipe.transformer.double(), p, sigma_data=SD)
    x = _noise(kind, 4).double()
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -1.2], dtype=torch.float64)
    f = functools.partial(den, **cond)
    _, tangent = jvp(f, (x, t), (dx, dt), backend=backend, block_size=3 if backend == "blocked" else None)
    with float64_precision(), torch.no_grad():
        h = 1e-6
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_the_guided_teacher_of_a_lora_student_is_the_base_network():
    """A LoRA student's teacher (`BaseModelDenoiser`: the student's network with its adapters off) guides with
    Qwen-Image's rescale on the base weights, not on the student's."""
    import copy

    from diffusers_scm.training.machinery.lora import BaseModelDenoiser, add_lora

    pipe = tiny("qwenimage")
    teacher = TextToImageTeacher(pipe)
    p = teacher.denoiser.parameterization
    network = copy.deepcopy(pipe.transformer)
    add_lora(network, 4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(0))
    base = BaseModelDenoiser(network, p, sigma_data=SD)
    cond, uncond = teacher.encoding.encode(PROMPTS, device="cpu")
    x_t, t = _noise("qwenimage", 1), torch.full((2,), 0.9)
    with torch.no_grad():
        expected = teacher.denoiser.guided(x_t, t, 4.0, cond, uncond)
        torch.testing.assert_close(base.guided(x_t, t, 4.0, cond, uncond), expected)
        student = TrigFlowDenoiser(network, p, sigma_data=SD)
        assert not torch.allclose(student.guided(x_t, t, 4.0, cond, uncond), expected, atol=1e-3)


def _native_conditioning(kind, pipe):
    """(cond, uncond) as the family pipeline's `__call__` makes them (its encode_prompt, its masks)."""
    length = SEQUENCE_LENGTH[kind]
    if kind == "qwenimage":
        pe, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        npe, nmask = pipe.encode_prompt([""] * 2, max_sequence_length=length)
        return [{"encoder_hidden_states": e, "encoder_hidden_states_mask": m} for e, m in ((pe, mask), (npe, nmask))]
    pe, ids, mask, npe, nids, nmask = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
    tokens = LATENT * LATENT // 4
    return [
        {
            "encoder_hidden_states": e,
            "txt_ids": i,
            "attention_mask": pipe._prepare_attention_mask(2, tokens, e.dtype, m),
        }
        for e, i, m in ((pe, ids, mask), (npe, nids, nmask))
    ]


def _call(kind, pipe, sample, timestep, conditioning):
    """The network call of the family pipeline's loop (packed latents, time s = timestep / 1000, positions)."""
    kwargs = {"hidden_states": pack_latents(sample), "timestep": timestep / 1000, "return_dict": False}
    if kind == "qwenimage":
        kwargs["img_shapes"] = [[(1, LATENT // 2, LATENT // 2)]] * sample.shape[0]
    else:
        kwargs["img_ids"] = pipe._prepare_latent_image_ids(1, LATENT // 2, LATENT // 2, "cpu", sample.dtype)
    return {**kwargs, **conditioning}


@pytest.mark.parametrize("kind", KINDS)
def test_unused_parameters_are_exactly_those_without_a_gradient(kind):
    """The adapter names the parameters the prediction never reads (Qwen-Image: its last block's text-stream output),
    which distillation freezes so that DDP does not wait for their gradients: exactly those get none."""
    from diffusers_scm.adapters import get_adapter

    pipe = tiny(kind)
    network = pipe.transformer.requires_grad_(True)
    cond, _ = prompt_encoding(pipe).encode(PROMPTS, device="cpu", guidance=False)
    out = get_adapter(network)(network, _noise(kind, 0), torch.full((2,), 500.0), **cond)
    out.square().mean().backward()
    unused = get_adapter(network).unused_parameters(network)
    without = {n for n, p in network.named_parameters() if p.grad is None}
    assert without == {n for n, _ in network.named_parameters() if n.startswith(unused)}
    assert bool(without) == (kind == "qwenimage")


def _student_folder(kind, tmp_path):
    """A flow student saved as a pipeline folder: the teacher's network (any weights do for sampling checks), VAE,
    text encoder and tokenizer, with the consistency scheduler of a flow-matching student (t_max = pi/2)."""
    folder = tmp_path / f"{kind}-student"
    scheduler = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    scm_pipeline(tiny(kind), scheduler).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_student_folder_samples_the_same_in_scm_pipeline_and_the_family_pipeline(kind, steps, tmp_path, monkeypatch):
    """One folder, two samplers: SCMPipeline.from_pretrained(folder) and the family's own pipeline class with
    diffusers' FlowMatchLCMScheduler give the same image from the same noise and prompts. The family pipelines draw
    the 2-step re-noising noise in their packed token layout; it is drawn here in the latent layout and packed, so
    that both samplers re-noise with the same draws."""
    from diffusers.schedulers import scheduling_flow_match_lcm

    folder = _student_folder(kind, tmp_path)
    ours = SCMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    theirs = family_pipeline(folder, ours.config.family_pipeline)
    draw = scheduling_flow_match_lcm.randn_tensor

    def latent_layout_draw(shape, **kwargs):
        b, n, d = shape
        return pack_latents(draw((b, d // 4, LATENT, LATENT), **kwargs))

    monkeypatch.setattr(scheduling_flow_match_lcm, "randn_tensor", latent_layout_draw)
    noise = _noise(kind, 2)
    sigmas = ours.scheduler.flow_sigmas(steps)
    torch.manual_seed(7)  # the re-noising draws of both schedulers (the family pipelines pass no generator)
    cfg_off = {"true_cfg_scale": 1.0} if kind == "qwenimage" else {"guidance_scale": 1.0}
    reference = _native(kind, theirs, noise, output_type="pt", num_inference_steps=steps, sigmas=sigmas, **cfg_off)
    torch.manual_seed(7)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image = ours(prompt=PROMPTS, num_inference_steps=steps, latents=noise, output_type="pt", **size).images
    torch.testing.assert_close(image, reference, rtol=1e-4, atol=1e-4)
    # prompt embeddings as the family's encode_prompt returns them give the same images
    if kind == "qwenimage":
        pe, mask = theirs.encode_prompt(PROMPTS, max_sequence_length=SEQUENCE_LENGTH[kind])
        embeds = {"prompt_embeds": pe, "prompt_embeds_mask": mask}
    else:
        pe, _, mask, *_ = theirs.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=SEQUENCE_LENGTH[kind]
        )
        embeds = {"prompt_embeds": pe, "prompt_attention_mask": mask}
    torch.manual_seed(7)
    again = ours(num_inference_steps=steps, latents=noise, output_type="pt", **size, **embeds).images
    torch.testing.assert_close(again, image, rtol=1e-5, atol=1e-5)


# ---- distillation ---------------------------------------------------------------------------------------------------


data_dir = captioned_data_dir()  # a captioned image folder in the `datasets` imagefolder convention


def _check_student(out, family):
    return check_student(out, family, PROMPTS, IMAGE_SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_distill_a_few_steps_and_sample_the_student_from_prompts(kind, tmp_path, data_dir):
    """`distill.py --teacher FOLDER --method scd` in this process (2 sCD steps with guidance), then the student from
    prompts at 1 and 2 steps, in SCMPipeline and in its family pipeline (1 step, the same images)."""
    teacher = tmp_path / kind
    pipe = save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    load_script("distill").main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--caption_column", "text", *RUN]
        + ["--method", "scd", "--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(out)]
        + ["--max_train_steps", "2"]
    )
    check_losses(out, 2)
    student = _check_student(out, type(pipe).__name__)
    family = family_pipeline(out, type(pipe).__name__)
    noise = _noise(kind, 3)
    cfg_off = {"true_cfg_scale": 1.0} if kind == "qwenimage" else {"guidance_scale": 1.0}
    sigmas = student.scheduler.flow_sigmas(1)
    theirs = _native(kind, family, noise, output_type="pt", num_inference_steps=1, sigmas=sigmas, **cfg_off)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ours = student(prompt=PROMPTS, num_inference_steps=1, latents=noise, output_type="pt", **size).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("qwenimage", ["--method", "scd", "--lora_rank", "4"]),
        ("chroma", ["--method", "tcm", "--stage2_max_train_steps", "1"]),
        ("qwenimage", ["--method", "tcm", "--stage2_max_train_steps", "1"]),
        ("chroma", ["--method", "scd", "--lora_rank", "4"]),
    ],
)
def test_lora_and_tcm_students(kind, extra, tmp_path, data_dir):
    """A LoRA sCD student (Qwen-Image: adapters on the last block's unused text output are frozen too) and a TCM
    student of each family, each a step or two, sample from prompts."""
    teacher = tmp_path / kind
    pipe = save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    load_script("distill").main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), *RUN, *extra]
        + ["--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(out), "--max_train_steps", "1"]
    )
    _check_student(out, type(pipe).__name__)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_round_trip_and_training_from_it(kind, tmp_path, data_dir, monkeypatch):
    """prepare_data.py writes the latent cache (batches of prompts of different lengths: Qwen-Image's fixed-length
    padding keeps one shape); cached and on-the-fly batches are equal; a run from the cache never loads the
    teacher's text encoders."""
    from diffusers_scm.training.data.captions import load_text_image_dataset

    teacher_dir = tmp_path / kind
    save_tiny_pipeline(kind, teacher_dir)
    cache = tmp_path / "cache"
    prepare_cache(teacher_dir, data_dir, cache, IMAGE_SIZE, "--batch_size", "3")
    w = GUIDANCE_SCALE[kind]
    rows = load_text_image_dataset(str(data_dir), IMAGE_SIZE)
    batches = cache_batches(teacher_dir, cache, rows, 4, guidance_scale=w, resolution=IMAGE_SIZE)
    assert len(batches.data) == 4 and len(rows) == 4  # one batch: all rows
    out = tmp_path / "from-cache"
    distill_from_cache(
        monkeypatch,
        ["--teacher", str(teacher_dir), "--cache_dir", str(cache), "--dataset_name", str(data_dir)]
        + ["--output_dir", str(out), "--max_train_steps", "1", "--guidance_scale", str(w), *RUN],
    )
    assert SCMPipeline.from_pretrained(out).config.family_pipeline == batches.teacher.family


@pytest.mark.slow  # two processes (gloo on CPU), about 25 s each: `python -m pytest -m slow`
@pytest.mark.parametrize("kind, extra", [("qwenimage", []), ("qwenimage", ["--lora_rank", "4"]), ("chroma", [])])
def test_two_process_distillation(kind, extra, tmp_path, data_dir):
    """`accelerate launch --multi_gpu --num_processes 2 examples/distill.py --method scd` with a guided teacher (and a
    LoRA student of Qwen-Image: DDP with its unused text-stream output frozen), then the student from prompts at 1
    and 2 steps."""
    teacher = tmp_path / kind
    pipe = save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    two_process_distillation(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--caption_column", "text", *RUN, *extra]
        + ["--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(out), "--max_train_steps", "2"]
    )
    _check_student(out, type(pipe).__name__)
