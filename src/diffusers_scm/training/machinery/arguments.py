"""The flags every accelerate script shares (`add_common_args`) and their types."""

import json
import logging


logger = logging.getLogger(__name__)

__all__ = ["add_common_args", "positive_int", "non_negative_int"]


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
