"""Consistency distillation and training with accelerate: continuous-time sCD / sCT (SPEC.md section 3), discrete-time
CD / CT (ECT-style) and truncated consistency models (TCM, SPEC.md section 5).

    accelerate launch examples/distill.py --teacher path/or/hub-id --method scd --dataset_name digits \
        --resolution 16 --train_batch_size 64 --max_train_steps 2000 --output_dir student

`--method tcm` trains Stage 1 (`--tcm_stage1_method`, saved in `OUTPUT_DIR/stage1/`) and then Stage 2 from the Stage-1
EMA weights on t >= t' (`--tcm_objective` discrete or continuous), or only Stage 2 with `--stage1_model PATH`. The
Stage-2 student's scheduler config records t' and the two-step intermediate time. `--dmd_weight W` adds rCM's score
regularization to sCD (after the tangent warmup) or to TCM's continuous Stage 2: DMD's reverse-divergence gradient from
a fake-score network that follows the student (`diffusers_scm.training.DMDLoss`).

The teacher is any diffusers pipeline or network folder whose parameterization `load_teacher` infers (EDM, flow
matching, DDPM eps/v, TrigFlow). `--guidance_model PATH --guidance_scale W` guides it the EDM2 way with a second,
smaller frozen network (EDM2's unconditional XS, or an autoguidance model): F = F_g + W (F - F_g) (SPEC.md section 10).
A latent teacher without text encoders (EDM2 converted with --vae) trains on its VAE's encoding of the images, and its
student keeps the VAE and the image range. The student starts as a copy of the teacher's network (or `--student`), is
trained with `SCMLoss`, and its EMA is saved as an `SCMPipeline` folder with a `TrigFlowScheduler` for its
parameterization.
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

from diffusers_scm import TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.adapters import get_adapter
from diffusers_scm.guidance import GuidedDenoiser
from diffusers_scm.training import ConsistencyLoss, SCMLoss, TCMLoss, load_teacher
from diffusers_scm.training.data.captions import load_text_image_dataset
from diffusers_scm.training.data.images import load_image_dataset, to_model_channels
from diffusers_scm.training.data.latent_cache import TextBatches
from diffusers_scm.training.machinery.arguments import add_common_args, non_negative_int, positive_int
from diffusers_scm.training.machinery.fsdp import is_sharded, shard_module
from diffusers_scm.training.machinery.loop import train_loop
from diffusers_scm.training.machinery.lora import BaseModelDenoiser, add_lora
from diffusers_scm.training.machinery.publishing import (
    finish_training,
    log_validation,
    publish_pipeline,
    teacher_decoder,
)
from diffusers_scm.training.machinery.run import adam, prepare_training, training_run
from diffusers_scm.training.objectives.dmd import DMDLoss
from diffusers_scm.training.objectives.objective import OBJECTIVES
from diffusers_scm.training.teacher import load_text_to_image_teacher


logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--teacher", type=str, default=None, help="teacher pipeline/network folder or Hub id")
    p.add_argument("--teacher_revision", type=str, default=None, help="branch, tag or commit of a Hub teacher")
    p.add_argument("--teacher_parameterization", type=str, default=None, help="override the inferred one")
    p.add_argument("--student", type=str, default=None, help="initial student (default: a copy of the teacher)")
    p.add_argument("--method", choices=["scd", "sct", "cd", "ct", "tcm"], default="scd")
    p.add_argument("--sigma_data", type=float, default=None, help="data std (default: the teacher's, else 0.5)")
    # SCMLoss (SPEC.md section 3)
    p.add_argument("--P_mean", type=float, default=-1.0)
    p.add_argument("--P_std", type=float, default=1.4)
    p.add_argument("--tangent_warmup_steps", type=non_negative_int, default=10000)
    p.add_argument("--tangent_norm_c", type=str, default="0.1", help="a number, or 'none' to switch it off")
    p.add_argument("--tangent_norm", choices=["l2", "rms"], default="l2")
    p.add_argument("--prior_weighting", choices=["none", "inverse_sigma"], default="none")
    p.add_argument("--no_adaptive_weighting", action="store_true")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="teacher CFG F_c + (w - 1)(F_c - F_u); with --guidance_model, w of F_g + w (F - F_g)",
    )
    p.add_argument(
        "--guidance_model",
        type=str,
        default=None,
        help="a second, smaller frozen network (folder or Hub id; EDM2's unconditional XS, or an autoguidance model) "
        "that guides the teacher the EDM2 way, F_g + w (F - F_g) with w = --guidance_scale, instead of CFG",
    )
    p.add_argument(
        "--guidance_scale_range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="draw w per sample and feed it to a student with a guidance input (Flux, Sana guidance embeddings)",
    )
    # text-to-image teachers (SPEC.md section 8)
    p.add_argument("--caption_column", type=str, default="text")
    p.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="prompts of the validation grids")
    p.add_argument(
        "--teacher_dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="frozen teacher, VAE and text encoders (the student keeps float32 master weights)",
    )
    p.add_argument(
        "--fsdp_shard_teacher",
        action="store_true",
        help="with FSDP (--fsdp or accelerate's): shard the frozen teacher (and TCM's Stage-1 network) per block too, "
        "instead of a full copy per process",
    )
    p.add_argument(
        "--teacher_ode_steps", type=int, default=16, help="prompt-only data: ODE steps of the teacher's own x0"
    )
    p.add_argument(
        "--num_frames",
        type=positive_int,
        default=None,
        help="video teachers (WanPipeline, ...): frames per clip, a count the VAE encodes whole (4k + 1 for Wan)",
    )
    # LoRA students (SPEC.md section 9)
    p.add_argument("--lora_rank", type=positive_int, default=None, help="train a LoRA adapter of this rank only")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument(
        "--lora_target_modules", type=str, default=None, help="comma-separated layer names (default: attention)"
    )
    p.add_argument(
        "--fuse_lora", action="store_true", help="save only the merged student (not the adapter file as well)"
    )
    p.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="latents and prompt embeddings cached once (examples/prepare_data.py); training from it loads neither "
        "the VAE nor the text encoders",
    )
    p.add_argument(
        "--rebuild_cache",
        action="store_true",
        help="write the --cache_dir cache again when it is incomplete or was made with other settings (teacher, "
        "--resolution, --teacher_dtype) instead of stopping with an error",
    )
    p.add_argument("--jvp_method", choices=["forward_ad", "func", "finite_difference"], default="forward_ad")
    p.add_argument("--jvp_dtype", choices=["float32", "auto"], default="float32", help="'auto': the step's dtype")
    p.add_argument("--jvp_backend", choices=["auto", "math", "blocked", "triton"], default="auto")
    p.add_argument(
        "--intermediate_timestep",
        type=float,
        default=None,
        help="two-step middle time recorded in the saved scheduler (default 1.1, sCM's; TCM: --tcm_intermediate_timestep)",
    )
    # ConsistencyLoss: --method cd / ct and discrete TCM stages (SPEC.md section 5)
    p.add_argument("--consistency_distance", choices=["pseudo_huber", "squared_l2"], default="pseudo_huber")
    p.add_argument("--huber_c", type=float, default=None, help="pseudo-Huber c (default 0.00054 sqrt(D))")
    p.add_argument(
        "--consistency_weighting",
        choices=["inverse_dsigma", "inverse_dt", "inverse_c_out_sq", "none"],
        default="inverse_dsigma",
    )
    p.add_argument("--dt_q", type=float, default=2.0, help="the step shrinks by this factor every stage")
    p.add_argument(
        "--dt_stage_steps", type=positive_int, default=None, help="steps per stage (default: a stage's steps / 8)"
    )
    p.add_argument("--dt_ratio_limit", type=float, default=0.999)
    p.add_argument(
        "--dt_start_stage", type=non_negative_int, default=0, help="cd / ct: to continue a schedule (e.g. --student)"
    )
    # TCM (SPEC.md section 5)
    p.add_argument("--tcm_stage1_method", choices=["scd", "sct", "cd", "ct"], default=None, help="default: scd/sct")
    p.add_argument("--tcm_objective", choices=["discrete", "continuous"], default=None, help="default: Stage 1's")
    p.add_argument("--stage1_model", type=str, default=None, help="a trained Stage-1 model: run only Stage 2")
    p.add_argument("--tcm_dividing_timestep", type=float, default=None, help="t' (default arctan(1 / sigma_data))")
    p.add_argument("--tcm_intermediate_timestep", type=float, default=None, help="two-step middle time (default t')")
    p.add_argument("--tcm_boundary_prob", type=float, default=0.25)
    p.add_argument("--tcm_boundary_weight", type=float, default=None, help="default 0.1 discrete, 1.0 continuous")
    p.add_argument("--tcm_time_proposal", choices=["student_t", "lognormal"], default="student_t")
    p.add_argument("--tcm_proposal_loc", type=float, default=0.0, help="of ln(sigma)")
    p.add_argument("--tcm_proposal_scale", type=float, default=0.2, help="of ln(sigma)")
    p.add_argument("--tcm_proposal_df", type=float, default=0.01)
    p.add_argument("--stage2_learning_rate", type=float, default=None, help="default: half of --learning_rate")
    p.add_argument("--stage2_train_batch_size", type=positive_int, default=None, help="default: --train_batch_size")
    p.add_argument("--stage2_max_train_steps", type=positive_int, default=None, help="default: --max_train_steps")
    p.add_argument("--stage2_tangent_warmup_steps", type=non_negative_int, default=0, help="continuous Stage 2")
    p.add_argument(
        "--stage2_start_stage",
        type=non_negative_int,
        default=None,
        help="discrete Stage 2: first stage of the step schedule (default: where a discrete Stage 1 of this run "
        "ended, else the first stage at --dt_ratio_limit)",
    )
    # score regularization (rCM): DMD's reverse-divergence gradient beside the sCM loss (diffusers_scm.training.objectives.dmd)
    p.add_argument(
        "--dmd_weight",
        type=float,
        default=0.0,
        help="weight of the distribution-matching term (0: off); --method scd, and TCM's continuous Stage 2",
    )
    p.add_argument("--dmd_fake_updates", type=positive_int, default=4, help="fake-score updates per student update")
    p.add_argument("--dmd_fake_learning_rate", type=float, default=None, help="default: --learning_rate")
    p.add_argument("--dmd_P_mean", type=float, default=0.0, help="time proposal of the noised student samples")
    p.add_argument("--dmd_P_std", type=float, default=1.6)
    p.add_argument(
        "--dmd_sample_steps",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: the term acts on the student's 1- and 2-step samples, in turn (2-step: through the middle time)",
    )
    p.add_argument(
        "--dmd_step_weights",
        type=float,
        nargs="+",
        default=None,
        help="with --dmd_sample_steps 2: relative frequencies of 1- and 2-step batches (default: 1 1)",
    )
    p.add_argument(
        "--dmd_start_step",
        type=non_negative_int,
        default=None,
        help="first step with the term (default: --tangent_warmup_steps; TCM Stage 2: 0)",
    )
    add_common_args(p, output_dir="scm-student")
    args = p.parse_args(argv)
    if args.method in ("scd", "cd") and args.teacher is None:
        p.error(f"--method {args.method} needs --teacher")
    if args.lora_rank is not None and args.method == "tcm":
        p.error("--lora_rank trains one adapter of one stage: use it with --method scd, sct, cd or ct")
    if args.stage1_model is not None and args.method != "tcm":
        p.error("--stage1_model is for --method tcm")
    if args.method == "tcm":
        if args.tcm_stage1_method is None:
            args.tcm_stage1_method = "scd" if args.teacher else "sct"
        if args.tcm_objective is None:
            args.tcm_objective = "continuous" if args.tcm_stage1_method in ("scd", "sct") else "discrete"
        if args.stage1_model is None and args.tcm_stage1_method in ("scd", "cd") and args.teacher is None:
            p.error(
                f"--method tcm with --tcm_stage1_method {args.tcm_stage1_method} needs --teacher; or give "
                "--stage1_model PATH to run only Stage 2 (consistency training without a teacher)"
            )
    if args.method == "tcm" and not (args.teacher or args.student or args.stage1_model):
        p.error("--method tcm needs --teacher, --student (to start Stage 1) or --stage1_model (Stage 2 only)")
    if args.teacher is None and args.student is None and args.method != "tcm":
        p.error(f"--method {args.method} needs --student or --teacher to initialize the student")
    if args.dmd_weight < 0:
        p.error(f"--dmd_weight must not be negative, got {args.dmd_weight}")
    if args.dmd_weight > 0:
        continuous = args.method == "scd" or (args.method == "tcm" and args.tcm_objective == "continuous")
        if not continuous or args.teacher is None:
            p.error(
                "--dmd_weight regularizes a continuous-time student with its teacher's score: use --method scd, or "
                "--method tcm with a continuous Stage 2 (--tcm_objective continuous), and --teacher"
            )
        if args.lora_rank is not None or args.fsdp:
            p.error(
                "--dmd_weight trains a full fake-score copy of the teacher beside the student, which is not sharded "
                "and has no LoRA form here: drop --lora_rank / --fsdp, or --dmd_weight"
            )
    if args.dmd_step_weights is None:
        args.dmd_step_weights = [1.0] * args.dmd_sample_steps
    if len(args.dmd_step_weights) != args.dmd_sample_steps or min(args.dmd_step_weights) < 0:
        p.error(
            f"--dmd_step_weights {args.dmd_step_weights}: give {args.dmd_sample_steps} non-negative frequencies, one "
            "per step count 1..--dmd_sample_steps"
        )
    if sum(args.dmd_step_weights) <= 0:
        p.error("--dmd_step_weights: at least one frequency must be positive")
    args.tangent_norm_c = None if args.tangent_norm_c.lower() == "none" else float(args.tangent_norm_c)
    if args.guidance_scale_range is not None and args.guidance_scale_range[0] > args.guidance_scale_range[1]:
        p.error(f"--guidance_scale_range {args.guidance_scale_range}: LO must not exceed HI")
    if args.guidance_model is not None:
        if args.teacher is None:
            p.error("--guidance_model guides the teacher: give --teacher (and --method scd, cd or tcm)")
        if args.guidance_scale_range is not None:
            p.error("--guidance_model guides with one --guidance_scale W: drop --guidance_scale_range")
    args.text_to_image = args.teacher is not None and text_to_image_family(args.teacher, args.teacher_revision)
    check_video_args(p, args)
    if args.text_to_image and args.dataset_name == "digits":
        p.error("A text-to-image teacher needs captioned data: --dataset_name FOLDER_OR_DATASET (--caption_column)")
    return args


def check_video_args(p, args):
    """A video teacher needs --num_frames, a count its VAE encodes whole (checked against the VAE's config before any
    weights load); an image teacher takes none."""
    from diffusers_scm.families import get_family

    family = get_family(args.text_to_image) if args.text_to_image else None
    video = family is not None and family.video
    if video and args.num_frames is None:
        p.error(f"{args.text_to_image} makes videos: pass --num_frames F (frames per clip, e.g. 81 for Wan)")
    if not video and args.num_frames is not None:
        p.error("--num_frames is for video teachers (WanPipeline, ...); this teacher makes images")
    if video:
        import types

        config = teacher_json(args.teacher, "vae/config.json", args.teacher_revision)
        if config is not None:
            codec = family.latent_codec(types.SimpleNamespace(config=config))
            try:
                codec.check_num_frames(args.num_frames, where=f"--num_frames: {args.teacher}'s VAE: ")
            except ValueError as e:
                p.error(str(e))


def teacher_json(teacher: str, filename: str, revision: str | None = None) -> dict | None:
    """A JSON file of a pipeline folder or Hub id (`model_index.json`, `vae/config.json`), None where there is none
    (a network repository has no model_index.json; a teacher without a VAE no vae/config.json)."""
    from diffusers_scm.hub.folders import local_folder
    from diffusers_scm.utils import read_json

    folder = local_folder(teacher)
    if folder is not None:
        path = os.path.join(folder, *filename.split("/"))
        return read_json(path) if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download

    try:
        return read_json(hf_hub_download(teacher, filename, revision=revision))
    except Exception:  # not in the repository
        return None


def load_text_data(args):
    """The captioned images, or (video teachers, --num_frames) clips, of --dataset_name; or its captions alone."""
    if args.num_frames is not None:
        from diffusers_scm.training.data.videos import load_text_video_dataset

        return load_text_video_dataset(
            args.dataset_name, args.resolution, args.num_frames, args.caption_column, args.skip_bad_images
        )
    return load_text_image_dataset(
        args.dataset_name, args.resolution, args.image_column, args.caption_column, args.skip_bad_images
    )


def text_to_image_family(teacher: str, revision: str | None = None) -> str | None:
    """The family pipeline class of a text-to-image teacher (its model_index.json), else None."""
    from diffusers_scm.families import is_family

    name = (teacher_json(teacher, "model_index.json", revision) or {}).get("_class_name")
    return name if is_family(name) else None


def student_scheduler(student, **kwargs) -> TrigFlowScheduler:
    """The consistency sampler of the student's parameterization (`kwargs`: e.g. TCM's dividing time). Flow-matching
    students start at t = pi/2 (s = 1, pure noise), as their family's own samplers do."""
    p = student.parameterization
    if p.name == "flow_matching":
        kwargs.setdefault("max_timesteps", math.pi / 2)
    return TrigFlowScheduler(parameterization=p.name, **p.config(), **kwargs)


def teacher_cfg_scale(args) -> float:
    """The classifier-free guidance scale of the losses: 1 when --guidance_model guides the teacher instead (its w is
    inside the guided teacher)."""
    return 1.0 if getattr(args, "guidance_model", None) else args.guidance_scale


def loss_cfg_scale(args) -> float:
    """The classifier-free guidance scale the losses apply themselves: `teacher_cfg_scale`, or 1 for a teacher whose
    network takes w as an input (Flux.1-dev, FLUX.2 [dev], HunyuanVideo: the batches carry w in its conditioning and
    make no unconditional branch)."""
    return 1.0 if getattr(args, "teacher_guidance_input", False) else teacher_cfg_scale(args)


def with_guidance_model(args, teacher):
    """The teacher guided by --guidance_model (loaded like the teacher: frozen, eval mode), F_g + w (F - F_g) with
    w = --guidance_scale (SPEC.md section 10); the teacher itself without it."""
    if teacher is None or not getattr(args, "guidance_model", None):
        return teacher
    if args.guidance_scale == 1.0:
        logger.warning("--guidance_model with --guidance_scale 1 does not guide: the guiding network is not loaded.")
        return teacher
    dtype = getattr(torch, args.teacher_dtype) if args.text_to_image else None
    guide = load_teacher(args.guidance_model, args.teacher_parameterization, args.sigma_data, torch_dtype=dtype)
    guided = GuidedDenoiser(teacher, guide, args.guidance_scale)
    if getattr(args, "t2i", None) is not None:  # prompt-only data: the teacher's own ODE samples are guided too
        args.t2i.denoiser = guided
    logger.info(
        "The teacher is guided by %s (%s) with w = %s.",
        args.guidance_model,
        type(guide.inner_model).__name__,
        args.guidance_scale,
    )
    return guided


def trainable(network):
    """`network` with gradients, except for the uncertainty head of EDM2 networks (`logvar_fourier`, `logvar_linear`,
    SPEC.md section 10), which the network's forward never calls, and the parameters its prediction never reads (its
    adapter's `unused_parameters`: Qwen-Image's last text-stream output): DDP waits for a gradient of every trainable
    parameter. The distillation's own adaptive-weighting head takes its place (SPEC.md section 3)."""
    network.requires_grad_(True)
    return freeze_unused(network, ("logvar_fourier.", "logvar_linear."))


def freeze_unused(network, prefixes=()):
    """`network` with the parameters under `prefixes` and its adapter's `unused_parameters` (LoRA adapters on them
    included) frozen."""
    prefixes = (*prefixes, *get_adapter(network).unused_parameters(network))
    for name, param in network.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return network


def build_models(args):
    teacher = None
    if args.text_to_image and getattr(args, "cache", None) is not None:  # the network only
        teacher = load_teacher(
            args.teacher,
            args.teacher_parameterization,
            args.sigma_data,
            torch_dtype=getattr(torch, args.teacher_dtype),
            revision=args.teacher_revision,
        )
        args.teacher_network = teacher.inner_model
    elif args.text_to_image:
        dtype = getattr(torch, args.teacher_dtype)
        args.t2i = load_text_to_image_teacher(
            args.teacher,
            args.teacher_parameterization,
            args.sigma_data,
            torch_dtype=dtype,
            revision=args.teacher_revision,
        )
        teacher = args.t2i.denoiser
    elif args.teacher:
        teacher = load_teacher(
            args.teacher, args.teacher_parameterization, args.sigma_data, revision=args.teacher_revision
        )
    network = getattr(teacher, "inner_model", None)
    args.teacher_guidance_input = bool(getattr(network, "config", {}).get("guidance_embeds", False))
    if args.student is not None:
        init = load_teacher(args.student, args.teacher_parameterization, args.sigma_data)
    else:
        init = teacher
    if teacher is not None and init.parameterization.config() != teacher.parameterization.config():
        logger.warning(
            "Student and teacher parameterizations differ: %s vs %s", init.parameterization, teacher.parameterization
        )
    if args.guidance_scale_range is not None and not init.inner_model.config.get("guidance_embeds", False):
        raise ValueError(
            f"--guidance_scale_range feeds w to the student's guidance input, but {type(init.inner_model).__name__} "
            "has none (Flux, and Sana with guidance_embeds=True, have one): use --guidance_scale W instead."
        )
    if args.lora_rank is not None:  # one copy: the teacher is the student's network with its adapters off
        network = student_source(init.inner_model)
        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        add_lora(network, args.lora_rank, args.lora_alpha, targets)
        freeze_unused(network).train()
        student = TrigFlowDenoiser(network, init.parameterization, sigma_data=init.sigma_data)
        if teacher is not None and (teacher.inner_model is network or network in teacher.inner_model.modules()):
            teacher = BaseModelDenoiser(teacher.inner_model, teacher.parameterization, sigma_data=teacher.sigma_data)
            if getattr(args, "t2i", None) is not None:
                args.t2i.denoiser = teacher
        return with_guidance_model(args, teacher), student
    network = trainable(copy.deepcopy(student_source(init.inner_model)).float()).train()  # float32 master weights
    student = TrigFlowDenoiser(network, init.parameterization, sigma_data=init.sigma_data)
    return with_guidance_model(args, teacher), student


def student_source(network):
    """The network a student starts from: the teacher's, or where the teacher calls several (Wan 2.2's experts,
    `TimestepExperts`), the one its `student_network()` names."""
    choose = getattr(network, "student_network", None)
    return choose() if callable(choose) else network


def build_loss(args, method: str, sigma_data: float, start_stage: int = 0):
    """The loss of one stage: `SCMLoss` (scd, sct), `ConsistencyLoss` (cd, ct) or `TCMLoss` (tcm Stage 2)."""
    if method == "tcm":
        objective = args.tcm_objective
        inner = build_loss(args, "scd" if objective == "continuous" else "cd", sigma_data, start_stage)
        return TCMLoss(
            objective,
            inner,
            sigma_data=sigma_data,
            dividing_timestep=args.tcm_dividing_timestep,
            boundary_prob=args.tcm_boundary_prob,
            boundary_weight=args.tcm_boundary_weight,
            time_proposal=args.tcm_time_proposal,
            proposal_loc=args.tcm_proposal_loc,
            proposal_scale=args.tcm_proposal_scale,
            proposal_df=args.tcm_proposal_df,
        )
    if method in ("cd", "ct"):
        return ConsistencyLoss(
            sigma_data=sigma_data,
            P_mean=args.P_mean,
            P_std=args.P_std,
            distance=args.consistency_distance,
            huber_c=args.huber_c,
            weighting=args.consistency_weighting,
            q=args.dt_q,
            stage_steps=dt_stage_steps(args),
            start_stage=start_stage,
            ratio_limit=args.dt_ratio_limit,
            guidance_scale=loss_cfg_scale(args),
        )
    return SCMLoss(
        sigma_data=sigma_data,
        P_mean=args.P_mean,
        P_std=args.P_std,
        tangent_warmup_steps=args.tangent_warmup_steps,
        tangent_norm_c=args.tangent_norm_c,
        tangent_norm=args.tangent_norm,
        prior_weighting=args.prior_weighting,
        adaptive_weighting=not args.no_adaptive_weighting,
        guidance_scale=loss_cfg_scale(args),
        jvp_method=args.jvp_method,
        jvp_dtype=torch.float32 if args.jvp_dtype == "float32" else None,
        jvp_backend=args.jvp_backend,
    )


def dt_stage_steps(args) -> int:
    """Steps per stage of the discrete step schedule: --dt_stage_steps, else an eighth of the stage's steps."""
    return args.dt_stage_steps or max(1, args.max_train_steps // 8)


def train_stage(args, accelerator, method: str, teacher, student, stage1=None, scheduler_kwargs=None, start_stage=0):
    """Train `student` with the loss of `method` (data, optimizer, EMA, checkpoints and validation in
    `args.output_dir`). Returns `(student, ema, global_step, counters)`."""
    sd = student.sigma_data
    if args.gradient_checkpointing:
        student.inner_model.enable_gradient_checkpointing()
    config = student.inner_model.config
    channels = config.get("in_channels", 1)
    conditional = args.label_column is not None or (
        args.dataset_name == "digits"
        and (config.get("num_class_embeds") or config.get("num_embeds_ada_norm") or config.get("num_classes"))
    )
    text = text_batches(args) if args.text_to_image else None
    encode = None if text is not None else latent_encoder(args, config, accelerator.device)
    if text is not None:
        dataset = text_dataset(args, accelerator)
        conditional = False
    else:
        dataset = load_image_dataset(
            args.dataset_name,
            args.resolution,
            3 if encode is not None else channels,  # a latent teacher's data: RGB images, encoded by its VAE
            args.image_column,
            args.label_column,
            skip_bad_images=args.skip_bad_images,
        )
    stage1_method = {"--tcm_stage1_method": method} if args.method == "tcm" and method != "tcm" else None
    student, logvar_head, optimizer, loader, ema, noise_generator, state = prepare_training(
        args, accelerator, student, dataset, "student", teacher=teacher, record=stage1_method
    )
    if args.fsdp_shard_teacher and not is_sharded(accelerator.unwrap_model(student)):
        raise ValueError("--fsdp_shard_teacher shards beside a sharded student: add --fsdp (or launch with FSDP2).")
    frozen_parts = teacher.denoisers() if isinstance(teacher, GuidedDenoiser) else (teacher,)  # with its guide
    sharded = []
    for frozen in (*frozen_parts, stage1):
        if frozen is not None:
            frozen.to(accelerator.device)
            if args.fsdp_shard_teacher and is_sharded(accelerator.unwrap_model(student)) and not is_sharded(frozen):
                shard_module(frozen)  # frozen: all-gathered block by block at each forward, no optimizer state
                sharded.append(type(frozen.inner_model).__name__)
    if sharded:
        logger.info("--fsdp_shard_teacher: sharded %d frozen networks (%s).", len(sharded), ", ".join(sharded))
    loss_fn = build_loss(args, method, sd, start_stage)
    continuous = isinstance(loss_fn, SCMLoss) or getattr(loss_fn, "objective", None) == "continuous"
    head = logvar_head if continuous and not args.no_adaptive_weighting else None
    dmd = build_dmd(args, accelerator, teacher, student, state)

    def inputs(batch):  # x0, the network's conditioning, the teacher's guidance inputs
        if text is not None:  # latents, prompt conditioning, CFG's unconditional branch, w per sample
            x0, cond, uncond, w = text(batch, accelerator.device, noise_generator)
            return x0, cond, {"uncond_conditioning": uncond, "teacher_guidance": w}
        if encode is not None:  # images through the latent teacher's VAE
            x0 = encode(to_model_channels(batch["pixel_values"], 3), noise_generator)
        else:
            x0 = to_model_channels(batch["pixel_values"], channels)
        return x0, ({"class_labels": batch["class_labels"]} if conditional and "class_labels" in batch else {}), {}

    def regularizer(shape, cond, guidance, step):  # before the main loss: its own backward pass
        if step < dmd["start_step"]:
            return {}
        return dmd_step(args, accelerator, dmd, student, teacher, shape, cond, guidance, noise_generator)

    objective = OBJECTIVES[method](
        loss_fn,
        student,
        inputs,
        noise_generator,
        teacher=teacher,
        logvar_head=head,
        regularizer=regularizer if dmd is not None else None,
        regularizer_weight=args.dmd_weight or 0.0,
        **({"stage1": stage1} if stage1 is not None else {}),
    )

    def ema_pipeline_parts():
        unwrapped = accelerator.unwrap_model(student)
        network = ema.averaged_model(unwrapped.inner_model)  # FSDP: gathered on the main process, None elsewhere
        return network and network.eval(), student_scheduler(unwrapped, **(scheduler_kwargs or {}))

    def validate(step):
        network, scheduler = ema_pipeline_parts()
        log_validation(
            accelerator,
            args.output_dir,
            network,
            scheduler,
            step,
            (1, 2),
            args.num_validation_images,
            conditional,
            tracker_step=step + getattr(args, "log_step_offset", 0),
            components=student_components(args),
            prompts=validation_prompts(args),
            image_size=args.resolution,
            num_frames=args.num_frames,
        )

    global_step, counters = train_loop(
        args,
        accelerator,
        student,
        optimizer,
        loader,
        ema,
        state,
        objective,
        validate,
        desc=method.upper() if method != "tcm" else f"TCM stage 2 ({args.tcm_objective})",
        accumulate=(student, logvar_head),
        pipeline_parts=ema_pipeline_parts,
    )
    return student, ema, global_step, counters


def build_dmd(args, accelerator, teacher, student, state) -> dict | None:
    """The score regularizer of a stage with `--dmd_weight` (None without): `DMDLoss`, a fake-score network (a
    float32 copy of the teacher, trained on the student's samples) and its Adam, prepared by `accelerator` and added to
    the checkpointed `state`."""
    if not getattr(args, "dmd_weight", 0):
        return None
    if is_sharded(accelerator.unwrap_model(student)):
        raise ValueError(
            "--dmd_weight trains an unsharded fake-score copy of the teacher: run it without FSDP, or drop --dmd_weight."
        )
    network = trainable(copy.deepcopy(teacher.inner_model).float()).train()
    fake = TrigFlowDenoiser(network, teacher.parameterization, sigma_data=teacher.sigma_data, adapter=teacher.adapter)
    optimizer = adam(
        fake.parameters(),
        lr=args.dmd_fake_learning_rate or args.learning_rate,
        betas=(0.0, args.adam_beta2),  # DMD2's critic: no momentum, it follows a moving target
        eps=args.adam_epsilon,
    )
    fake, optimizer = accelerator.prepare(fake, optimizer)
    state["modules"]["fake_score"] = fake
    state["optimizers"] = {"fake_score": optimizer}
    guidance = teacher_cfg_scale(args) if args.guidance_scale is not None else 1.0
    start = args.dmd_start_step if args.dmd_start_step is not None else args.tangent_warmup_steps
    if args.method == "tcm":  # Stage 2's two-step time: t' unless given
        middle = args.tcm_intermediate_timestep or args.tcm_dividing_timestep
    else:  # the saved scheduler's two-step time (sCM's 1.1 by default)
        middle = args.intermediate_timestep or 1.1
    return {
        "loss": DMDLoss(
            teacher.sigma_data,
            args.dmd_P_mean,
            args.dmd_P_std,
            guidance_scale=guidance,
            intermediate_timesteps=(middle,) if args.dmd_sample_steps > 1 else (),
        ),
        "fake": fake,
        "optimizer": optimizer,
        "start_step": start,
    }


def dmd_step(args, accelerator, dmd, student, teacher, shape, cond, guidance, generator) -> dict:
    """One step of the score regularizer, before the stage's own loss: `--dmd_fake_updates` updates of the fake-score
    network, each on a fresh batch of student samples (once per optimizer step), then the student's DMD gradient,
    back-propagated at once (without a DDP all-reduce: the stage's own backward pass reduces the sum). Each batch is of
    1..--dmd_sample_steps steps, drawn in the proportions --dmd_step_weights. Returns the losses for the log."""
    loss_fn, fake, optimizer = dmd["loss"], dmd["fake"], dmd["optimizer"]
    logs = {}
    frequencies = torch.tensor(args.dmd_step_weights, device=generator.device)

    def steps():
        return 1 + int(torch.multinomial(frequencies, 1, generator=generator))

    if accelerator.sync_gradients:
        for _ in range(args.dmd_fake_updates):
            noise = torch.randn(shape, generator=generator, device=generator.device)
            fake_loss, fake_logs = loss_fn.fake_score_loss(
                fake, student, noise, generator=generator, steps=steps(), **cond
            )
            accelerator.backward(fake_loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logs["fake_score_loss"] = fake_logs["fake_score_loss"]
    noise = torch.randn(shape, generator=generator, device=generator.device)
    guided = {
        "uncond_conditioning": guidance.get("uncond_conditioning"),
        "teacher_guidance": guidance.get("teacher_guidance"),
    }
    loss, dmd_logs = loss_fn(student, teacher, fake, noise, generator=generator, steps=steps(), **guided, **cond)
    with accelerator.no_sync(student):
        accelerator.backward(args.dmd_weight * loss)
    logs["dmd_loss"] = loss.detach()
    logs["dmd_grad_norm"] = dmd_logs["dmd_grad_norm"]
    return logs


def validation_prompts(args):
    if not args.text_to_image:
        return None
    return args.validation_prompts or ["a photo"] * min(args.num_validation_images, 4)


def text_batches(args) -> TextBatches:
    """Captions to (x0, conditioning) for the losses: on the fly through the teacher, or from --cache_dir."""
    uncond = None
    if getattr(args, "cache", None) is not None:
        uncond = args.cache[1]
    teacher = getattr(args, "t2i", None)
    network = teacher.denoiser.inner_model if teacher is not None else args.teacher_network
    return TextBatches(
        teacher,
        guidance_scale=teacher_cfg_scale(args),
        guidance_range=args.guidance_scale_range,
        teacher_guidance_input=bool(network.config.get("guidance_embeds", False)),
        uncond=uncond,
        resolution=args.resolution,
        ode_steps=args.teacher_ode_steps,
        num_frames=args.num_frames,
    )


def text_dataset(args, accelerator):
    """The training rows: the --cache_dir cache (written first when missing), or captioned images on the fly."""
    if getattr(args, "cache", None) is not None:
        return args.cache[0]
    dataset = load_text_data(args)
    if not dataset.has_images:
        logger.info(
            "Prompt-only data: x0 comes from the teacher's own ODE samples (%d steps).", args.teacher_ode_steps
        )
    return dataset


def prepare_cache(args, accelerator):
    """--cache_dir: write the cache (main process) when it is missing (with --rebuild_cache also when it is incomplete
    or was made with other settings), check that it was made with this run's teacher, --resolution and
    --teacher_dtype, then train from it without the VAE and text encoders."""
    from diffusers_scm.training.data.latent_cache import (
        CACHE_INFO,
        cache_problem,
        load_cache,
        teacher_record,
        write_cache,
    )

    expected = {
        **teacher_record(args.teacher, args.teacher_revision),
        "resolution": args.resolution,
        "dtype": args.teacher_dtype,
        "num_frames": args.num_frames,
    }
    if accelerator.is_main_process:
        missing = not os.path.isfile(os.path.join(args.cache_dir, CACHE_INFO))
        problem = None if missing or not args.rebuild_cache else cache_problem(args.cache_dir, expected)
        if missing or problem is not None:
            if problem is not None:
                logger.warning(f"--rebuild_cache: writing the cache again. {problem}")
            teacher = load_text_to_image_teacher(
                args.teacher,
                args.teacher_parameterization,
                args.sigma_data,
                torch_dtype=getattr(torch, args.teacher_dtype),
                revision=args.teacher_revision,
            )
            dataset = load_text_data(args)
            write_cache(
                dataset,
                teacher,
                args.cache_dir,
                device=accelerator.device,
                resolution=args.resolution,
                teacher_name=args.teacher,
                teacher_revision=args.teacher_revision,
                dataset_name=args.dataset_name,
                caption_column=args.caption_column,
                num_frames=args.num_frames,
            )
            del teacher
    accelerator.wait_for_everyone()
    args.cache = load_cache(args.cache_dir, expected)  # refuses an incomplete cache or one of other settings
    logger.info("Training from the cache %s (%d rows).", args.cache_dir, len(args.cache[0]))


def student_components(args) -> dict | None:
    """What a text-to-image student's pipeline keeps of its teacher: VAE, text encoders, tokenizers, family. From a
    cache they are loaded here (main process, for validation and saving), never during training steps. A latent
    teacher without text encoders (EDM2 converted with --vae) passes on its VAE and image range (`teacher_decoder`)."""
    if not args.text_to_image:  # a latent class-conditional teacher (EDM2 with --vae): its VAE and image range
        if getattr(args, "teacher_decoder", None) is None:
            args.teacher_decoder = teacher_decoder(args.teacher, args.teacher_revision) if args.teacher else {}
        return {**args.teacher_decoder} or None
    teacher = getattr(args, "t2i", None)
    if teacher is None and getattr(args, "cached_components", None) is None:  # loaded once, kept for later calls
        from diffusers import DiffusionPipeline

        from diffusers_scm.conditioning import TEXT_COMPONENTS

        names = ("vae", *TEXT_COMPONENTS)
        skip = dict.fromkeys(("transformer", "transformer_2", "unet"))  # networks (Wan 2.2's second expert too)
        pipe = DiffusionPipeline.from_pretrained(args.teacher, revision=args.teacher_revision, **skip)
        parts = {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}
        args.cached_components = {**parts, "family_pipeline": type(pipe).__name__}
    if teacher is None:
        return {**args.cached_components, **guidance_record(args)}
    parts = {"vae": teacher.pipeline.vae, **teacher.text_components(), "family_pipeline": teacher.family}
    return {**parts, **guidance_record(args)}


def latent_encoder(args, config, device):
    """For a latent teacher without text encoders (EDM2 converted with --vae, SPEC.md section 10): images in [-1, 1] ->
    latents x0, through the teacher's VAE on the images mapped to its `image_range` ([0, 1] for EDM2) and its latent
    normalization (`LatentCodec`), a sample of the latent distribution as EDM2's training draws it. None for other
    teachers."""
    from diffusers_scm.conditioning import LatentCodec

    parts = student_components(args) or {}
    if "vae" not in parts:
        return None
    codec = LatentCodec(parts["vae"].to(device))
    size = config.get("sample_size")
    if size is not None and args.resolution != size * codec.scale_factor:
        raise ValueError(
            f"--resolution {args.resolution}: the teacher is a latent network on {size}x{size} latents, the encoding of "
            f"{size * codec.scale_factor}x{size * codec.scale_factor} images by its VAE: use --resolution "
            f"{size * codec.scale_factor}."
        )
    lo, hi = parts.get("image_range") or (-1.0, 1.0)

    def encode(images, generator=None):
        return codec.encode((lo + (images + 1) * (hi - lo) / 2).to(device), generator=generator)

    return encode


def guidance_record(args) -> dict:
    """The guidance a student was distilled with, for its pipeline config and model card."""
    if args.guidance_scale_range is not None:
        lo, hi = args.guidance_scale_range
        return {"guidance_scale_range": [lo, hi], "guidance_scale": (lo + hi) / 2}
    teacher = getattr(args, "t2i", None)
    denoiser = getattr(teacher, "denoiser", None)
    network = getattr(denoiser, "inner_model", None) or getattr(args, "teacher_network", None)
    if network is not None and network.config.get("guidance_embeds", False):  # Flux.1-dev, Flux.2 [dev]
        return {"guidance_scale": float(args.guidance_scale)}  # the w its guidance input was trained at (SPEC.md 8)
    return {}


def _stage1_finished(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("model_index.json", "training_summary.json"))


def _split_resume(resume_from, stage1_dir):
    """--resume_from_checkpoint for (Stage 1, Stage 2): 'latest' for both, or an explicit checkpoint for its stage."""
    if resume_from in (None, "latest"):
        return resume_from, resume_from
    in_stage1 = os.path.abspath(os.path.dirname(os.path.normpath(resume_from))) == os.path.abspath(stage1_dir)
    return (resume_from, None) if in_stage1 else (None, resume_from)


def run_tcm(args, accelerator):
    """Stage 1 into `OUTPUT_DIR/stage1/` (unless --stage1_model, or a finished Stage 1 found on resume), then Stage 2
    from the Stage-1 EMA weights. Returns `(student, ema, scheduler, global_step, counters)` of Stage 2."""
    stage1_dir = os.path.join(args.output_dir, "stage1")
    resume1, resume2 = _split_resume(args.resume_from_checkpoint, stage1_dir)
    teacher, init = build_models(args) if args.teacher or args.student else (None, None)
    stage1_path, start_stage = args.stage1_model, args.stage2_start_stage
    stage1_steps = 0  # Stage 2 logs to the trackers after Stage 1's steps (not over them)
    if stage1_path is None:
        stage1_path = stage1_dir
        stage1_args = argparse.Namespace(
            **{
                **vars(args),
                "output_dir": stage1_dir,
                "resume_from_checkpoint": resume1,
                "push_at_checkpoints": False,
                "dmd_weight": 0.0,
            }
        )  # the repository is the Stage-2 student's: Stage 1 is not pushed; the DMD term is Stage 2's
        if args.resume_from_checkpoint and _stage1_finished(stage1_dir):
            logger.info("Stage 1 is finished in %s: going on with Stage 2.", stage1_dir)
        elif resume2 is not None and resume2 != "latest":
            raise ValueError(
                f"{resume2} is a Stage-2 checkpoint, but Stage 1 in {stage1_dir} is not finished: resume Stage 1 "
                "first (--resume_from_checkpoint latest)."
            )
        else:
            os.makedirs(stage1_dir, exist_ok=True)
            method = args.tcm_stage1_method
            student, ema, steps, counters = train_stage(stage1_args, accelerator, method, teacher, init)
            scheduler = student_scheduler(accelerator.unwrap_model(student))
            components = student_components(args) if accelerator.is_main_process else None
            finish_training(
                accelerator, stage1_dir, student, ema, scheduler, steps, counters, False, components=components
            )
            accelerator.free_memory()
        accelerator.wait_for_everyone()  # the main process has written the Stage-1 pipeline
        with open(os.path.join(stage1_dir, "training_summary.json")) as f:
            stage1_steps = json.load(f)["steps"]
        if start_stage is None and args.tcm_stage1_method in ("cd", "ct"):  # continue the discrete step schedule
            start_stage = stage1_steps // dt_stage_steps(stage1_args)

    if start_stage is None:  # a finished consistency model: start with the smallest step
        start_stage = ConsistencyLoss(q=args.dt_q, ratio_limit=args.dt_ratio_limit).stage_at_limit()
    stage1 = load_teacher(stage1_path, sigma_data=args.sigma_data)  # frozen: eval mode, no gradients
    sd = stage1.sigma_data
    network = trainable(copy.deepcopy(stage1.inner_model)).train()
    student = TrigFlowDenoiser(network, stage1.parameterization, sigma_data=sd)
    t_div = args.tcm_dividing_timestep if args.tcm_dividing_timestep is not None else math.atan(1.0 / sd)
    mid = args.tcm_intermediate_timestep if args.tcm_intermediate_timestep is not None else t_div
    if mid < t_div:
        raise ValueError(f"--tcm_intermediate_timestep {mid} lies below the dividing time t' = {t_div:.6f}.")
    stage2_args = argparse.Namespace(
        **{
            **vars(args),
            "resume_from_checkpoint": resume2,
            "learning_rate": args.stage2_learning_rate or args.learning_rate / 2,
            "train_batch_size": args.stage2_train_batch_size or args.train_batch_size,
            "max_train_steps": args.stage2_max_train_steps or args.max_train_steps,
            "tangent_warmup_steps": args.stage2_tangent_warmup_steps,
            "dmd_start_step": args.dmd_start_step or 0,
            "tcm_dividing_timestep": t_div,
            "seed": args.seed + 1,
            "log_step_offset": stage1_steps,
        }
    )
    scheduler_kwargs = {"dividing_timestep": t_div, "intermediate_timesteps": mid}
    student, ema, steps, counters = train_stage(
        stage2_args, accelerator, "tcm", teacher, student, stage1, scheduler_kwargs, start_stage
    )
    scheduler = student_scheduler(accelerator.unwrap_model(student), **scheduler_kwargs)
    return student, ema, scheduler, steps, counters


def train(args, accelerator):
    """The run: train (TCM: both stages), save the EMA student (which ends the process group), then sample it, write its
    model card and upload it (main process)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    if args.text_to_image and args.cache_dir:
        prepare_cache(args, accelerator)
    if args.method == "tcm":
        student, ema, scheduler, global_step, counters = run_tcm(args, accelerator)
    else:
        teacher, student = build_models(args)
        student, ema, global_step, counters = train_stage(
            args, accelerator, args.method, teacher, student, start_stage=args.dt_start_stage
        )
        mid = {} if args.intermediate_timestep is None else {"intermediate_timesteps": args.intermediate_timestep}
        scheduler = student_scheduler(accelerator.unwrap_model(student), **mid)
    components = student_components(args) if accelerator.is_main_process else None
    lora = None if args.lora_rank is None else {"save_adapter": not args.fuse_lora}
    finish_training(
        accelerator, args.output_dir, student, ema, scheduler, global_step, counters, components=components, lora=lora
    )
    publish_pipeline(args, accelerator, sample_steps=(1, 2))


def main(argv=None):
    args = parse_args(argv)
    with training_run(args, "scm-distill") as accelerator:  # locks --output_dir; ends through end_run
        train(args, accelerator)


if __name__ == "__main__":
    main()
