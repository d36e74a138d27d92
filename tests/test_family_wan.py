"""Wan 2.1 and 2.2 (`WanPipeline`) end to end, against diffusers' own WanPipeline: the teacher's guided ODE (2.2: its
two experts switched at the boundary), the student's consistency sampler inside WanPipeline
(`TrigFlowFamilyScheduler`), `.frames` from `SCMPipeline`, short sCD / TCM / LoRA runs with `--num_frames`, and the
latent cache. Tiny random pipelines from tests/video_pipelines.py; nothing is downloaded."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_script
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from family_checks import (
    cache_batches,
    check_losses,
    distill_from_cache,
    prepare_cache,
    rel,
    scm_pipeline,
    teacher_ode,
    two_process_distillation,
)
from video_pipelines import NUM_FRAMES, SIZE, save_clips, save_tiny_wan, tiny_wan

from diffusers_scm import SCMPipeline, TrigFlowFamilyScheduler, TrigFlowScheduler
from diffusers_scm.families import get_family
from diffusers_scm.families.wan import TimestepExperts
from diffusers_scm.training.teacher import TextToImageTeacher


PROMPTS = ["a red fox", "a blue bird"]
LATENT = (2, 16, 2, SIZE // 8, SIZE // 8)  # 5 frames: 2 latent frames
COMMON = [
    "--resolution", str(SIZE), "--num_frames", str(NUM_FRAMES), "--train_batch_size", "2", "--tangent_warmup_steps",
    "1", "--report_to", "none", "--num_validation_images", "2", "--validation_prompts", *PROMPTS, "--seed", "3",
    "--guidance_scale", "3.0",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return save_clips(tmp_path_factory.mktemp("clips"), captions=PROMPTS, num_frames=7)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan21")
    save_tiny_wan(folder, "2.1")
    return folder


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22")
    save_tiny_wan(folder, "2.2")
    return folder


def _ode(version, guidance, network=None):
    """(ours, WanPipeline's) latents of the teacher's guided ODE on the same 4-step grid from the same noise."""
    pipe = tiny_wan(version)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    size = {"height": SIZE, "width": SIZE, "num_frames": NUM_FRAMES}
    with torch.no_grad():
        native = pipe(
            prompt=PROMPTS, num_inference_steps=4, latents=noise, output_type="latent", guidance_scale=guidance, **size
        ).frames
    mine, _ = teacher_ode(pipe, PROMPTS, noise, guidance, network=network(pipe) if network else None, **size)
    return mine.frames, native, pipe, pipe.scheduler.sigmas[:-1].double()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_wan21_teacher_guided_ode_equals_wan_pipeline(guidance):
    mine, native, pipe, _ = _ode("2.1", guidance)
    assert type(TextToImageTeacher(pipe).denoiser.inner_model).__name__ == "WanTransformer3DModel"
    assert rel(mine, native) < 1e-4


def test_wan22_teacher_switches_experts_at_the_boundary_as_wan_pipeline():
    """Both experts, switched at boundary_ratio * 1000 with one guidance scale for both, equal WanPipeline (its
    `guidance_scale_2` defaulting to `guidance_scale`); the grid has steps on both sides of the boundary, and the
    high-noise expert alone does not give WanPipeline's result."""
    mine, native, pipe, sigmas = _ode("2.2", 4.0)
    assert (sigmas * 1000 >= 875).any() and (sigmas * 1000 < 875).any()
    assert isinstance(TextToImageTeacher(pipe).denoiser.inner_model, TimestepExperts)
    assert rel(mine, native) < 1e-4
    alone, native, _, _ = _ode("2.2", 4.0, network=lambda p: p.transformer)
    assert rel(alone, native) > 1e-3


def test_experts_route_each_sample_of_a_mixed_batch():
    pipe = tiny_wan("2.2")
    experts = TimestepExperts(pipe.transformer, pipe.transformer_2, 875.0)
    x = torch.randn(3, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    text = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([950.0, 500.0, 875.0])
    with torch.no_grad():
        out = experts(x, t, encoder_hidden_states=text)
        for i, expert in enumerate([pipe.transformer, pipe.transformer_2, pipe.transformer]):
            one = expert(hidden_states=x[i : i + 1], timestep=t[i : i + 1], encoder_hidden_states=text[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], one.sample, rtol=1e-5, atol=1e-5)
    assert experts.student_network() is pipe.transformer_2


def test_family_scheduler_is_the_trigflow_scheduler_in_flow_units():
    trig = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    family = TrigFlowFamilyScheduler.from_trigflow(trig)
    family.set_timesteps(2)
    s = torch.tensor(trig.flow_sigmas(2))
    torch.testing.assert_close(family.timesteps, (1000 * s).float())
    torch.testing.assert_close(family.sigmas[:-1], s.float())
    assert family.init_noise_sigma == pytest.approx(1.0) and family.order == 1
    with pytest.raises(ValueError, match="pass `num_inference_steps`"):
        family.set_timesteps(2, sigmas=[1.0, 0.5])
    assert family.trigflow_scheduler().config.intermediate_timesteps == trig.config.intermediate_timesteps
    assert get_family("WanPipeline").own_sampler == "scheduler" and get_family("WanPipeline").video


@pytest.mark.parametrize("steps", [1, 2])
def test_student_folder_samples_the_same_in_wan_pipeline_and_scm_pipeline(steps, tmp_path):
    """The folder loads in WanPipeline as it is (its scheduler is TrigFlowFamilyScheduler): the same frames as
    SCMPipeline from the same noise and re-noising draws."""
    pipe = tiny_wan("2.1")
    scheduler = TrigFlowFamilyScheduler.from_trigflow(
        TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    )
    scm_pipeline(pipe, scheduler, pipe.transformer).save_pretrained(tmp_path / "student")
    ours = SCMPipeline.from_pretrained(tmp_path / "student")
    ours.set_progress_bar_config(disable=True)
    theirs = WanPipeline.from_pretrained(tmp_path / "student")
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.scheduler, TrigFlowFamilyScheduler) and theirs.transformer_2 is None
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(2))
    size = {"height": SIZE, "width": SIZE, "num_frames": NUM_FRAMES}
    torch.manual_seed(7)  # the re-noising draws (WanPipeline passes no generator to its scheduler)
    reference = theirs(
        prompt=PROMPTS, num_inference_steps=steps, latents=noise, guidance_scale=1.0, output_type="np", **size
    ).frames
    torch.manual_seed(7)
    frames = ours(prompt=PROMPTS, num_inference_steps=steps, latents=noise, output_type="np", **size).frames
    assert frames.shape == (2, NUM_FRAMES, SIZE, SIZE, 3)
    assert rel(frames, reference) < 1e-4
    if steps == 2:  # the re-noising draw matters: other draws give other frames
        torch.manual_seed(8)
        other = ours(prompt=PROMPTS, num_inference_steps=steps, latents=noise, output_type="np", **size).frames
        assert np.abs(other - reference).max() > 1e-4


def test_video_student_outputs_frames_in_diffusers_layouts(tmp_path):
    pipe = tiny_wan("2.1")
    student = scm_pipeline(
        pipe, TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2), pipe.transformer
    )
    size = {"height": SIZE, "width": SIZE, "num_frames": NUM_FRAMES}

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    out = student(prompt=PROMPTS, num_inference_steps=1, output_type="np", generator=gens(), **size)
    assert not hasattr(out, "images") and out.frames.shape == (2, NUM_FRAMES, SIZE, SIZE, 3)
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    pt = student(prompt=PROMPTS, num_inference_steps=1, output_type="pt", generator=gens(), **size).frames
    assert pt.shape == (2, NUM_FRAMES, 3, SIZE, SIZE)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), out.frames, atol=1e-6)
    pil = student(prompt=PROMPTS, num_inference_steps=1, output_type="pil", generator=gens(), **size).frames
    assert len(pil) == 2 and len(pil[0]) == NUM_FRAMES and pil[0][0].size == (SIZE, SIZE)
    latent = student(prompt=PROMPTS, num_inference_steps=1, output_type="latent", generator=gens(), **size).frames
    assert latent.shape == LATENT
    with pytest.raises(ValueError, match="Use 5 or 9 frames"):
        student(prompt=PROMPTS, height=SIZE, width=SIZE, num_frames=6)


def test_short_wan21_distillation_saves_a_student_for_both_pipelines(tmp_path, wan21, clips):
    distill = load_script("distill")
    out = tmp_path / "student"
    distill.main(
        ["--teacher", str(wan21), "--dataset_name", clips, "--output_dir", str(out), "--max_train_steps", "2"]
        + ["--validation_steps", "2", *COMMON]
    )
    check_losses(out, 2)
    assert (out / "samples" / "step-0000002-2step.png").is_file() and (out / "sample_grid.png").is_file()
    from PIL import Image

    assert Image.open(out / "sample_grid.png").size == (
        2 * NUM_FRAMES * SIZE,
        2 * SIZE,
    )  # filmstrips, rows 1 and 2 steps
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "TrigFlowFamilyScheduler" and scheduler["parameterization"] == "flow_matching"
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    frames = student(
        prompt=PROMPTS, num_inference_steps=2, output_type="np", height=SIZE, width=SIZE, num_frames=NUM_FRAMES
    ).frames
    assert np.isfinite(frames).all() and frames.shape == (2, NUM_FRAMES, SIZE, SIZE, 3)
    assert "WanPipeline.from_pretrained" in (out / "README.md").read_text()
    with pytest.raises(SystemExit):  # a count Wan's VAE cannot encode whole
        distill.parse_args(["--teacher", str(wan21), "--dataset_name", clips, "--num_frames", "6"])
    with pytest.raises(SystemExit):  # a video teacher needs --num_frames
        distill.parse_args(["--teacher", str(wan21), "--dataset_name", clips])


def test_wan22_student_starts_from_the_low_noise_expert_and_distills(tmp_path, wan22, clips):
    distill = load_script("distill")
    args = distill.parse_args(["--teacher", str(wan22), "--dataset_name", clips, *COMMON])
    teacher, student = distill.build_models(args)
    assert isinstance(teacher.inner_model, TimestepExperts)
    expert = teacher.inner_model.low_noise.state_dict()
    for name, value in student.inner_model.state_dict().items():
        torch.testing.assert_close(value, expert[name])
    out = tmp_path / "student"
    distill.main(
        ["--teacher", str(wan22), "--dataset_name", clips, "--output_dir", str(out), "--max_train_steps", "2", *COMMON]
    )
    family = WanPipeline.from_pretrained(out)
    assert family.transformer_2 is None and family.config.boundary_ratio is None
    family.set_progress_bar_config(disable=True)
    frames = family(
        prompt=PROMPTS,
        num_inference_steps=1,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        num_frames=NUM_FRAMES,
        output_type="np",
    ).frames
    assert np.isfinite(frames).all()


def test_wan_tcm_and_lora_runs(tmp_path, wan21, wan22, clips):
    distill = load_script("distill")
    tcm = tmp_path / "tcm"
    distill.main(
        ["--teacher", str(wan21), "--method", "tcm", "--dataset_name", clips, "--output_dir", str(tcm)]
        + ["--max_train_steps", "1", "--stage2_max_train_steps", "1", *COMMON]
    )
    scheduler = WanPipeline.from_pretrained(tcm).scheduler
    assert isinstance(scheduler, TrigFlowFamilyScheduler) and scheduler.config.dividing_timestep
    lora = tmp_path / "lora"
    distill.main(
        ["--teacher", str(wan22), "--dataset_name", clips, "--output_dir", str(lora), "--lora_rank", "4"]
        + ["--max_train_steps", "2", *COMMON]
    )
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    family = WanPipeline.from_pretrained(wan22)  # the adapter belongs to the low-noise expert, `transformer_2`
    family.load_lora_weights(lora, load_into_transformer_2=True)
    merged = SCMPipeline.from_pretrained(lora).transformer
    x = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    call = {"hidden_states": x, "timestep": torch.tensor([500.0]), "encoder_hidden_states": torch.randn(1, 5, 32)}
    with torch.no_grad():
        torch.testing.assert_close(family.transformer_2(**call).sample, merged(**call).sample, rtol=1e-4, atol=1e-4)

    # the teacher of a LoRA student on one expert: both experts with the adapter off, whatever its weights
    args = distill.parse_args(["--teacher", str(wan22), "--dataset_name", clips, "--lora_rank", "4", *COMMON])
    teacher, student = distill.build_models(args)
    base = tiny_wan("2.2")
    text = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))}
    x = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.6, 1.5])  # TrigFlow times on both sides of the boundary (s = 0.41 and 0.97)
    with torch.no_grad():
        for name, param in student.inner_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
        reference = TextToImageTeacher(base).denoiser(x, t, **text)
        torch.testing.assert_close(teacher(x, t, **text), reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(student(x, t, **text), reference, atol=1e-3)


def test_wan22_cache_round_trip_and_training_from_it(tmp_path, wan22, clips, monkeypatch):
    from diffusers_scm.training.data import latent_cache
    from diffusers_scm.training.data.videos import load_text_video_dataset
    from diffusers_scm.training.teacher import load_teacher

    cache = tmp_path / "cache"
    prepare_cache(wan22, clips, cache, SIZE, "--num_frames", str(NUM_FRAMES), "--device", "cpu")
    rows = load_text_video_dataset(clips, SIZE, NUM_FRAMES)
    b = cache_batches(wan22, cache, rows, 2, num_frames=NUM_FRAMES, guidance_scale=3.0, resolution=SIZE)
    assert b.info["num_frames"] == NUM_FRAMES and b.info["family"] == "WanPipeline"
    assert b.x0.shape == LATENT and "encoder_hidden_states" in b.cond and "encoder_hidden_states" in b.uncond
    assert isinstance(load_teacher(str(wan22)).inner_model, TimestepExperts)  # the network-only teacher of a cache run

    out = tmp_path / "from-cache"
    distill_from_cache(
        monkeypatch,
        ["--teacher", str(wan22), "--cache_dir", str(cache), "--dataset_name", clips, "--output_dir", str(out)]
        + ["--max_train_steps", "2", *COMMON],
    )
    assert SCMPipeline.from_pretrained(out).config.family_pipeline == "WanPipeline"
    with pytest.raises(ValueError, match="--num_frames 5, this run has --num_frames 9"):
        latent_cache.load_cache(str(cache), {"num_frames": 9})


def test_prompt_only_video_data_uses_the_teachers_ode(tmp_path, wan21):
    distill = load_script("distill")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "student"
    distill.main(
        ["--teacher", str(wan21), "--dataset_name", str(prompts), "--teacher_ode_steps", "2", "--output_dir", str(out)]
        + ["--max_train_steps", "1", *COMMON]
    )
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
def test_two_process_wan_distillation(tmp_path, wan21):
    clips = save_clips(tmp_path / "clips", captions=(*PROMPTS, "a small cat", "a white dog"), num_frames=5)
    out = tmp_path / "student"
    two_process_distillation(
        ["--teacher", str(wan21), "--dataset_name", clips, "--output_dir", str(out), "--max_train_steps", "2", *COMMON]
    )
    theirs = WanPipeline.from_pretrained(out)
    theirs.set_progress_bar_config(disable=True)
    ours = SCMPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    size = {"height": SIZE, "width": SIZE, "num_frames": NUM_FRAMES}
    a = theirs(
        prompt=PROMPTS, num_inference_steps=1, latents=noise, guidance_scale=1.0, output_type="np", **size
    ).frames
    b = ours(prompt=PROMPTS, num_inference_steps=1, latents=noise, output_type="np", **size).frames
    assert rel(b, a) < 1e-4
