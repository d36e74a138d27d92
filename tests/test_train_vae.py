"""`examples/train_vae.py` and `diffusers_scm.training.vae`: the loss against a hand computation, reconstruction error
falling on a fixed batch, the latent statistics, and a run of the script whose folder loads with
`AutoencoderKL.from_pretrained` and whose scaling gives unit-std latents. Nothing is downloaded."""

import json
import math

import pytest
import torch
from conftest import load_script
from diffusers import AutoencoderKL

from diffusers_scm.conditioning import LatentCodec
from diffusers_scm.training.data.images import DigitsDataset
from diffusers_scm.training.objectives.vae import (
    VAETrainingModule,
    latent_statistics,
    save_vae,
    set_latent_scaling,
    tiny_autoencoder,
    vae_loss,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n, resolution=16):
    return DigitsDataset(resolution).images[:n].repeat(1, 3, 1, 1)  # (n, 3, r, r) in [-1, 1]


def test_vae_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    images, recon = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    for kind, weight in (("l1", 1e-3), ("mse", 0.5)):
        loss, logs = vae_loss(images, recon, mean, logvar, kl_weight=weight, reconstruction_loss=kind)
        expected = 0.0
        for i in range(3):
            diff = (recon[i] - images[i]).flatten()
            rec = sum(abs(float(d)) for d in diff) if kind == "l1" else sum(float(d) ** 2 for d in diff)
            kl = sum(
                0.5 * (float(m) ** 2 + math.exp(float(v)) - 1 - float(v))
                for m, v in zip(mean[i].flatten(), logvar[i].flatten())
            )
            expected += rec / diff.numel() + weight * kl / mean[i].numel()
            assert logs["kl"][i].item() == pytest.approx(kl / mean[i].numel(), rel=1e-5)
        assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    # the KL term is diffusers' DiagonalGaussianDistribution.kl() per latent element
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    kl = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).kl() / mean[0].numel()
    torch.testing.assert_close(vae_loss(images, recon, mean, logvar)[1]["kl"], kl)
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        vae_loss(images, recon, mean, logvar, reconstruction_loss="huber")


def test_reconstruction_error_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = tiny_autoencoder("tiny", resolution=16)
    model = VAETrainingModule(vae)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    images, g = _digits(16), torch.Generator().manual_seed(0)

    def error():
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mode()
            return (vae.decode(z).sample - images).abs().mean().item()

    before = error()
    for _ in range(40):
        loss, _ = vae_loss(images, *model(images, g), kl_weight=1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    assert after < 0.5 * before, (before, after)


def test_latent_statistics_set_unit_std_latents(tmp_path):
    torch.manual_seed(0)
    vae = tiny_autoencoder("tiny", resolution=16).eval()
    images = _digits(40)
    batches = list(images.split(16))
    mean, std = latent_statistics(vae, batches)
    z = vae.encode(images).latent_dist.mode().double()
    assert mean == pytest.approx(z.mean().item(), rel=1e-6) and std == pytest.approx(
        z.std(unbiased=False).item(), 1e-6
    )
    set_latent_scaling(vae, mean, std)
    assert vae.config.shift_factor == pytest.approx(mean) and vae.config.scaling_factor == pytest.approx(1 / std)
    x0 = LatentCodec(vae, sample=False).encode(images)  # the pipelines' (z - shift) * scale
    assert x0.mean().item() == pytest.approx(0.0, abs=1e-5) and x0.std(unbiased=False).item() == pytest.approx(
        1.0, 1e-4
    )
    # grey batches are repeated to the VAE's channels; dict batches are read from pixel_values
    grey = [{"pixel_values": b[:, :1]} for b in batches]
    assert latent_statistics(vae, grey) == pytest.approx((mean, std))

    folder = tmp_path / "vae"
    (folder / "logs").mkdir(parents=True)
    save_vae(vae, str(folder))
    save_vae(vae, str(folder))  # replaces the files; the folder's other contents stay
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "logs"]
    loaded = AutoencoderKL.from_pretrained(folder)
    assert loaded.config.scaling_factor == pytest.approx(1 / std) and loaded.config.shift_factor == pytest.approx(mean)


def test_train_vae_script(tmp_path):
    out = tmp_path / "vae"
    args = ["--resolution", "16", "--max_train_steps", "30", "--train_batch_size", "16", "--report_to", "none"]
    load_script("train_vae").main([*args, "--output_dir", str(out), "--lr_warmup_steps", "5"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["latent_shape"] == [4, 4, 4]
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(log) == 30
    first, last = sum(r["reconstruction"] for r in log[:5]) / 5, sum(r["reconstruction"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert (out / "reconstructions.png").is_file()

    vae = AutoencoderKL.from_pretrained(out)  # diffusers' own class loads the folder
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(summary["latent_mean"])
    digits = DigitsDataset(16).images.repeat(1, 3, 1, 1)  # the training split: the statistics' data
    x0 = LatentCodec(vae, sample=False).encode(digits)
    assert x0.shape == (len(digits), 4, 4, 4)
    assert abs(x0.mean().item()) < 1e-3 and x0.std().item() == pytest.approx(1.0, abs=1e-3)
    held_out = DigitsDataset(16, split="test").images.repeat(1, 3, 1, 1)
    assert LatentCodec(vae, sample=False).encode(held_out).std().item() == pytest.approx(1.0, abs=0.1)


def test_train_vae_bad_inputs(capsys):
    train_vae = load_script("train_vae")
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--resolution", "30"])
    assert "multiple of 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--kl_weight", "-1"])
    assert "--kl_weight" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown VAE preset"):
        tiny_autoencoder("huge")
