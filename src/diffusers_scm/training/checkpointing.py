"""Training checkpoints without pickle: safetensors for weights, EMA and RNG states, JSON for counters, and the
optimizer state loaded with `torch.load(weights_only=True)`. Folders are written atomically (a temporary folder,
then a rename), so an interrupted save never damages an existing checkpoint. A sharded (FSDP2) student's weights,
optimizer state and EMA are written shard by shard with torch.distributed.checkpoint (`fsdp.save_sharded_state`)."""

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from .fsdp import SHARDED_STATE, is_sharded, load_sharded_state, save_sharded_state


__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "rotate_checkpoints", "CHECKPOINT_PATTERN"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, d))
        for d in os.listdir(output_dir)
        if (m := CHECKPOINT_PATTERN.match(d))
    ]
    return sorted(found)


def find_checkpoint(output_dir: str, resume_from: str) -> tuple[str, int] | None:
    """`(folder, step)` for `resume_from` ("latest" or a folder); None when "latest" finds none."""
    if resume_from == "latest":
        found = _checkpoints(output_dir)
        return (found[-1][1], found[-1][0]) if found else None
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(resume_from)))
    if not os.path.isdir(resume_from) or match is None:
        raise ValueError(f"{resume_from!r} is not a checkpoint-<step> folder; use 'latest' or such a folder.")
    return resume_from, int(match.group(1))


def rotate_checkpoints(output_dir: str, total_limit: int | None):
    """Delete the oldest checkpoints so that at most `total_limit` remain."""
    if total_limit is None:
        return
    found = _checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)


def _sharded_root(accelerator, modules: dict):
    """The first sharded (FSDP2) module of `modules`, unwrapped: its state, with its optimizer and EMA, goes through
    torch.distributed.checkpoint; None when nothing is sharded. (A sharded student holds the adaptive-weighting head
    as a submodule, so the one root covers every module.)"""
    for module in modules.values():
        unwrapped = accelerator.unwrap_model(module)
        if is_sharded(unwrapped):
            return unwrapped
    return None


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    modules: dict,
    optimizer,
    ema=None,
    generators: dict | None = None,
    total_limit: int | None = None,
    lr_scheduler=None,
    counters: dict | None = None,
    optimizers: dict | None = None,
) -> str:
    """
    Save `checkpoint-<step>`: each module's weights (unwrapped) and the EMA as safetensors, the optimizer state (and
    that of each further named optimizer in `optimizers`, e.g. a fake-score network's, as `optimizer_<name>.pt`), the
    learning-rate schedule, and per process the torch RNG state and the named generators (for exact resumption).
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    sharded = _sharded_root(accelerator, modules)
    if sharded is not None:  # FSDP2: every process writes its shards of the weights, optimizer state and EMA
        save_sharded_state(tmp, sharded, optimizer, ema)
    if accelerator.is_main_process:
        if sharded is None:
            for name, module in modules.items():
                save_file(
                    _contiguous(accelerator.unwrap_model(module).state_dict()),
                    os.path.join(tmp, f"{name}.safetensors"),
                )
            if ema is not None:
                save_file(_contiguous(ema.state_dict()["shadow"]), os.path.join(tmp, "ema.safetensors"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            for name, extra in (optimizers or {}).items():
                torch.save(extra.state_dict(), os.path.join(tmp, f"optimizer_{name}.pt"))
        meta = {
            "step": step,
            "ema_num_updates": None if ema is None else ema.num_updates,
            "sharded": sharded is not None,
        }
        if counters is not None:  # e.g. skipped steps: totals that a resumed run goes on counting
            meta["counters"] = dict(counters)
        if lr_scheduler is not None:  # LambdaLR: counters and learning rates (its lambdas are rebuilt from the flags)
            meta["lr_scheduler"] = lr_scheduler.state_dict()
        if accelerator.scaler is not None:
            meta["grad_scaler"] = dict(accelerator.scaler.state_dict().items())
        with open(os.path.join(tmp, "training_state.json"), "w") as f:
            json.dump(meta, f, indent=2, default=float)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    for name, generator in (generators or {}).items():
        rng[f"generator.{name}"] = generator.get_state()
    save_file(rng, os.path.join(tmp, f"rng_state_{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _previous_checkpoint(folder: str) -> str | None:
    """The latest `checkpoint-<step>` beside `folder` with a smaller step, if any."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(folder)))
    if match is None:
        return None
    earlier = [path for step, path in _checkpoints(os.path.dirname(os.path.normpath(folder))) if step < int(match[1])]
    return earlier[-1] if earlier else None


def _resume_hint(folder: str) -> str:
    previous = _previous_checkpoint(folder)
    if previous is None:
        return "No earlier checkpoint is beside it: start again without --resume_from_checkpoint."
    return f"Delete it, or resume the previous one with --resume_from_checkpoint {previous}."


def load_checkpoint(
    accelerator,
    folder: str,
    modules: dict,
    optimizer,
    ema=None,
    generators: dict | None = None,
    lr_scheduler=None,
    counters: dict | None = None,
    optimizers: dict | None = None,
) -> int:
    """Restore what `save_checkpoint` wrote; returns the step. A damaged folder is an error that names the file that
    failed and, where there is one, the previous checkpoint to resume instead."""
    sharded = _sharded_root(accelerator, modules)
    if sharded is not None:
        needed = [os.path.join(SHARDED_STATE, ".metadata"), "training_state.json"]
    else:
        needed = [f"{name}.safetensors" for name in modules] + ["optimizer.pt", "training_state.json"]
    needed += [f"optimizer_{name}.pt" for name in optimizers or {}]
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        kind = "unsharded" if sharded is not None and os.path.isfile(os.path.join(folder, "optimizer.pt")) else None
        if kind or (sharded is None and os.path.isdir(os.path.join(folder, SHARDED_STATE))):
            written = "without --fsdp" if kind else "by a sharded (FSDP) run"
            raise ValueError(
                f"Checkpoint {folder} was written {written}: resume it with the same sharding (add or drop --fsdp, "
                "or the accelerate FSDP config)."
            )
        raise ValueError(f"Checkpoint {folder} is incomplete or corrupted: missing {missing}. {_resume_hint(folder)}")
    path = folder  # the file being read, for the error
    try:
        if sharded is not None:
            path = os.path.join(folder, SHARDED_STATE)
            load_sharded_state(folder, sharded, optimizer, ema)
        else:
            for name, module in modules.items():
                path = os.path.join(folder, f"{name}.safetensors")
                accelerator.unwrap_model(module).load_state_dict(load_file(path))
            path = os.path.join(folder, "optimizer.pt")
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        for name, extra in (optimizers or {}).items():
            path = os.path.join(folder, f"optimizer_{name}.pt")
            extra.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        path = os.path.join(folder, "training_state.json")
        with open(path) as f:
            meta = json.load(f)
        if ema is not None:
            ema.num_updates = int(meta["ema_num_updates"])
        if ema is not None and sharded is None:
            path = os.path.join(folder, "ema.safetensors")
            ema.load_state_dict({"shadow": load_file(path), "num_updates": meta["ema_num_updates"]})
        if counters is not None:  # updated in place
            counters.update(meta.get("counters", {}))
        if lr_scheduler is not None and "lr_scheduler" in meta:
            lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if accelerator.scaler is not None and "grad_scaler" in meta:
            accelerator.scaler.load_state_dict(meta["grad_scaler"])
        rng_path = os.path.join(folder, f"rng_state_{accelerator.process_index}.safetensors")
        if os.path.isfile(rng_path):
            path = rng_path
            rng = load_file(rng_path)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            for name, generator in (generators or {}).items():
                if f"generator.{name}" in rng:
                    generator.set_state(rng[f"generator.{name}"])
    except Exception as e:  # safetensors, torch.load and JSON errors alike
        raise ValueError(
            f"Checkpoint {folder} could not be loaded: {path} failed ({type(e).__name__}: {e}). The file may be "
            "corrupted (an interrupted copy, a full disk), or the checkpoint was written with other model settings. "
            f"{_resume_hint(folder)}"
        ) from e
    return int(meta["step"])
