"""Glue shared by the accelerate scripts (`examples/distill.py`, `examples/train_teacher.py`, `examples/train_vae.py`)."""

import contextlib
import json
import logging
import math
import os

import torch


__all__ = [
    "adam",
    "add_common_args",
    "positive_int",
    "non_negative_int",
    "prepare_training",
    "push_checkpoint",
    "train_loop",
    "make_accelerator",
    "training_run",
    "end_run",
    "run_config",
    "network_component",
    "time_bucket_logs",
    "log_validation",
    "finish_training",
    "publish_pipeline",
]

logger = logging.getLogger(__name__)


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (an argparse error names the flag otherwise)."""
    return _bounded_int(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(value, 0, "an integer >= 0")


def _bounded_int(value: str, low: int, what: str) -> int:
    import argparse

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if number < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {number}")
    return number


def add_common_args(p, output_dir: str):
    """Flags shared by the training scripts: data, optimization, EMA, checkpoints, validation and logging."""
    # data
    p.add_argument("--dataset_name", type=str, default="digits", help="'digits', an image folder or a datasets name")
    p.add_argument("--resolution", type=positive_int, default=16)
    p.add_argument("--image_column", type=str, default="image")
    p.add_argument("--label_column", type=str, default=None, help="class labels for class-conditional networks")
    p.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="image folders: skip files that cannot be read (counted and logged) instead of stopping",
    )
    p.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    # optimization
    p.add_argument("--train_batch_size", type=positive_int, default=32, help="per device")
    p.add_argument("--max_train_steps", type=positive_int, default=1000)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument(
        "--lr_scheduler",
        choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
        default="constant",
        help="learning-rate schedule over --max_train_steps (diffusers.optimization); a decay to 0 removes the "
        "late-training jitter of the normalized sCM gradient",
    )
    p.add_argument("--lr_warmup_steps", type=non_negative_int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.99)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the student, its optimizer state and EMA per block with FSDP2 (torch's fully_shard) where "
        "accelerate does not (e.g. CPU processes over gloo); under `accelerate launch --use_fsdp --fsdp_version 2` "
        "accelerate shards it and this flag is implied",
    )
    p.add_argument(
        "--fsdp_block_classes",
        type=str,
        default=None,
        help="with --fsdp: comma-separated block classes, one FSDP unit each (default: the network's "
        "_no_split_modules, else its down/up/mid/transformer blocks)",
    )
    # EMA
    p.add_argument("--ema_sigma_rel", type=float, default=None, help="EDM2 power EMA (default 0.05)")
    p.add_argument("--ema_decay", type=float, default=None, help="constant-decay EMA instead")
    # checkpoints, validation, logging
    p.add_argument("--output_dir", type=str, default=output_dir)
    p.add_argument("--checkpointing_steps", type=positive_int, default=500)
    p.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--validation_steps", type=positive_int, default=500)
    p.add_argument("--num_validation_images", type=positive_int, default=16)
    p.add_argument(
        "--report_to",
        type=str,
        default=None,
        help="tensorboard, wandb (comma-separated for several), all or none; default: tensorboard when installed",
    )
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--seed", type=int, default=0)
    # Hugging Face Hub: a model card is always written into the output folder; --push_to_hub uploads the pipeline
    p.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline and its model card")
    p.add_argument("--hub_model_id", type=str, default=None, help="org/name (default: output_dir's name, your user)")
    p.add_argument("--hub_token", type=str, default=None, help="default: the token saved by `hf auth login`")
    p.add_argument("--hub_private_repo", action="store_true", help="create the repository as private")
    p.add_argument("--hub_license", type=str, default="apache-2.0", help="card license (a student: the teacher's)")
    p.add_argument(
        "--push_at_checkpoints",
        action="store_true",
        help="with --push_to_hub: also upload the EMA pipeline and its card at every checkpoint (not the training state)",
    )
    return p


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_report_to(report_to: str | None) -> list[str] | str | None:
    """The trackers for `Accelerator(log_with=...)` from --report_to. Named trackers must be installed (accelerate
    would skip a missing one with only a warning, and the run would log nothing); the default is tensorboard when it
    is installed, else none."""
    import importlib.util

    installed = {name: importlib.util.find_spec(pkg) is not None for name, pkg in TRACKER_PACKAGES.items()}
    if report_to is None:
        if not installed["tensorboard"]:
            logger.info("tensorboard is not installed: no training logs (pip install tensorboard, or --report_to).")
        return ["tensorboard"] if installed["tensorboard"] else None
    if report_to in ("none", "all"):
        return None if report_to == "none" else "all"
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    missing = [name for name in names if not installed.get(name, True)]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[name] for name in missing)
        raise ValueError(
            f"--report_to {report_to}: {', '.join(missing)} not installed. Install it (pip install {packages}) or "
            "choose another tracker (--report_to none logs nothing)."
        )
    return names


def tracker_config(recorded: dict) -> dict:
    """The run's flags as trackers take them: None dropped, lists and other values written as their JSON (tensorboard's
    hparams take only numbers, strings and booleans)."""
    scalar = (bool, int, float, str)
    return {
        k: v if isinstance(v, scalar) else json.dumps(v, default=str) for k, v in recorded.items() if v is not None
    }


def make_accelerator(args, project_name: str):
    """An `Accelerator` from the scripts' common flags; several processes without CUDA train on CPU with gloo. The main
    process takes the lock of `--output_dir` (`output_lock.OutputDirLock`): a second run into a folder that a live run
    holds is refused on every process, with the holder's process id. Scripts end the run with `training_run` (or
    `end_run`), which releases it; so does the exit of the process."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    if getattr(args, "push_at_checkpoints", False) and not args.push_to_hub:
        raise ValueError("--push_at_checkpoints uploads to the Hub: add --push_to_hub (and --hub_model_id).")
    on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=resolve_report_to(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    _lock_output_dir(accelerator, args.output_dir)
    if accelerator.is_main_process:
        if getattr(args, "push_to_hub", False):  # create the repository now: a bad token fails before training
            from ..hub import create_hub_repo

            name = args.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(args.output_dir)))
            args.hub_model_id = create_hub_repo(name, token=args.hub_token, private=args.hub_private_repo)
        recorded = {k: v for k, v in vars(args).items() if k != "hub_token"}  # never write the token to disk
        accelerator.init_trackers(project_name, config=tracker_config(recorded))
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump(recorded, f, indent=2)
    return accelerator


def _lock_output_dir(accelerator, output_dir: str):
    """The main process locks `output_dir`; every process raises its refusal (no process trains alone)."""
    from .output_lock import lock_output_dir

    refusal = None
    if accelerator.is_main_process:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock_output_dir(output_dir)
        except Exception as e:  # OutputDirLockedError, or a folder that cannot be written
            refusal = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise refusal


@contextlib.contextmanager
def training_run(args, project_name: str):
    """
    The frame of every training script: `make_accelerator` (which locks `--output_dir`) on entry; on exit `end_run`
    (pending collectives, trackers, the process group) and the lock released. After an error only the lock is
    released (waiting for the other processes could hang).

    Args:
        args (`argparse.Namespace`): the script's flags (`add_common_args`, or `output_dir`, `logging_dir`,
            `report_to`, `mixed_precision` and `gradient_accumulation_steps`).
        project_name (`str`): the trackers' project.
    """
    from .output_lock import release_output_dir

    accelerator = make_accelerator(args, project_name)
    try:
        yield accelerator
        end_run(accelerator)
    finally:
        if accelerator.is_main_process:
            release_output_dir(args.output_dir)


def end_run(accelerator):
    """
    End a run the same way in every script, before the interpreter tears modules down: wait for every process (their
    collectives are done), finish the trackers, then destroy the process group. Idempotent (a run that ended in
    `finish_training` passes through here again).

    DDP's `Reducer` holds the process group from C++. If it goes last, at module teardown, it destroys a gloo group
    with the GIL held while the group joins its worker threads, which may wait for the GIL to free a finished
    all-gather's tensors: a hang, once in ten to thirty 2-process CPU runs. So every DDP module gives up its reducer
    first, while the group is alive, and the group goes in `destroy_process_group`, whose destructor releases the GIL.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        accelerator.wait_for_everyone()
        _release_ddp_reducers()
    accelerator.end_training()  # the trackers, then torch.distributed.destroy_process_group()
    accelerator.trackers = []  # finished: a second call finishes nothing
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not accelerator.state.fork_launched:
        torch.distributed.destroy_process_group()


def _release_ddp_reducers():
    """Drop the reducer (and its logger) of every DistributedDataParallel module, then collect: each Reducer goes now,
    while the process group has other references (see `end_run`). The modules cannot train afterwards."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    gc.collect()  # unreachable modules (an earlier stage's) go while the group is alive
    for obj in gc.get_objects():
        if issubclass(type(obj), DistributedDataParallel):  # type(): no attribute lookups on arbitrary objects
            for name in ("logger", "reducer"):
                obj.__dict__.pop(name, None)
    gc.collect()


def train_loader(args, dataset) -> torch.utils.data.DataLoader:
    """The shuffled training loader of the scripts: `--train_batch_size`, whole batches only,
    `--dataloader_num_workers`."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
    )


def adam(params, sharded: bool = False, **kwargs) -> torch.optim.Adam:
    """torch's Adam over `params`, fused into one kernel per step where torch has that kernel for every parameter (CPU
    or CUDA floating-point tensors, not a sharded model's DTensors): the same update, about 3x faster than the
    per-tensor loop torch uses by default on CPU, which shows for small networks with several updates per step."""
    params = list(params)
    fused = not sharded and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, fused=fused or None, **kwargs)


# flags that shape a checkpoint's state or what it means (script_utils.run_config); the folders a network was loaded
# from (--teacher, --student, --model, --model_config) are recorded too, and a change of them alone is only logged
RUN_CONFIG_FLAGS = (
    "method",
    "objective",
    "resolution",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "teacher",
    "student",
    "model",
    "model_config",
)


def network_record(network, source: str | None = None) -> dict:
    """A network's architecture for `run_config`: its class and config (without the `_`-prefixed entries), or a
    digest of its parameter names and shapes where it has no config; `source`: the flag it came from."""
    record = {"class": type(network).__name__}
    config = getattr(network, "config", None)
    if config is not None:
        record["config"] = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    else:
        import hashlib

        shapes = repr([(name, tuple(p.shape)) for name, p in network.named_parameters()])
        record["shapes"] = hashlib.sha1(shapes.encode()).hexdigest()[:16]
    if source is not None:
        record["from"] = source
    return record


def run_config(args, model, teacher=None, sharded: bool = False, record: dict | None = None) -> dict:
    """
    The flags and networks that shape a run's checkpoints: `save_checkpoint` writes this record into each checkpoint's
    `training_state.json`, and `load_checkpoint` compares it on resume before reading any tensor, so that a changed
    flag is an error naming the flag and both values.

    Args:
        args (`argparse.Namespace`): the script's flags; those of `RUN_CONFIG_FLAGS` that it has are recorded.
        model (`torch.nn.Module`): the trained model (its `inner_model`: the network's class and config).
        teacher (`TrigFlowDenoiser`, *optional*): the teacher (its network's class and config).
        sharded (`bool`): whether the model is sharded (`--fsdp`, or accelerate's FSDP2).
        record (`dict`, *optional*): further entries, flag -> value (e.g. TCM Stage 1's `--tcm_stage1_method`).

    Returns:
        `dict`: JSON values, keyed by flag (`"--lora_rank"`) or `"network"` / `"teacher network"`.
    """
    entries = {f"--{name}": getattr(args, name) for name in RUN_CONFIG_FLAGS if hasattr(args, name)}
    entries["--fsdp"] = bool(sharded)
    entries.update(record or {})
    sources = [f"--{n}" for n in ("student", "teacher", "model", "model_config", "preset") if getattr(args, n, None)]
    entries["network"] = network_record(model.inner_model, sources[0] if sources else None)
    if teacher is not None:
        entries["teacher network"] = network_record(teacher.inner_model, "--teacher")
    return json.loads(json.dumps(entries, default=str))


def prepare_training(args, accelerator, model, dataset, module_name: str, teacher=None, record: dict | None = None):
    """Data loader, adaptive-weighting head, Adam, EMA and the time/noise generator, prepared by `accelerator`.

    Returns `(model, logvar_head, optimizer, loader, ema, generator, state)`, where `state` is what checkpoints hold,
    with the `run_config` of `args`, `model` and `teacher` (and the entries of `record`) that resumes are checked
    against. The generator for times and noise is saved in checkpoints, so a resumed run draws what the uninterrupted
    run would have drawn.
    """
    from diffusers.optimization import get_scheduler

    from .ema import make_ema
    from .logvar import LogVarHead

    loader = train_loader(args, dataset)
    logvar_head = LogVarHead()
    sharded = _use_fsdp(args, accelerator, model)
    settings = run_config(args, model, teacher, sharded, record)
    if sharded:  # one FSDP root holds the student and the head: one optimizer over both, one gradient clip
        from .fsdp import block_class_names, shard_module

        model.add_module("logvar_head", logvar_head)
        blocks = args.fsdp_block_classes.split(",") if getattr(args, "fsdp_block_classes", None) else None
        blocks = blocks or block_class_names(model.inner_model)
        if accelerator.is_fsdp2:  # accelerate's auto-wrap policy reads the units from `_no_split_modules`
            model._no_split_modules = [*blocks, type(logvar_head).__name__]
        else:  # accelerate did not shard: torch's fully_shard, the same units (CPU processes over gloo too)
            shard_module(model, blocks, accelerator.mixed_precision, extra_units=(logvar_head,))
    optimizer = adam(
        [p for p in model.parameters() if p.requires_grad] + ([] if sharded else list(logvar_head.parameters())),
        sharded=sharded,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # stepped once per optimizer update by train_loop (not prepared: accelerate would step it once per process)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    if accelerator.is_fsdp2:  # accelerate shards the one model it is given and remaps the optimizer
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        logvar_head = model.logvar_head
    elif sharded:  # sharded above: a DDP wrapper must not replicate it
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, logvar_head, optimizer, loader = accelerator.prepare(model, logvar_head, optimizer, loader)
    network = accelerator.unwrap_model(model).inner_model
    frozen_parts = not all(p.requires_grad for p in network.parameters())  # a LoRA student: average what trains
    ema = make_ema(network, args.ema_sigma_rel, args.ema_decay, trainable_only=frozen_parts)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    state = {
        "modules": {module_name: model, "logvar_head": logvar_head},
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "ema": ema,
        "generators": {"noise": generator},
        "run_config": settings,
    }
    return model, logvar_head, optimizer, loader, ema, generator, state


def _use_fsdp(args, accelerator, model) -> bool:
    """Whether the student is sharded (FSDP2 by accelerate, or `--fsdp`); refuses what sharding does not support."""
    if accelerator.distributed_type.name == "FSDP" and not accelerator.is_fsdp2:
        raise ValueError("FSDP1 is not supported: launch with --fsdp_version 2 (accelerate config: fsdp_version: 2).")
    sharded = accelerator.is_fsdp2 or getattr(args, "fsdp", False)
    if not sharded:
        return False
    network = model.inner_model
    if not all(p.requires_grad for p in network.parameters()):
        raise ValueError(
            "--fsdp with a LoRA student is not supported: a LoRA student already fits where its base network does "
            "(drop --fsdp), or train all weights sharded (drop --lora_rank)."
        )
    if not hasattr(network, "config"):
        raise ValueError(
            f"--fsdp needs a diffusers network (one with a config to rebuild it unsharded for saving); got "
            f"{type(network).__name__}."
        )
    if not torch.distributed.is_initialized():
        raise ValueError(
            "--fsdp shards the student over processes: start the script with `accelerate launch --num_processes N` "
            "(N >= 2), or drop --fsdp."
        )
    if getattr(args, "gradient_accumulation_steps", 1) > 1 and not accelerator.is_fsdp2:
        logger.info("--fsdp with gradient accumulation: gradients are reduce-scattered at every micro-batch.")
    return True


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
):
    """Sample grids from fixed noise for each step count; save them as PNG (named by `step`) and log them to the
    trackers (at `tracker_step`, default `step`). Text-to-image students: `components` (VAE, text encoders and
    tokenizers, `family_pipeline`) and the validation `prompts` (one image each, `image_size` pixels)."""
    from diffusers.utils import numpy_to_pil

    from ..pipelines import SCMPipeline
    from ..utils import square_image_grid

    if not accelerator.is_main_process:  # a sharded student is gathered by every process, sampled by the main one
        return
    pipe = SCMPipeline(scheduler=scheduler, **{network_component(network): network}, **(components or {}))
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(num_images)] if conditional else None
    if prompts:
        num_images = len(prompts)
        text = {"prompt": list(prompts), "height": image_size, "width": image_size}
    else:
        text = {"batch_size": num_images}
    os.makedirs(os.path.join(output_dir, "samples"), exist_ok=True)
    grids = {}
    for steps in step_counts:
        images = pipe(
            **text,
            num_inference_steps=steps,
            class_labels=labels,
            output_type="np",
            generator=[torch.Generator().manual_seed(i) for i in range(num_images)],
        ).images
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


def finish_training(
    accelerator, output_dir, model, ema, scheduler, steps, counters, end_training=True, components=None, lora=None
):
    """Check that every replica holds the same weights, write `training_summary.json` (with `counters` from
    `train_loop`, or a number of skipped steps), and save the EMA network with `scheduler` (and `components`: a
    text-to-image student's VAE, text encoders, tokenizers and `family_pipeline`) as an SCMPipeline folder. A LoRA
    student (`lora`: `{"save_adapter": bool}`) is saved merged, beside its adapter in diffusers' LoRA format.
    Then `end_run` (trackers and process group; the main process may go on alone, e.g. `publish_pipeline`), unless
    `end_training=False`, which keeps them for a further stage (TCM)."""
    from ..pipelines import SCMPipeline
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
    from ..hub import SAMPLE_GRID, push_pipeline_to_hub, save_model_card, save_sample_grid
    from ..pipelines import SCMPipeline

    pipe = SCMPipeline.from_pretrained(args.output_dir).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = getattr(args, "validation_prompts", None)
    size = getattr(args, "resolution", None) if prompts else None
    path = os.path.join(args.output_dir, SAMPLE_GRID)
    save_sample_grid(pipe, path, sample_steps, num_sample_images, args.seed, prompts=prompts, image_size=size)
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

    from ..hub import push_pipeline_to_hub, save_model_card
    from ..pipelines import SCMPipeline

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


def train_loop(
    args,
    accelerator,
    model,
    optimizer,
    loader,
    ema,
    state,
    compute_loss,
    validate,
    desc,
    accumulate,
    pipeline_parts=None,
):
    """
    The scripts' training loop: resume, gradient accumulation, mixed precision, clipping, EMA, logging, checkpoints,
    validation. `compute_loss(batch, step) -> (loss, logs)`; `validate(step)` runs on the main process.
    `pipeline_parts() -> (network, scheduler)` gives the EMA pipeline that `--push_at_checkpoints` uploads after each
    checkpoint (main process).
    Nothing non-finite reaches the weights (SPEC.md pitfall 9): samples with non-finite targets are left out of the
    gradient pass by the losses (counted here), and a non-finite loss or gradient norm on any process skips the step
    on every process. Both counts go to the console, the trackers, `loss_log.jsonl` and `training_summary.json`. A run
    whose every step was skipped, or that trained nothing where a finished pipeline already lies, raises instead of
    returning (the caller would save over it). Returns `(steps, counters)` with counters `skipped_steps` and
    `nonfinite_samples` (totals over the run, resumed parts included).
    """
    from tqdm.auto import tqdm

    from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
    from .fsdp import is_sharded

    sharded = is_sharded(accelerator.unwrap_model(model))
    clipped = list(accelerator.unwrap_model(model).inner_model.parameters())  # the network's, not the logvar head's
    global_step, start_step = 0, 0
    counters = {"skipped_steps": 0, "nonfinite_samples": 0}
    state = {**state, "counters": counters}  # checkpoints carry the counts, so a resumed run's totals are right
    if args.resume_from_checkpoint:
        found = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if found is None:
            logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
        else:
            global_step = start_step = load_checkpoint(accelerator, found[0], **state)
            logger.info("Resumed from %s (step %d).", found[0], global_step)
            if global_step > args.max_train_steps:
                raise ValueError(
                    f"{found[0]} is at step {global_step}, past --max_train_steps {args.max_train_steps}: raise "
                    "--max_train_steps to train on, or resume an earlier checkpoint."
                )
    loss_log = os.path.join(args.output_dir, "loss_log.jsonl")
    if accelerator.is_main_process:
        _truncate_loss_log(loss_log, global_step)  # a resumed run rewrites the steps after its checkpoint
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError("The data set is smaller than one batch: lower --train_batch_size.")
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc=desc, disable=not accelerator.is_local_main_process
    )
    nonfinite_in_step = 0
    for epoch in range(global_step // steps_per_epoch, math.ceil(args.max_train_steps / steps_per_epoch) + 1):
        if global_step >= args.max_train_steps:
            break
        loader.set_epoch(epoch)
        done_in_epoch = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch > 0 else loader
        for batch in batches:
            grad_norm, skip_reason = None, None
            with accelerator.accumulate(*accumulate):
                with accelerator.autocast():
                    loss, logs = compute_loss(batch, global_step)
                dropped = float(logs.get("nonfinite", 0))  # samples the loss left out (non-finite targets)
                checks = torch.tensor([[float(torch.isfinite(loss.detach())), dropped]], device=accelerator.device)
                checks = accelerator.gather(checks)
                nonfinite_in_step += int(checks[:, 1].sum())
                if bool(checks[:, 0].all()):
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = _local(accelerator.clip_grad_norm_(clipped, args.max_grad_norm))
                        norm_ok = torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32)).reshape(1)
                        if not bool(accelerator.gather(norm_ok.to(accelerator.device)).all()):
                            skip_reason = f"non-finite gradient norm ({float(grad_norm)})"
                    if skip_reason is None:
                        optimizer.step()
                else:
                    skip_reason = "non-finite loss"
                optimizer.zero_grad(set_to_none=True)
            if skip_reason is not None:
                counters["skipped_steps"] += 1
                logger.warning(
                    "Step %d: %s, the update was skipped on every process (%d skipped so far).",
                    global_step + 1,
                    skip_reason,
                    counters["skipped_steps"],
                )
            if not accelerator.sync_gradients:
                continue
            if nonfinite_in_step:
                counters["nonfinite_samples"] += nonfinite_in_step
                logger.warning(
                    "Step %d: %d sample(s) with non-finite targets were left out of the gradient pass (%d so far).",
                    global_step + 1,
                    nonfinite_in_step,
                    counters["nonfinite_samples"],
                )
            lr = optimizer.param_groups[0]["lr"]  # the rate this update used
            state["lr_scheduler"].step()
            ema.step(accelerator.unwrap_model(model).inner_model)
            global_step += 1
            progress.update(1)
            mean_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            log = {"loss": mean_loss, **counters, "lr": lr, **time_bucket_logs(logs)}
            log["nonfinite_samples_in_step"] = nonfinite_in_step
            nonfinite_in_step = 0
            for key in ("tangent_norm", "logvar", "boundary_loss", "dmd_loss", "dmd_grad_norm", "fake_score_loss"):
                if key in logs:
                    log[key] = logs[key].float().mean().item()
            for key in ("warmup_ratio", "discretization_ratio"):
                if key in logs:
                    log[key] = logs[key]
            if grad_norm is not None:
                log["grad_norm"] = float(grad_norm)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            accelerator.log(log, step=global_step + getattr(args, "log_step_offset", 0))  # TCM Stage 2: after Stage 1
            if accelerator.is_main_process:
                with open(loss_log, "a") as f:
                    record = {"step": global_step, "loss": mean_loss, "lr": lr, **counters}
                    record["nonfinite_samples_in_step"] = log["nonfinite_samples_in_step"]
                    f.write(json.dumps(record) + "\n")
            if global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(
                    accelerator, args.output_dir, global_step, **state, total_limit=args.checkpoints_total_limit
                )
                logger.info("Saved %s", path)
                if args.push_to_hub and args.push_at_checkpoints and (accelerator.is_main_process or sharded):
                    parts = pipeline_parts()  # a sharded student is gathered by every process
                    if accelerator.is_main_process:
                        push_checkpoint(args, accelerator, *parts, global_step, counters["skipped_steps"])
            if (accelerator.is_main_process or sharded) and global_step % args.validation_steps == 0:
                validate(global_step)  # sharded: every process gathers, the main one samples
            if global_step >= args.max_train_steps:
                break
    _check_trained(args.output_dir, global_step, start_step, counters)
    return global_step, counters


def _local(value):
    """A gradient norm as a plain tensor (a sharded student's comes as a DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _truncate_loss_log(path: str, step: int):
    """Keep the lines of `loss_log.jsonl` up to `step` (all of them are rewritten by a run resumed there)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a kill
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _check_trained(output_dir: str, steps: int, start_step: int, counters: dict):
    """Refuse to hand a run that learned nothing to the caller, which would save it over `output_dir`."""
    if steps > 0 and counters["skipped_steps"] >= steps:
        raise RuntimeError(
            f"Every one of the {steps} training steps was skipped (non-finite loss or gradients; "
            f"{counters['nonfinite_samples']} samples had non-finite targets), so nothing was saved. Check the "
            "teacher and the data for NaN or Inf, or lower --learning_rate; --mixed_precision no rules out "
            "half-precision overflow."
        )
    if steps == start_step and os.path.isfile(os.path.join(output_dir, "model_index.json")):
        raise ValueError(
            f"Nothing to train: the run resumed at step {steps}, which is --max_train_steps, and {output_dir} already "
            "holds a saved pipeline, which is left as it is. Raise --max_train_steps to train on."
        )
