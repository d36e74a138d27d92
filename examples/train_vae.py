"""Train a small `AutoencoderKL` (diffusers' own class) with accelerate, for latent text-to-image teachers.

    accelerate launch examples/train_vae.py --dataset_name digits --resolution 32 --max_train_steps 400 \
        --output_dir digits-vae

32x32 images become 8x8x4 latents (`--preset tiny` or `small`, three levels). Loss: L1 (or MSE) reconstruction plus
a small KL term (`diffusers_scm.training.vae.vae_loss`). After training, the latent statistics over the data set the
VAE's `shift_factor` (the mean) and `scaling_factor` (1 / std), SD3's convention, so that the pipeline's latents
(z - shift_factor) * scaling_factor have unit std (SPEC.md section 8). The output folder loads with
`AutoencoderKL.from_pretrained(OUTPUT_DIR)`; it also holds `training_summary.json` (held-out reconstruction error,
latent statistics), `reconstructions.png` (held-out images over their reconstructions) and `loss_log.jsonl`. The
digits are grey; the VAE takes `--channels 3` (the grey repeated) by default, as the family pipelines give RGB images.
"""

import argparse
import json
import logging
import math
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from diffusers_scm.training.data.images import load_image_dataset, to_model_channels
from diffusers_scm.training.machinery.arguments import non_negative_int, positive_int
from diffusers_scm.training.machinery.run import end_run, train_loader, training_run
from diffusers_scm.training.objectives.vae import (
    VAE_PRESETS,
    VAETrainingModule,
    latent_statistics,
    save_vae,
    set_latent_scaling,
    tiny_autoencoder,
    vae_loss,
)


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(VAE_PRESETS), default="tiny", help="AutoencoderKL size")
    p.add_argument("--latent_channels", type=positive_int, default=4)
    p.add_argument("--channels", type=positive_int, default=3, help="image channels of the VAE (grey is repeated)")
    # data
    p.add_argument("--dataset_name", type=str, default="digits", help="'digits', an image folder or a datasets name")
    p.add_argument("--resolution", type=positive_int, default=32, help="a multiple of 4")
    p.add_argument("--image_column", type=str, default="image")
    p.add_argument("--skip_bad_images", action="store_true", help="image folders: skip unreadable files")
    p.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    # loss and optimization
    p.add_argument("--reconstruction_loss", choices=["l1", "mse"], default="l1")
    p.add_argument("--kl_weight", type=float, default=1e-4, help="weight of the per-element KL term")
    p.add_argument("--train_batch_size", type=positive_int, default=64, help="per device")
    p.add_argument("--max_train_steps", type=positive_int, default=400)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--lr_scheduler", choices=["constant", "cosine", "linear"], default="cosine")
    p.add_argument("--lr_warmup_steps", type=non_negative_int, default=20)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.99)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    # latent statistics, evaluation, output
    p.add_argument(
        "--statistics_images",
        type=positive_int,
        default=10000,
        help="training images the latent mean and std are measured on (all of them if fewer)",
    )
    p.add_argument("--output_dir", type=str, default="vae")
    p.add_argument("--logging_steps", type=positive_int, default=50, help="console log every N steps")
    p.add_argument(
        "--report_to", type=str, default=None, help="tensorboard, wandb, all or none (default: tensorboard)"
    )
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    levels = len(VAE_PRESETS[args.preset]["block_out_channels"]) - 1
    if args.resolution % 2**levels:
        p.error(f"--resolution {args.resolution} must be a multiple of {2**levels} (the VAE halves it {levels} times)")
    if args.kl_weight < 0:
        p.error(f"--kl_weight must be >= 0, got {args.kl_weight}")
    return args


def load_images(args, split="train"):
    """The training (or held-out) images; the digits are grey (repeated to --channels in `images_of`)."""
    if args.dataset_name == "digits":
        return load_image_dataset("digits", args.resolution, 1, split=split)
    return load_image_dataset(
        args.dataset_name, args.resolution, args.channels, args.image_column, skip_bad_images=args.skip_bad_images
    )


def images_of(batch, channels):
    return to_model_channels(batch["pixel_values"], channels)


def held_out_images(args, dataset, count=256):
    """Digits: the test split; other data: the first `count` training images (there is no held-out split)."""
    data = load_images(args, "test") if args.dataset_name == "digits" else dataset
    indices = range(min(count, len(data)))
    return torch.stack([to_model_channels(data[i]["pixel_values"][None], args.channels)[0] for i in indices])


@torch.no_grad()
def evaluate(vae, images, batch_size=64):
    """Reconstruction errors of the posterior mode on `images` (L1, MSE and PSNR for the [-1, 1] range)."""
    vae.eval()
    recon = torch.cat(
        [
            vae.decode(vae.encode(x.to(vae.device)).latent_dist.mode()).sample.float().cpu()
            for x in images.split(batch_size)
        ]
    )
    mse = float((recon - images).square().mean())
    return recon, {
        "reconstruction_l1": float((recon - images).abs().mean()),
        "reconstruction_mse": mse,
        "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),  # peak-to-peak range 2
    }


def save_reconstructions(path, images, recon, count=16):
    """Held-out images (top row) over their reconstructions (bottom row)."""
    from diffusers.utils import make_image_grid, numpy_to_pil

    pair = torch.cat([images[:count], recon[:count]]).clamp(-1, 1) * 0.5 + 0.5
    pil = numpy_to_pil(pair.permute(0, 2, 3, 1).numpy())
    make_image_grid(pil, rows=2, cols=len(pil) // 2).save(path)


def train(args, accelerator):
    """Train the VAE, then (main process) set its latent scaling, save it and evaluate it."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    from diffusers.optimization import get_scheduler

    dataset = load_images(args)
    vae = tiny_autoencoder(args.preset, args.resolution, args.channels, args.latent_channels).train()
    model = VAETrainingModule(vae)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    loader = train_loader(args, dataset)
    if len(loader) < args.gradient_accumulation_steps:
        raise ValueError(f"The data set ({len(dataset)} images) is smaller than one batch: lower --train_batch_size.")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    logger.info(
        "AutoencoderKL %s: %d parameters, %d images, latents %dx%dx%d",
        args.preset,
        sum(p.numel() for p in vae.parameters()),
        len(dataset),
        args.latent_channels,
        args.resolution // 4,
        args.resolution // 4,
    )

    loss_log = os.path.join(args.output_dir, "loss_log.jsonl")
    if accelerator.is_main_process and os.path.isfile(loss_log):
        os.remove(loss_log)
    step, epoch = 0, 0
    while step < args.max_train_steps:
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            images = images_of(batch, args.channels)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(images, generator)
                loss, logs = vae_loss(images, *outputs, args.kl_weight, args.reconstruction_loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            step += 1
            stats = accelerator.gather(
                torch.stack([loss.detach().float(), logs["reconstruction"].mean(), logs["kl"].mean()])[None]
            ).mean(0)
            record = {"step": step, "loss": stats[0].item(), "reconstruction": stats[1].item(), "kl": stats[2].item()}
            accelerator.log({**record, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if accelerator.is_main_process:
                with open(loss_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if step % args.logging_steps == 0 or step == args.max_train_steps:
                    logger.info("step %d: reconstruction %.4f, kl %.3f", step, record["reconstruction"], record["kl"])
            if step >= args.max_train_steps:
                break

    end_run(accelerator)  # trackers and process group: the main process measures, saves and evaluates alone
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        count = min(args.statistics_images, len(dataset))
        stats_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=128)
        mean, std = latent_statistics(vae, (images_of(b, args.channels) for b in stats_loader))
        set_latent_scaling(vae, mean, std)
        save_vae(vae, args.output_dir)
        held_out = held_out_images(args, dataset)
        recon, errors = evaluate(vae, held_out)
        save_reconstructions(os.path.join(args.output_dir, "reconstructions.png"), held_out, recon)
        summary = {
            "steps": step,
            **errors,
            "held_out": "digits test split" if args.dataset_name == "digits" else "first training images",
            "latent_mean": mean,
            "latent_std": std,
            "shift_factor": vae.config.shift_factor,
            "scaling_factor": vae.config.scaling_factor,
            "latent_shape": [args.latent_channels, args.resolution // 4, args.resolution // 4],
            "num_processes": accelerator.num_processes,
        }
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        logger.info(
            "Saved the VAE to %s: held-out L1 %.4f, PSNR %.1f dB; latent mean %.4f, std %.4f",
            args.output_dir,
            errors["reconstruction_l1"],
            errors["psnr_db"],
            mean,
            std,
        )


def main(argv=None):
    args = parse_args(argv)
    with training_run(args, "vae") as accelerator:  # locks --output_dir; ends through end_run
        train(args, accelerator)


if __name__ == "__main__":
    main()
