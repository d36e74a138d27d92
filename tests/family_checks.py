"""Checks shared by the family tests (`test_family_*.py`): each family's tiny pipeline against its own diffusers
pipeline (SPEC.md section 8) goes through the same steps, written once here.

    scm_pipeline(pipe, scheduler)      an `SCMPipeline` over a family pipeline's network, VAE and text components
    rel(a, b)                          max |a - b| / max |b| (tensors or arrays)
    teacher_ode(pipe, prompts, ...)    the teacher's ODE through the package on the family pipeline's own grid
    family_pipeline(folder)            a student folder in its family's own pipeline with `FlowMatchLCMScheduler`
    captioned_images(folder, ...)      a captioned image folder in the `datasets` imagefolder convention
    captioned_data_dir(...)            a module-scoped fixture of one (`data_dir = captioned_data_dir()`)
    check_losses(out, n)               `n` finite losses in a run's `loss_log.jsonl`
    check_student(out, family, ...)    the saved student samples from prompts at 1 and 2 steps in `SCMPipeline`
    prepare_cache(...) / cache_batches(...) / distill_from_cache(...)
                                       the latent cache round trip: `prepare_data.py`, cached batches equal to the
                                       teacher's on-the-fly batches, a run from the cache without text encoders
    two_process_distillation(args)     `accelerate launch` with 2 processes; the replicas stay in sync
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_script
from t2i_pipelines import IMAGE_SIZE

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.conditioning import TEXT_COMPONENTS
from diffusers_scm.training.teacher import TextToImageTeacher


SD = 0.5
CAPTIONS = ["a red fox", "a bowl of soup", "a blue bird in a small green bowl", "a small cat"]
# the arguments of the image families' short `distill.py` runs (2 images a batch, validation from 2 prompts)
RUN = [
    "--resolution", str(IMAGE_SIZE), "--train_batch_size", "2", "--tangent_warmup_steps", "2", "--report_to", "none",
    "--num_validation_images", "2", "--validation_prompts", "a red fox", "a small cat", "--seed", "3",
]  # fmt: skip


def scm_pipeline(pipe, scheduler, network=None) -> SCMPipeline:
    """`SCMPipeline` over `pipe`'s network (or `network`), VAE and text components, sampling with `scheduler`, its
    `family_pipeline` the class of `pipe`; progress bar off."""
    parts = {k: getattr(pipe, k) for k in TEXT_COMPONENTS if getattr(pipe, k, None) is not None}
    out = SCMPipeline(
        scheduler=scheduler,
        transformer=network if network is not None else pipe.transformer,
        vae=pipe.vae,
        family_pipeline=type(pipe).__name__,
        **parts,
    )
    out.set_progress_bar_config(disable=True)
    return out


def rel(a, b) -> float:
    """The relative difference max |a - b| / max |b| of two tensors or arrays."""
    return float(abs(a - b).max() / abs(b).max())


def trigflow_grid(s: torch.Tensor):
    """The TrigFlow times of the flow times `s` (tan t = s / (sd (1 - s))) and the factor of the first one: the
    family pipeline's unit noise n is x_s = n, whose TrigFlow state is x_t = (cos t + sd sin t) x_s."""
    grid = torch.atan2(s, SD * (1 - s))
    return grid, torch.cos(grid[0]) + SD * torch.sin(grid[0])


def teacher_ode(pipe, prompts, noise, guidance=None, network=None, s=None, **call):
    """The package's teacher ODE (`SCMPipeline` + `TrigFlowODEScheduler`, DDIM solver, over the teacher's network or
    `network`) on the grid of flow times `s` (default: the one the family pipeline's scheduler used last) from the
    family pipeline's unit noise `noise`. Returns (the pipeline output, with output_type="latent"; the teacher)."""
    teacher = TextToImageTeacher(pipe)
    p = teacher.denoiser.parameterization
    ours = TrigFlowODEScheduler(parameterization=p.name, solver="ddim", **p.config())
    s = pipe.scheduler.sigmas[:-1].double() if s is None else s
    grid, start = trigflow_grid(s)
    ours.set_timesteps(timesteps=grid)
    sampler = scm_pipeline(pipe, ours, network if network is not None else teacher.denoiser.inner_model)
    if guidance is not None:
        call["guidance_scale"] = guidance
    with torch.no_grad():
        out = sampler(
            prompt=prompts, timesteps=grid, latents=noise * start.float() / ours.init_noise_sigma, output_type="latent",
            **call,
        )  # fmt: skip
    return out, teacher


def family_pipeline(folder, family: str, **components):
    """The folder in the family's own diffusers pipeline class `family`, with diffusers' `FlowMatchLCMScheduler`
    (unless `components` gives another scheduler); progress bar off."""
    import diffusers
    from diffusers import FlowMatchLCMScheduler

    components.setdefault("scheduler", FlowMatchLCMScheduler(shift=1.0))
    pipe = getattr(diffusers, family).from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- distillation ---------------------------------------------------------------------------------------------------
def captioned_images(folder, captions=CAPTIONS, shape=(36, 40, 3)):
    """A captioned image folder in the `datasets` imagefolder convention: random RGB images of `shape` (seed 0)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return folder


def captioned_data_dir(captions=CAPTIONS, shape=(36, 40, 3)):
    """A module-scoped fixture (assign it to `data_dir` in a test module) of a `captioned_images` folder."""

    @pytest.fixture(scope="module")
    def data_dir(tmp_path_factory):
        return captioned_images(tmp_path_factory.mktemp("captioned"), captions, shape)

    return data_dir


def check_losses(out, n: int = 2) -> list:
    """The run in `out` logged `n` finite losses."""
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == n and all(math.isfinite(v) for v in losses)
    return losses


def check_student(out, family: str, prompts, size: int, output_type: str = "np") -> SCMPipeline:
    """The student saved in `out` loads in `SCMPipeline` with its family pipeline recorded, and samples `size` x
    `size` images from `prompts` (2) at 1 and 2 steps: finite, in [0, 1] for "np"."""
    student = SCMPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    assert student.config.family_pipeline == family
    for steps in (1, 2):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        images = student(
            prompt=prompts, num_inference_steps=steps, generator=gens, output_type=output_type, height=size,
            width=size,
        ).images  # fmt: skip
        if output_type == "np":
            assert images.shape == (2, size, size, 3) and (images >= 0).all() and (images <= 1).all()
        else:
            assert torch.isfinite(images).all() and images.shape == (2, 3, size, size)
    return student


def prepare_cache(teacher, dataset, cache, resolution: int, *extra):
    """`prepare_data.py` writes the latent cache of `dataset` encoded by the teacher folder `teacher`."""
    load_script("prepare_data").main(
        ["--teacher", str(teacher), "--dataset_name", str(dataset), "--resolution", str(resolution)]
        + ["--cache_dir", str(cache), *extra]
    )


def assert_same_conditioning(mine, theirs):
    """Two conditionings (nested dicts of tensors, or None) hold the same keys and values."""
    from diffusers_scm.training.data import latent_cache

    assert (mine is None) == (theirs is None)
    if theirs is None:
        return
    flat, cflat = latent_cache.flatten_conditioning(theirs), latent_cache.flatten_conditioning(mine)
    assert flat.keys() == cflat.keys()
    for key in flat:
        torch.testing.assert_close(cflat[key].float(), flat[key].float())


def cache_batches(teacher_dir, cache, rows, batch_size: int, num_frames=None, **common):
    """The first batch of `rows` encoded on the fly by the teacher loaded from `teacher_dir` and the first batch of
    the cache in `cache`, through `TextBatches(**common)`: equal x0 and conditioning. Returns a namespace of the cache
    (`data`, `info`), the `teacher`, the on-the-fly `batch`, its `x0`, `cond`, `uncond`, `w`, and the
    cached `cw`, `cached_cond`, `cached_uncond`."""
    from diffusers_scm.training.data import latent_cache
    from diffusers_scm.training.teacher import load_text_to_image_teacher

    data, uncond, info = latent_cache.load_cache(str(cache))
    teacher = load_text_to_image_teacher(str(teacher_dir))
    assert info["family"] == teacher.family
    on_the_fly = latent_cache.TextBatches(teacher, num_frames=num_frames, **common)
    cached = latent_cache.TextBatches(None, uncond=uncond, **common)
    batch = next(iter(torch.utils.data.DataLoader(rows, batch_size=batch_size)))
    cached_batch = next(iter(torch.utils.data.DataLoader(data, batch_size=batch_size)))
    x0, cond, un, w = on_the_fly(batch, "cpu")
    cx0, ccond, cun, cw = cached(cached_batch, "cpu")
    torch.testing.assert_close(cx0, x0)
    assert_same_conditioning(ccond, cond)
    assert_same_conditioning(cun, un)
    return SimpleNamespace(
        data=data, info=info, teacher=teacher, batch=batch, x0=x0, cond=cond, uncond=un, w=w, cw=cw,
        cached_cond=ccond, cached_uncond=cun,
    )  # fmt: skip


def distill_from_cache(monkeypatch, args):
    """`distill.py` with `args` (a `--cache_dir` run), failing if it loads the teacher's text encoders."""
    distill = load_script("distill")

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although the cache exists")

    monkeypatch.setattr(distill, "load_text_to_image_teacher", refuse)
    distill.main(args)


def two_process_distillation(args):
    """`accelerate launch --multi_gpu --num_processes 2 examples/distill.py ARGS`: the replicas stay in sync."""
    from test_distill_script import _launch

    _launch(args)
    out = Path(args[args.index("--output_dir") + 1])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_in_sync"]
