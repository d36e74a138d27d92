"""Lumina-Image 2.0, CogView4 and AuraFlow end to end against their own diffusers pipelines (SPEC.md section 8): the
prompt encoding, the latent codec, the teacher's guided ODE (Lumina 2's reversed time, negated prediction and
normalized guidance; CogView4's unshifted network time and size conditioning), the student folder in `SCMPipeline`
and in the family pipeline, distillation with `examples/distill.py` and the latent cache. Tiny random pipelines from
tests/dit_family_pipelines.py; nothing is downloaded."""

import math

import pytest
import torch
from conftest import load_script
from dit_family_pipelines import (
    GUIDANCE_SCALE,
    LATENT_SIZE,
    PIPELINES,
    SEQUENCE_LENGTH,
    call_kwargs,
    noise,
    save_tiny_pipeline,
)
from dit_family_pipelines import tiny_pipeline as tiny
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
    scm_pipeline,
    teacher_ode,
    trigflow_grid,
    two_process_distillation,
)
from family_checks import rel as _rel
from t2i_pipelines import IMAGE_SIZE

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.adapters import get_adapter
from diffusers_scm.families import get_family
from diffusers_scm.families.cogview4 import RELEASED_TIME_SHIFT, CogView4Adapter, cogview4_sampling_kwargs
from diffusers_scm.training.objectives.common import teacher_velocity
from diffusers_scm.training.teacher import TextToImageTeacher


PROMPTS = ["a red fox", "a bowl of soup with a small blue bird"]  # different lengths: padding and masks show
KINDS = ("lumina2", "cogview4", "auraflow")
SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_family_declarations_and_codecs():
    """Each family's record, adapter and codec; the codecs decode as the pipelines do (Lumina 2: z = x0 / scale +
    shift; CogView4 and AuraFlow: z = x0 / scale, CogView4's VAE's shift_factor unused by its pipeline) and encode
    the inverse."""
    for kind in KINDS:
        family = get_family(PIPELINES[kind])
        assert family.own_sampler == "sigmas" and not family.video and family.network == "transformer"
    assert type(get_adapter(tiny("lumina2").transformer)).__name__ == "Lumina2Adapter"
    assert type(get_adapter(tiny("cogview4").transformer)).__name__ == "CogView4Adapter"
    assert type(get_adapter(tiny("auraflow").transformer)).__name__ == "UnitTimeAdapter"
    for kind in KINDS:
        pipe = tiny(kind)
        codec = get_family(pipe).latent_codec(pipe.vae, sample=False)
        assert codec.scale_factor * LATENT_SIZE[kind] == IMAGE_SIZE  # Lumina 2's pipeline fixes its factor at 8
        x = noise(kind, 5)
        run = {"prompt": PROMPTS, "latents": x, "num_inference_steps": 1, **call_kwargs(kind)}
        with torch.no_grad():
            x0 = pipe(**run, output_type="latent").images
            theirs = pipe(**run, output_type="pt").images
            torch.testing.assert_close(pipe.image_processor.postprocess(codec.decode(x0), output_type="pt"), theirs)
            pixels = codec.decode(x0).clamp(-1, 1)
            raw = pipe.vae.encode(pixels).latent_dist.mode()
        cfg = pipe.vae.config
        expected = (raw - cfg.shift_factor) * cfg.scaling_factor if kind == "lumina2" else raw * cfg.scaling_factor
        torch.testing.assert_close(codec.encode(pixels), expected)
    assert tiny("cogview4").vae.config.shift_factor == 0.1  # set, and unused by CogView4Pipeline


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_encoding_is_the_family_encode_prompt(kind):
    """The conditioning is what the pipeline's `encode_prompt` returns (Lumina 2: with its system prompt and mask;
    CogView4: left-padded GLM states and the size conditioning; AuraFlow: masked UMT5 states), the negative prompt
    the empty one."""
    pipe = tiny(kind)
    encoding = get_family(pipe).prompt_encoding(pipe)
    assert encoding.sequence_length() == SEQUENCE_LENGTH[kind]
    cond, uncond = encoding.encode(PROMPTS, device="cpu", height=32, width=48)
    length = SEQUENCE_LENGTH[kind]
    if kind == "lumina2":
        pe, mask, npe, nmask = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        torch.testing.assert_close(cond["encoder_attention_mask"], mask)
        torch.testing.assert_close(uncond["encoder_attention_mask"], nmask)
        ids = pipe.tokenizer(pipe.system_prompt + " <Prompt Start> " + PROMPTS[0]).input_ids
        assert int(mask[0].sum()) == len(ids) < length  # the system prompt is encoded with the prompt
        assert int(nmask[0].sum()) == 1  # the empty negative prompt: <bos> only (no system prompt)
    elif kind == "cogview4":
        pe, npe = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        assert pe.shape[1] == 16
        for c in (cond, uncond):
            torch.testing.assert_close(c["target_size"], torch.tensor([[32.0, 48.0]] * 2))
            torch.testing.assert_close(c["original_size"], torch.tensor([[32.0, 48.0]] * 2))
            torch.testing.assert_close(c["crop_coords"], torch.zeros(2, 2))
    else:
        pe, mask, npe, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        assert pe.shape[1] == length and (pe[0, int(mask[0].sum()) :] == 0).all()
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(uncond["encoder_hidden_states"], npe)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_guided_ode_from_a_prompt_equals_the_family_pipeline(kind, guidance):
    """The package's teacher ODE (SCMPipeline + TrigFlowODEScheduler over the teacher's network, prompts through the
    family's encode_prompt, guidance combined by the adapter) equals the family pipeline with its own scheduler on the
    same grid, from the same noise and prompts. Lumina 2 guides at its defaults (cfg_normalization=True,
    cfg_trunc_ratio=1.0); without the normalization its pipeline gives another result."""
    pipe = tiny(kind)
    x = noise(kind, 0)
    with torch.no_grad():
        native = pipe(
            prompt=PROMPTS, latents=x, output_type="latent", num_inference_steps=4, guidance_scale=guidance,
            **call_kwargs(kind),
        ).images  # fmt: skip
    mine, teacher = teacher_ode(pipe, PROMPTS, x, guidance, network=pipe.transformer, **SIZE)
    p = teacher.denoiser.parameterization
    assert p.name == "flow_matching"
    assert _rel(mine.images, native) < 1e-4
    if guidance == 1.0:
        return
    if kind == "lumina2":  # the normalization is exercised: the pipeline without it differs
        with torch.no_grad():
            plain = pipe(
                prompt=PROMPTS, latents=x, output_type="latent", num_inference_steps=4, guidance_scale=guidance,
                cfg_normalization=False, **call_kwargs(kind),
            ).images  # fmt: skip
        assert _rel(plain, native) > 1e-3
    # the training velocity (sCD's teacher, SPEC.md section 3) guides the same way: sd F of the pipeline's combination
    x_t = x * 0.8
    t = torch.full((2,), 0.7)
    cond, uncond = teacher.encoding.encode(PROMPTS, device="cpu", **SIZE)
    with torch.no_grad():
        dxdt = teacher_velocity(teacher.denoiser, x_t, t, None, None, SD, guidance, cond, uncond)
        sample, timestep = p.model_inputs(x_t, t)
        raw_c, raw_u = (_native_prediction(kind, pipe, sample, timestep, c) for c in _native_conditioning(kind, pipe))
    combined = raw_u + guidance * (raw_c - raw_u)
    if kind == "lumina2":  # Lumina2Pipeline.__call__: comb * |cond| / |comb| over the last axis
        combined = combined * (raw_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    expected = SD * p.to_trigflow(combined, x_t, t)
    torch.testing.assert_close(dxdt, expected, rtol=1e-4, atol=1e-5)


def _native_conditioning(kind, pipe):
    """(cond, uncond) as the family pipeline's `__call__` makes them."""
    length = SEQUENCE_LENGTH[kind]
    if kind == "lumina2":
        pe, mask, npe, nmask = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        return [{"encoder_hidden_states": pe, "encoder_attention_mask": mask},
                {"encoder_hidden_states": npe, "encoder_attention_mask": nmask}]  # fmt: skip
    if kind == "cogview4":
        pe, npe = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
        size = {"original_size": torch.tensor([[32.0, 32.0]] * 2), "target_size": torch.tensor([[32.0, 32.0]] * 2),
                "crop_coords": torch.zeros(2, 2)}  # fmt: skip
        return [{"encoder_hidden_states": pe, **size}, {"encoder_hidden_states": npe, **size}]
    pe, _, npe, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=length)
    return [{"encoder_hidden_states": pe}, {"encoder_hidden_states": npe}]


def _native_prediction(kind, pipe, sample, timestep, conditioning):
    """The flow velocity that the family pipeline's loop hands to `scheduler.step` at flow time timestep / 1000."""
    s = timestep / 1000
    if kind == "lumina2":  # time 1 - s, the prediction negated
        return -pipe.transformer(hidden_states=sample, timestep=1 - s, **conditioning, return_dict=False)[0]
    if kind == "cogview4":  # the unshifted time u: s = mu u / (1 + (mu - 1) u), mu from the image tokens
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        mu = calculate_shift(LATENT_SIZE[kind] ** 2 // 4, 256, 0.25, 0.75)
        u = s / (s + mu * (1 - s))
        return pipe.transformer(hidden_states=sample, timestep=1000 * u, **conditioning, return_dict=False)[0]
    return pipe.transformer(sample, timestep=s, **conditioning, return_dict=False)[0]


def test_cogview4_network_time_follows_the_teacher_scheduler():
    """CogView4's network time is the scheduler's unshifted time: with another teacher scheduler (an exponential
    time shift, other shift constants) the teacher ODE still equals the pipeline, because the teacher records the
    settings in the network's config, where a student copied from it keeps them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny("cogview4")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.5, max_shift=1.15, base_image_seq_len=8, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    x = noise("cogview4", 1)
    with torch.no_grad():
        native = pipe(prompt=PROMPTS, latents=x, output_type="latent", num_inference_steps=3, guidance_scale=1.0,
                      **call_kwargs("cogview4")).images  # fmt: skip
    record = TextToImageTeacher(pipe).denoiser.inner_model.config["_time_shift"]
    assert record["time_shift_type"] == "exponential" and record["base_shift"] == 0.5 and record != RELEASED_TIME_SHIFT
    m = CogView4Adapter.shift_factor(pipe.transformer, 8, 8)
    assert m == pytest.approx(math.exp(math.sqrt(16 / 8) * 1.15 + 0.5))
    s = pipe.scheduler.sigmas[:-1].double()
    torch.testing.assert_close(  # the network times the pipeline passed (its integer grid) from its flow times
        CogView4Adapter().network_time(None, 1000 * s, m), pipe.scheduler.timesteps.double(), rtol=0, atol=1e-3
    )
    ours = TrigFlowODEScheduler(parameterization="flow_matching", solver="ddim")
    grid, start = trigflow_grid(s)
    run = {"prompt": PROMPTS, "timesteps": grid, "latents": x * start.float() / ours.init_noise_sigma, **SIZE}
    with torch.no_grad():
        mine = scm_pipeline(pipe, ours)(**run, output_type="latent").images
    assert _rel(mine, native) < 1e-4
    pipe.transformer.register_to_config(_time_shift=None)  # without the record: the released settings, another ODE
    with torch.no_grad():
        unrecorded = scm_pipeline(pipe, ours)(**run, output_type="latent").images
    assert _rel(unrecorded, native) > 1e-3


@pytest.mark.parametrize("backend", ["math", "blocked"])
def test_cogview4_jvp_matches_float64_finite_differences(backend):
    """sCD's tangent through CogView4's adapter (its time map in the JVP) and attention, in float64, against central
    differences (Lumina 2 and AuraFlow: test_architectures.py)."""
    import functools

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.jvp import float64_precision, jvp

    pipe = tiny("cogview4")
    cond, _ = get_family(pipe).prompt_encoding(pipe).encode(PROMPTS, device="cpu", guidance=False, **SIZE)
    cond = {k: v.double() for k, v in cond.items()}
    den = TrigFlowDenoiser(pipe.transformer.double(), "flow_matching", sigma_data=SD)
    g = torch.Generator().manual_seed(4)
    x = noise("cogview4", 4).double()
    t, dt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.tensor([0.7, -1.2], dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g).double()
    f = functools.partial(den, **cond)
    _, tangent = jvp(f, (x, t), (dx, dt), backend=backend, block_size=3 if backend == "blocked" else None)
    h = 1e-6
    with float64_precision(), torch.no_grad():
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    assert _rel(tangent, fd) < 1e-6


def _student_folder(kind, tmp_path, intermediate=None):
    """A flow student saved as a pipeline folder: the teacher's network (any weights do for sampling checks; CogView4's
    with its recorded time shift, as distillation copies it), VAE, text encoder and tokenizer, with the consistency
    scheduler of a flow-matching student (t_max = pi/2)."""
    folder = tmp_path / f"{kind}-student"
    pipe = tiny(kind)
    get_family(pipe).teacher_network_of(pipe)
    extra = {} if intermediate is None else {"intermediate_timesteps": intermediate}
    scheduler = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2, **extra)
    scm_pipeline(pipe, scheduler).save_pretrained(folder)
    return folder


def _family_samples(kind, theirs, scheduler, x, steps, output_type="pt"):
    """The student in its family pipeline with `FlowMatchLCMScheduler`, without guidance (CogView4: its network
    times too)."""
    if kind == "cogview4":
        times = cogview4_sampling_kwargs(theirs, scheduler, steps, IMAGE_SIZE, IMAGE_SIZE)
    else:
        times = {"sigmas": scheduler.flow_sigmas(steps)}
    return theirs(prompt=PROMPTS, latents=x, num_inference_steps=steps, guidance_scale=1.0, output_type=output_type,
                  **call_kwargs(kind), **times).images  # fmt: skip


def _cogview4_integer_time(m: float, u: float = 0.5) -> float:
    """The TrigFlow time whose CogView4 network time is 1000 u (an integer): s = m u / (1 + (m - 1) u), tan t =
    s / (sd (1 - s))."""
    s = m * u / (1 + (m - 1) * u)
    return math.atan2(s, SD * (1 - s))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_student_folder_samples_the_same_in_scm_pipeline_and_the_family_pipeline(kind, steps, tmp_path):
    """One folder, two samplers: SCMPipeline.from_pretrained(folder) and the family's own pipeline class with
    diffusers' FlowMatchLCMScheduler give the same image from the same noise, prompts and re-noising draws. CogView4's
    pipeline truncates its network times to integers: its 2-step check takes an intermediate time whose network time
    is one (500), and the default intermediate time stays within the rounding of its network time."""
    intermediate = None
    if kind == "cogview4" and steps == 2:
        m = CogView4Adapter.shift_factor(tiny(kind).transformer, LATENT_SIZE[kind], LATENT_SIZE[kind])
        intermediate = _cogview4_integer_time(m)
    folder = _student_folder(kind, tmp_path, intermediate)
    ours = SCMPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    if kind == "cogview4":
        assert ours.transformer.config["_time_shift"] == RELEASED_TIME_SHIFT  # the teacher's settings, saved
    theirs = family_pipeline(folder, ours.config.family_pipeline)
    x = noise(kind, 2)
    torch.manual_seed(7)  # the re-noising draws of both schedulers (the family pipelines pass no generator)
    reference = _family_samples(kind, theirs, ours.scheduler, x, steps)
    if kind == "cogview4" and steps == 2:
        times = cogview4_sampling_kwargs(theirs, ours.scheduler, 2, IMAGE_SIZE, IMAGE_SIZE)["timesteps"]
        assert times == [1000.0, 500.0]
    torch.manual_seed(7)
    image = ours(prompt=PROMPTS, num_inference_steps=steps, latents=x, output_type="pt", **SIZE).images
    assert _rel(image, reference) < 1e-4
    if kind == "cogview4" and steps == 2:  # the default intermediate time: the network time rounded (< 0.5 / 1000)
        ours.scheduler.register_to_config(intermediate_timesteps=1.1)
        torch.manual_seed(7)
        default = ours(prompt=PROMPTS, num_inference_steps=2, latents=x, output_type="pt", **SIZE).images
        torch.manual_seed(7)
        rounded = _family_samples(kind, theirs, ours.scheduler, x, 2)
        assert 0 < _rel(default, rounded) < 1e-2
        ours.scheduler.register_to_config(intermediate_timesteps=intermediate)
    # prompt embeddings as the family's encode_prompt returns them give the same images
    length = SEQUENCE_LENGTH[kind]
    if kind == "lumina2":
        pe, mask, *_ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=length)
        embeds = {"prompt_embeds": pe, "prompt_attention_mask": mask}
    elif kind == "cogview4":
        pe, _ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=length)
        embeds = {"prompt_embeds": pe}
    else:
        pe, mask, *_ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=length)
        embeds = {"prompt_embeds": pe, "prompt_attention_mask": mask}
    torch.manual_seed(7)
    again = ours(num_inference_steps=steps, latents=x, output_type="pt", **SIZE, **embeds).images
    torch.testing.assert_close(again, image, rtol=1e-5, atol=1e-5)


# ---- distillation ---------------------------------------------------------------------------------------------------


data_dir = captioned_data_dir()  # a captioned image folder in the `datasets` imagefolder convention


def _check_student(out, kind):
    return check_student(out, PIPELINES[kind], PROMPTS, IMAGE_SIZE)


def _distill(kind, tmp_path, data_dir, method="scd", extra=()):
    teacher = tmp_path / kind
    save_tiny_pipeline(kind, teacher)
    out = tmp_path / f"student-{method}"
    load_script("distill").main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--caption_column", "text", *RUN]
        + ["--method", method, "--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(out)]
        + ["--max_train_steps", "2", *extra]
    )
    check_losses(out, 2)
    return out


def _distill_and_sample(kind, tmp_path, data_dir):
    """2 guided sCD steps in this process, then the student from prompts at 1 and 2 steps in SCMPipeline, and at 1
    step in its family pipeline (the same images)."""
    out = _distill(kind, tmp_path, data_dir)
    student = _check_student(out, kind)
    if kind == "cogview4":  # the teacher's time map went into the student
        assert student.transformer.config["_time_shift"] == RELEASED_TIME_SHIFT
    family = family_pipeline(out, PIPELINES[kind])
    x = noise(kind, 3)
    theirs = _family_samples(kind, family, student.scheduler, x, 1)
    ours = student(prompt=PROMPTS, num_inference_steps=1, latents=x, output_type="pt", **SIZE).images
    assert _rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_distill_a_few_steps_and_sample_the_student_from_prompts(kind, tmp_path, data_dir):
    _distill_and_sample(kind, tmp_path, data_dir)


@pytest.mark.parametrize("kind", KINDS)
def test_tcm_and_lora_runs(kind, tmp_path, data_dir):
    """A LoRA sCD run and a TCM run (Stage 1 sCD and Stage 2, one step each) of each family save students that
    sample from prompts."""
    out = _distill(kind, tmp_path, data_dir, extra=["--lora_rank", "4"])
    _check_student(out, kind)
    tcm = tmp_path / "tcm"
    load_script("distill").main(
        ["--teacher", str(tmp_path / kind), "--dataset_name", str(data_dir), "--caption_column", "text", *RUN]
        + ["--method", "tcm", "--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(tcm)]
        + ["--max_train_steps", "1", "--stage2_max_train_steps", "1"]
    )
    student = _check_student(tcm, kind)
    assert student.scheduler.config.dividing_timestep is not None  # the TCM student's truncated sampler


@pytest.mark.parametrize("kind", KINDS)
def test_cache_round_trip_and_training_from_it(kind, tmp_path, data_dir, monkeypatch):
    """prepare_data.py writes the latent cache (batches of prompts of different lengths); cached and on-the-fly
    batches are equal; a run from the cache never loads the teacher's text encoders."""
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
    student = SCMPipeline.from_pretrained(out)
    assert student.config.family_pipeline == batches.teacher.family
    if kind == "cogview4":  # the network-only teacher of a cache run records the time map too
        assert student.transformer.config["_time_shift"] == RELEASED_TIME_SHIFT


@pytest.mark.slow  # two processes (gloo on CPU): `python -m pytest -m slow`
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_distillation(kind, tmp_path, data_dir):
    """`accelerate launch --multi_gpu --num_processes 2 examples/distill.py --method scd` with a guided teacher, then
    the student from prompts at 1 and 2 steps."""
    teacher = tmp_path / kind
    save_tiny_pipeline(kind, teacher)
    out = tmp_path / "student"
    two_process_distillation(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--caption_column", "text", *RUN]
        + ["--guidance_scale", str(GUIDANCE_SCALE[kind]), "--output_dir", str(out), "--max_train_steps", "2"]
    )
    _check_student(out, kind)
