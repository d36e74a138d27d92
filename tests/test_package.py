"""The package's public surface: root exports, and imports that need no training or GPU packages."""

import os
import subprocess
import sys
import textwrap

import torch


def test_public_api_at_package_root():
    import diffusers_scm

    for name in [
        "TrigFlowScheduler",
        "TrigFlowODEScheduler",
        "SCMPipeline",
        "TrigFlowDenoiser",
        "get_parameterization",
        "__version__",
    ]:
        assert hasattr(diffusers_scm, name), name
    assert diffusers_scm.__version__.count(".") >= 2


def test_import_and_sample_without_accelerate_datasets_or_gpu_packages(tmp_path):
    """Simulate an environment where the training and GPU extras (accelerate, datasets, peft, ...) are not installed."""
    import diffusers_scm

    blocked = {
        "accelerate",
        "datasets",
        "peft",
        "flash_attn",
        "xformers",
        "jvp_flash_attention",
        "triton",
        "tensorboard",
    }
    site_dir = os.path.dirname(os.path.dirname(torch.__file__))
    env_dir = tmp_path / "site"
    env_dir.mkdir()
    for entry in os.listdir(site_dir):
        base = entry.split("-")[0].split(".")[0].lower()
        if base in blocked or entry.endswith(".pth") or entry.startswith("__editable__"):
            continue
        os.symlink(os.path.join(site_dir, entry), env_dir / entry)
    src_dir = os.path.dirname(os.path.dirname(diffusers_scm.__file__))
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        missing = [m for m in {sorted(blocked)!r} if importlib.util.find_spec(m) is not None]
        assert not missing, missing
        from diffusers import UNet2DModel
        from diffusers_scm import SCMPipeline, TrigFlowScheduler
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False)
        pipe = SCMPipeline(unet=unet, scheduler=TrigFlowScheduler())
        pipe.set_progress_bar_config(disable=True)
        print(pipe(num_inference_steps=2, output_type="np").images.shape)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_dir), src_dir])}
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "(1, 8, 8, 1)"
