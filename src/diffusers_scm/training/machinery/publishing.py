"""The end of a run and what it shows: validation grids, the replica check, the training summary, the saved pipeline,
the model card and the pushes to the Hub."""

import json
import logging
import os

import torch

from .run import end_run


__all__ = [
    "push_checkpoint",
    "network_component",
    "log_validation",
    "finish_training",
    "publish_pipeline",
    "teacher_decoder",
]


logger = logging.getLogger(__name__)


def network_component(network) -> str:
    """The SCMPipeline component name for a network: "transformer" or "unet"."""
    return "transformer" if "Transformer" in type(network).__name__ else "unet"


@torch.no_grad()
def log_validation(
    accelerator,
    output_dir,
    network,
    scheduler,
    step,
    step_counts,
    num_images,
    conditional,
    tracker_step=None,
    components=None,
    prompts=None,
    image_size=None,
    num_frames=None,
):
    """Sample grids from fixed noise for each step count; save them as PNG (named by `step`) and log them to the
    trackers (at `tracker_step`, default `step`). Text-to-image students: `components` (VAE, text encoders and
    tokenizers, `family_pipeline`) and the validation `prompts` (one image each, `image_size` pixels). Video students
    (`num_frames`): one video per prompt, saved as its frames side by side (a filmstrip per video)."""
    from diffusers.utils import numpy_to_pil

    from ...pipelines import SCMPipeline
    from ...utils import square_image_grid, video_filmstrips

    if not accelerator.is_main_process:  # a sharded student is gathered by every process, sampled by the main one
        return
    pipe = SCMPipeline(scheduler=scheduler, **{network_component(network): network}, **(components or {}))
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(num_images)] if conditional else None
    if prompts:
        num_images = len(prompts)
        text = {"prompt": list(prompts), "height": image_size, "width": image_size}
        if num_frames is not None:
            text["num_frames"] = num_frames
    else:
        text = {"batch_size": num_images}
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    grids = {}
    for steps in step_counts:
        out = pipe(
            **text,
            num_inference_steps=steps,
            class_labels=labels,
            output_type="np",
            generator=[torch.Generator().manual_seed(i) for i in range(num_images)],
        )
        images = out.images if num_frames is None else video_filmstrips(out.frames)
        square_image_grid(numpy_to_pil(images)).save(
            os.path.join(output_dir, "samples", f"step-{step:07d}-{steps}step.png")
        )
        grids[steps] = images
    step = step if tracker_step is None else tracker_step
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for steps, images in grids.items():
                tracker.writer.add_images(f"validation/{steps}-step", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"validation/{s}-step": [wandb.Image(i) for i in im] for s, im in grids.items()}, step=step)


def teacher_decoder(teacher: str, revision: str | None = None) -> dict:
    """
    The VAE and `image_range` of a latent teacher's pipeline folder that has no text encoders (a latent EDM2 network
    converted with `--vae`, SPEC.md section 10), for its student's SCMPipeline: the VAE's config carries the latent
    normalization, `image_range` the range of its images ([0, 1] for EDM2), so that the student's images decode as the
    teacher's. An empty dict for a pipeline without a VAE (pixel networks) or a network folder.

    Args:
        teacher (`str`): the teacher's folder or Hub id (`--teacher`).
        revision (`str`, *optional*): the Hub revision (`--teacher_revision`).
    """
    import importlib

    from ...hub.folders import local_folder
    from ...utils import read_json

    folder = local_folder(teacher)
    if folder is not None:
        path = os.path.join(folder, "model_index.json")
        index = read_json(path) if os.path.isfile(path) else {}
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = read_json(hf_hub_download(teacher, "model_index.json", revision=revision))
        except Exception:  # a network repository without model_index.json
            index = {}
    entry = index.get("vae")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
        return {}
    library, name = entry
    cls = getattr(importlib.import_module(library), name)
    vae = cls.from_pretrained(folder or teacher, subfolder="vae", revision=None if folder else revision).eval()
    parts = {"vae": vae}
    if index.get("image_range") is not None:
        parts["image_range"] = [float(v) for v in index["image_range"]]
    return parts


def finish_training(
    accelerator, output_dir, model, ema, scheduler, steps, counters, end_training=True, components=None, lora=None
):
    """Check that every replica holds the same weights, write `training_summary.json` (with `counters` from
    `train_loop`, or a number of skipped steps), and save the EMA network with `scheduler` (and `components`: a
    text-to-image student's VAE, text encoders, tokenizers and `family_pipeline`) as an SCMPipeline folder. A LoRA
    student (`lora`: `{"save_adapter": bool}`) is saved merged, beside its adapter in diffusers' LoRA format.
    Then `end_run` (trackers and process group; the main process may go on alone, e.g. `publish_pipeline`), unless
    `end_training=False`, which keeps them for a further stage (TCM)."""
    from ...pipelines import SCMPipeline
    from .fsdp import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)
    extra = replica_check(accelerator, model)
    accelerator.wait_for_everyone()
    network = ema.averaged_model(unwrapped.inner_model) if sharded else None  # gathered by every process
    if accelerator.is_main_process:
        _write_summary(output_dir, accelerator, steps, counters, **extra)
        network = (network if sharded else ema.averaged_model(unwrapped.inner_model)).eval()
        if lora is not None:  # the adapter in diffusers' LoRA format, then the merged network for SCMPipeline
            from .lora import fuse_lora, save_lora

            if lora.get("save_adapter", True):
                save_lora(network, output_dir, (components or {}).get("family_pipeline"))
            network = fuse_lora(network)
        parts = {network_component(network): network, **(components or {})}
        family = (components or {}).get("family_pipeline")
        if family is not None:
            from ...families import get_family

            if get_family(family).own_sampler == "scheduler":  # the family's own pipeline takes no sigmas=
                from ...schedulers import TrigFlowFamilyScheduler

                scheduler = TrigFlowFamilyScheduler.from_trigflow(scheduler)
        SCMPipeline(scheduler=scheduler, **parts).save_pretrained(output_dir)
        logger.info("Saved the EMA model to %s", output_dir)
    if end_training:
        end_run(accelerator)


def replica_check(accelerator, model) -> dict:
    """Whether every process holds the same weights (checksums gathered; a collective), for the training summary:
    `{"replicas_in_sync", "replica_checksums"}` and, where some are NaN or infinite, `"nonfinite_weights"` (their
    names, also logged); or `{"sharded": True}` for an FSDP student (each process holds its shards: nothing to
    compare). A NaN checksum equals a NaN checksum: non-finite weights are reported as such, not as replicas that
    differ."""
    from .fsdp import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(unwrapped):
        return {"sharded": True}
    named = list(unwrapped.named_parameters())
    params = torch.cat([p.detach().double().flatten() for _, p in named])
    checksums = accelerator.gather(torch.stack([params.sum(), params.abs().sum(), (params * params).sum()])[None])
    first = checksums[:1].expand_as(checksums)
    in_sync = bool(((checksums == first) | (checksums.isnan() & first.isnan())).all())
    if not in_sync:
        logger.warning("Replica weights differ after training: %s", checksums.tolist())
    result = {"replicas_in_sync": in_sync, "replica_checksums": checksums.tolist()}
    nonfinite = [name.removeprefix("inner_model.") for name, p in named if not torch.isfinite(p.detach()).all()]
    if nonfinite:
        result["nonfinite_weights"] = nonfinite
        if accelerator.is_main_process:
            shown = ", ".join(nonfinite[:8]) + (f" and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else "")
            logger.warning(
                "%d of %d weight tensors hold NaN or infinite values after training: %s.",
                len(nonfinite),
                len(named),
                shown,
            )
    return result


def _write_summary(folder: str, accelerator, steps: int, counters, **extra):
    """`training_summary.json`: steps, skipped steps, samples left out for non-finite targets and the hardware (what
    the model card reports), plus `extra`. `counters`: train_loop's, or a number of skipped steps."""
    counters = counters if isinstance(counters, dict) else {"skipped_steps": int(counters)}
    summary = {
        "steps": steps,
        "skipped_steps": counters.get("skipped_steps", 0),
        "nonfinite_samples": counters.get("nonfinite_samples", 0),
        "num_processes": accelerator.num_processes,
        "device_type": accelerator.device.type,
        "device_name": _device_name(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        **extra,
    }
    with open(os.path.join(folder, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def publish_pipeline(args, accelerator, sample_steps, num_sample_images: int = 8):
    """
    After `finish_training`: draw the sample grid (a row per entry of `sample_steps`) and write the model card into
    `args.output_dir`, and with `--push_to_hub` upload the pipeline folder and the card (not the checkpoints, logs or
    sample history) to `args.hub_model_id`. Runs on the main process.
    """
    if not accelerator.is_main_process:
        return None
    from ...hub.cards import SAMPLE_GRID, save_model_card, save_sample_grid
    from ...hub.push import push_pipeline_to_hub
    from ...pipelines import SCMPipeline

    pipe = SCMPipeline.from_pretrained(args.output_dir).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = getattr(args, "validation_prompts", None)
    size = getattr(args, "resolution", None) if prompts else None
    path = os.path.join(args.output_dir, SAMPLE_GRID)
    frames = getattr(args, "num_frames", None)
    if frames is not None:  # a video student: at the training size and length, not its pipeline's defaults
        size = getattr(args, "resolution", None)
    save_sample_grid(
        pipe, path, sample_steps, num_sample_images, args.seed, prompts=prompts, image_size=size, num_frames=frames
    )
    card = save_model_card(args.output_dir, repo_id=args.hub_model_id, license=args.hub_license)
    logger.info("Wrote the model card %s", card)
    if not args.push_to_hub:
        return None
    with open(os.path.join(args.output_dir, "training_summary.json")) as f:
        steps = json.load(f)["steps"]
    commit = push_pipeline_to_hub(
        args.output_dir,
        args.hub_model_id,
        token=args.hub_token,
        private=args.hub_private_repo,
        commit_message=f"Upload the pipeline after {steps} training steps",
    )
    logger.info("Pushed %s to %s", args.output_dir, commit.commit_url)
    return commit


def push_checkpoint(args, accelerator, network, scheduler, step: int, skipped: int):
    """
    `--push_at_checkpoints`: upload the EMA pipeline of a checkpoint (network and scheduler) with its model card to
    `args.hub_model_id`, one commit per checkpoint; the final push replaces it. The pipeline is written to a temporary
    folder inside the output folder and removed after the upload. Runs on the main process. A failed upload is logged
    and training goes on (the checkpoint is safe on disk; the final push still runs); returns the commit or None.
    """
    import shutil

    from ...hub.cards import save_model_card
    from ...hub.push import push_pipeline_to_hub
    from ...pipelines import SCMPipeline

    folder = os.path.join(args.output_dir, f".hub-checkpoint-{step}")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        SCMPipeline(scheduler=scheduler, **{network_component(network): network}).save_pretrained(folder)
        shutil.copy(os.path.join(args.output_dir, "training_args.json"), folder)
        _write_summary(folder, accelerator, step, skipped)
        save_model_card(folder, repo_id=args.hub_model_id, license=args.hub_license)
        commit = push_pipeline_to_hub(
            folder,
            args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            commit_message=f"Checkpoint: the EMA pipeline after {step} training steps",
        )
        logger.info("Pushed the step-%d pipeline to %s", step, commit.commit_url)
        return commit
    except Exception as e:  # network or Hub errors must not end a long run (nor stall the other processes)
        logger.warning(
            "Could not push the step-%d pipeline to %s (%s: %s); training goes on.",
            step,
            args.hub_model_id,
            type(e).__name__,
            e,
        )
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
