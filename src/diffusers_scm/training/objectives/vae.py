"""Training a small `AutoencoderKL` (diffusers' own class) for latent teachers (`examples/train_vae.py`).

    vae = tiny_autoencoder("tiny", resolution=32)            # 32x32 images <-> 8x8x4 latents
    model = VAETrainingModule(vae)                            # one forward: encode, sample, decode (DDP-safe)
    loss, logs = vae_loss(images, *model(images, generator), kl_weight=1e-4)
    shift, scale = latent_statistics(vae, loader)             # SPEC.md section 8: x0 = (z - shift) * scale
    set_latent_scaling(vae, shift, scale)                     # into the VAE config (SD3 convention)

The loss is a reconstruction term (L1 or MSE, per element) plus a small KL term to N(0, I) (per latent element), as in
the latent diffusion autoencoders without their perceptual and adversarial terms.
"""

import os

import torch


__all__ = [
    "VAE_PRESETS",
    "tiny_autoencoder",
    "VAETrainingModule",
    "vae_loss",
    "latent_statistics",
    "set_latent_scaling",
    "save_vae",
]

# Sizes for CPU-scale data (digits at 16 or 32 pixels). Three levels: the latents are 1/4 of the image size.
VAE_PRESETS = {
    "tiny": {"block_out_channels": (8, 16, 32), "layers_per_block": 1, "norm_num_groups": 4},
    "small": {"block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 8},
}


def tiny_autoencoder(
    preset: str = "tiny", resolution: int = 32, channels: int = 3, latent_channels: int = 4, **overrides
):
    """A randomly initialized `AutoencoderKL` of a `VAE_PRESETS` size (encoder and decoder of
    `len(block_out_channels)` levels, so latents of `resolution / 4`), without mid-block attention."""
    from diffusers import AutoencoderKL

    if preset not in VAE_PRESETS:
        raise ValueError(f"Unknown VAE preset {preset!r}: use one of {', '.join(VAE_PRESETS)}.")
    config = {**VAE_PRESETS[preset], **overrides}
    levels = len(config["block_out_channels"])
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels,
        sample_size=resolution,
        scaling_factor=1.0,  # set from the data after training (`set_latent_scaling`)
        shift_factor=0.0,
        mid_block_add_attention=False,
        **config,
    )


class VAETrainingModule(torch.nn.Module):
    """
    The autoencoder's whole training pass in one `forward` (a DDP wrapper synchronizes gradients only through
    `forward`): encode, draw z from the posterior, decode.

    Returns `(reconstruction, posterior_mean, posterior_logvar)`; `vae` is the wrapped `AutoencoderKL`.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator)  # (B, C, H/4, W/4)
        reconstruction = self.vae.decode(z).sample
        return reconstruction, posterior.mean, posterior.logvar


def vae_loss(
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float = 1e-4,
    reconstruction_loss: str = "l1",
):
    """
    `recon + kl_weight * KL` and its logs. recon: mean |x - x_hat| ("l1") or mean (x - x_hat)^2 ("mse") over the
    pixels; KL(N(mean, exp(logvar)) || N(0, I)) = 0.5 (mean^2 + exp(logvar) - 1 - logvar), averaged over the latent
    elements (diffusers' `DiagonalGaussianDistribution.kl` sums it instead).

    Returns `(loss, {"reconstruction": per-sample tensor, "kl": per-sample tensor})`.
    """
    error = reconstruction.float() - images.float()
    if reconstruction_loss == "l1":
        recon = error.abs().flatten(1).mean(1)
    elif reconstruction_loss == "mse":
        recon = error.square().flatten(1).mean(1)
    else:
        raise ValueError(f"reconstruction_loss must be 'l1' or 'mse', not {reconstruction_loss!r}.")
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)  # the clamp of DiagonalGaussianDistribution
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).mean(1)
    loss = (recon + kl_weight * kl).mean()
    return loss, {"reconstruction": recon.detach(), "kl": kl.detach()}


@torch.no_grad()
def latent_statistics(vae, batches, sample: bool = False, generator: torch.Generator | None = None):
    """
    `(mean, std)` of the latents z of every image in `batches` (an iterable of image tensors in [-1, 1], or of dicts
    with `pixel_values`), over all elements: z is the posterior's mode (`sample=False`, what `LatentCodec(vae,
    sample=False)` encodes) or a draw from it. The SD3 convention then sets shift_factor = mean, scaling_factor =
    1 / std, so that x0 = (z - shift_factor) * scaling_factor has zero mean and unit std (SPEC.md section 8).
    Sums are accumulated in float64.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches:
        images = batch["pixel_values"] if isinstance(batch, dict) else batch
        images = images.to(vae.device, vae.dtype)
        if images.shape[1] != vae.config.in_channels and images.shape[1] == 1:
            images = images.repeat(1, vae.config.in_channels, 1, 1)
        posterior = vae.encode(images).latent_dist
        z = (posterior.sample(generator) if sample else posterior.mode()).double()
        total += float(z.sum())
        total_sq += float(z.square().sum())
        count += z.numel()
    if count == 0:
        raise ValueError("No images to measure the latent statistics on.")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if not std > 0:
        raise ValueError("The latents have zero variance: the autoencoder encodes every image to the same point.")
    return mean, std


def set_latent_scaling(vae, shift: float, std: float):
    """Record `shift_factor = shift` and `scaling_factor = 1 / std` in the VAE's config (SD3 convention: pipelines
    decode `latents / scaling_factor + shift_factor`)."""
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(1.0 / std))
    return vae


def save_vae(vae, folder: str):
    """`vae.save_pretrained(folder)` (safetensors) with every file it writes replaced atomically: the files are written
    into a temporary folder inside `folder`, then each is moved over the old one (weights first, the config last), so
    a reader never sees a half-written file."""
    import shutil
    import tempfile

    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".vae-", dir=folder)
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # the config last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
