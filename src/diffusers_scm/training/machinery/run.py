"""One training run: the accelerator (with the lock on the output folder), the student, optimizer, data and EMA prepared
for it, the record of the settings that shape its checkpoints, and the shutdown every script ends with."""

import contextlib
import json
import logging
import os

import torch

from .arguments import resolve_report_to, tracker_config


logger = logging.getLogger(__name__)

__all__ = ["adam", "prepare_training", "make_accelerator", "training_run", "end_run", "run_config"]


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
            from ...hub.push import create_hub_repo

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


# flags that shape a checkpoint's state or what it means (run_config); the folders a network was loaded
# from (--teacher, --student, --model, --model_config, --guidance_model) are recorded too, and a change of them alone
# is only logged (adding or dropping --guidance_model is a change; its w, --guidance_scale, is recorded with it)
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
    "guidance_model",
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
        `dict`: JSON values, keyed by flag (`"--lora_rank"`) or `"network"` / `"teacher network"` / `"guidance network"`
        (the network of `--guidance_model`, when `teacher` is a `GuidedDenoiser`).
    """
    entries = {f"--{name}": getattr(args, name) for name in RUN_CONFIG_FLAGS if hasattr(args, name)}
    entries["--fsdp"] = bool(sharded)
    entries.update(record or {})
    sources = [f"--{n}" for n in ("student", "teacher", "model", "model_config", "preset") if getattr(args, n, None)]
    entries["network"] = network_record(model.inner_model, sources[0] if sources else None)
    if teacher is not None:
        entries["teacher network"] = network_record(teacher.inner_model, "--teacher")
    if getattr(args, "guidance_model", None):  # the teacher guided by a second network, D_g + w (D - D_g)
        entries["--guidance_scale"] = args.guidance_scale
        if hasattr(teacher, "denoisers"):  # a GuidedDenoiser (not loaded with w = 1)
            entries["guidance network"] = network_record(teacher.denoisers()[1].inner_model, "--guidance_model")
    return json.loads(json.dumps(entries, default=str))


def prepare_training(args, accelerator, model, dataset, module_name: str, teacher=None, record: dict | None = None):
    """Data loader, adaptive-weighting head, Adam, EMA and the time/noise generator, prepared by `accelerator`.

    Returns `(model, logvar_head, optimizer, loader, ema, generator, state)`, where `state` is what checkpoints hold,
    with the `run_config` of `args`, `model` and `teacher` (and the entries of `record`) that resumes are checked
    against. The generator for times and noise is saved in checkpoints, so a resumed run draws what the uninterrupted
    run would have drawn.
    """
    from diffusers.optimization import get_scheduler

    from ..objectives.logvar import LogVarHead
    from .ema import make_ema

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
        from .fsdp import update_shards_before_forward

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        logvar_head = model.logvar_head
        update_shards_before_forward(model)  # EDM2's forced weight normalization on the shards
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
    if getattr(network, "peft_config", None):  # adapters added by diffusers' add_adapter (lora.add_lora)
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
