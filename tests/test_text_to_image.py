"""Text-to-image teachers and students (SPEC.md section 8) against the families' own diffusers pipelines: the teacher's
guided ODE from a prompt, prompt encoding, the latent codec, and students sampled by SCMPipeline and by the family
pipeline with a consistency scheduler. Tiny random pipelines from tests/t2i_pipelines.py; nothing is downloaded."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from t2i_pipelines import IMAGE_SIZE, VAE_SCALE_FACTOR, call_kwargs, tiny_pipeline

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.conditioning import TEXT_COMPONENTS, LatentCodec
from diffusers_scm.families import prompt_encoding
from diffusers_scm.training.teacher import TextToImageTeacher


SD = 0.5
PROMPTS = ["a red fox", "a bowl of soup"]
FLOW = ("sd3", "flux", "sana")
FAMILIES = ("sd3", "flux", "sana", "pixart_sigma", "sd15", "sdxl")


pytestmark = pytest.mark.usefixtures("one_thread")


def scm_pipeline(pipe, scheduler, network=None) -> SCMPipeline:
    """An SCMPipeline over a family pipeline's components (its network unless `network` is given)."""
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    parts = {k: getattr(pipe, k) for k in TEXT_COMPONENTS if getattr(pipe, k, None) is not None}
    out = SCMPipeline(
        scheduler=scheduler,
        vae=pipe.vae,
        family_pipeline=type(pipe).__name__,
        **{name: network if network is not None else getattr(pipe, name)},
        **parts,
    )
    out.set_progress_bar_config(disable=True)
    return out


def _latent_shape(pipe, n=len(PROMPTS)):
    channels = LatentCodec(pipe.vae).latent_channels
    return (n, channels, IMAGE_SIZE // VAE_SCALE_FACTOR, IMAGE_SIZE // VAE_SCALE_FACTOR)


def _native_latents(family, pipe, noise, guidance_scale, steps=4):
    """The family pipeline's own sampler from `noise`; returns (latents (B, C, h, w), its scheduler)."""
    from diffusers import FluxPipeline

    kwargs = {**call_kwargs(family), "guidance_scale": guidance_scale}
    latents = noise
    if family == "flux":
        b, c, h, w = noise.shape
        latents = FluxPipeline._pack_latents(noise, b, c, h, w)
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, latents=latents, output_type="latent", **kwargs).images
    if family == "flux":
        out = FluxPipeline._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, VAE_SCALE_FACTOR)
    return out


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_guided_ode_from_a_prompt_equals_the_family_pipeline(family, guidance):
    """The package's teacher ODE (SCMPipeline + TrigFlowODEScheduler, prompts through the family's encode_prompt,
    classifier-free guidance F_u + w (F_c - F_u), or Flux's guidance input) equals the family pipeline with its own
    scheduler (FlowMatchEuler with the family's shift; DDIM for the VP families) on the same grid."""
    pipe = tiny_pipeline(family)
    if family in FLOW:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    noise = torch.randn(_latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = _native_latents(family, pipe, noise, guidance)
    teacher = TextToImageTeacher(pipe)
    p = teacher.denoiser.parameterization
    ours = TrigFlowODEScheduler(parameterization=p.name, solver="ddim", **p.config())
    if family in FLOW:
        s = pipe.scheduler.sigmas[:-1].double()  # the grid the native run used
        grid = torch.atan2(s, SD * (1 - s))
        start = torch.cos(grid[0]) + SD * torch.sin(grid[0])  # x_t = (cos t + sd sin t) x_s, x_s = n
    else:
        grid = p.timestep_to_time(pipe.scheduler.timesteps.double())
        start = torch.sqrt(torch.cos(grid[0]) ** 2 + SD**2 * torch.sin(grid[0]) ** 2)  # x_t = b(t) x_tau
    ours.set_timesteps(timesteps=grid)
    student_like = scm_pipeline(pipe, ours)
    latents = noise * start.float() / ours.init_noise_sigma
    with torch.no_grad():
        mine = student_like(
            prompt=PROMPTS,
            timesteps=grid,
            latents=latents,
            guidance_scale=guidance,
            output_type="latent",
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
        ).images
    assert ((mine - native).abs().max() / native.abs().max()).item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoding_is_the_family_encode_prompt(family):
    pipe = tiny_pipeline(family)
    cond, uncond = prompt_encoding(pipe).encode(PROMPTS, device="cpu", height=IMAGE_SIZE, width=IMAGE_SIZE)
    assert cond["encoder_hidden_states"].shape[0] == 2 and uncond is not None
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])
    with pytest.raises(ValueError, match="Got 3 negative prompts for 2 prompts"):
        prompt_encoding(pipe).encode(PROMPTS, ["x", "y", "z"], device="cpu")


@pytest.mark.parametrize("family", ["sd3", "flux", "sana", "sd15"])
def test_latent_codec_round_trip_uses_scaling_and_shift(family):
    pipe = tiny_pipeline(family)
    codec = LatentCodec(pipe.vae, sample=False)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = codec.encode(images)
    assert x0.shape == _latent_shape(pipe)
    z = pipe.vae.encode(images)
    raw = z.latent_dist.mode() if hasattr(z, "latent_dist") else z.latent
    cfg = pipe.vae.config
    torch.testing.assert_close(x0, (raw - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor)
    decoded = codec.decode(x0)
    reference = pipe.vae.decode(raw, return_dict=False)[0]
    torch.testing.assert_close(decoded, reference, rtol=1e-5, atol=1e-5)


def _student_folder(family, tmp_path):
    """A flow student saved as a pipeline folder: the teacher's network (any weights do for sampling checks), VAE,
    text encoders and tokenizers, with the consistency scheduler of a flow-matching student (t_max = pi/2)."""
    import math

    from diffusers_scm import TrigFlowScheduler

    pipe = tiny_pipeline(family)
    scheduler = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    folder = tmp_path / f"{family}-student"
    scm_pipeline(pipe, scheduler).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("family", ["sd3", "sana", "flux"])
def test_student_folder_samples_the_same_in_scm_pipeline_and_the_family_pipeline(family, steps, tmp_path):
    """One folder, two samplers: SCMPipeline.from_pretrained(folder) and the family's own pipeline class with
    diffusers' FlowMatchLCMScheduler (the consistency step in flow coordinates) give the same image from the same
    noise and prompts."""
    import diffusers
    from diffusers import FlowMatchLCMScheduler, FluxPipeline

    if family == "flux" and steps == 2:
        pytest.skip("FluxPipeline draws the re-noising noise in its packed token layout: not the same draws")
    folder = _student_folder(family, tmp_path)
    ours = SCMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    family_cls = getattr(diffusers, ours.config.family_pipeline)
    theirs = family_cls.from_pretrained(folder, scheduler=FlowMatchLCMScheduler(shift=1.0))
    theirs.set_progress_bar_config(disable=True)
    noise = torch.randn(_latent_shape(theirs), generator=torch.Generator().manual_seed(2))
    sigmas = ours.scheduler.flow_sigmas(steps)
    kwargs = {**call_kwargs(family), "guidance_scale": 1.0}  # a student samples without classifier-free guidance
    latents = noise
    if family == "flux":
        latents = FluxPipeline._pack_latents(noise, *noise.shape)
        kwargs["guidance_scale"] = 3.5
    torch.manual_seed(7)  # the re-noising draws of both schedulers (the family pipelines pass no generator)
    reference = theirs(
        prompt=PROMPTS, num_inference_steps=steps, sigmas=sigmas, latents=latents, output_type="pt", **kwargs
    )
    torch.manual_seed(7)
    image = ours(
        prompt=PROMPTS,
        num_inference_steps=steps,
        latents=noise,
        output_type="pt",
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=kwargs["guidance_scale"] if family == "flux" else None,
    ).images
    torch.testing.assert_close(image, reference.images, rtol=1e-4, atol=1e-4)


def test_prompt_embeds_guidance_and_bad_inputs(tmp_path):
    folder = _student_folder("flux", tmp_path)  # Flux.1-dev style: guidance embeddings
    pipe = SCMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    common = {"num_inference_steps": 1, "output_type": "pt", "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    a = pipe(prompt=PROMPTS, generator=gens, guidance_scale=2.0, **common).images
    family = pipe.family_pipeline()
    pe, ppe, _ = family.encode_prompt(prompt=PROMPTS, prompt_2=None, device="cpu")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    b = pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, generator=gens, guidance_scale=2.0, **common).images
    torch.testing.assert_close(a, b)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    c = pipe(prompt=PROMPTS, generator=gens, guidance_scale=6.0, **common).images
    assert not torch.allclose(a, c, atol=1e-4)  # the guidance input is live
    assert torch.isfinite(a).all() and a.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="Got 3 generators for 2 prompts"):
        pipe(prompt=PROMPTS, generator=[torch.Generator()] * 3, **common)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(prompt=PROMPTS, num_inference_steps=1, height=30, width=30)
