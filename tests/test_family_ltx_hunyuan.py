"""LTX-Video (`LTXPipeline`), HunyuanVideo (`HunyuanVideoPipeline`) and HunyuanVideo 1.5 (`HunyuanVideo15Pipeline`)
against diffusers' own pipelines: the teacher's guided ODE from prompts, the latent codec, the adapters' JVP, and the
students sampled by SCMPipeline and by the family pipeline. Tiny random pipelines from tests/video_family_pipelines.py;
nothing is downloaded."""

import functools
import math

import pytest
import torch
from conftest import load_script
from family_checks import (
    SD,
    cache_batches,
    check_losses,
    distill_from_cache,
    prepare_cache,
    rel,
    scm_pipeline,
    teacher_ode,
    two_process_distillation,
)
from video_family_pipelines import (
    KINDS,
    NUM_FRAMES,
    PIPELINES,
    SIZE,
    call_kwargs,
    latent_shape,
    save_tiny_pipeline,
    tiny_pipeline,
)

from diffusers_scm import SCMPipeline, TrigFlowDenoiser
from diffusers_scm.families import get_family, prompt_encoding
from diffusers_scm.training.teacher import TextToImageTeacher


PROMPTS = {
    "ltx": ["a red fox", "a blue bird"],
    "hunyuan": ["a red fox", "a blue bird"],
    "hunyuan15": ["a red fox", 'a blue bird with "hello"'],  # a quoted glyph text: the ByT5 encoder's input
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _native(kind, pipe, noise, guidance, steps):
    """The family pipeline with its own scheduler from `noise` (B, C, F', h, w): latents (B, C, F', h, w)."""
    from diffusers import LTXPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    kwargs = call_kwargs(kind)
    latents = noise
    if kind == "ltx":
        latents = LTXPipeline._pack_latents(noise, 1, 1)
    if kind == "hunyuan15":
        pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance)
    else:
        kwargs["guidance_scale"] = guidance  # LTX: classifier-free guidance; HunyuanVideo: its guidance input
    with torch.no_grad():
        out = pipe(
            prompt=PROMPTS[kind], num_inference_steps=steps, latents=latents, output_type="latent", **kwargs
        ).frames
    if kind == "ltx":
        out = LTXPipeline._unpack_latents(out, *noise.shape[2:], 1, 1)
    return out


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_guided_ode_from_prompts_equals_the_family_pipeline(kind, guidance):
    """The teacher's guided ODE (SCMPipeline + TrigFlowODEScheduler over `TextToImageTeacher`'s network, prompts through
    the family's encode_prompt; classifier-free guidance F_u + w (F_c - F_u) for LTX and HunyuanVideo 1.5's guider,
    the guidance input 1000 w for HunyuanVideo) equals the family pipeline with its own scheduler on its own grid
    (LTX: shifted by the sequence length, with a terminal shift) from the same noise."""
    pipe = tiny_pipeline(kind)
    noise = torch.randn(latent_shape(kind), generator=torch.Generator().manual_seed(0))
    native = _native(kind, pipe, noise, guidance, steps=3)
    size = {k: v for k, v in call_kwargs(kind).items() if k != "max_sequence_length"}
    out, teacher = teacher_ode(pipe, PROMPTS[kind], noise, guidance, **size)  # on the grid the native run used
    assert teacher.denoiser.parameterization.name == "flow_matching"
    mine = out.frames
    assert mine.shape == noise.shape
    assert rel(mine, native) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_encoding_is_the_family_encode_prompt(kind):
    pipe = tiny_pipeline(kind)
    prompts = PROMPTS[kind]
    cond, uncond = prompt_encoding(pipe).encode(prompts, device="cpu")
    text = cond["encoder_hidden_states"]
    assert text.shape[0] == 2 and not torch.allclose(text[0], text[1])
    assert uncond is not None and not torch.allclose(uncond["encoder_hidden_states"][0], text[0])
    if kind == "ltx":
        pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
        torch.testing.assert_close(cond["encoder_hidden_states"], pe)
        assert torch.equal(cond["encoder_attention_mask"], mask)
        # (temporal ratio / 25 fps, spatial ratio, spatial ratio) of the tiny 4x4x4 VAE
        torch.testing.assert_close(cond["rope_interpolation_scale"], torch.tensor([[4 / 25, 4.0, 4.0]] * 2))
    elif kind == "hunyuan":
        pe, ppe, mask = pipe.encode_prompt(prompts, max_sequence_length=16)
        torch.testing.assert_close(cond["encoder_hidden_states"], pe)
        torch.testing.assert_close(cond["pooled_projections"], ppe)
        torch.testing.assert_close(cond["encoder_attention_mask"], mask.float())
    else:
        pe, mask, pe2, mask2 = pipe.encode_prompt(prompts, batch_size=2)
        torch.testing.assert_close(cond["encoder_hidden_states"], pe)
        torch.testing.assert_close(cond["encoder_hidden_states_2"], pe2)
        assert mask2[0].sum() == 0 and mask2[1].sum() > 0  # the glyph text of the second prompt only
        torch.testing.assert_close(cond["encoder_attention_mask_2"], mask2)
        assert torch.equal(cond["encoder_attention_mask"], mask)


@pytest.mark.parametrize("kind", KINDS)
def test_video_codec_round_trip_is_the_pipelines_normalization(kind):
    """x0 is the VAE's latent normalized as the family pipeline's decode inverts it (LTX: (z - mean) * scaling / std
    with the VAE's buffers; HunyuanVideo and 1.5: z * scaling_factor), and decoding x0 is the pipeline's decode."""
    from diffusers import LTXPipeline

    pipe = tiny_pipeline(kind)
    codec = get_family(pipe).latent_codec(pipe.vae, sample=False)
    frames = call_kwargs(kind)["num_frames"]
    size = SIZE[kind]
    videos = torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = codec.encode(videos)
    assert x0.shape == latent_shape(kind)
    assert codec.latent_shape(2, size, size, frames) == latent_shape(kind)
    vae = pipe.vae
    one = kind == "hunyuan15"  # AutoencoderKLHunyuanVideo15 takes one video at a time (its attention mask's shape)
    z = (
        torch.cat([vae.encode(v[None]).latent_dist.mode() for v in videos])
        if one
        else vae.encode(videos).latent_dist.mode()
    )
    if kind == "ltx":
        expected = LTXPipeline._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        raw = LTXPipeline._denormalize_latents(x0, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        assert vae.config.timestep_conditioning  # LTXPipeline decodes at its default decode_timestep, 0
        reference = vae.decode(raw, torch.zeros(2), return_dict=False)[0]
    else:
        expected = z * vae.config.scaling_factor
        raw = x0 / vae.config.scaling_factor
        reference = (
            torch.cat([vae.decode(r[None], return_dict=False)[0] for r in raw])
            if one
            else vae.decode(raw, return_dict=False)[0]
        )
    torch.testing.assert_close(x0, expected)
    decoded = codec.decode(x0)
    assert decoded.shape == videos.shape
    torch.testing.assert_close(decoded, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frames"):
        codec.encode(videos[:, :, :4])


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_jvp_matches_float64_finite_differences(kind):
    """The student's tangent (sCD's JVP, SPEC.md section 3) through each network as its adapter calls it (LTX: packed
    tokens and its rope scale; HunyuanVideo: the guidance input; 1.5: the zero condition channels and image tokens),
    with the conditioning this package gives it, equals float64 central differences."""
    from diffusers_scm.jvp import float64_precision, jvp

    pipe = tiny_pipeline(kind)
    cond, _ = prompt_encoding(pipe).encode(PROMPTS[kind], device="cpu", guidance=False)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    if kind == "hunyuan":
        cond["guidance"] = torch.tensor([3.0, 5.0], dtype=torch.float64)
    p = TextToImageTeacher(pipe).denoiser.parameterization
    den = TrigFlowDenoiser(pipe.transformer.double(), p, sigma_data=SD)
    x = torch.randn(latent_shape(kind), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -1.2], dtype=torch.float64)
    f = functools.partial(den, **cond)
    _, tangent = jvp(f, (x, t), (dx, dt), backend="math")
    with float64_precision(), torch.no_grad():
        h = 1e-6
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_ltx_adapter_is_the_pipelines_call_also_in_bfloat16():
    """The adapter's call is LTXPipeline's (packed tokens, the latent grid, the rope scale as Python floats), also for
    a bf16 network: the rope scale is not rounded to bf16 with the other conditioning."""
    from diffusers import LTXPipeline

    from diffusers_scm.adapters import get_adapter

    pipe = tiny_pipeline("ltx")
    cond, _ = prompt_encoding(pipe).encode(PROMPTS["ltx"], device="cpu", guidance=False)
    x = torch.randn(latent_shape("ltx"), generator=torch.Generator().manual_seed(8))
    t = torch.tensor([640.0, 640.0])
    for dtype in (torch.float32, torch.bfloat16):
        net = pipe.transformer.to(dtype)
        with torch.no_grad():
            ours = get_adapter(net)(net, x, t, **cond)
            theirs = net(
                hidden_states=LTXPipeline._pack_latents(x, 1, 1).to(dtype),
                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                timestep=t.to(dtype),
                encoder_attention_mask=cond["encoder_attention_mask"],
                num_frames=2,
                height=8,
                width=8,
                rope_interpolation_scale=(4 / 25, 4, 4),
                return_dict=False,
            )[0]
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, LTXPipeline._unpack_latents(theirs, 2, 8, 8, 1, 1).float(), rtol=0, atol=0)


def test_hunyuan15_unused_parameters_are_exactly_those_without_gradient():
    """DDP needs a gradient for every trainable parameter: the adapter names those the prediction never reads."""
    from diffusers_scm.adapters import get_adapter

    pipe = tiny_pipeline("hunyuan15")
    cond, _ = prompt_encoding(pipe).encode(PROMPTS["hunyuan15"], device="cpu", guidance=False)
    net = pipe.transformer
    adapter = get_adapter(net)
    x = torch.randn(latent_shape("hunyuan15"), generator=torch.Generator().manual_seed(3))
    adapter(net, x, torch.tensor([500.0, 300.0]), **cond).square().sum().backward()
    without = {n for n, p in net.named_parameters() if p.grad is None}
    named = {n for n, _ in net.named_parameters() if n.startswith(adapter.unused_parameters(net))}
    assert without and without == named


def test_families_are_declared():
    for kind, name in PIPELINES.items():
        family = get_family(name)
        assert family.video
        assert family.own_sampler == ("scheduler" if kind == "ltx" else "sigmas")
    assert get_family("HunyuanVideo15Pipeline").extra_components == ("guider",)


def _student_folder(kind, tmp_path):
    """A flow student saved as a pipeline folder: the teacher's network (any weights do for sampling checks), VAE,
    text encoders and tokenizers, with the consistency scheduler of a flow-matching student (t_max = pi/2), as
    `examples/distill.py` saves it (`TrigFlowFamilyScheduler` for a family whose pipeline takes no `sigmas=`)."""
    from diffusers_scm import TrigFlowFamilyScheduler, TrigFlowScheduler

    pipe = tiny_pipeline(kind)
    scheduler = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    if get_family(pipe).own_sampler == "scheduler":
        scheduler = TrigFlowFamilyScheduler.from_trigflow(scheduler)
    folder = tmp_path / f"{kind}-student"
    scm_pipeline(pipe, scheduler).save_pretrained(folder)
    return folder


def _family_sample(kind, folder, prompts, noise, steps, sigmas, output_type, guidance=3.5):
    """The student folder sampled by its family's own pipeline: HunyuanVideo and 1.5 with diffusers'
    `FlowMatchLCMScheduler` and the student's `sigmas=` (1.5: its guider off), HunyuanVideo at the student's
    guidance value `guidance`; LTX with the folder's `TrigFlowFamilyScheduler` as it is."""
    import diffusers
    from diffusers import FlowMatchLCMScheduler, LTXPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    cls = getattr(diffusers, PIPELINES[kind])
    extra, kwargs, latents = {}, dict(call_kwargs(kind)), noise
    if kind == "ltx":
        kwargs["guidance_scale"] = 1.0
        latents = LTXPipeline._pack_latents(noise, 1, 1)
    else:
        extra["scheduler"] = FlowMatchLCMScheduler(shift=1.0)
        kwargs["sigmas"] = sigmas
    if kind == "hunyuan":
        kwargs["guidance_scale"] = guidance
    if kind == "hunyuan15":
        extra["guider"] = ClassifierFreeGuidance(guidance_scale=1.0)
    theirs = cls.from_pretrained(folder, **extra)
    theirs.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return theirs(
            prompt=prompts, num_inference_steps=steps, latents=latents, output_type=output_type, **kwargs
        ).frames


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_student_folder_samples_the_same_in_scm_pipeline_and_the_family_pipeline(kind, steps, tmp_path):
    """One folder, two samplers: SCMPipeline.from_pretrained(folder) and the family's own pipeline class give the same
    frames from the same noise, prompts and re-noising draws. (HunyuanVideo 1.5: one prompt, as its pipeline decodes a
    batch with its VAE, which takes one video at a time.)"""
    if kind == "ltx" and steps == 2:
        pytest.skip("LTXPipeline's scheduler draws the re-noising noise in its packed token layout: other draws")
    folder = _student_folder(kind, tmp_path)
    ours = SCMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    prompts = PROMPTS[kind][1:] if kind == "hunyuan15" else PROMPTS[kind]
    noise = torch.randn(latent_shape(kind, len(prompts)), generator=torch.Generator().manual_seed(2))
    sigmas = ours.sampling_scheduler().flow_sigmas(steps)
    size = {k: v for k, v in call_kwargs(kind).items() if k != "max_sequence_length"}
    torch.manual_seed(7)  # the re-noising draws of both schedulers (the family pipelines pass no generator)
    reference = _family_sample(kind, folder, prompts, noise, steps, sigmas, "np")
    torch.manual_seed(7)
    guidance = 3.5 if kind == "hunyuan" else None
    with torch.no_grad():
        frames = ours(
            prompt=prompts, num_inference_steps=steps, latents=noise, output_type="np", guidance_scale=guidance, **size
        ).frames
    assert frames.shape == (len(prompts), size["num_frames"], size["height"], size["width"], 3)
    assert rel(frames, reference) < 1e-4


# ---- distillation with --num_frames, the trained folder in both pipelines, the latent cache --------------------------
def _common(kind):
    return [
        "--resolution", str(SIZE[kind]), "--num_frames", str(NUM_FRAMES[kind]), "--train_batch_size", "2",
        "--tangent_warmup_steps", "1", "--report_to", "none", "--num_validation_images", "2", "--validation_prompts",
        *PROMPTS[kind], "--seed", "3", "--guidance_scale", "3.0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The tiny pipelines of every kind, saved (built on first use)."""
    folders = {}

    def get(kind):
        if kind not in folders:
            folders[kind] = tmp_path_factory.mktemp(f"{kind}-teacher")
            save_tiny_pipeline(kind, folders[kind])
        return folders[kind]

    return get


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """GIF clips of 7 frames, 40 x 40 pixels, one per prompt of the first kind (the captions differ per kind only in
    HunyuanVideo 1.5's glyph text, which the caption column carries)."""
    from video_pipelines import save_clips

    folders = {}

    def get(kind):
        if kind not in folders:
            folders[kind] = save_clips(tmp_path_factory.mktemp(f"{kind}-clips"), PROMPTS[kind], num_frames=7, size=40)
        return folders[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_short_distillation_samples_frames_and_loads_in_the_family_pipeline(kind, tmp_path, teachers, clips):
    """Two sCD steps with --num_frames; the student folder samples `.frames` in SCMPipeline with prompts, and its
    family's own pipeline gives the same frames from the same noise (one step; HunyuanVideo at the student's
    guidance value 3.0, recorded in its folder)."""
    import numpy as np

    from diffusers_scm import TrigFlowFamilyScheduler

    out = tmp_path / "student"
    load_script("distill").main(
        ["--teacher", str(teachers(kind)), "--dataset_name", clips(kind), "--output_dir", str(out)]
        + ["--max_train_steps", "2", "--validation_steps", "2", *_common(kind)]
    )
    check_losses(out, 2)
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    assert student.config.family_pipeline == PIPELINES[kind]
    assert isinstance(student.scheduler, TrigFlowFamilyScheduler) == (kind == "ltx")
    size = {k: v for k, v in call_kwargs(kind).items() if k != "max_sequence_length"}
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    frames = student(prompt=PROMPTS[kind], num_inference_steps=2, output_type="np", generator=gens, **size).frames
    assert frames.shape == (2, size["num_frames"], size["height"], size["width"], 3) and np.isfinite(frames).all()
    assert 0 <= frames.min() and frames.max() <= 1
    if kind == "hunyuan":
        assert student.config.guidance_scale == 3.0  # the guidance input's value
    if kind == "hunyuan15":  # its pipeline's height and width default to None (from its network's target size)
        with pytest.raises(ValueError, match="pass `height` and `width`"):
            student(prompt=PROMPTS[kind], num_inference_steps=1, num_frames=5)
    prompts = PROMPTS[kind][1:] if kind == "hunyuan15" else PROMPTS[kind]
    noise = torch.randn(latent_shape(kind, len(prompts)), generator=torch.Generator().manual_seed(5))
    sigmas = student.sampling_scheduler().flow_sigmas(1)
    reference = _family_sample(kind, out, prompts, noise, 1, sigmas, "np", guidance=3.0)
    with torch.no_grad():
        ours = student(prompt=prompts, num_inference_steps=1, latents=noise, output_type="np", **size).frames
    assert rel(ours, reference) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_cache_round_trip_and_training_from_it(kind, tmp_path, teachers, clips, monkeypatch):
    """prepare_data's cache holds the same x0 and conditioning as on-the-fly encoding (LTX's rope scale rows,
    HunyuanVideo's pooled projections and masks, 1.5's glyph states), and a run trains from it without text
    encoders."""
    from diffusers_scm.training.data.videos import load_text_video_dataset

    teacher_folder, data_folder, frames, size = str(teachers(kind)), clips(kind), NUM_FRAMES[kind], SIZE[kind]
    cache = tmp_path / "cache"
    prepare_cache(teacher_folder, data_folder, cache, size, "--num_frames", str(frames), "--device", "cpu")
    common = {"guidance_scale": 3.0, "resolution": size, "teacher_guidance_input": kind == "hunyuan"}
    rows = load_text_video_dataset(data_folder, size, frames)
    b = cache_batches(teacher_folder, cache, rows, 2, num_frames=frames, **common)
    assert b.info["num_frames"] == frames and b.info["family"] == PIPELINES[kind]
    assert b.x0.shape == latent_shape(kind)
    assert sorted(b.cached_cond) == sorted(b.cond)
    assert (b.uncond is None) == (kind == "hunyuan")  # HunyuanVideo: its guidance input w, no unconditional pass
    if kind == "hunyuan":
        torch.testing.assert_close(b.cond["guidance"], torch.full((2,), 3.0))

    out = tmp_path / "from-cache"
    distill_from_cache(
        monkeypatch,
        ["--teacher", teacher_folder, "--cache_dir", str(cache), "--dataset_name", data_folder]
        + ["--output_dir", str(out), "--max_train_steps", "1", *_common(kind)],
    )
    assert SCMPipeline.from_pretrained(out).config.family_pipeline == PIPELINES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_and_tcm_runs(kind, tmp_path, teachers, clips):
    """A LoRA student's adapter loads onto the teacher's network (through the family pipeline's `load_lora_weights`
    where it has one; HunyuanVideo15Pipeline has no LoRA loader in diffusers 0.42, so onto its transformer with
    `load_lora_adapter`) and gives the merged student's prediction; TCM's two stages run (HunyuanVideo's
    guidance-input teacher too: w is its network's input, so TCM's loss applies no classifier-free guidance)."""
    import diffusers

    distill = load_script("distill")
    lora = tmp_path / "lora"
    distill.main(
        ["--teacher", str(teachers(kind)), "--dataset_name", clips(kind), "--output_dir", str(lora)]
        + ["--lora_rank", "4", "--max_train_steps", "2", *_common(kind)]
    )
    merged = SCMPipeline.from_pretrained(lora).transformer
    family = getattr(diffusers, PIPELINES[kind]).from_pretrained(teachers(kind))
    if hasattr(family, "load_lora_weights"):
        family.load_lora_weights(lora)
    else:
        family.transformer.load_lora_adapter(lora, weight_name="pytorch_lora_weights.safetensors", prefix=None)
    pipe = tiny_pipeline(kind)
    cond, _ = prompt_encoding(pipe).encode(PROMPTS[kind], device="cpu", guidance=False)
    if kind == "hunyuan":
        cond["guidance"] = torch.full((2,), 3.0)
    x = torch.randn(latent_shape(kind), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([700.0, 300.0])
    from diffusers_scm.adapters import get_adapter

    with torch.no_grad():
        a = get_adapter(merged)(merged, x, t, **cond)
        b = get_adapter(family.transformer)(family.transformer, x, t, **cond)
        base = get_adapter(pipe.transformer)(pipe.transformer, x, t, **cond)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-6)  # the adapter trained
    tcm = tmp_path / "tcm"
    distill.main(
        ["--teacher", str(teachers(kind)), "--method", "tcm", "--dataset_name", clips(kind), "--output_dir", str(tcm)]
        + ["--max_train_steps", "1", "--stage2_max_train_steps", "1", *_common(kind)]
    )
    assert SCMPipeline.from_pretrained(tcm).sampling_scheduler().config.dividing_timestep


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_distillation(kind, tmp_path, teachers):
    from video_pipelines import save_clips

    captions = (*PROMPTS[kind], "a small cat", "a white dog")
    data_folder = save_clips(tmp_path / "clips", captions=captions, num_frames=NUM_FRAMES[kind], size=40)
    out = tmp_path / "student"
    two_process_distillation(
        ["--teacher", str(teachers(kind)), "--dataset_name", data_folder, "--output_dir", str(out)]
        + ["--max_train_steps", "2", *_common(kind)]
    )
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    prompts = PROMPTS[kind][1:] if kind == "hunyuan15" else PROMPTS[kind]
    noise = torch.randn(latent_shape(kind, len(prompts)), generator=torch.Generator().manual_seed(0))
    size = {k: v for k, v in call_kwargs(kind).items() if k != "max_sequence_length"}
    reference = _family_sample(
        kind, out, prompts, noise, 1, student.sampling_scheduler().flow_sigmas(1), "np", guidance=3.0
    )
    with torch.no_grad():
        ours = student(prompt=prompts, num_inference_steps=1, latents=noise, output_type="np", **size).frames
    assert rel(ours, reference) < 1e-4
