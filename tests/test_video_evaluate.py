"""examples/evaluate.py and examples/sample.py on text-to-video pipelines: a tiny Wan 2.1 teacher folder (sampled by
WanPipeline with its own scheduler and classifier-free guidance) and a Wan student folder (the teacher's network under
the `TrigFlowFamilyScheduler` that distill.py saves), with `--num_frames`. The paired RMSE, NFE, filmstrip grids,
saved videos and GIFs are checked against calls of the two pipelines made here. Nothing is downloaded."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_script
from diffusers import WanPipeline
from PIL import Image
from video_pipelines import NUM_FRAMES, SIZE, save_tiny_wan, tiny_wan

from diffusers_scm import SCMPipeline, TrigFlowFamilyScheduler, TrigFlowScheduler


PROMPTS = ["a red fox", "a blue bird"]
NUM_SAMPLES = 3  # video i for prompt i mod 2, in batches of 2 (a batch boundary inside a prompt's videos)
GUIDANCE = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(teacher, student): a saved tiny WanPipeline, and an SCMPipeline student folder as distill.py writes one (a
    `TrigFlowFamilyScheduler`, so that WanPipeline samples it too) with the teacher's text encoder and VAE and another
    random network of the teacher's shape (so that the student's samples differ from the teacher's)."""
    root = tmp_path_factory.mktemp("wan-eval")
    teacher = save_tiny_wan(root / "teacher", "2.1")
    scheduler = TrigFlowFamilyScheduler.from_trigflow(
        TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    )
    SCMPipeline(
        scheduler=scheduler,
        transformer=tiny_wan("2.1", seed=1).transformer,
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        family_pipeline="WanPipeline",
    ).save_pretrained(root / "student")
    return root / "teacher", root / "student"


def _common(out, *extra):
    return [
        "--num_frames", str(NUM_FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--prompts", *PROMPTS,
        "--num_samples", str(NUM_SAMPLES), "--batch_size", "2", "--guidance_scale", str(GUIDANCE), "--output_dir",
        str(out), *extra,
    ]  # fmt: skip


def test_video_student_paired_rmse_equals_the_two_pipelines_frames(folders, tmp_path):
    """`--paired_teacher` a WanPipeline folder (its own scheduler, CFG 3, 2 steps) and a student at 1 and 2 steps: the
    rows' paired RMSE equals the RMSE between the frames that WanPipeline and SCMPipeline give here from the same
    noise (video i: seed-0 noise i, prompt i mod 2, re-noising from generator seed i + 1); NFE counts WanPipeline's two
    guidance branches; the grids are filmstrips, `--save_images` writes the videos and their GIFs, and the saved
    teacher videos serve as `--paired_reference` (of the same frame count only)."""
    teacher_dir, student_dir = folders
    evaluate = load_script("evaluate")
    out = tmp_path / "report"
    teacher_rows = evaluate.main(
        ["--pipeline", str(teacher_dir), "--name", "teacher", "--steps", "2", "--save_images"]
        + _common(out, "--num_grid_images", "4")
    )["rows"]
    results = evaluate.main(
        ["--pipeline", str(student_dir), "--steps", "1", "2", "--paired_teacher", str(teacher_dir)]
        + ["--paired_teacher_steps", "2", "--save_images", *_common(out, "--num_grid_images", "4")]
    )
    rows = {(r["model"], r["steps"]): r for r in results["rows"]}
    assert teacher_rows[0]["nfe"] == 4 and rows["teacher", 2]["guidance_scale"] == GUIDANCE  # 2 steps x 2 branches
    assert rows["student", 1]["nfe"] == 1 and rows["student", 2]["nfe"] == 2
    assert all(r["num_frames"] == NUM_FRAMES and r["sec_per_video"] > 0 for r in rows.values())
    assert results["paired_reference"]["solver"] == "ode-FlowMatchEulerDiscreteScheduler"

    # the same noise, prompts and guidance through the two pipelines, called here
    noise = torch.randn((NUM_SAMPLES, 16, 2, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(0))
    prompts = [PROMPTS[i % 2] for i in range(NUM_SAMPLES)]
    size = {"height": SIZE, "width": SIZE, "num_frames": NUM_FRAMES, "output_type": "pt"}
    wan = WanPipeline.from_pretrained(teacher_dir)
    wan.set_progress_bar_config(disable=True)
    student = SCMPipeline.from_pretrained(student_dir)
    student.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = wan(
            prompt=prompts, latents=noise, num_inference_steps=2, guidance_scale=GUIDANCE, **size
        ).frames.float()
        frames = {
            steps: student(
                prompt=prompts,
                latents=noise,
                num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(i + 1) for i in range(NUM_SAMPLES)],
                **size,
            ).frames.float()
            for steps in (1, 2)
        }
    assert reference.shape == (NUM_SAMPLES, NUM_FRAMES, 3, SIZE, SIZE)
    for steps, video in frames.items():
        expected = ((video - reference) * 2).double().flatten(1).pow(2).mean(1).mean().sqrt().item()  # in [-1, 1]
        assert expected > 1e-3  # the student is not its teacher's 2-step ODE
        assert rows["student", steps]["paired_rmse"] == pytest.approx(expected, rel=1e-4)
    assert abs(rows["student", 1]["paired_rmse"] - rows["student", 2]["paired_rmse"]) > 1e-6

    # saved videos: the teacher's own frames; GIFs of F frames; filmstrip grids (row p: prompt p's first 2 videos)
    from safetensors.torch import load_file

    saved = load_file(out / "images" / "teacher-2step.safetensors")["images"]
    torch.testing.assert_close(saved, reference * 2 - 1, rtol=1e-4, atol=1e-4)
    gifs = sorted((out / "videos" / "student-2step").glob("*.gif"))
    assert len(gifs) == NUM_SAMPLES and Image.open(gifs[0]).n_frames == NUM_FRAMES
    scale = 64 // SIZE  # small frames upscaled (nearest) to 64 pixels
    strip = (NUM_FRAMES * SIZE * scale + 2, SIZE * scale + 2)  # one video's frames side by side, a 1-pixel frame
    assert Image.open(out / "grids" / "student-1step.png").size == (2 * strip[0], 2 * strip[1])
    assert "s/video" in (out / "results.md").read_text()

    # the saved teacher videos as the paired reference: the same RMSE without running the teacher again
    loaded = evaluate.main(
        ["--pipeline", str(student_dir), "--steps", "2", "--metrics", "paired_rmse", "--paired_reference"]
        + [str(out / "images" / "teacher-2step.safetensors"), *_common(tmp_path / "again", "--num_grid_images", "0")]
    )
    assert loaded["rows"][0]["paired_rmse"] == pytest.approx(rows["student", 2]["paired_rmse"], rel=1e-4)
    wrong = _common(tmp_path / "wrong", "--num_grid_images", "0")
    wrong[1] = "9"
    with pytest.raises(ValueError, match="num_frames 5 \\(here 9\\)"):
        evaluate.main(
            ["--pipeline", str(student_dir), "--steps", "1", "--paired_reference"]
            + [str(out / "images" / "teacher-2step.safetensors"), *wrong]
        )


def test_video_feature_metrics_treat_frames_as_images(folders, tmp_path):
    """fd_to_teacher: the Frechet distance between the two sets of frames in the digit features; diversity: the mean
    distance between a prompt's videos, each its frames' features stacked (independent loops here); and the
    argument checks of videos."""
    from itertools import combinations

    from safetensors.torch import load_file

    from diffusers_scm.metrics import feature_statistics, frechet_distance, load_digits_classifier

    teacher_dir, student_dir = folders
    evaluate = load_script("evaluate")
    out = tmp_path / "report"
    evaluate.main(
        ["--pipeline", str(teacher_dir), "--name", "teacher", "--steps", "2", "--save_images"]
        + _common(out, "--num_grid_images", "0")
    )
    reference = out / "images" / "teacher-2step.safetensors"
    results = evaluate.main(
        ["--pipeline", str(student_dir), "--steps", "1", "--save_images", "--paired_reference", str(reference)]
        + _common(out, "--num_grid_images", "0")
    )
    row = {r["model"]: r for r in results["rows"]}["student"]
    assert {"paired_rmse", "fd_to_teacher", "diversity"} <= set(row) and "fd_digits" not in row  # video defaults
    classifier, _ = load_digits_classifier()
    student = load_file(out / "images" / "student-1step.safetensors")["images"]
    teacher = load_file(reference)["images"]
    assert student.shape == (NUM_SAMPLES, NUM_FRAMES, 3, SIZE, SIZE)
    with torch.no_grad():
        fs = torch.stack([classifier.embed(video) for video in student]).double()  # (N, F, d), per video
        ft = torch.cat([classifier.embed(video) for video in teacher]).double()
    expected = frechet_distance(*feature_statistics(fs.flatten(0, 1)), *feature_statistics(ft))
    assert expected > 1e-4 and row["fd_to_teacher"] == pytest.approx(expected, rel=1e-5)
    per_prompt = []
    for p in range(2):
        videos = [fs[i].flatten().numpy() for i in range(p, NUM_SAMPLES, 2)]
        pairs = [np.linalg.norm(a - b) for a, b in combinations(videos, 2)]
        per_prompt.append(float(np.mean(pairs)) if pairs else None)
    assert row["diversity_per_group"][0] == pytest.approx(per_prompt[0], rel=1e-6)
    assert row["diversity_per_group"][1] is None  # one video of prompt 1
    assert json.loads((out / "results.json").read_text())["num_frames"] == NUM_FRAMES

    with pytest.raises(SystemExit):  # videos come from prompts
        evaluate.parse_args(["--pipeline", "x", "--num_frames", "5"])
    with pytest.raises(ValueError, match="give --num_frames"):
        evaluate.main(
            ["--pipeline", str(student_dir), "--prompts", *PROMPTS, "--metrics", "diversity", "--output_dir"]
            + [str(tmp_path / "x")]
        )


def test_sample_script_writes_filmstrips_and_gifs_of_a_video_student(folders, tmp_path):
    """examples/sample.py on the Wan student folder: a grid of one filmstrip per prompt and one GIF of F frames each,
    equal to the student's own frames for the same seeds."""
    _, student_dir = folders
    grid, videos = tmp_path / "grid.png", tmp_path / "videos"
    load_script("sample").main(
        ["--pipeline", str(student_dir), "--prompt", *PROMPTS, "--num_frames", str(NUM_FRAMES), "--height", str(SIZE)]
        + ["--width", str(SIZE), "--num_inference_steps", "2", "--video_dir", str(videos), "--output", str(grid)]
        + ["--device", "cpu"]
    )
    assert Image.open(grid).size == (2 * NUM_FRAMES * SIZE, SIZE)  # two filmstrips side by side
    gifs = sorted(videos.glob("*.gif"))
    assert [g.name for g in gifs] == ["video-000.gif", "video-001.gif"]
    assert all(Image.open(g).n_frames == NUM_FRAMES for g in gifs)
    student = SCMPipeline.from_pretrained(student_dir)
    student.set_progress_bar_config(disable=True)
    frames = student(
        prompt=PROMPTS,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        num_frames=NUM_FRAMES,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="np",
    ).frames
    strip = np.asarray(Image.open(grid).convert("RGB"))[:, NUM_FRAMES * SIZE :]  # the second video's filmstrip
    expected = (frames[1].transpose(1, 0, 2, 3).reshape(SIZE, NUM_FRAMES * SIZE, 3) * 255).round()
    assert np.abs(strip.astype(np.float64) - expected).max() <= 1
    with pytest.raises(SystemExit):  # GIFs are videos: --num_frames needed
        load_script("sample").parse_args(["--pipeline", str(student_dir), "--video_dir", str(videos)])


@pytest.mark.parametrize("kind", ["ltx", "hunyuan", "hunyuan15"])
def test_other_video_family_teachers_are_sampled_as_their_own_pipelines(kind, tmp_path):
    """LTX-Video (noise packed into its tokens, CFG), HunyuanVideo (guidance input: one branch) and HunyuanVideo 1.5
    (CFG through its guider; one video per call, as its VAE decodes batches of one) teacher folders: the saved videos
    equal the family pipeline called here from the same noise with the same guidance, and NFE counts its branches."""
    from diffusers import LTXPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from safetensors.torch import load_file
    from video_family_pipelines import NUM_FRAMES as FRAMES
    from video_family_pipelines import SIZE as SIZES
    from video_family_pipelines import call_kwargs, latent_shape, save_tiny_pipeline

    evaluate = load_script("evaluate")
    pipe = save_tiny_pipeline(kind, tmp_path / "teacher")
    out = tmp_path / "report"
    (row,) = evaluate.main(
        ["--pipeline", str(tmp_path / "teacher"), "--name", "teacher", "--steps", "2", "--guidance_scale", "3"]
        + ["--num_frames", str(FRAMES[kind]), "--resolution", str(SIZES[kind]), "--prompts", *PROMPTS]
        + ["--num_samples", "2", "--batch_size", "2", "--save_images", "--num_grid_images", "0"]
        + ["--output_dir", str(out)]
    )["rows"]
    assert row["nfe"] == (2 if kind == "hunyuan" else 4)  # HunyuanVideo: guidance-distilled, one call per step
    noise = torch.randn(latent_shape(kind, 2), generator=torch.Generator().manual_seed(0))
    kwargs, latents = dict(call_kwargs(kind)), noise
    if kind == "ltx":
        latents = LTXPipeline._pack_latents(noise, 1, 1)
    if kind == "hunyuan15":
        pipe.guider = ClassifierFreeGuidance(guidance_scale=3.0)
    else:
        kwargs["guidance_scale"] = 3.0
    one = 1 if kind == "hunyuan15" else 2
    with torch.no_grad():
        expected = torch.cat(
            [
                pipe(
                    prompt=PROMPTS[i : i + one],
                    latents=latents[i : i + one],
                    num_inference_steps=2,
                    output_type="pt",
                    **kwargs,
                ).frames.float()
                for i in range(0, 2, one)
            ]
        )
    saved = load_file(out / "images" / "teacher-2step.safetensors")["images"]
    assert saved.shape == (2, FRAMES[kind], 3, SIZES[kind], SIZES[kind])
    torch.testing.assert_close(saved, expected * 2 - 1, rtol=1e-5, atol=1e-5)


def test_nfe_of_a_wan22_teacher_counts_both_experts(tmp_path):
    """Wan 2.2's pipeline calls `transformer` above its boundary timestep and `transformer_2` below: a 4-step run whose
    timesteps lie on both sides evaluates a network twice per step (CFG), whichever expert."""
    evaluate = load_script("evaluate")
    pipe = save_tiny_wan(tmp_path / "teacher", "2.2")
    pipe.scheduler.set_timesteps(4)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert (pipe.scheduler.timesteps >= boundary).any() and (pipe.scheduler.timesteps < boundary).any()
    (row,) = evaluate.main(
        ["--pipeline", str(tmp_path / "teacher"), "--steps", "4", "--num_grid_images", "0", "--metrics", "diversity"]
        + _common(tmp_path / "report")
    )["rows"]
    assert row["nfe"] == 8 and row["sampler"] == "ode-UniPCMultistepScheduler"
