"""Continuous-time consistency distillation (sCD) and training (sCT) with accelerate (SPEC.md section 3).

    accelerate launch examples/distill.py --teacher path/or/hub-id --method scd --dataset_name digits \
        --resolution 16 --train_batch_size 64 --max_train_steps 2000 --output_dir student

The teacher is any diffusers pipeline or network folder whose parameterization `load_teacher` infers (EDM, flow
matching, DDPM eps/v, TrigFlow). The student starts as a copy of the teacher's network (or `--student`), is trained
with `SCMLoss`, and its EMA is saved as an `SCMPipeline` folder with a `TrigFlowScheduler` for its parameterization.
"""

import argparse
import copy
import logging

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from diffusers_scm import TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.training import SCMLoss, load_teacher, lognormal_times
from diffusers_scm.training.data import load_image_dataset, to_model_channels
from diffusers_scm.training.script_utils import (
    add_common_args,
    finish_training,
    log_validation,
    make_accelerator,
    prepare_training,
    train_loop,
)


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--teacher", type=str, default=None, help="teacher pipeline/network folder or Hub id")
    p.add_argument("--teacher_parameterization", type=str, default=None, help="override the inferred one")
    p.add_argument("--student", type=str, default=None, help="initial student (default: a copy of the teacher)")
    p.add_argument("--method", choices=["scd", "sct"], default="scd")
    p.add_argument("--sigma_data", type=float, default=None, help="data std (default: the teacher's, else 0.5)")
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
    add_common_args(p, output_dir="scm-student")
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
        args.dataset_name == "digits"
        and (config.get("num_class_embeds") or config.get("num_embeds_ada_norm") or config.get("num_classes"))
    )
    dataset = load_image_dataset(args.dataset_name, args.resolution, channels, args.image_column, args.label_column)
    student, logvar_head, optimizer, loader, ema, noise_generator, state = prepare_training(
        args, accelerator, student, dataset, "student"
    )
    if teacher is not None:
        teacher.to(accelerator.device)
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

    def compute_loss(batch, step):
        x0 = to_model_channels(batch["pixel_values"], channels)
        cond = {"class_labels": batch["class_labels"]} if conditional and "class_labels" in batch else {}
        g = noise_generator
        t = lognormal_times(x0.shape[0], args.P_mean, args.P_std, sd, device=g.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        head = logvar_head if not args.no_adaptive_weighting else None
        return loss_fn(student, x0, teacher=teacher, step=step, t=t, noise=noise, logvar_head=head, **cond)

    def validate(step):
        unwrapped = accelerator.unwrap_model(student)
        network = ema.averaged_model(unwrapped.inner_model).eval()
        log_validation(
            accelerator,
            args.output_dir,
            network,
            student_scheduler(unwrapped),
            step,
            (1, 2),
            args.num_validation_images,
            conditional,
        )

    global_step, skipped = train_loop(
        args,
        accelerator,
        student,
        optimizer,
        loader,
        ema,
        state,
        compute_loss,
        validate,
        desc="sCD" if teacher else "sCT",
        accumulate=(student, logvar_head),
    )
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
