"""Latent EDM2 and EDM2's guidance by a second network (SPEC.md section 10).

Tiny EDM2 networks are written as NVlabs pickles (`nvlabs_pickles`) and converted with `diffusers_scm.convert`. The
references are written here: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) from the raw networks (SPEC.md
section 10's table), guidance D_g + w (D - D_g), EDM2's decode of the final latents ((x - bias) / scale, the VAE's
decode, clamp to [0, 1]) with a tiny random `AutoencoderKL`, and EDM's Euler sampler. The last test distills a
converted tiny EDM2 teacher guided by a converted unconditional one in two processes.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from nvlabs_pickles import official_layout, precond_object, tiny_network, write_pickle
from test_t2i_distill import data_dir  # noqa: F401 (a fixture)

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.convert import convert_checkpoint, edm2_latent_normalization, main
from diffusers_scm.guidance import GuidedDenoiser, guidance_conditioning, takes_class_labels
from diffusers_scm.jvp import jvp, jvp_mode
from diffusers_scm.training import load_teacher
from diffusers_scm.training.objectives.common import teacher_velocity


pytestmark = pytest.mark.usefixtures("one_thread")

SD = 0.5
W = 1.7  # guidance scale
SIGMAS = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 7, dtype=torch.float64))
# EDM2's StabilityVAEEncoder (SPEC.md section 10), as nvlabs_pickles.official_layout stores it
RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], dtype=np.float32)
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)
SCALE = np.float32(0.5) / RAW_STD
BIAS = np.float32(0) - RAW_MEAN * SCALE


def write_edm2(path, num_classes=3, seed=0, **overrides):
    """A tiny EDM2 network in its Precond, pickled in EDM2's official layout (with the latent encoder record);
    returns the network as the file holds it (weights rounded to float16)."""
    net = tiny_network("UNet", num_classes=num_classes, seed=seed, **overrides)
    write_pickle(path, official_layout(precond_object("Precond", net), edm2=True))
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            tensor.copy_(tensor.half().float())
    return net


def reference_D(net, x, sigma, labels=None):
    """EDM2's D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, one-hot labels) (SPEC.md section 10), float64."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out = SD**2 / (s**2 + SD**2), s * SD / torch.sqrt(s**2 + SD**2)
    c_in, c_noise = 1 / torch.sqrt(s**2 + SD**2), torch.log(s) / 4
    rows = None if labels is None else torch.nn.functional.one_hot(labels, net.config.num_classes).float()
    with torch.no_grad():
        F = net((c_in * x).float(), c_noise.flatten(), class_labels=rows).sample.double()
    return c_skip * x.double() + c_out * F


def guided_reference(net, guide, x, sigma, labels, w=W, guide_labels=None):
    """D_g + w (D - D_g): EDM2's guidance (generate_images.py's lerp), the guide without labels unless given."""
    D, D_g = reference_D(net, x, sigma, labels), reference_D(guide, x, sigma, guide_labels)
    return D_g + w * (D - D_g)


def relative_error(a, b) -> float:
    """The largest per-sample max-norm error of `a` relative to `b`."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).abs().amax(1) / b.abs().amax(1)).max().item()


def noisy_batch(seed=0, channels=2):
    """x = x0 + sigma n on the grid (x the float64 point that a float32 x_t = cos(t) x stands for) and labels."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(SIGMAS), channels, 8, 8, generator=g, dtype=torch.float64) * 0.5
    x = x0 + SIGMAS.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cos_t = torch.cos(torch.atan(SIGMAS / SD)).reshape(-1, 1, 1, 1)
    return (cos_t * x).float().double() / cos_t, torch.randint(0, 3, (len(SIGMAS),), generator=g)


def tiny_vae(seed=0) -> AutoencoderKL:
    """A random AutoencoderKL with 4 latent channels and a scale factor of 2 (sd-vae-ft-mse's interface, tiny)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="module")
def edm2(tmp_path_factory):
    """Converted tiny EDM2 networks: a class-conditional teacher, an unconditional guide (EDM2's XS uncond), a
    class-conditional guide (autoguidance), and a latent teacher with its VAE folder."""
    root = tmp_path_factory.mktemp("edm2")
    out = {}
    for name, classes, seed in (("teacher", 3, 0), ("uncond", 0, 1), ("autoguide", 3, 2)):
        net = write_edm2(root / f"{name}.pkl", num_classes=classes, seed=seed)
        convert_checkpoint(str(root / f"{name}.pkl"), str(root / name))
        out[name] = (net, str(root / name))
    tiny_vae().save_pretrained(root / "vae")
    net = write_edm2(root / "latent.pkl", num_classes=3, seed=3, in_channels=4)
    convert_checkpoint(str(root / "latent.pkl"), str(root / "latent"), vae=str(root / "vae"))
    out["latent"] = (net, str(root / "latent"))
    out["vae"] = str(root / "vae")
    out["root"] = root
    return out


# ---- guidance by a second network -----------------------------------------------------------------------------------


def test_guided_teacher_is_edm2_guidance(edm2):
    (net, teacher_dir), (uncond, uncond_dir) = edm2["teacher"], edm2["uncond"]
    teacher, guide = load_teacher(teacher_dir), load_teacher(uncond_dir)
    guided = GuidedDenoiser(teacher, guide, W)
    x, labels = noisy_batch(seed=1)
    t = torch.atan(SIGMAS / SD)
    x_t = (torch.cos(t).reshape(-1, 1, 1, 1) * x).float()
    with torch.no_grad():
        x0 = guided.denoise(x_t, t, class_labels=labels)
        F = guided(x_t, t, class_labels=labels)
    assert relative_error(x0, guided_reference(net, uncond, x, SIGMAS, labels)) < 1e-5
    # the unconditional guide is called without labels; the teacher's interface is the main network's
    assert not takes_class_labels(guide) and takes_class_labels(teacher)
    assert guidance_conditioning(guide, {"class_labels": labels}) == {}
    assert guided.inner_model is teacher.inner_model and guided.parameterization is teacher.parameterization
    assert guided.sigma_data == SD and guided.adapter is teacher.adapter
    # the losses' teacher velocity: sd F of the guided teacher, classifier-free guidance off
    dxdt = teacher_velocity(guided, x_t, t, None, None, SD, 1.0, {"class_labels": labels})
    torch.testing.assert_close(dxdt, SD * F, rtol=0, atol=0)
    # F = F_g + w (F - F_g) in TrigFlow terms, and one w per sample equals the scalar
    with torch.no_grad():
        F_main, F_g = teacher(x_t, t, class_labels=labels), guide(x_t, t)
        per_sample = GuidedDenoiser(teacher, guide, torch.full((len(SIGMAS),), W))(x_t, t, class_labels=labels)
        plain = GuidedDenoiser(teacher, guide, 1.0)(x_t, t, class_labels=labels)
    torch.testing.assert_close(F, F_g + W * (F_main - F_g), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_sample, F, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain, F_main, rtol=0, atol=0)  # w = 1: the main network alone


def test_autoguidance_guide_gets_the_labels(edm2):
    (net, teacher_dir), (auto, auto_dir) = edm2["teacher"], edm2["autoguide"]
    guided = GuidedDenoiser(load_teacher(teacher_dir), load_teacher(auto_dir), 2.5)
    x, labels = noisy_batch(seed=2)
    t = torch.atan(SIGMAS / SD)
    x_t = (torch.cos(t).reshape(-1, 1, 1, 1) * x).float()
    with torch.no_grad():
        x0 = guided.denoise(x_t, t, class_labels=labels)
    reference = guided_reference(net, auto, x, SIGMAS, labels, w=2.5, guide_labels=labels)
    assert relative_error(x0, reference) < 1e-5
    # with the labels dropped the answer would differ: the conditional guide does read them
    assert relative_error(x0, guided_reference(net, auto, x, SIGMAS, labels, w=2.5)) > 1e-3


def test_guidance_needs_the_same_sigma_data(edm2):
    teacher = load_teacher(edm2["teacher"][1])
    with pytest.raises(ValueError, match="sigma_data"):
        GuidedDenoiser(teacher, load_teacher(edm2["uncond"][1], sigma_data=1.0), W)


def test_jvp_through_the_guided_teacher_matches_float64_differences(edm2):
    teacher = load_teacher(edm2["teacher"][1]).double()
    guide = load_teacher(edm2["uncond"][1]).double()
    guided = GuidedDenoiser(teacher, guide, W)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.35, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.8, -1.1], dtype=torch.float64)
    labels = torch.tensor([0, 2])

    def f(a, b):
        return guided(a, b, class_labels=labels)

    out, tangent = jvp(f, (x, t), (dx, dt), module=guided, method="forward_ad", backend="blocked")
    h = 1e-6
    with jvp_mode(guided), torch.no_grad():  # the float64 time embedding of the JVP pass
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
        plain = f(x, t)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert relative_error(tangent, fd) < 1e-6


def test_pipeline_samples_guided_like_edms_euler_sampler(edm2, tmp_path):
    # SCMPipeline(unet, ODE scheduler, guidance_model, guidance_scale) with the first-order solver equals EDM's Euler
    # sampler with the guided reference D: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i; sigma_i)) / sigma_i
    (net, teacher_dir), (uncond, uncond_dir) = edm2["teacher"], edm2["uncond"]
    guide = SCMPipeline.from_pretrained(uncond_dir).unet
    pipe = SCMPipeline.from_pretrained(teacher_dir, guidance_model=guide, guidance_scale=W)
    pipe.scheduler = TrigFlowODEScheduler.from_config(pipe.scheduler.config, solver="ddim")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 2])
    steps = 6
    out = pipe(batch_size=2, num_inference_steps=steps, latents=noise, class_labels=labels, output_type="latent")
    t = torch.tensor(pipe.scheduler.time_grid(steps)[:-1].tolist(), dtype=torch.float64)
    sigmas = torch.cat([SD * torch.tan(t), torch.zeros(1, dtype=torch.float64)])
    x = SD * noise.double() / torch.cos(t[0])  # the pipeline's start x_t = sd n, in sigma coordinates
    for i in range(steps):
        D = guided_reference(net, uncond, x, sigmas[i].expand(2), labels)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - D) / sigmas[i]
    assert relative_error(out.images, x) < 1e-3  # float32 sampling of a chaotic random network

    # w = 1 at the call: the teacher alone, equal to a pipeline without the guide
    alone = SCMPipeline.from_pretrained(teacher_dir)
    alone.scheduler = pipe.scheduler
    alone.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "latents": noise, "class_labels": labels}
    a = pipe(**kwargs, guidance_scale=1.0, output_type="latent").images
    unguided = alone(**kwargs, output_type="latent").images
    torch.testing.assert_close(a, unguided, rtol=0, atol=0)
    assert relative_error(pipe(**kwargs, output_type="latent").images, unguided) > 1e-2  # w = 1.7 guides

    # save / from_pretrained keep the guide and its w
    pipe.save_pretrained(tmp_path / "guided")
    index = json.load(open(tmp_path / "guided" / "model_index.json"))
    assert index["guidance_model"] == ["diffusers_scm", "EDM2UNet2DModel"] and index["guidance_scale"] == W
    again = SCMPipeline.from_pretrained(tmp_path / "guided")
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        again(**kwargs, output_type="latent").images, pipe(**kwargs, output_type="latent").images, rtol=0, atol=0
    )


# ---- latent EDM2 ----------------------------------------------------------------------------------------------------


def edm2_decode(vae, x0):
    """EDM2's StabilityVAEEncoder.decode of final latents (before its uint8 rounding), written from SPEC.md section
    10: the raw latent z = (x - bias) / scale, the VAE's decode, clamped to [0, 1] (its images are in [0, 1])."""
    scale = torch.from_numpy(SCALE).reshape(1, -1, 1, 1)
    bias = torch.from_numpy(BIAS).reshape(1, -1, 1, 1)
    z = (x0.float() - bias) / scale
    with torch.no_grad():
        return vae.decode(z).sample.clamp(0, 1)


def test_latent_edm2_pipeline_decodes_as_edm2(edm2):
    net, folder = edm2["latent"]
    vae = AutoencoderKL.from_pretrained(edm2["vae"]).eval()  # the VAE as given to --vae, without the normalization
    pipe = SCMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.image_range == [0.0, 1.0] and pipe.image_range == (0.0, 1.0)
    config = pipe.vae.config  # EDM2's normalization in diffusers' VAE entries
    np.testing.assert_allclose(config.latents_mean, RAW_MEAN, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(config.latents_std, RAW_STD, rtol=1e-5)
    assert config.scaling_factor == 0.5 and config.shift_factor is None
    record = json.load(open(os.path.join(folder, "conversion.json")))
    assert record["vae"] == edm2["vae"] and record["image_range"] == [0.0, 1.0]

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 1.5
    images = pipe.latents_to_images(x0)
    expected = edm2_decode(vae, x0)
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the clamp matters: the raw decode leaves [0, 1]
        raw = vae.decode(
            (x0 - torch.from_numpy(BIAS).reshape(1, -1, 1, 1)) / torch.from_numpy(SCALE).reshape(1, -1, 1, 1)
        )
    assert raw.sample.min() < 0 or raw.sample.max() > 1

    # sampling: the images are the decode of the sampled latents, in [0, 1]
    kwargs = {"batch_size": 2, "num_inference_steps": 2, "class_labels": [1, 2]}
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pt = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(pt, edm2_decode(vae, latents), rtol=1e-5, atol=1e-5)
    arr = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)

    # the same VAE in a default pipeline: diffusers' [-1, 1] convention, (image + 1) / 2 clamped
    default = SCMPipeline(unet=pipe.unet, scheduler=pipe.scheduler, vae=pipe.vae)
    assert default.image_range == (-1.0, 1.0)
    with torch.no_grad():
        decoded = pipe.vae.decode(
            x0 / 0.5 * torch.tensor(RAW_STD).reshape(1, -1, 1, 1) + torch.tensor(RAW_MEAN).reshape(1, -1, 1, 1)
        ).sample
    torch.testing.assert_close(default.latents_to_images(x0), ((decoded + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_latent_normalization_matches_the_encoder_formula():
    # x0 = (z - latents_mean) / latents_std * scaling_factor equals EDM2's (z - raw_mean) final_std / raw_std +
    # final_mean, also with final_mean != 0 (SPEC.md section 10)
    final_mean, final_std = 0.3, 0.7
    scale = final_std / RAW_STD.astype(np.float64)
    bias = final_mean - RAW_MEAN.astype(np.float64) * scale
    entries = edm2_latent_normalization({"scale": scale.tolist(), "bias": bias.tolist(), "final_std": final_std})
    z = np.random.default_rng(0).normal(size=(4, 3)) * 5
    ours = (z - np.array(entries["latents_mean"])[:, None]) / np.array(entries["latents_std"])[:, None]
    ours = ours * entries["scaling_factor"]
    edm = (z - RAW_MEAN[:, None]) * final_std / RAW_STD[:, None] + final_mean
    np.testing.assert_allclose(ours, edm, rtol=1e-6, atol=1e-6)


def test_vae_flag_from_the_command_line_and_its_errors(edm2, tmp_path):
    root = edm2["root"]
    main(["--checkpoint", str(root / "latent.pkl"), "--output_dir", str(tmp_path / "cli"), "--vae", edm2["vae"]])
    assert json.load(open(tmp_path / "cli" / "model_index.json"))["image_range"] == [0.0, 1.0]
    assert os.path.isfile(tmp_path / "cli" / "vae" / "config.json")
    # a VAE whose latent channels do not fit the network
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "vae2")
    with pytest.raises(ValueError, match="2 latent channels"):
        convert_checkpoint(str(root / "latent.pkl"), str(tmp_path / "bad"), vae=str(tmp_path / "vae2"))
    # a pixel checkpoint (no StabilityVAEEncoder) takes no VAE
    net = tiny_network("DhariwalUNet")
    write_pickle(tmp_path / "edm.pkl", official_layout(precond_object("EDMPrecond", net)))
    with pytest.raises(ValueError, match="--vae is for latent EDM2"):
        convert_checkpoint(str(tmp_path / "edm.pkl"), str(tmp_path / "bad2"), vae=edm2["vae"])
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad2")


# ---- distillation of a guided teacher (examples/distill.py, two processes) ------------------------------------------


def distill_args(teacher, guide, out, *extra) -> list[str]:
    """A 2-step sCD run on the 8x8 digits, its teacher guided by `guide` with w = 2."""
    run = "--method scd --dataset_name digits --resolution 8 --train_batch_size 4 --max_train_steps 2"
    rest = "--checkpointing_steps 100 --validation_steps 100 --num_validation_images 2 --report_to none"
    guidance = ["--guidance_model", guide, "--guidance_scale", "2"]
    return [
        "--teacher",
        teacher,
        *guidance,
        *f"{run} {rest} --tangent_warmup_steps 1".split(),
        "--output_dir",
        out,
        *extra,
    ]


def test_two_process_distillation_of_a_converted_edm2_teacher_with_its_guide(tmp_path):
    from test_distill_script import _launch, _losses

    write_edm2(tmp_path / "teacher.pkl", num_classes=10, seed=0)  # the digits' 10 classes
    write_edm2(tmp_path / "uncond.pkl", num_classes=0, seed=1)  # EDM2's unconditional guide
    for name in ("teacher", "uncond"):
        convert_checkpoint(str(tmp_path / f"{name}.pkl"), str(tmp_path / name))
    out = str(tmp_path / "student")
    res = _launch(distill_args(str(tmp_path / "teacher"), str(tmp_path / "uncond"), out))
    assert "The teacher is guided by" in res.stderr + res.stdout

    summary = json.load(open(os.path.join(out, "training_summary.json")))
    assert summary["num_processes"] == 2 and summary["steps"] == 2 and summary["replicas_in_sync"]
    # the student starts as the teacher, so without guidance the first loss is 0 (F_minus = F_teacher, no tangent
    # yet); the guided teacher's velocity differs from the student's
    assert _losses(out)[1] > 1e-4
    pipe = SCMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "EDM2UNet2DModel" and pipe.scheduler.config.parameterization == "edm"
    for steps in (1, 2):
        images = pipe(
            batch_size=2,
            num_inference_steps=steps,
            class_labels=[3, 7],
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert images.shape == (2, 8, 8, 2) and np.isfinite(images).all()


def test_fsdp_shards_edm2_networks_as_the_unsharded_network(tmp_path):
    # fsdp_worker's checks for a tiny EDM2 network (2 processes over gloo): its gains (shape (1,)) are sharded like
    # every parameter, the sharded JVP, EMA, gathering and sharded checkpoints equal the unsharded network's, and
    # EDM2's forced weight normalization reaches the shards (FSDP computes with gathered copies, which it drops)
    import subprocess
    import sys

    from test_distill_script import _free_port

    worker = os.path.join(os.path.dirname(__file__), "edm_fsdp_worker.py")
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    res = subprocess.run(
        cmd + [worker, str(result), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-5000:]
    main, other = json.loads(result.read_text())
    r = main["edm2"]
    assert r["sharded"] and r["blocks"] == ["EDM2Block"] and r["copy_class"] == "EDM2UNet2DModel"
    for backend in ("math", "blocked"):
        assert max(r[f"jvp_{backend}"]) < 1e-6, (backend, r[f"jvp_{backend}"])
    assert r["ema_shadow_is_sharded"] and r["ema_max_abs"] == 0.0 and r["copy_max_abs"] == 0.0
    assert other["edm2"]["others_get_none"]
    for key in ("reload_weights", "reload_moments", "reload_ema"):
        assert r[key] == 0.0 and other["edm2"][key] == 0.0, key
    # after a training-mode forward the stored shards equal the unsharded network's normalized weights
    assert main["forced"]["stored_max_abs"] == 0.0 and main["forced"]["unit_rows_max_abs"] < 1e-3


@pytest.mark.slow
def test_sharded_edm2_distillation_with_its_guide_equals_ddp(tmp_path):
    # a converted EDM2 teacher and its guide sharded beside the EDM2 student (--fsdp --fsdp_shard_teacher): the
    # losses and the final weights equal the DDP run's (forced weight normalization on the shards included)
    from test_distill_script import _launch, _losses

    write_edm2(tmp_path / "teacher.pkl", num_classes=10, seed=0)
    write_edm2(tmp_path / "guide.pkl", num_classes=0, seed=1)
    for name in ("teacher", "guide"):
        convert_checkpoint(str(tmp_path / f"{name}.pkl"), str(tmp_path / name))
    teacher, guide = str(tmp_path / "teacher"), str(tmp_path / "guide")
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    common = ["--adam_epsilon", "1e-2", "--learning_rate", "1e-2"]
    _launch(distill_args(teacher, guide, ddp, *common))
    res = _launch(distill_args(teacher, guide, fsdp, *common, "--fsdp", "--fsdp_shard_teacher"))
    assert (
        "--fsdp_shard_teacher: sharded 2 frozen networks (EDM2UNet2DModel, EDM2UNet2DModel)" in res.stderr + res.stdout
    )
    losses_ddp, losses_fsdp = _losses(ddp), _losses(fsdp)
    assert sorted(losses_fsdp) == [1, 2] and losses_ddp[1] > 1e-4
    for step, loss in losses_ddp.items():
        assert abs(losses_fsdp[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, loss, losses_fsdp[step])
    assert json.load(open(os.path.join(fsdp, "training_summary.json")))["sharded"]
    from safetensors.torch import load_file

    final_ddp, final_fsdp = (
        load_file(os.path.join(f, "unet", "diffusion_pytorch_model.safetensors")) for f in (ddp, fsdp)
    )
    assert final_ddp.keys() == final_fsdp.keys() and final_fsdp["out_gain"].shape == (1,)
    assert max((final_ddp[k] - final_fsdp[k]).abs().max().item() for k in final_ddp) < 1e-5


@pytest.mark.slow
def test_sharded_guide_gives_the_unsharded_losses(tmp_path):
    # --fsdp --fsdp_shard_teacher shards the guiding network beside the teacher (each its own FSDP root); the losses
    # equal those of the DDP run (tiny UNet2DModels; EDM2 networks: the slow test above)
    from conftest import tiny_unet
    from diffusers import DDPMPipeline, DDPMScheduler
    from test_distill_script import _launch, _losses

    for name, seed in (("teacher", 0), ("guide", 1)):
        DDPMPipeline(unet=tiny_unet(sample_size=8, seed=seed), scheduler=DDPMScheduler()).save_pretrained(
            tmp_path / name
        )
    teacher, guide = str(tmp_path / "teacher"), str(tmp_path / "guide")
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    _launch(distill_args(teacher, guide, ddp, "--adam_epsilon", "1e-2"))
    res = _launch(distill_args(teacher, guide, fsdp, "--adam_epsilon", "1e-2", "--fsdp", "--fsdp_shard_teacher"))
    assert "--fsdp_shard_teacher: sharded 2 frozen networks (UNet2DModel, UNet2DModel)" in res.stderr + res.stdout
    losses_ddp, losses_fsdp = _losses(ddp), _losses(fsdp)
    assert sorted(losses_fsdp) == [1, 2] and losses_ddp[1] > 1e-4
    for step, loss in losses_ddp.items():
        assert abs(losses_fsdp[step] - loss) <= 1e-5 * max(1.0, abs(loss)), (step, loss, losses_fsdp[step])
    assert json.load(open(os.path.join(fsdp, "training_summary.json")))["sharded"]


def test_latent_edm2_student_decodes_as_its_teacher(tmp_path, monkeypatch):
    # a latent EDM2 teacher converted with --vae, distilled a few steps: the training images go through its VAE in
    # [0, 1] (EDM2's x0 = z * scale + bias, z a sample of the latent distribution); the student's folder keeps the VAE
    # (with EDM2's per-channel normalization in its config) and the [0, 1] image range, so its pipeline decodes
    # latents as the teacher's pipeline does, and its samples are images in [0, 1]
    from conftest import load_script

    from diffusers_scm.conditioning import LatentCodec

    write_edm2(tmp_path / "latent.pkl", num_classes=10, seed=3, in_channels=4)
    tiny_vae().save_pretrained(tmp_path / "vae")
    teacher = str(tmp_path / "teacher")
    convert_checkpoint(str(tmp_path / "latent.pkl"), teacher, vae=str(tmp_path / "vae"))
    encoded = []
    encode = LatentCodec.encode

    def spy(self, images, generator=None):
        state = None if generator is None else generator.get_state()
        out = encode(self, images, generator=generator)
        encoded.append((images.clone(), state, out))
        return out

    monkeypatch.setattr(LatentCodec, "encode", spy)
    out = tmp_path / "student"
    run = "--method scd --dataset_name digits --resolution 16 --train_batch_size 4 --max_train_steps 2"
    rest = "--checkpointing_steps 100 --validation_steps 1 --num_validation_images 2 --report_to none"
    distill = load_script("distill")
    distill.main(["--teacher", teacher, *f"{run} {rest}".split(), "--output_dir", str(out)])

    assert len(encoded) == 2  # one batch per step
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    for images, state, x0 in encoded:
        assert images.shape == (4, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
        assert images.min() < 0.1 and images.max() > 0.9  # the digits' [-1, 1] mapped to EDM2's [0, 1]
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample(torch.Generator().set_state(state))
        expected = z * torch.from_numpy(SCALE).reshape(1, -1, 1, 1) + torch.from_numpy(BIAS).reshape(1, -1, 1, 1)
        assert x0.shape == (4, 4, 8, 8)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)

    index = json.load(open(out / "model_index.json"))
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["image_range"] == [0.0, 1.0]
    student = SCMPipeline.from_pretrained(str(out))
    reference = SCMPipeline.from_pretrained(teacher)
    assert type(student.unet).__name__ == "EDM2UNet2DModel" and student.image_range == (0.0, 1.0)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(student.vae.config) == public(reference.vae.config)
    np.testing.assert_allclose(student.vae.config.latents_mean, RAW_MEAN, rtol=1e-5, atol=1e-5)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 1.5
    images = student.latents_to_images(x0)
    torch.testing.assert_close(images, reference.latents_to_images(x0), rtol=0, atol=0)
    torch.testing.assert_close(images, edm2_decode(vae, x0))
    student.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "class_labels": [3, 7], "output_type": "np"}
    for steps in (1, 2):
        arr = student(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
        assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    # the validation grids were decoded too
    assert sorted(os.listdir(out / "samples"))[:2] == ["step-0000001-1step.png", "step-0000001-2step.png"]
    # the images must be those the VAE encodes to the network's latents
    with pytest.raises(ValueError, match="--resolution 8: the teacher is a latent network on 8x8 latents.*16"):
        distill.main(
            ["--teacher", teacher, *f"{run} {rest}".replace("16", "8").split(), "--output_dir", str(out) + "2"]
        )


def test_resume_names_a_changed_guidance_model(edm2, tmp_path):
    # --guidance_model, its network and w are in the checkpoints' run_config: a resume that adds, drops or changes
    # them is refused naming the flag, before any tensor is read
    from conftest import load_script

    distill = load_script("distill")
    root = tmp_path
    write_edm2(root / "teacher10.pkl", num_classes=10, seed=0)
    write_edm2(root / "small_uncond.pkl", num_classes=0, seed=4, num_blocks=2)  # a guide of another architecture
    for name in ("teacher10", "small_uncond"):
        convert_checkpoint(str(root / f"{name}.pkl"), str(root / name))
    teacher, guide = str(root / "teacher10"), edm2["uncond"][1]
    out = str(tmp_path / "student")
    run = "--method scd --dataset_name digits --resolution 8 --train_batch_size 2 --max_train_steps 1"
    rest = "--checkpointing_steps 1 --validation_steps 100 --num_validation_images 2 --report_to none"
    base = ["--teacher", teacher, *f"{run} {rest}".split(), "--output_dir", out]
    distill.main([*base, "--guidance_model", guide, "--guidance_scale", "2"])
    state = json.load(open(os.path.join(out, "checkpoint-1", "training_state.json")))["run_config"]
    assert state["--guidance_model"] == guide and state["--guidance_scale"] == 2.0
    assert (
        state["guidance network"]["class"] == "EDM2UNet2DModel"
        and state["guidance network"]["config"]["num_classes"] == 0
    )

    resume = [*base[:-2], "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps", "2"]
    for extra, message in (
        ([], "was written with --guidance_model " + guide + "; this run has no --guidance_model"),
        (
            ["--guidance_model", guide, "--guidance_scale", "3"],
            "--guidance_scale 2.0; this run has --guidance_scale 3",
        ),
        (
            ["--guidance_model", str(root / "small_uncond"), "--guidance_scale", "2"],
            "was written with the guiding network EDM2UNet2DModel(",
        ),
    ):
        with pytest.raises(ValueError, match="Checkpoint .*checkpoint-1") as error:
            distill.main([*resume, *extra])
        assert message in str(error.value), str(error.value)
    assert not os.path.exists(os.path.join(out, "checkpoint-2"))
    # the same guide (a moved folder would only be logged): the run resumes
    distill.main([*resume, "--guidance_model", guide, "--guidance_scale", "2"])
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))


def test_guide_with_the_latent_cache(tmp_path, data_dir, monkeypatch):  # noqa: F811
    # a text-to-image teacher trained from the cache (examples/prepare_data.py): the guide is loaded for training only,
    # like the teacher's network (never the text encoders), and called in every teacher pass instead of CFG
    from conftest import load_script
    from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline
    from test_t2i_distill import COMMON

    teacher, guide, cache = tmp_path / "sdxl", tmp_path / "sdxl_guide", tmp_path / "cache"
    save_tiny_pipeline("sdxl", teacher)
    save_tiny_pipeline("sdxl", guide, seed=1)  # autoguidance: a network of the same family
    load_script("prepare_data").main(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--resolution", str(IMAGE_SIZE)]
        + ["--cache_dir", str(cache), "--batch_size", "4"]
    )
    distill = load_script("distill")

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although the cache exists")

    passes = []
    forward = GuidedDenoiser.forward

    def spy(self, x_t, t, **conditioning):
        passes.append((self.guidance_scale, sorted(conditioning)))
        return forward(self, x_t, t, **conditioning)

    monkeypatch.setattr(distill, "load_text_to_image_teacher", refuse)
    monkeypatch.setattr(GuidedDenoiser, "forward", spy)
    out = tmp_path / "student"
    distill.main(
        ["--teacher", str(teacher), "--cache_dir", str(cache), "--dataset_name", str(data_dir)]
        + ["--guidance_model", str(guide), "--guidance_scale", "2.0"]
        + ["--output_dir", str(out), "--max_train_steps", "2", *COMMON]
    )
    assert passes and all(w == 2.0 for w, _ in passes)
    assert "encoder_hidden_states" in passes[0][1]  # the prompt conditioning reaches the teacher and its guide
    assert SCMPipeline.from_pretrained(out).config.family_pipeline == "StableDiffusionXLPipeline"


# ---- against NVlabs' own code (DIFFUSERS_SCM_NVLABS_EDM2: a checkout of NVlabs' edm2) -------------------------------

NVLABS_SCRIPT = """
import pickle, sys
import torch
from diffusers import AutoencoderKL
repo, vae_dir, out = sys.argv[1:4]
sys.path.insert(0, repo)
from training.encoders import StabilityVAEEncoder
from training.networks_edm2 import Precond
tiny = dict(img_resolution=8, img_channels=4, model_channels=16, channels_per_head=8, logvar_channels=8,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
encoder = StabilityVAEEncoder()
nets = {}
for name, label_dim, seed in (("net", 3, 0), ("gnet", 0, 1)):
    torch.manual_seed(seed)
    net = Precond(label_dim=label_dim, **tiny)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if p.abs().max() < 1e-3 or key.endswith("gain"):  # zero-initialized layers and gains
                p.normal_(0, 0.3)
    nets[name] = net.eval().requires_grad_(False).to(torch.float16)  # as EDM2's published files
    with open(f"{out}-{name}.pkl", "wb") as f:
        pickle.dump(dict(encoder=encoder, ema=nets[name]), f)
g = torch.Generator().manual_seed(1)
sigma = torch.tensor([0.05, 0.7, 3.0, 40.0])
x = torch.randn(4, 4, 8, 8, generator=g) * (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 2]), 3).float()
with torch.no_grad():  # generate_images.py's guided denoiser: gnet's D lerped towards net's by the guidance
    D = nets["gnet"].float()(x, sigma, labels).lerp(nets["net"].float()(x, sigma, labels), 1.7)
    encoder._vae = AutoencoderKL.from_pretrained(vae_dir).eval()  # instead of the Hub's sd-vae-ft-mse
    latents = torch.randn(2, 4, 8, 8, generator=g) * 1.5
    images = encoder.decode(latents)  # uint8
torch.save(dict(x=x, sigma=sigma, labels=labels, D=D, latents=latents, images=images), out + ".pt")
"""


def test_against_nvlabs_code(edm2, tmp_path):
    import subprocess
    import sys

    repo = os.environ.get("DIFFUSERS_SCM_NVLABS_EDM2")
    if not repo:
        pytest.skip("set DIFFUSERS_SCM_NVLABS_EDM2 to a checkout of NVlabs' edm2")
    out = str(tmp_path / "nvlabs")
    res = subprocess.run(
        [sys.executable, "-c", NVLABS_SCRIPT, repo, edm2["vae"], out], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    ref = torch.load(out + ".pt", weights_only=True)
    for name in ("net", "gnet"):
        convert_checkpoint(f"{out}-{name}.pkl", str(tmp_path / name), vae=edm2["vae"])
    guided = GuidedDenoiser(load_teacher(str(tmp_path / "net")), load_teacher(str(tmp_path / "gnet")), 1.7)
    t = torch.atan(ref["sigma"].double() / SD)
    x_t = (torch.cos(t).reshape(-1, 1, 1, 1) * ref["x"].double()).float()
    with torch.no_grad():
        x0 = guided.denoise(x_t, t, class_labels=ref["labels"].argmax(1))
    assert relative_error(x0, ref["D"]) < 1e-5  # their D in float32 at float32 x and sigma
    # the pipeline's images are EDM2's own decode, which rounds them down to uint8
    pipe = SCMPipeline.from_pretrained(str(tmp_path / "net"))
    ours, theirs = pipe.latents_to_images(ref["latents"]).mul(255), ref["images"].float()
    assert (ours - theirs).abs().max() < 1 + 1e-3 and (ours.floor() == theirs).float().mean() > 0.99
