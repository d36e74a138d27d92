"""FLUX.2 families (`Flux2Pipeline`, `Flux2KleinPipeline`; `diffusers_scm.families.flux2`) against diffusers' own
pipelines (SPEC.md section 8): the prompt encoding, the latent codec (patchify + batch-norm statistics), the adapter's
JVP, the teacher's guided ODE from a prompt, a student folder sampled by SCMPipeline and by the family pipeline, the
latent cache, and distillation with `examples/distill.py` (in process from the cache; two processes, slow). Tiny random
pipelines from tests/flux2_pipelines.py; nothing is downloaded."""

import math

import pytest
import torch
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
from flux2_pipelines import KINDS, SEQUENCE_LENGTH, call_kwargs, save_tiny_pipeline, tiny_pipeline
from t2i_pipelines import IMAGE_SIZE

from diffusers_scm import SCMPipeline, TrigFlowScheduler
from diffusers_scm.adapters import get_adapter
from diffusers_scm.families import get_family, prompt_encoding, prompt_sequence_length
from diffusers_scm.families.flux2 import Flux2Adapter, Flux2LatentCodec


PROMPTS = ["a red fox", "a bowl of soup"]
LATENT = (2, 16, IMAGE_SIZE // 8, IMAGE_SIZE // 8)  # x0: 4 VAE channels in 2x2 patches, 32 pixels / (4 * 2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn(pipe):
    bn = pipe.vae.bn
    return bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)


def _native_x0(pipe, latents):
    """x0 (B, 4C, h, w) from what the family pipeline returns with output_type="latent": Flux2Pipeline's normalized
    tokens (B, h * w, 4C); Klein's VAE latent (B, C, H, W), patchified and normalized again."""
    if latents.ndim == 3:
        return latents.permute(0, 2, 1).reshape(LATENT)
    mean, std = _bn(pipe)
    return (type(pipe)._patchify_latents(latents) - mean) / std


@pytest.mark.parametrize("kind", KINDS)
def test_family_declaration_and_sequence_length(kind):
    pipe = tiny_pipeline(kind)
    family = get_family(pipe)
    assert family.pipeline == type(pipe).__name__ and family.own_sampler == "sigmas"
    assert isinstance(get_adapter(pipe.transformer), Flux2Adapter)
    assert isinstance(family.latent_codec(pipe.vae), Flux2LatentCodec)
    assert prompt_sequence_length(pipe) == SEQUENCE_LENGTH[kind]  # the tokenizer's, shorter than the default 512


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_encoding_is_the_family_encode_prompt(kind):
    pipe = tiny_pipeline(kind)
    length = SEQUENCE_LENGTH[kind]
    cond, uncond = prompt_encoding(pipe).encode(PROMPTS, device="cpu")
    pe, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=length)
    npe, _ = pipe.encode_prompt(["", ""], device="cpu", max_sequence_length=length)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, rtol=0, atol=0)
    torch.testing.assert_close(uncond["encoder_hidden_states"], npe, rtol=0, atol=0)
    assert pe.shape == (2, length, 48) and not torch.allclose(pe[0], pe[1])
    given, given_uncond = prompt_encoding(pipe).encode(None, device="cpu", prompt_embeds=pe, negative_prompt_embeds=pe)
    torch.testing.assert_close(given["encoder_hidden_states"], pe, rtol=0, atol=0)
    torch.testing.assert_close(given_uncond["encoder_hidden_states"], pe, rtol=0, atol=0)
    neg, _ = pipe.encode_prompt(["a cat", "a cat"], device="cpu", max_sequence_length=length)
    _, uncond = prompt_encoding(pipe).encode(PROMPTS, "a cat", device="cpu")
    torch.testing.assert_close(uncond["encoder_hidden_states"], neg, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Got 3 negative prompts for 2 prompts"):
        prompt_encoding(pipe).encode(PROMPTS, ["x", "y", "z"], device="cpu")


def test_pixtral_processor_encodes_as_its_tokenizer():
    """Flux.2 [dev] ships a `PixtralProcessor` (it needs torchvision); the tiny pipelines hold its tokenizer. Both give
    the same prompt embeddings, and the sequence length is read from the processor's tokenizer."""
    pytest.importorskip("torchvision")
    from flux2_pipelines import pixtral_processor

    pipe = tiny_pipeline("flux2")
    with_processor = type(pipe)(**{**pipe.components, "tokenizer": pixtral_processor(pipe.tokenizer)})
    assert prompt_sequence_length(with_processor) == SEQUENCE_LENGTH["flux2"]
    cond, _ = prompt_encoding(with_processor).encode(PROMPTS, device="cpu", guidance=False)
    reference, _ = prompt_encoding(pipe).encode(PROMPTS, device="cpu", guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], reference["encoder_hidden_states"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_codec_is_the_pipelines_patchify_and_batch_norm(kind):
    pipe = tiny_pipeline(kind)
    codec = Flux2LatentCodec(pipe.vae, sample=False)
    assert (codec.latent_channels, codec.scale_factor) == (16, 8)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = codec.encode(images)
    torch.testing.assert_close(x0, pipe._encode_vae_image(images, generator=None), rtol=1e-6, atol=1e-6)
    assert x0.shape == LATENT
    # decode: the pipeline's own last lines (un-normalize, unpatchify, decode) on the same x0
    mean, std = _bn(pipe)
    reference = pipe.vae.decode(type(pipe)._unpatchify_latents(x0 * std + mean), return_dict=False)[0]
    torch.testing.assert_close(codec.decode(x0), reference, rtol=1e-5, atol=1e-5)
    drawn = Flux2LatentCodec(pipe.vae).encode(images, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == LATENT and not torch.allclose(drawn, x0)
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(images[..., :28, :28])


def test_adapter_is_the_pipelines_network_call_and_its_jvp_matches_finite_differences():
    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.jvp import jvp, jvp_mode

    pipe = tiny_pipeline("flux2")
    net = pipe.transformer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(LATENT, generator=g)
    text = torch.randn(2, 5, 48, generator=g)
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        ours = get_adapter(net)(net, x, t, encoder_hidden_states=text, guidance=3.5)
        tokens = type(pipe)._pack_latents(x)
        theirs = net(
            hidden_states=tokens,
            timestep=t / 1000,
            guidance=torch.full((2,), 3.5),
            encoder_hidden_states=text,
            txt_ids=type(pipe)._prepare_text_ids(text),
            img_ids=type(pipe)._prepare_latent_ids(x),
            return_dict=False,
        )[0]
    torch.testing.assert_close(type(pipe)._pack_latents(ours), theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patchified latent"):
        get_adapter(net)(net, tokens, t, encoder_hidden_states=text)

    den = TrigFlowDenoiser(net.double(), "flow_matching", sigma_data=SD)
    x, text = x.double(), text.double()
    tt = torch.tensor([0.35, 1.2], dtype=torch.float64)
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0.8, -1.1], dtype=torch.float64)

    def f(a, b):
        return den(a, b, encoder_hidden_states=text, guidance=3.5)

    out, tangent = jvp(f, (x, tt), (dx, dt), module=den, method="forward_ad", backend="blocked")
    h = 1e-6
    with jvp_mode(den), torch.no_grad():
        fd = (f(x + h * dx, tt + h * dt) - f(x - h * dx, tt - h * dt)) / (2 * h)
        plain = f(x, tt)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_guided_ode_from_a_prompt_equals_the_family_pipeline(kind, guidance):
    """The teacher's ODE through the package (SCMPipeline + TrigFlowODEScheduler over `TextToImageTeacher`'s
    parameterization; Klein: classifier-free guidance against the empty prompt; Flux.2 [dev]: w as the network's
    guidance input) equals the family pipeline with its own scheduler (FlowMatchEuler, dynamic shifting with the
    pipeline's empirical mu) on the same grid, from the same noise and prompts."""
    pipe = tiny_pipeline(kind)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    kwargs = {**call_kwargs(kind), "guidance_scale": guidance}
    with torch.no_grad():
        native = pipe(prompt=PROMPTS, num_inference_steps=4, latents=noise, output_type="latent", **kwargs).images
    native = _native_x0(pipe, native)
    # on the grid the native run used (shifted by its mu)
    out, teacher = teacher_ode(
        pipe, PROMPTS, noise, guidance, network=pipe.transformer, height=IMAGE_SIZE, width=IMAGE_SIZE
    )
    assert teacher.denoiser.parameterization.name == "flow_matching"
    mine = out.images
    assert mine.shape == LATENT
    assert rel(mine, native) < 1e-4


def _student_folder(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    folder = tmp_path / f"{kind}-student"
    scm_pipeline(pipe, TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)).save_pretrained(
        folder
    )
    return folder


def _own_pipeline_images(folder, kind, noise, steps, scheduler):
    ours = SCMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    theirs = family_pipeline(folder, ours.config.family_pipeline)
    guidance = 3.5 if kind == "flux2" else 1.0  # Klein's student samples without classifier-free guidance
    kwargs = {**call_kwargs(kind), "guidance_scale": guidance}
    torch.manual_seed(7)  # the re-noising draws of both schedulers (the family pipelines pass no generator)
    reference = theirs(
        prompt=PROMPTS,
        num_inference_steps=steps,
        sigmas=scheduler.flow_sigmas(steps),
        latents=noise,
        output_type="pt",
        **kwargs,
    ).images
    torch.manual_seed(7)
    image = ours(
        prompt=PROMPTS,
        num_inference_steps=steps,
        latents=noise,
        output_type="pt",
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=guidance if kind == "flux2" else None,
    ).images
    return image, reference


@pytest.mark.parametrize("kind", KINDS)
def test_student_folder_samples_the_same_in_scm_pipeline_and_the_family_pipeline(kind, tmp_path):
    """One folder, two samplers: SCMPipeline.from_pretrained(folder) and the family's own pipeline class with diffusers'
    FlowMatchLCMScheduler give the same one-step image from the same noise and prompts. (Two steps re-noise with draws
    in the pipeline's token layout, which differ from SCMPipeline's: see `diffusers_scm.families.flux2`.)"""
    folder = _student_folder(kind, tmp_path)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    scheduler = SCMPipeline.from_pretrained(folder).scheduler
    image, reference = _own_pipeline_images(folder, kind, noise, 1, scheduler)
    assert image.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert rel(image, reference) < 1e-4


def test_evaluate_a_student_against_its_klein_teacher(tmp_path):
    """`examples/evaluate.py --prompts`: the teacher folder sampled by `Flux2KleinPipeline` itself (with CFG, x0-shaped
    noise from the family's codec) and a student SCMPipeline; the paired RMSE equals the two pipelines called here."""
    from conftest import load_script

    evaluate = load_script("evaluate")
    teacher = save_tiny_pipeline("klein", tmp_path / "teacher")
    scm_pipeline(
        teacher, TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    ).save_pretrained(tmp_path / "student")
    common = ["--num_samples", "2", "--batch_size", "2", "--output_dir", str(tmp_path / "report")]
    common += ["--num_grid_images", "0", "--prompts", *PROMPTS, "--guidance_scale", "3", "--resolution", "32"]
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", "--paired_teacher", str(tmp_path / "teacher")]
        + ["--paired_teacher_steps", "2", "--metrics", "paired_rmse", *common]
    )
    (row,) = results["rows"]
    assert row["nfe"] == 1
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    kwargs = {**call_kwargs("klein"), "guidance_scale": 3.0}
    with torch.no_grad():
        images = teacher(prompt=PROMPTS, latents=noise, num_inference_steps=2, output_type="pt", **kwargs).images
    student = SCMPipeline.from_pretrained(tmp_path / "student")
    student.set_progress_bar_config(disable=True)
    student_images = student(prompt=PROMPTS, latents=noise, output_type="pt", height=32, width=32).images
    expected = ((student_images - images) * 2).double().square().mean().sqrt().item()
    assert row["paired_rmse"] == pytest.approx(expected, rel=1e-4)


# ---- distillation ---------------------------------------------------------------------------------------------------
TRAIN_PROMPTS = ["a red fox", "a bowl of soup", "a blue bird", "a small cat"]
COMMON = [*RUN, "--guidance_scale", "4.0"]


data_dir = captioned_data_dir(TRAIN_PROMPTS, shape=(40, 36, 3))  # a captioned image folder (`datasets` imagefolder)


def _check_student(out, kind):
    """(c) the student samples from prompts in 1 and 2 steps; (d) its folder gives the same one-step image in the
    family's own pipeline."""
    student = check_student(out, type(tiny_pipeline(kind)).__name__, PROMPTS, IMAGE_SIZE, output_type="pt")
    assert next(student.transformer.parameters()).dtype == torch.float32
    # Flux.2 [dev]: the w its guidance input was distilled at is the student's default
    assert student.config.guidance_scale == (4.0 if kind == "flux2" else None)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    image, reference = _own_pipeline_images(out, kind, noise, 1, student.scheduler)
    assert rel(image, reference) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_cache_round_trip_and_distillation_from_it(kind, tmp_path, data_dir, monkeypatch):
    """(e) prepare_data.py's cache gives the batches that the teacher gives on the fly; `distill.py --cache_dir` then
    distills (sCD, 2 steps) without loading the text encoders, and the student samples (c, d)."""
    from diffusers_scm.training.data.captions import load_text_image_dataset

    teacher_dir = tmp_path / kind
    pipe = save_tiny_pipeline(kind, teacher_dir)
    cache = tmp_path / "cache"
    prepare_cache(teacher_dir, data_dir, cache, IMAGE_SIZE, "--batch_size", "3")
    guided = pipe.transformer.config.guidance_embeds  # Flux.2 [dev]: w is the network's input
    rows = load_text_image_dataset(str(data_dir), IMAGE_SIZE)
    b = cache_batches(
        teacher_dir, cache, rows, 4, guidance_scale=4.0, teacher_guidance_input=guided, resolution=IMAGE_SIZE
    )
    assert len(b.data) == 4 and b.teacher.denoiser.inner_model.config.guidance_embeds == guided
    assert b.x0.shape == (4, *LATENT[1:]) and b.w == b.cw == (1.0 if guided else 4.0)
    torch.testing.assert_close(b.x0, b.teacher.codec.encode(b.batch["pixel_values"]))
    if guided:
        assert b.cond["guidance"].tolist() == [4.0] * 4 and b.uncond is None
    else:
        assert "guidance" not in b.cond and b.uncond is not None

    out = tmp_path / "from-cache"
    distill_from_cache(
        monkeypatch,
        ["--teacher", str(teacher_dir), "--cache_dir", str(cache), "--dataset_name", str(data_dir)]
        + ["--output_dir", str(out), "--max_train_steps", "2", *COMMON],
    )
    check_losses(out, 2)
    _check_student(out, kind)


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("klein", ["--method", "tcm", "--stage2_max_train_steps", "2"]),  # TCM: Stage 1 sCD, then Stage 2
        ("flux2", ["--method", "scd", "--lora_rank", "4"]),  # a LoRA student on the attention projections
        ("flux2", ["--method", "tcm", "--stage2_max_train_steps", "2"]),  # TCM with a guidance-input teacher
        ("klein", ["--method", "scd", "--lora_rank", "4"]),
    ],
)
def test_tcm_and_lora_students(kind, extra, tmp_path, data_dir):
    """`distill.py` in process with the teacher encoding captions on the fly: TCM and a LoRA student of each family
    train (TCM of Flux.2 [dev]: w is its teacher's input, no unconditional branch), and their students sample (c,
    d)."""
    from conftest import load_script

    teacher = tmp_path / kind
    save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    load_script("distill").main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--output_dir", str(out)]
        + ["--max_train_steps", "2", *COMMON, *extra]
    )
    check_losses(out, 2)
    if "tcm" in extra:
        assert SCMPipeline.from_pretrained(out).scheduler.config.dividing_timestep
    _check_student(out, kind)


@pytest.mark.slow  # `python -m pytest -m slow`: two processes with gloo on CPU
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_distillation(kind, tmp_path, data_dir):
    """`accelerate launch --multi_gpu --num_processes 2 examples/distill.py --method scd` on the family's tiny
    pipeline (on-the-fly encoding through the teacher): the replicas stay in sync and the student samples (c, d)."""
    teacher = tmp_path / kind
    save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    two_process_distillation(
        ["--teacher", str(teacher), "--method", "scd", "--dataset_name", str(data_dir), *COMMON]
        + ["--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2"]
    )
    _check_student(out, kind)
