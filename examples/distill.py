"""Continuous-time consistency distillation (sCD) and training (sCT) with accelerate (SPEC.md section 3).

    accelerate launch examples/distill.py --teacher path/or/hub-id --method scd --dataset_name digits \
        --resolution 16 --train_batch_size 64 --max_train_steps 2000 --output_dir student

The teacher is any diffusers pipeline or network folder whose parameterization `load_teacher` infers (EDM, flow
matching, DDPM eps/v, TrigFlow). The student starts as a copy of the teacher's network (or `--student`), is trained
with `SCMLoss`, and its EMA is saved as an `SCMPipeline` folder with a `TrigFlowScheduler` for its parameterization.
"""

import argparse
import copy
import json
import logging
import math
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffusers_scm import TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.training import LogVarHead, SCMLoss, load_teacher, lognormal_times, make_ema
from diffusers_scm.training.checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from diffusers_scm.training.data import load_image_dataset, to_model_channels
from diffusers_scm.training.script_utils import finish_training, log_validation, make_accelerator, time_bucket_logs


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--teacher", type=str, default=None, help="teacher pipeline/network folder or Hub id")
    p.add_argument("--teacher_parameterization", type=str, default=None, help="override the inferred one")
    p.add_argument("--student", type=str, default=None, help="initial student (default: a copy of the teacher)")
    p.add_argument("--method", choices=["scd", "sct"], default="scd")
    p.add_argument("--sigma_data", type=float, default=None, help="data std (default: the teacher's, else 0.5)")
    # data
    p.add_argument("--dataset_name", type=str, default="digits", help="'digits', an image folder or a datasets name")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--image_column", type=str, default="image")
    p.add_argument("--label_column", type=str, default=None, help="class labels for class-conditional networks")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    # optimization
    p.add_argument("--train_batch_size", type=int, default=32, help="per device")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.99)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    # SCMLoss (SPEC.md section 3)
    p.add_argument("--P_mean", type=float, default=-1.0)
    p.add_argument("--P_std", type=float, default=1.4)
    p.add_argument("--tangent_warmup_steps", type=int, default=10000)
    p.add_argument("--tangent_norm_c", type=str, default="0.1", help="a number, or 'none' to switch it off")
    p.add_argument("--tangent_norm", choices=["l2", "rms"], default="l2")
    p.add_argument("--prior_weighting", choices=["none", "inverse_sigma"], default="none")
    p.add_argument("--no_adaptive_weighting", action="store_true")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--jvp_method", choices=["forward_ad", "func", "finite_difference"], default="forward_ad")
    p.add_argument("--jvp_dtype", choices=["float32", "auto"], default="float32", help="'auto': the step's dtype")
    p.add_argument("--jvp_backend", choices=["auto", "math", "blocked", "triton"], default="auto")
    # EMA
    p.add_argument("--ema_sigma_rel", type=float, default=None, help="EDM2 power EMA (default 0.05)")
    p.add_argument("--ema_decay", type=float, default=None, help="constant-decay EMA instead")
    # checkpoints, validation, logging
    p.add_argument("--output_dir", type=str, default="scm-student")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--num_validation_images", type=int, default=16)
    p.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none")
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.method == "scd" and args.teacher is None:
        p.error("--method scd needs --teacher")
    if args.teacher is None and args.student is None:
        p.error("--method sct needs --student or --teacher to initialize the student")
    args.tangent_norm_c = None if args.tangent_norm_c.lower() == "none" else float(args.tangent_norm_c)
    return args


def student_scheduler(student) -> TrigFlowScheduler:
    """The consistency sampler of the student's parameterization."""
    p = student.parameterization
    return TrigFlowScheduler(parameterization=p.name, **p.config())


def build_models(args):
    teacher = load_teacher(args.teacher, args.teacher_parameterization, args.sigma_data) if args.teacher else None
    if args.student is not None:
        init = load_teacher(args.student, args.teacher_parameterization, args.sigma_data)
    else:
        init = teacher
    if teacher is not None and init.parameterization.config() != teacher.parameterization.config():
        logger.warning(
            "Student and teacher parameterizations differ: %s vs %s", init.parameterization, teacher.parameterization
        )
    network = copy.deepcopy(init.inner_model).requires_grad_(True).train()
    student = TrigFlowDenoiser(network, init.parameterization, sigma_data=init.sigma_data)
    return teacher, student


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args, "scm-distill")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    teacher, student = build_models(args)
    sd = student.sigma_data
    if args.gradient_checkpointing:
        student.inner_model.enable_gradient_checkpointing()
    config = student.inner_model.config
    channels = config.get("in_channels", 1)
    conditional = args.label_column is not None or (
        args.dataset_name == "digits" and (config.get("num_class_embeds") or config.get("num_embeds_ada_norm"))
    )
    dataset = load_image_dataset(args.dataset_name, args.resolution, channels, args.image_column, args.label_column)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
    )
    logvar_head = LogVarHead()
    optimizer = torch.optim.Adam(
        list(student.parameters()) + list(logvar_head.parameters()),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    student, logvar_head, optimizer, loader = accelerator.prepare(student, logvar_head, optimizer, loader)
    if teacher is not None:
        teacher.to(accelerator.device)
    ema = make_ema(accelerator.unwrap_model(student).inner_model, args.ema_sigma_rel, args.ema_decay)
    # times and noise come from a generator of their own, saved in checkpoints: a resumed run draws what the
    # uninterrupted run would have drawn
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(
        args.seed * 1000 + accelerator.process_index
    )
    state = {
        "modules": {"student": student, "logvar_head": logvar_head},
        "optimizer": optimizer,
        "ema": ema,
        "generators": {"noise": noise_generator},
    }
    loss_fn = SCMLoss(
        sigma_data=sd,
        P_mean=args.P_mean,
        P_std=args.P_std,
        tangent_warmup_steps=args.tangent_warmup_steps,
        tangent_norm_c=args.tangent_norm_c,
        tangent_norm=args.tangent_norm,
        prior_weighting=args.prior_weighting,
        adaptive_weighting=not args.no_adaptive_weighting,
        guidance_scale=args.guidance_scale,
        jvp_method=args.jvp_method,
        jvp_dtype=torch.float32 if args.jvp_dtype == "float32" else None,
        jvp_backend=args.jvp_backend,
    )
    global_step, skipped = 0, 0
    if args.resume_from_checkpoint:
        found = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if found is None:
            logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
        else:
            global_step = load_checkpoint(accelerator, found[0], **state)
            logger.info("Resumed from %s (step %d).", found[0], global_step)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    first_epoch = global_step // steps_per_epoch
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="sCD" if teacher else "sCT",
        disable=not accelerator.is_local_main_process,
    )

    for epoch in range(first_epoch, math.ceil(args.max_train_steps / steps_per_epoch) + 1):
        if global_step >= args.max_train_steps:
            break
        loader.set_epoch(epoch)
        done_in_epoch = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch > 0 else loader
        for batch in batches:
            with accelerator.accumulate(student, logvar_head):
                x0 = to_model_channels(batch["pixel_values"], channels)
                cond = {"class_labels": batch["class_labels"]} if conditional and "class_labels" in batch else {}
                g = noise_generator
                t = lognormal_times(x0.shape[0], args.P_mean, args.P_std, sd, device=g.device, generator=g)
                noise = torch.randn(x0.shape, generator=g, device=g.device)
                with accelerator.autocast():
                    loss, logs = loss_fn(
                        student,
                        x0,
                        teacher=teacher,
                        step=global_step,
                        t=t,
                        noise=noise,
                        logvar_head=logvar_head if not args.no_adaptive_weighting else None,
                        **cond,
                    )
                finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()
                if finite:
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                    optimizer.step()
                else:  # a non-finite loss skips the step on every process (SPEC.md pitfall 9)
                    skipped += 1
                    logger.warning("Non-finite loss at step %d: step skipped (%d so far).", global_step, skipped)
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                ema.step(accelerator.unwrap_model(student).inner_model)
                global_step += 1
                progress.update(1)
                mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
                log = {
                    "loss": mean_loss,
                    "tangent_norm": logs["tangent_norm"].mean().item(),
                    "logvar": logs["logvar"].mean().item(),
                    "nonfinite_samples": int(logs["nonfinite"]),
                    "skipped_steps": skipped,
                    "warmup_ratio": logs["warmup_ratio"],
                    "lr": optimizer.param_groups[0]["lr"],
                    **time_bucket_logs(logs),
                }
                if finite and grad_norm is not None:
                    log["grad_norm"] = float(grad_norm)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                accelerator.log(log, step=global_step)
                if accelerator.is_main_process:
                    with open(os.path.join(args.output_dir, "loss_log.jsonl"), "a") as f:
                        f.write(json.dumps({"step": global_step, "loss": mean_loss}) + "\n")
                if global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint(
                        accelerator, args.output_dir, global_step, **state, total_limit=args.checkpoints_total_limit
                    )
                    logger.info("Saved %s", path)
                if accelerator.is_main_process and global_step % args.validation_steps == 0:
                    unwrapped = accelerator.unwrap_model(student)
                    log_validation(
                        accelerator,
                        args.output_dir,
                        ema.averaged_model(unwrapped.inner_model).eval(),
                        student_scheduler(unwrapped),
                        global_step,
                        (1, 2),
                        args.num_validation_images,
                        conditional,
                    )
                if global_step >= args.max_train_steps:
                    break

    finish_training(
        accelerator,
        args.output_dir,
        student,
        ema,
        student_scheduler(accelerator.unwrap_model(student)),
        global_step,
        skipped,
    )


if __name__ == "__main__":
    main()
