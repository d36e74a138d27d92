"""`SCMPipeline`: closed-form steps, diffusers pipeline contracts, save/load, class conditioning, VAE decoding."""

import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_dit, tiny_unet
from diffusers import AutoencoderKL, UNet2DModel

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler


SD = 0.5


def _pipe(parameterization="trigflow", **unet_kwargs):
    return SCMPipeline(unet=tiny_unet(**unet_kwargs), scheduler=TrigFlowScheduler(parameterization=parameterization))


def test_two_steps_follow_the_consistency_sampler_by_hand():
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    n0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(
        batch_size=2,
        num_inference_steps=2,
        latents=n0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    # By hand (SPEC.md section 4): x = sd n at t_max; x0 = cos t x - sin t sd F(x / sd, t); re-noise at 1.1.
    net, t_max = pipe.unet, math.atan(80 / SD)

    def f(x, t):
        with torch.no_grad():
            F = net(x / SD, torch.full((x.shape[0],), t)).sample
        return math.cos(t) * x - math.sin(t) * SD * F

    x0 = f(SD * n0, t_max)
    n1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x0 = f(math.cos(1.1) * x0 + math.sin(1.1) * SD * n1, 1.1)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_output_types_and_return_dict():
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 2}
    latent = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pt = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    np_img = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    pil = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pil").images
    tup = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert latent.shape == (2, 1, 8, 8) and pt.shape == (2, 1, 8, 8) and np_img.shape == (2, 8, 8, 1)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(np_img, pt.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    assert isinstance(pil, list) and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - np_img[0, :, :, 0]).max() <= 1 / 255 + 1e-6
    assert isinstance(tup, tuple) and np.array_equal(tup[0], np_img)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg")


def test_batch_split_with_generator_list_is_identical():
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    whole = pipe(
        batch_size=3,
        num_inference_steps=2,
        output_type="pt",
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
    ).images
    parts = [
        pipe(
            batch_size=1, num_inference_steps=2, output_type="pt", generator=[torch.Generator().manual_seed(i)]
        ).images
        for i in range(3)
    ]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-6)


def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].clone()))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = pipe(
        batch_size=1,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert [s[0] for s in seen] == [0, 1, 2] and pipe.num_timesteps == 3
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(torch.tensor([s[1] for s in seen]), pipe.scheduler.timesteps)
    with pytest.raises(ValueError, match="not available"):
        pipe(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_save_load_round_trip_and_plain_diffusers_loading():
    pipe = SCMPipeline(unet=tiny_unet(), scheduler=TrigFlowScheduler(parameterization="vp_v", sigma_data=0.6))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    with tempfile.TemporaryDirectory() as d:
        pipe.save_pretrained(d)
        assert os.path.isfile(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"))
        loaded = SCMPipeline.from_pretrained(d)
        loaded.set_progress_bar_config(disable=True)
        out = loaded(
            batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
        ).images
        assert torch.equal(out, ref)
        assert loaded.scheduler.config.parameterization == "vp_v" and loaded.scheduler.config.sigma_data == 0.6
        # The network is a plain diffusers model: diffusers alone loads it.
        code = f"from diffusers import UNet2DModel; m = UNet2DModel.from_pretrained({os.path.join(d, 'unet')!r}); print(m.config.in_channels)"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr


def test_class_conditional_unet_and_missing_labels():
    pipe = SCMPipeline(unet=tiny_unet(num_class_embeds=4), scheduler=TrigFlowScheduler())
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, class_labels=[1, 1], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    b = pipe(batch_size=2, class_labels=1, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    c = pipe(batch_size=2, class_labels=[2, 3], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(batch_size=2)
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        pipe(batch_size=2, class_labels=[0, 1, 2])


def test_dit_transformer_with_learned_variance_and_vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    dit = tiny_dit()
    pipe = SCMPipeline(transformer=dit, vae=vae, scheduler=TrigFlowScheduler(parameterization="edm"))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        batch_size=2, class_labels=[3, 7], output_type="latent", generator=torch.Generator().manual_seed(0)
    ).images
    assert latents.shape == (2, 4, 8, 8)
    # One EDM step by hand, keeping the DiT's first 4 of 8 output channels (the mean, not the variance).
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = math.atan(80 / SD)
    with torch.no_grad():
        raw = dit(n, torch.full((2,), math.log(SD * math.tan(t)) / 4), class_labels=torch.tensor([3, 7])).sample[:, :4]
    torch.testing.assert_close(latents, math.cos(t) * SD * n + math.sin(t) * SD * raw, rtol=1e-5, atol=1e-5)
    images = pipe(
        batch_size=2, class_labels=[3, 7], output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    with torch.no_grad():
        ref = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    with tempfile.TemporaryDirectory() as d:
        pipe.save_pretrained(d)
        loaded = SCMPipeline.from_pretrained(d)
        assert loaded.unet is None and type(loaded.transformer).__name__ == "DiTTransformer2DModel"


def test_ode_scheduler_in_the_same_pipeline_matches_manual_loop():
    net = tiny_unet()
    sch = TrigFlowODEScheduler(parameterization="flow_matching", solver="dpmsolver++", timestep_spacing="angle")
    pipe = SCMPipeline(unet=net, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    n = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(num_inference_steps=6, latents=n, output_type="latent").images
    ref_sch = TrigFlowODEScheduler.from_config(sch.config)
    ref_sch.set_timesteps(6)
    x = SD * n
    for t in ref_sch.timesteps:
        s, tt = ref_sch.model_inputs(x, t)
        with torch.no_grad():
            x = ref_sch.step(net(s, tt.expand(1)).sample, t, x).prev_sample
    torch.testing.assert_close(out, x)


def test_pipeline_input_errors():
    with pytest.raises(ValueError, match="exactly one network"):
        SCMPipeline(scheduler=TrigFlowScheduler())
    pipe = _pipe()
    with pytest.raises(ValueError, match="latents.*shape"):
        pipe(batch_size=2, latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="generators for a batch"):
        pipe(batch_size=2, generator=[torch.Generator()])


def test_network_is_stored_in_its_own_diffusers_class():
    pipe = _pipe()
    with tempfile.TemporaryDirectory() as d:
        pipe.save_pretrained(d)
        import json

        index = json.load(open(os.path.join(d, "model_index.json")))
        assert index["unet"] == ["diffusers", "UNet2DModel"]
        assert index["scheduler"] == ["diffusers_scm", "TrigFlowScheduler"]
        assert isinstance(UNet2DModel.from_pretrained(os.path.join(d, "unet")), UNet2DModel)


def test_sample_script_writes_a_grid(tmp_path):
    import importlib.util

    pipe = _pipe()
    pipe.save_pretrained(tmp_path / "student")
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "sample.py")
    spec = importlib.util.spec_from_file_location("sample_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for extra in ([], ["--ode_solver", "heun"]):
        out = tmp_path / f"grid{len(extra)}.png"
        module.main(
            [
                "--pipeline",
                str(tmp_path / "student"),
                "--num_inference_steps",
                "2",
                "--batch_size",
                "5",
                "--output",
                str(out),
                "--device",
                "cpu",
                *extra,
            ]
        )
        grid = PIL.Image.open(out)
        assert grid.size == (24, 16)  # 5 images of 8x8 on a 3 x 2 grid
