"""The scripts' training loop: resume, accumulation, mixed precision, non-finite guards, EMA, logs, checkpoints,
validation."""

import json
import logging
import math
import os

import torch

from .publishing import push_checkpoint


logger = logging.getLogger(__name__)

__all__ = ["train_loop", "time_bucket_logs"]


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


def train_loop(
    args,
    accelerator,
    model,
    optimizer,
    loader,
    ema,
    state,
    objective,
    validate,
    desc,
    accumulate,
    pipeline_parts=None,
):
    """
    The scripts' training loop: resume, gradient accumulation, mixed precision, clipping, EMA, logging, checkpoints,
    validation. `objective(batch, step) -> (loss, logs)` (an `objectives.Objective`, or any callable of that shape); `validate(step)` runs on the main process.
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
                    loss, logs = objective(batch, global_step)
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
