"""Train a TrigFlow diffusion model (a teacher) with accelerate (SPEC.md section 1).

    accelerate launch examples/train_teacher.py --preset tiny --dataset_name digits --resolution 16 \
        --train_batch_size 64 --max_train_steps 5000 --output_dir digits-teacher

The network is an `SCMUNet2DModel` (a preset, or `--model` to continue from a saved one), trained with the TrigFlow
diffusion loss and EDM2-style uncertainty weighting (`LogVarHead`), the TrigFlow teacher time proposal, an EMA, and
the data, logging, checkpointing and resuming of `distill.py`. The EMA model is saved as an `SCMPipeline` folder with a
`TrigFlowODEScheduler`, which `distill.py --teacher` accepts directly.

`--objective edm` trains any network the EDM way (SPEC.md section 10): EDM's loss weighting and log-normal noise levels
(ln sigma ~ N(P_mean, P_std^2), default EDM2's ImageNet-512 -0.4, 1.0), and EDM2's uncertainty weighting through the
network's own log-variance output (`EDM2UNet2DModel`; other networks: the `LogVarHead`). The network: an
`EDM2UNet2DModel` of a published size (`--edm2_preset img512-xs`, its architecture with the data's resolution,
channels and classes), any network from a config file (`--model_config`, the class from its `_class_name` in
diffusers_scm or diffusers, e.g. an `EDM2UNet2DModel` with small `model_channels`), a saved one (`--model`), or by
default the `--preset` SCMUNet2DModel. EDM-family and other diffusers networks run in EDM's preconditioning (the "edm"
parameterization, c_noise = ln(sigma) / 4), an SCMUNet2DModel in TrigFlow's; the EMA network is saved with a
`TrigFlowODEScheduler` of that parameterization, which `load_teacher` and `distill.py --teacher` read:

    accelerate launch examples/train_teacher.py --objective edm --model_config examples/configs/edm2_digits.json \
        --dataset_name digits --resolution 8 --P_mean -0.8 --P_std 1.6 --output_dir digits-edm2

`--objective flow_matching` trains a latent text-to-image teacher in diffusers' conventions instead:

    accelerate launch examples/train_teacher.py --objective flow_matching --model_config sd3-digits.json \
        --vae digits-vae --dataset_name digits --resolution 32 --output_dir digits-sd3

the rectified-flow loss (SPEC.md section 2: x_s = (1 - s) x0 + s n, target n - x0, the network called as its family
pipeline calls it, SD3's logit-normal times), any diffusers network from a config file (`--model_config`, the class
from its `_class_name`; text-to-image families: SD3Transformer2DModel), the latents of `--vae` (an AutoencoderKL, e.g.
`train_vae.py`'s output), captions through small frozen text encoders with random weights and tokenizers over the
captions' words (built here, saved in the pipeline), encoded by the family pipeline's own `encode_prompt`, and
caption dropout for classifier-free guidance (`--caption_dropout`: the empty prompt's embeddings). The EMA network is
saved as a complete pipeline of its family (`StableDiffusion3Pipeline` with a `FlowMatchEulerDiscreteScheduler`),
which diffusers loads and samples from prompts, and which `distill.py --teacher` takes as a text-to-image teacher
(parameterization "flow_matching"). `--dataset_name digits` gives the captions "digit zero" .. "digit nine"; other
data: a captioned image folder (`metadata.jsonl`) or a `datasets` name with `--caption_column`.
"""

import argparse
import logging
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from diffusers_scm import SCMUNet2DModel, TrigFlowDenoiser, TrigFlowODEScheduler
from diffusers_scm.models import PRESETS
from diffusers_scm.models.unet_edm2 import EDM2_PRESETS, EDM2UNet2DModel
from diffusers_scm.training import TrigFlowDiffusionLoss, load_teacher
from diffusers_scm.training.data.captions import DIGIT_CAPTIONS, load_text_image_dataset
from diffusers_scm.training.data.encoded import CaptionCache, cache_latents
from diffusers_scm.training.data.images import load_image_dataset, to_model_channels
from diffusers_scm.training.machinery.arguments import add_common_args, positive_int
from diffusers_scm.training.machinery.loop import train_loop
from diffusers_scm.training.machinery.publishing import finish_training, log_validation, publish_pipeline
from diffusers_scm.training.machinery.run import prepare_training, training_run
from diffusers_scm.training.objectives.edm import EDMLoss
from diffusers_scm.training.objectives.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingLoss,
    FlowMatchingModel,
    drop_captions,
    network_from_config,
)
from diffusers_scm.training.objectives.objective import DiffusionObjective, EDMObjective, FlowMatchingObjective


logger = get_logger(__name__)

# --P_mean, --P_std of each objective: TrigFlow teachers (SPEC.md section 3), EDM2's ImageNet-512 values (section 10)
TIME_PROPOSALS = {"trigflow": (-0.8, 1.6), "edm": (-0.4, 1.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="SCMUNet2DModel size")
    p.add_argument("--model", type=str, default=None, help="continue from a saved SCMPipeline or network folder")
    p.add_argument(
        "--channels", type=positive_int, default=None, help="image channels (default: 1 for digits, else 3)"
    )
    p.add_argument("--class_conditional", action="store_true", help="condition on --label_column (digits: labels)")
    p.add_argument("--dropout", type=float, default=None, help="default 0 (an --edm2_preset: the preset's)")
    p.add_argument("--sigma_data", type=float, default=0.5)
    p.add_argument(
        "--P_mean", type=float, default=None, help="time proposal ln(sd tan t) ~ N(P_mean, P_std^2); trigflow: -0.8"
    )
    p.add_argument("--P_std", type=float, default=None, help="trigflow: 1.6; edm: EDM2's -0.4, 1.0 (img512)")
    p.add_argument("--no_adaptive_weighting", action="store_true", help="no uncertainty (log-variance) weighting")
    p.add_argument(
        "--validation_nfe", type=positive_int, nargs="+", default=[8, 32], help="ODE steps of the validation grids"
    )
    # --objective flow_matching: a latent text-to-image teacher of a diffusers family
    p.add_argument(
        "--objective",
        choices=["trigflow", "edm", "flow_matching"],
        default="trigflow",
        help="trigflow: an SCMUNet2DModel TrigFlow teacher; edm: EDM/EDM2's loss for any network (an EDM2 UNet); "
        "flow_matching: a text-to-image pipeline (rectified flow)",
    )
    p.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="edm, flow_matching: a network config.json (its _class_name from diffusers_scm or diffusers)",
    )
    p.add_argument(
        "--edm2_preset",
        choices=list(EDM2_PRESETS),
        default=None,
        help="edm: an EDM2UNet2DModel of a published size (resolution, channels and classes from the data)",
    )
    p.add_argument("--vae", type=str, default=None, help="flow_matching: an AutoencoderKL folder (train_vae.py)")
    p.add_argument("--caption_column", type=str, default="text", help="flow_matching: the captions' column")
    p.add_argument(
        "--cache_latents", action="store_true", help="flow_matching: encode every image once before training"
    )
    p.add_argument("--caption_dropout", type=float, default=0.1, help="flow_matching: empty-prompt rate (for CFG)")
    p.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal", help="SD3's time density")
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument(
        "--flow_shift",
        type=float,
        default=1.0,
        help="the saved FlowMatchEulerDiscreteScheduler's shift, also applied to the training times (as SD3)",
    )
    p.add_argument("--guidance_scale", type=float, default=4.0, help="flow_matching: CFG of the validation grids")
    p.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="flow_matching: grid prompts")
    add_common_args(p, output_dir="trigflow-teacher")
    p.set_defaults(learning_rate=2e-4)
    args = p.parse_args(argv)
    check_objective(p, args)
    if args.objective in TIME_PROPOSALS:
        P_mean, P_std = TIME_PROPOSALS[args.objective]
        args.P_mean = P_mean if args.P_mean is None else args.P_mean
        args.P_std = P_std if args.P_std is None else args.P_std
    return args


def check_objective(p, args):
    """Flags that belong to one objective only, and what --objective flow_matching needs."""
    if args.objective != "edm" and args.edm2_preset is not None:
        p.error("--edm2_preset needs --objective edm (EDM2's loss and uncertainty weighting).")
    if args.objective == "trigflow":
        flow_only = [f"--{name}" for name in ("model_config", "vae") if getattr(args, name) is not None]
        if flow_only:
            p.error(
                f"{' and '.join(flow_only)} need --objective flow_matching (a text-to-image teacher)"
                + (" or --objective edm (any network from a config)" if args.vae is None else "")
                + "."
            )
        return
    if args.objective == "edm":
        if args.vae is not None:
            p.error("--vae is for --objective flow_matching; --objective edm trains on the images themselves.")
        sources = [f"--{n}" for n in ("model", "model_config", "edm2_preset") if getattr(args, n) is not None]
        if len(sources) > 1:
            p.error(f"{' and '.join(sources)}: give one network (a saved one, a config file or an EDM2 preset).")
        return
    missing = [f"--{name}" for name in ("model_config", "vae") if getattr(args, name) is None]
    if missing:
        p.error(
            f"--objective flow_matching needs {' and '.join(missing)}: the network's diffusers config.json (e.g. an "
            "SD3Transformer2DModel) and the AutoencoderKL folder of the latent space (examples/train_vae.py)."
        )
    trigflow_only = [f"--{n}" for n in ("model", "class_conditional", "label_column", "channels") if getattr(args, n)]
    if trigflow_only:
        p.error(f"{', '.join(trigflow_only)}: TrigFlow teachers only; a flow_matching teacher is caption-conditioned.")
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}.")
    if getattr(args, "fsdp", False):
        p.error("--fsdp is not supported for flow_matching teachers yet: drop it (DDP replicates the network).")
    if args.push_to_hub or args.push_at_checkpoints:
        p.error(
            "--push_to_hub is not supported for flow_matching teachers yet: upload the output folder with "
            "`hf upload ORG/NAME OUTPUT_DIR`."
        )


def build_model(args) -> TrigFlowDenoiser:
    """The network to train, in TrigFlow: a saved one (`--model`), from `--model_config` or `--edm2_preset` (`--objective
    edm`), or an SCMUNet2DModel `--preset`. SCMUNet2DModel runs in TrigFlow, every other network in EDM's
    preconditioning (SPEC.md section 2)."""
    if args.model is not None:
        teacher = load_teacher(args.model, "trigflow" if args.objective == "trigflow" else None, args.sigma_data)
        network = teacher.inner_model.requires_grad_(True).train()
        return TrigFlowDenoiser(network, teacher.parameterization, sigma_data=teacher.sigma_data)
    channels = args.channels or (1 if args.dataset_name == "digits" else 3)
    num_classes = 10 if args.class_conditional and args.dataset_name == "digits" else None
    if args.class_conditional and num_classes is None and args.model_config is None:
        raise ValueError("--class_conditional outside the digits data needs a network with classes: pass --model.")
    if args.edm2_preset is not None:
        dropout = {} if args.dropout is None else {"dropout": args.dropout}
        network = EDM2UNet2DModel.from_preset(
            args.edm2_preset,
            sample_size=args.resolution,
            in_channels=channels,
            num_classes=num_classes or 0,
            **dropout,
        )
    elif args.model_config is not None:
        network = network_from_any_config(args.model_config, args.resolution, channels, args.class_conditional)
    else:
        network = SCMUNet2DModel.from_preset(
            args.preset,
            sample_size=args.resolution,
            in_channels=channels,
            num_classes=num_classes,
            dropout=args.dropout or 0.0,
        )
    parameterization = "trigflow" if isinstance(network, SCMUNet2DModel) else "edm"
    return TrigFlowDenoiser(network.train(), parameterization, sigma_data=args.sigma_data)


def network_from_any_config(path: str, resolution: int, channels: int, conditional: bool):
    """A randomly initialized network from a config file (`config.json`, or its folder): the class named by its
    `_class_name`, from diffusers_scm (EDM2UNet2DModel, SongUNet2DModel, DhariwalUNet2DModel, SCMUNet2DModel) or
    diffusers; its sample size and input channels must be the data's."""
    import diffusers

    import diffusers_scm
    from diffusers_scm.utils import read_json

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"--model_config {path}: no such config file (a network's config.json, or its folder)."
        )
    config = read_json(file, fix="Write the network's config as JSON (the config.json of a diffusers model).")
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers_scm, str(name), None) or getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(
            f"{file}: _class_name {name!r} is not a network class of diffusers_scm or diffusers (e.g. "
            '{"_class_name": "EDM2UNet2DModel", "model_channels": 32, ...}).'
        )
    network = cls.from_config(config)
    size, in_channels = network.config.get("sample_size"), network.config.get("in_channels")
    if size not in (None, resolution) or in_channels not in (None, channels):
        raise ValueError(
            f"{file}: sample_size {size} and in_channels {in_channels}, but the data is {channels}x{resolution}x"
            f"{resolution} (--resolution, --channels); set them to {resolution} and {channels}."
        )
    classes = network.config.get("num_classes") or network.config.get("num_class_embeds")
    if conditional and not classes:
        raise ValueError(f"--class_conditional: the network of {file} has no classes; set its num_classes.")
    return network


def main(argv=None):
    args = parse_args(argv)
    flow = args.objective == "flow_matching"
    project = "flow-matching-teacher" if flow else "trigflow-teacher"
    with training_run(args, project) as accelerator:  # locks --output_dir; ends through end_run
        (train_flow_matching if flow else train_trigflow)(args, accelerator)


def train_trigflow(args, accelerator):
    """The TrigFlow teacher (--objective trigflow) or EDM/EDM2 training of any network (--objective edm): see the
    module docstring."""
    from diffusers_scm.training.machinery.fsdp import is_sharded

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
    denoiser = accelerator.unwrap_model(model)
    p = denoiser.parameterization
    logger.info(
        "%s: %d parameters, parameterization %s, --objective %s (P_mean %g, P_std %g)",
        type(denoiser.inner_model).__name__,
        sum(w.numel() for w in denoiser.inner_model.parameters()),
        p.name,
        args.objective,
        args.P_mean,
        args.P_std,
    )
    edm = args.objective == "edm"
    loss_fn = (EDMLoss if edm else TrigFlowDiffusionLoss)(args.sigma_data, args.P_mean, args.P_std)
    sampler = p.config() if p.name != "trigflow" else {"sigma_data": args.sigma_data}
    scheduler = TrigFlowODEScheduler(parameterization=p.name, **sampler, solver="dpmsolver++")

    def inputs(batch):  # x0, class labels, no guidance
        x0 = to_model_channels(batch["pixel_values"], channels)
        return x0, ({"class_labels": batch["class_labels"]} if conditional and "class_labels" in batch else {}), {}

    head = None if args.no_adaptive_weighting else logvar_head
    if edm:  # EDM2: the network's own log-variance head where it has one (not reachable in a sharded network)
        own = not args.no_adaptive_weighting and not is_sharded(denoiser)
        objective = EDMObjective(loss_fn, model, inputs, noise_generator, network_logvar=own, logvar_head=head)
        if objective.logvar_head is logvar_head and logvar_head is not None:
            logger.info("Uncertainty weighting: the LogVarHead (the network has no log-variance head of its own).")
    else:
        objective = DiffusionObjective(loss_fn, model, inputs, noise_generator, logvar_head=head)

    def ema_pipeline_parts():
        network = ema.averaged_model(accelerator.unwrap_model(model).inner_model)  # FSDP: None off the main process
        return network and network.eval(), TrigFlowODEScheduler.from_config(scheduler.config)

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
        objective,
        validate,
        desc="teacher",
        accumulate=(model, logvar_head),
        pipeline_parts=ema_pipeline_parts,
    )
    finish_training(accelerator, args.output_dir, model, ema, scheduler, steps, counters)
    publish_pipeline(args, accelerator, sample_steps=args.validation_nfe)


# ---- --objective flow_matching ---------------------------------------------------------------------------------------
def flow_teacher_parts(args, captions):
    """The network (random, from --model_config), the frozen VAE and text components, and the family pipeline class."""
    import diffusers

    from diffusers_scm.conditioning import LatentCodec
    from diffusers_scm.training.data.text_encoders import text_components, text_to_image_family

    network = network_from_config(args.model_config)
    family = text_to_image_family(network)  # an error naming the supported classes for others
    vae = diffusers.AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    codec = LatentCodec(vae, sample=False)
    size, channels = args.resolution // codec.scale_factor, codec.latent_channels
    config = network.config
    if args.resolution % codec.scale_factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE's factor {codec.scale_factor}.")
    if config.get("in_channels") != channels:
        raise ValueError(
            f"{args.model_config}: in_channels = {config.get('in_channels')}, but the VAE {args.vae} has "
            f"{channels} latent channels; set in_channels (and out_channels) to {channels}."
        )
    if config.get("sample_size") not in (None, size):
        raise ValueError(
            f"{args.model_config}: sample_size = {config.get('sample_size')}, but --resolution {args.resolution} gives "
            f"{size}x{size} latents (VAE factor {codec.scale_factor}); set sample_size to {size}, the size the "
            "family pipeline samples by default."
        )
    text = text_components(network, captions, seed=args.seed)
    return network, vae, text, getattr(diffusers, family.pipeline)


def family_pipeline(pipeline_class, network, vae, text, args):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=args.flow_shift)
    pipe = pipeline_class(transformer=network, vae=vae, scheduler=scheduler, **text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def flow_sample_grids(pipe, prompts, args, folder, name, accelerator=None, step=None):
    """One image per prompt for each --validation_nfe, sampled by the family pipeline itself (Euler, CFG at
    --guidance_scale, fixed seeds), saved as `folder/{name}-{n}step.png` and logged to the trackers."""
    from diffusers.utils import numpy_to_pil

    from diffusers_scm.families import prompt_sequence_length
    from diffusers_scm.utils import square_image_grid

    os.makedirs(folder, exist_ok=True)
    grids = {}
    length = prompt_sequence_length(pipe)  # the T5 length the teacher trains with (its tokenizer's model_max_length)
    for steps in args.validation_nfe:
        images = pipe(
            prompt=list(prompts),
            **({} if length is None else {"max_sequence_length": length}),
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            height=args.resolution,
            width=args.resolution,
            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
            output_type="np",
        ).images
        square_image_grid(numpy_to_pil(images)).save(os.path.join(folder, f"{name}-{steps}step.png"))
        grids[steps] = images
    for tracker in accelerator.trackers if accelerator is not None else ():
        if tracker.name == "tensorboard":
            for steps, images in grids.items():
                tracker.writer.add_images(f"validation/{steps}-step", images, step, dataformats="NHWC")
    return grids


def train_flow_matching(args, accelerator):
    """--objective flow_matching: see the module docstring."""
    from diffusers_scm.conditioning import LatentCodec
    from diffusers_scm.families import prompt_encoding
    from diffusers_scm.training.machinery.publishing import _write_summary, replica_check
    from diffusers_scm.training.machinery.run import end_run

    if accelerator.is_fsdp2 or accelerator.distributed_type.name == "FSDP":
        raise ValueError("FSDP is not supported for flow_matching teachers yet: launch without --use_fsdp (DDP).")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    dataset = load_text_image_dataset(
        args.dataset_name, args.resolution, args.image_column, args.caption_column, args.skip_bad_images
    )
    if not getattr(dataset, "has_images", True):
        raise ValueError(f"{args.dataset_name} holds captions without images: a teacher trains on captioned images.")
    captions = dataset.captions
    network, vae, text, pipeline_class = flow_teacher_parts(args, captions)
    if args.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    # the pipeline encodes prompts with its own encode_prompt; its network is the one being trained
    pipe = family_pipeline(pipeline_class, network, vae, text, args)
    encoding, codec = prompt_encoding(pipe), LatentCodec(vae, sample=False)
    for part in [vae, *(m for m in text.values() if isinstance(m, torch.nn.Module))]:
        part.to(accelerator.device)
    if args.cache_latents:
        dataset = cache_latents(dataset, codec, accelerator.device)
    model = FlowMatchingModel(network.train(), pipe.scheduler.config.num_train_timesteps)
    model, logvar_head, optimizer, loader, ema, noise_generator, state = prepare_training(
        args, accelerator, model, dataset, "model"
    )
    logger.info(
        "%s: %d parameters; %s, %d captions (%d distinct), CLIP length %d",
        type(network).__name__,
        sum(p.numel() for p in network.parameters()),
        pipeline_class.__name__,
        len(captions),
        len(set(captions)),
        text["tokenizer"].model_max_length,
    )
    loss_fn = FlowMatchingLoss(
        args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.flow_shift
    )
    prompts = args.validation_prompts or (
        list(DIGIT_CAPTIONS) if args.dataset_name == "digits" else sorted(set(captions))[:8]
    )

    text_cache = CaptionCache(encoding, accelerator.device)

    def inputs(batch):  # latents, captions (dropped at --caption_dropout for CFG), no teacher
        if "latents" in batch:  # --cache_latents
            x0 = batch["latents"].to(accelerator.device)
        else:
            x0 = codec.encode(batch["pixel_values"].to(accelerator.device))  # (z - shift_factor) * scaling_factor
        cond, uncond = text_cache(batch["caption"])
        cond = drop_captions(cond, uncond, args.caption_dropout, noise_generator)
        return x0, cond, {}

    objective = FlowMatchingObjective(loss_fn, model, inputs, noise_generator)

    def ema_pipeline():
        network = ema.averaged_model(accelerator.unwrap_model(model).inner_model).eval()
        return family_pipeline(pipeline_class, network, vae, text, args)

    def validate(step):
        folder = os.path.join(args.output_dir, "samples")
        flow_sample_grids(ema_pipeline(), prompts, args, folder, f"step-{step:07d}", accelerator, step)

    steps, counters = train_loop(
        args,
        accelerator,
        model,
        optimizer,
        loader,
        ema,
        state,
        objective,
        validate,
        desc="flow-matching teacher",
        accumulate=(model, logvar_head),
    )
    replicas = replica_check(accelerator, model)
    end_run(accelerator)  # trackers and process group: the main process saves and samples alone
    if accelerator.is_main_process:
        _write_summary(args.output_dir, accelerator, steps, counters, **replicas)
        final = ema_pipeline()
        final.save_pretrained(args.output_dir, safe_serialization=True)
        logger.info("Saved the EMA %s to %s", pipeline_class.__name__, args.output_dir)
        reloaded = pipeline_class.from_pretrained(args.output_dir).to(accelerator.device)
        reloaded.set_progress_bar_config(disable=True)
        grids = flow_sample_grids(reloaded, prompts, args, os.path.join(args.output_dir, "samples"), "final")
        from diffusers.utils import numpy_to_pil

        from diffusers_scm.hub import SAMPLE_GRID
        from diffusers_scm.utils import square_image_grid

        square_image_grid(numpy_to_pil(grids[max(grids)])).save(os.path.join(args.output_dir, SAMPLE_GRID))


if __name__ == "__main__":
    main()
