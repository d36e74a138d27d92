"""Train a TrigFlow diffusion model (a teacher) with accelerate (SPEC.md section 1).

    accelerate launch examples/train_teacher.py --preset tiny --dataset_name digits --resolution 16 \
        --train_batch_size 64 --max_train_steps 5000 --output_dir digits-teacher

The network is an `SCMUNet2DModel` (a preset, or `--model` to continue from a saved one), trained with the TrigFlow
diffusion loss and EDM2-style uncertainty weighting (`LogVarHead`), the TrigFlow teacher time proposal, an EMA, and
the data, logging, checkpointing and resuming of `distill.py`. The EMA model is saved as an `SCMPipeline` folder with a
`TrigFlowODEScheduler`, which `distill.py --teacher` accepts directly.
"""

import argparse
import logging

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from diffusers_scm import SCMUNet2DModel, TrigFlowDenoiser, TrigFlowODEScheduler
from diffusers_scm.models import PRESETS
from diffusers_scm.training import TrigFlowDiffusionLoss, load_teacher, lognormal_times
from diffusers_scm.training.data import load_image_dataset, to_model_channels
from diffusers_scm.training.script_utils import (
    add_common_args,
    finish_training,
    log_validation,
    make_accelerator,
    positive_int,
    prepare_training,
    publish_pipeline,
    train_loop,
)


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="SCMUNet2DModel size")
    p.add_argument("--model", type=str, default=None, help="continue from a saved SCMPipeline or network folder")
    p.add_argument(
        "--channels", type=positive_int, default=None, help="image channels (default: 1 for digits, else 3)"
    )
    p.add_argument("--class_conditional", action="store_true", help="condition on --label_column (digits: labels)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sigma_data", type=float, default=0.5)
    p.add_argument("--P_mean", type=float, default=-0.8, help="teacher time proposal (SPEC.md section 3)")
    p.add_argument("--P_std", type=float, default=1.6)
    p.add_argument("--no_adaptive_weighting", action="store_true")
    p.add_argument(
        "--validation_nfe", type=positive_int, nargs="+", default=[8, 32], help="ODE steps of the validation grids"
    )
    add_common_args(p, output_dir="trigflow-teacher")
    p.set_defaults(learning_rate=2e-4)
    return p.parse_args(argv)


def build_model(args) -> TrigFlowDenoiser:
    if args.model is not None:
        teacher = load_teacher(args.model, "trigflow", args.sigma_data)
        return TrigFlowDenoiser(teacher.inner_model.requires_grad_(True).train(), "trigflow", args.sigma_data)
    channels = args.channels or (1 if args.dataset_name == "digits" else 3)
    num_classes = 10 if args.class_conditional and args.dataset_name == "digits" else None
    if args.class_conditional and num_classes is None:
        raise ValueError("--class_conditional outside the digits data needs a network with classes: pass --model.")
    network = SCMUNet2DModel.from_preset(
        args.preset, sample_size=args.resolution, in_channels=channels, num_classes=num_classes, dropout=args.dropout
    )
    return TrigFlowDenoiser(network.train(), "trigflow", sigma_data=args.sigma_data)


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args, "trigflow-teacher")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    model = build_model(args)
    if args.gradient_checkpointing:
        model.inner_model.enable_gradient_checkpointing()
    config = model.inner_model.config
    channels = config.get("in_channels", 1)
    conditional = args.class_conditional or args.label_column is not None
    label_column = args.label_column or ("label" if conditional and args.dataset_name != "digits" else None)
    dataset = load_image_dataset(
        args.dataset_name,
        args.resolution,
        channels,
        args.image_column,
        label_column,
        skip_bad_images=args.skip_bad_images,
    )
    model, logvar_head, optimizer, loader, ema, noise_generator, state = prepare_training(
        args, accelerator, model, dataset, "model"
    )
    loss_fn = TrigFlowDiffusionLoss(args.sigma_data, args.P_mean, args.P_std)
    scheduler = TrigFlowODEScheduler(sigma_data=args.sigma_data, parameterization="trigflow", solver="dpmsolver++")

    def compute_loss(batch, step):
        x0 = to_model_channels(batch["pixel_values"], channels)
        cond = {"class_labels": batch["class_labels"]} if conditional and "class_labels" in batch else {}
        g = noise_generator
        t = lognormal_times(x0.shape[0], args.P_mean, args.P_std, args.sigma_data, device=g.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        head = None if args.no_adaptive_weighting else logvar_head
        return loss_fn(model, x0, t=t, noise=noise, logvar_head=head, **cond)

    def ema_pipeline_parts():
        network = ema.averaged_model(accelerator.unwrap_model(model).inner_model).eval()
        return network, TrigFlowODEScheduler.from_config(scheduler.config)

    def validate(step):
        network, sampler = ema_pipeline_parts()
        log_validation(
            accelerator,
            args.output_dir,
            network,
            sampler,
            step,
            args.validation_nfe,
            args.num_validation_images,
            conditional,
        )

    steps, counters = train_loop(
        args,
        accelerator,
        model,
        optimizer,
        loader,
        ema,
        state,
        compute_loss,
        validate,
        desc="teacher",
        accumulate=(model, logvar_head),
        pipeline_parts=ema_pipeline_parts,
    )
    finish_training(accelerator, args.output_dir, model, ema, scheduler, steps, counters)
    publish_pipeline(args, accelerator, sample_steps=args.validation_nfe)


if __name__ == "__main__":
    main()
