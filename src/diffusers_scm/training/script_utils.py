"""Glue shared by the accelerate scripts (`examples/distill.py`, `examples/train_teacher.py`)."""

import json
import logging
import math
import os

import torch


__all__ = ["make_accelerator", "network_component", "time_bucket_logs", "log_validation", "finish_training"]

logger = logging.getLogger(__name__)


def make_accelerator(args, project_name: str):
    """An `Accelerator` from the scripts' common flags; several processes without CUDA train on CPU with gloo."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.init_trackers(project_name, config={k: v for k, v in vars(args).items() if v is not None})
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    return accelerator


def network_component(network) -> str:
    """The SCMPipeline component name for a network: "transformer" or "unet"."""
    return "transformer" if "Transformer" in type(network).__name__ else "unet"


def time_bucket_logs(logs) -> dict:
    """Mean unweighted loss per log(tan t) bucket."""
    log_tan = torch.log(torch.tan(logs["t"].float()))
    edges = [-math.inf, -1.0, 0.0, 1.0, math.inf]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (log_tan >= lo) & (log_tan < hi)
        if mask.any():
            out[f"loss_by_time/log_tan_t_{lo:+.0f}_{hi:+.0f}"] = logs["loss"][mask].mean().item()
    return out


@torch.no_grad()
def log_validation(accelerator, output_dir, network, scheduler, step, step_counts, num_images, conditional):
    """Sample grids from fixed noise for each step count; save them as PNG and log them to the trackers."""
    from diffusers.utils import make_image_grid, numpy_to_pil

    from ..pipelines import SCMPipeline

    pipe = SCMPipeline(scheduler=scheduler, **{network_component(network): network})
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(num_images)] if conditional else None
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    cols = int(math.ceil(math.sqrt(num_images)))
    rows = math.ceil(num_images / cols)
    grids = {}
    for steps in step_counts:
        images = pipe(
            batch_size=num_images,
            num_inference_steps=steps,
            class_labels=labels,
            output_type="np",
            generator=[torch.Generator().manual_seed(i) for i in range(num_images)],
        ).images
        pil = numpy_to_pil(images)
        pil += [pil[0].point(lambda _: 0)] * (rows * cols - num_images)
        make_image_grid(pil, rows=rows, cols=cols).save(
            os.path.join(output_dir, "samples", f"step-{step:07d}-{steps}step.png")
        )
        grids[steps] = images
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for steps, images in grids.items():
                tracker.writer.add_images(f"validation/{steps}-step", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"validation/{s}-step": [wandb.Image(i) for i in im] for s, im in grids.items()}, step=step)


def finish_training(accelerator, output_dir, model, ema, scheduler, steps, skipped):
    """Check that every replica holds the same weights, write `training_summary.json`, and save the EMA network
    with `scheduler` as an SCMPipeline folder."""
    from ..pipelines import SCMPipeline

    unwrapped = accelerator.unwrap_model(model)
    params = torch.cat([p.detach().double().flatten() for p in unwrapped.parameters()])
    checksums = accelerator.gather(torch.stack([params.sum(), params.abs().sum(), (params * params).sum()])[None])
    in_sync = bool((checksums - checksums[:1]).abs().max() == 0)
    if not in_sync:
        logger.warning("Replica weights differ after training: %s", checksums.tolist())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "training_summary.json"), "w") as f:
            json.dump(
                {
                    "steps": steps,
                    "skipped_steps": skipped,
                    "num_processes": accelerator.num_processes,
                    "replicas_in_sync": in_sync,
                    "replica_checksums": checksums.tolist(),
                },
                f,
                indent=2,
            )
        network = ema.averaged_model(unwrapped.inner_model).eval()
        SCMPipeline(scheduler=scheduler, **{network_component(network): network}).save_pretrained(output_dir)
        logger.info("Saved the EMA model to %s", output_dir)
    accelerator.end_training()
