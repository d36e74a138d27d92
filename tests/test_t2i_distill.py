"""Text-to-image distillation end to end (`examples/distill.py` with a text-to-image teacher): two processes with gloo
on CPU, resume, the saved student in SCMPipeline and in its family's own pipeline, TCM, the latent/embedding cache,
guidance ranges, prompt-only data and the errors of bad inputs. Tiny random pipelines; nothing is downloaded."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image
from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline
from test_distill_script import _launch
from test_hub import COMMIT_A, hub_cache, put_in_cache  # noqa: F401 (hub_cache is a fixture)

from diffusers_scm import SCMPipeline


PROMPTS = ["a red fox", "a bowl of soup", "a blue bird", "a small cat"]
COMMON = [
    "--resolution", str(IMAGE_SIZE), "--train_batch_size", "2", "--tangent_warmup_steps", "2", "--report_to", "none",
    "--num_validation_images", "2", "--validation_prompts", "a red fox", "a small cat", "--seed", "3",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A captioned image folder in the `datasets` imagefolder convention (images of several sizes)."""
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(8):
            size = (40 + 4 * (i % 3), 36)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": PROMPTS[i % 4]}) + "\n")
    return folder


def _losses(folder):
    return [json.loads(line)["loss"] for line in (Path(folder) / "loss_log.jsonl").read_text().splitlines()]


def test_two_process_sd3_distillation_resume_and_both_pipelines(tmp_path, data_dir):
    import diffusers
    from diffusers import FlowMatchLCMScheduler

    teacher = tmp_path / "sd3"
    save_tiny_pipeline("sd3", teacher)
    args = ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--guidance_scale", "3.0", *COMMON]
    full, part = tmp_path / "full", tmp_path / "part"
    _launch([*args, "--output_dir", str(full), "--max_train_steps", "4", "--checkpointing_steps", "2"])
    _launch([*args, "--output_dir", str(part), "--max_train_steps", "2", "--checkpointing_steps", "2"])
    _launch([*args, "--output_dir", str(part), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    np.testing.assert_allclose(_losses(part), _losses(full), rtol=1e-5)
    summary = json.loads((full / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_in_sync"]

    student = SCMPipeline.from_pretrained(full)
    student.set_progress_bar_config(disable=True)
    assert student.config.family_pipeline == "StableDiffusion3Pipeline"
    noise = torch.randn(2, 16, IMAGE_SIZE // 4, IMAGE_SIZE // 4, generator=torch.Generator().manual_seed(0))
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    for steps in (1, 2):
        images = student(prompt=PROMPTS[:2], num_inference_steps=steps, latents=noise, output_type="pt", **size)
        assert torch.isfinite(images.images).all() and images.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    family = diffusers.StableDiffusion3Pipeline.from_pretrained(full, scheduler=FlowMatchLCMScheduler(shift=1.0))
    family.set_progress_bar_config(disable=True)
    theirs = family(
        prompt=PROMPTS[:2],
        num_inference_steps=1,
        sigmas=student.scheduler.flow_sigmas(1),
        latents=noise,
        guidance_scale=1.0,
        output_type="pt",
        **size,
    ).images
    ours = student(prompt=PROMPTS[:2], num_inference_steps=1, latents=noise, output_type="pt", **size).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    card = (full / "README.md").read_text()
    assert "text-to-image" in card and "FlowMatchLCMScheduler" in card and '"a red fox"' in card


def test_tcm_with_a_text_to_image_teacher(tmp_path, data_dir):
    distill = load_script("distill")
    teacher = tmp_path / "sana"
    save_tiny_pipeline("sana", teacher)
    out = tmp_path / "tcm"
    distill.main(
        ["--teacher", str(teacher), "--method", "tcm", "--dataset_name", str(data_dir), "--output_dir", str(out)]
        + ["--max_train_steps", "2", "--stage2_max_train_steps", "2", "--guidance_scale", "2.0", *COMMON]
        + ["--dmd_weight", "1.0", "--dmd_fake_updates", "1"]  # Stage 2 with the score regularizer, guided teacher
    )
    assert all(np.isfinite(_losses(out))) and len(_losses(out)) == 2
    student = SCMPipeline.from_pretrained(out)
    assert student.config.family_pipeline == "SanaPipeline" and student.scheduler.config.dividing_timestep
    student.set_progress_bar_config(disable=True)
    images = student(prompt=PROMPTS[:2], num_inference_steps=2, output_type="pt", height=IMAGE_SIZE, width=IMAGE_SIZE)
    assert torch.isfinite(images.images).all()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "sana", "pixart_sigma", "sd15"])
def test_cache_round_trip_and_training_without_vae_or_text_encoders(family, tmp_path, data_dir, monkeypatch):
    """Cached and on-the-fly batches are equal; a run from the cache never loads the teacher's text encoders."""
    from diffusers_scm.training.data import latent_cache as text_to_image
    from diffusers_scm.training.data.captions import load_text_image_dataset
    from diffusers_scm.training.teacher import load_text_to_image_teacher

    teacher_dir = tmp_path / family
    save_tiny_pipeline(family, teacher_dir)
    cache = tmp_path / "cache"
    prepare = load_script("prepare_data")
    prepare.main(
        ["--teacher", str(teacher_dir), "--dataset_name", str(data_dir), "--resolution", str(IMAGE_SIZE)]
        + ["--cache_dir", str(cache), "--batch_size", "3"]
    )
    data, uncond, info = text_to_image.load_cache(str(cache))
    assert len(data) == 8 and info["family"] == load_text_to_image_teacher(str(teacher_dir)).family
    teacher = load_text_to_image_teacher(str(teacher_dir))
    on_the_fly = text_to_image.TextBatches(teacher, guidance_scale=3.0, resolution=IMAGE_SIZE)
    cached = text_to_image.TextBatches(None, guidance_scale=3.0, uncond=uncond, resolution=IMAGE_SIZE)
    rows = load_text_image_dataset(str(data_dir), IMAGE_SIZE)
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    cached_loader = torch.utils.data.DataLoader(data, batch_size=4)
    for batch, cached_batch in zip(loader, cached_loader):
        x0, cond, un, _ = on_the_fly(batch, "cpu")
        cx0, ccond, cun, _ = cached(cached_batch, "cpu")
        torch.testing.assert_close(cx0, x0)
        flat, cflat = text_to_image.flatten_conditioning(cond), text_to_image.flatten_conditioning(ccond)
        assert flat.keys() == cflat.keys()
        for key in flat:
            torch.testing.assert_close(cflat[key].float(), flat[key].float())
        for key, value in text_to_image.flatten_conditioning(un).items():
            torch.testing.assert_close(text_to_image.flatten_conditioning(cun)[key].float(), value.float())

    if family != "sdxl":
        return
    distill = load_script("distill")

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although the cache exists")

    monkeypatch.setattr(distill, "load_text_to_image_teacher", refuse)
    out = tmp_path / "from-cache"
    distill.main(
        ["--teacher", str(teacher_dir), "--cache_dir", str(cache), "--dataset_name", str(data_dir)]
        + ["--output_dir", str(out), "--max_train_steps", "2", "--guidance_scale", "3.0", *COMMON]
    )
    assert SCMPipeline.from_pretrained(out).config.family_pipeline == "StableDiffusionXLPipeline"


def test_guidance_range_student_and_prompt_only_data(tmp_path):
    """A Flux.1-dev-like teacher (guidance input), w drawn per sample from [1, 5]: the student records the range and
    its output follows `guidance_scale`; the data are prompts only (x0 from the teacher's ODE)."""
    distill = load_script("distill")
    teacher = tmp_path / "flux"
    save_tiny_pipeline("flux", teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "flux-student"
    distill.main(
        ["--teacher", str(teacher), "--dataset_name", str(prompts), "--guidance_scale_range", "1", "5"]
        + ["--teacher_ode_steps", "3", "--output_dir", str(out), "--max_train_steps", "2", *COMMON]
    )
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    assert student.config.guidance_scale_range == [1.0, 5.0]
    common = {"prompt": PROMPTS[:2], "num_inference_steps": 1, "output_type": "pt", "height": 32, "width": 32}
    low = student(**common, guidance_scale=1.0, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    high = student(**common, guidance_scale=5.0, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert not torch.allclose(low.images, high.images, atol=1e-4)
    assert "[1.0, 5.0]" in (out / "README.md").read_text()


def test_bad_text_to_image_inputs_have_clear_errors(tmp_path, data_dir):
    from diffusers_scm.training.data.captions import load_text_image_dataset
    from diffusers_scm.training.teacher import load_text_to_image_teacher

    with pytest.raises(ValueError, match="no caption column 'caption'.*--caption_column"):
        load_text_image_dataset(str(data_dir), IMAGE_SIZE, caption_column="caption")
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (8, 8)).save(bare / "a.png")
    with pytest.raises(ValueError, match="has no metadata.jsonl.*file_name"):
        load_text_image_dataset(str(bare), IMAGE_SIZE)
    teacher = tmp_path / "sd15"
    save_tiny_pipeline("sd15", teacher)
    index = json.loads((teacher / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (teacher / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no text_encoder: a text-to-image teacher needs"):
        load_text_to_image_teacher(str(teacher))
    distill = load_script("distill")
    with pytest.raises(SystemExit):
        distill.parse_args(["--teacher", str(teacher), "--dataset_name", "digits"])
    save_tiny_pipeline("sd15", tmp_path / "sd15-ok")
    with pytest.raises(ValueError, match="--guidance_scale_range feeds w to the student's guidance input"):
        distill.main(
            [
                "--teacher",
                str(tmp_path / "sd15-ok"),
                "--dataset_name",
                str(data_dir),
                "--guidance_scale_range",
                "1",
                "2",
            ]
            + ["--output_dir", str(tmp_path / "x"), "--max_train_steps", "1", *COMMON]
        )


@pytest.mark.slow  # about 80 s: `python -m pytest -m slow`; the SD3 two-process test above runs by default
@pytest.mark.parametrize(
    "family, extra",
    [
        ("flux", ["--guidance_scale", "3.5"]),
        ("sana", ["--guidance_scale", "4.5", "--method", "cd"]),
        ("pixart_sigma", ["--guidance_scale", "4.5"]),
        ("sd15", ["--guidance_scale", "7.5", "--teacher_dtype", "bfloat16"]),
    ],
)
def test_two_process_distillation_of_each_family(family, extra, tmp_path, data_dir):
    """`accelerate launch --multi_gpu --num_processes 2 examples/distill.py` for every family (sCD, discrete CD for
    Sana, a bf16 teacher for SD 1.5): the student loads with SCMPipeline and gives finite images from prompts in 1
    and 2 steps."""
    teacher = tmp_path / family
    save_tiny_pipeline(family, teacher)
    out = tmp_path / "student"
    _launch(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), *COMMON, *extra]
        + ["--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2"]
    )
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    assert student.transformer is not None or student.unet is not None
    assert next(student.network.parameters()).dtype == torch.float32  # float32 master weights saved
    for steps in (1, 2):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out_images = student(
            prompt=PROMPTS[:2], num_inference_steps=steps, generator=gens, output_type="pt", height=32, width=32
        ).images
        assert torch.isfinite(out_images).all()


def test_text_to_image_student_publishes_every_component_and_loads_by_hub_id(tmp_path, data_dir, hub_cache):  # noqa: F811
    """The push uploads the student network and scheduler with the unchanged components (VAE, text encoders,
    tokenizers), so `SCMPipeline.from_pretrained("org/name")` needs nothing else; checked offline against a cache laid
    out as the Hub's."""
    from diffusers_scm.hub import pipeline_files

    distill = load_script("distill")
    teacher = tmp_path / "sd3"
    save_tiny_pipeline("sd3", teacher)
    out = tmp_path / "student"
    distill.main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--output_dir", str(out)]
        + ["--max_train_steps", "1", *COMMON]
    )
    files = pipeline_files(str(out))
    for component in ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_3", "tokenizer", "tokenizer_3"):
        assert any(f.startswith(component + "/") for f in files), component
    assert not any(f.startswith("checkpoint-") for f in files)
    put_in_cache(hub_cache, "org/t2i-student", out, COMMIT_A)
    by_id = SCMPipeline.from_pretrained("org/t2i-student")
    local = SCMPipeline.from_pretrained(out)
    for pipe in (by_id, local):
        pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPTS[:2], "num_inference_steps": 1, "output_type": "pt", "height": 32, "width": 32}
    a = by_id(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    b = local(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    torch.testing.assert_close(a, b)
