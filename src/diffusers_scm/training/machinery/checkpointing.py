"""Training checkpoints without pickle: safetensors for weights, EMA and RNG states, JSON for counters, and the
optimizer state loaded with `torch.load(weights_only=True)`. Folders are written atomically (a temporary folder,
then a rename), so an interrupted save never damages an existing checkpoint. A sharded (FSDP2) student's weights,
optimizer state and EMA are written shard by shard with torch.distributed.checkpoint (`fsdp.save_sharded_state`)."""

import json
import logging
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from .fsdp import SHARDED_STATE, is_sharded, load_sharded_state, save_sharded_state


__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "rotate_checkpoints", "CHECKPOINT_PATTERN"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


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
    run_config: dict | None = None,
) -> str:
    """
    Save `checkpoint-<step>`: each module's weights (unwrapped) and the EMA as safetensors, the optimizer state (and
    that of each further named optimizer in `optimizers`, e.g. a fake-score network's, as `optimizer_<name>.pt`), the
    learning-rate schedule, and per process the torch RNG state and the named generators (for exact resumption).
    `run_config` (`run.run_config`: the flags and networks that shape this state) is recorded in
    `training_state.json` with the names of the modules and optimizers; `load_checkpoint` compares them on resume.
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
            "modules": sorted(modules),
            "optimizers": sorted(optimizers or {}),
        }
        if run_config is not None:
            meta["run_config"] = run_config
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
    """The way on from a damaged checkpoint: the previous one, where there is one."""
    previous = _previous_checkpoint(folder)
    if previous is None:
        return "No earlier checkpoint is beside it: start again without --resume_from_checkpoint."
    return f"Delete it, or resume the previous one with --resume_from_checkpoint {previous}."


SETTINGS_FIX = "resume with the flags it was written with, or start a new --output_dir"
# flags naming where a network was loaded from: a folder may move, so a change is logged, not refused
SOURCE_FLAGS = ("--teacher", "--student", "--model", "--model_config", "--guidance_model")
# source flags whose presence changes what is trained (a teacher guided by a second network): adding or dropping one
# is a change of settings, moving its folder is not
PRESENCE_FLAGS = ("--guidance_model",)
# modules that a flag adds to a run's state
MODULE_FLAGS = {"fake_score": "--dmd_weight"}


def _flag_text(flag: str, value) -> str:
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def _network_texts(old, new) -> tuple[str, str]:
    """The two network records, each as its class and the config entries in which they differ."""
    if not (isinstance(old, dict) and isinstance(new, dict)) or old.get("class") != new.get("class"):
        return (old or {}).get("class", "none"), (new or {}).get("class", "none")
    a, b = old.get("config") or {}, new.get("config") or {}
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:4]
    if not keys:
        return f"{old['class']} (weights of other shapes)", f"{new['class']} (weights of other shapes)"
    return tuple(f"{old['class']}({', '.join(f'{k}={c.get(k)!r}' for k in keys)})" for c in (a, b))


def _same_network(old, new) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k != "from"} if isinstance(r, dict) else r  # noqa: E731
    return strip(old) == strip(new)


def _settings_difference(key: str, old, new) -> str:
    if key == "network":
        was, now = _network_texts(old, new)
        source = f" (from {new['from']})" if isinstance(new, dict) and new.get("from") else ""
        return f"was written for a {was}; this run trains a {now}{source}"
    if key == "teacher network":
        was, now = _network_texts(old, new)
        return f"was written with the teacher {was}; this run's --teacher is a {now}"
    if key == "guidance network":
        was, now = _network_texts(old, new)
        return f"was written with the guiding network {was}; this run's --guidance_model is a {now}"
    if key == "--fsdp":  # also accelerate's FSDP2 (`accelerate launch --use_fsdp`), which has no flag of ours
        if old:
            return "was written by a sharded (FSDP) run; this run is not sharded (add --fsdp, or accelerate's FSDP2)"
        return "was written without --fsdp; this run is sharded (drop --fsdp, or accelerate's FSDP config)"
    return f"was written with {_flag_text(key, old)}; this run has {_flag_text(key, new)}"


def _check_settings(folder: str, meta: dict, run_config: dict | None, modules: dict, optimizers: dict | None):
    """Compare the checkpoint's record of the state-shaping settings (`training_state.json`) with this run's, before
    any tensor is read: a change is an error that names the flag and both values (never a "corrupted" checkpoint).
    Checkpoints written without a record are not checked."""
    recorded = meta.get("run_config")
    if run_config is not None and isinstance(recorded, dict):
        current = json.loads(json.dumps(run_config, default=str))  # as the record was written
        changed, moved = [], []
        for key in [k for k in current if k in recorded]:  # flags, then networks
            old, new = recorded[key], current[key]
            if old == new or (key.endswith("network") and _same_network(old, new)):
                continue
            source = key in SOURCE_FLAGS and not (key in PRESENCE_FLAGS and (old is None) != (new is None))
            (moved if source else changed).append(_settings_difference(key, old, new))
        if changed:
            raise ValueError(f"Checkpoint {folder} " + "; it ".join(changed + moved) + f": {SETTINGS_FIX}.")
        for difference in moved:
            logger.warning("Checkpoint %s %s (the same networks): resuming.", folder, difference)
    lacking = [name for name in modules if "modules" in meta and name not in meta["modules"]]
    lacking += [f"optimizer_{n}" for n in optimizers or {} if "optimizers" in meta and n not in meta["optimizers"]]
    if lacking:
        flags = sorted({MODULE_FLAGS[n] for n in modules if n in MODULE_FLAGS and n in lacking})
        added = f" (added by {', '.join(flags)})" if flags else ""
        raise ValueError(
            f"Checkpoint {folder} holds no state of {lacking}, which this run trains{added}: it was written with other "
            f"settings; {SETTINGS_FIX}."
        )


def _shorten(error: Exception, lines: int = 4, width: int = 200) -> str:
    """An exception's text in a few short lines (a state-dict error lists every key)."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    short = [line if len(line) <= width else line[: width - 3] + "..." for line in text[:lines]]
    more = f" (+{len(text) - lines} more lines)" if len(text) > lines else ""
    return f"{type(error).__name__}: " + " ".join(short) + more


def _read(folder: str, path: str, reader):
    """`reader(path)`; a file that cannot be read is a damaged checkpoint."""
    try:
        return reader(path)
    except Exception as e:  # safetensors, torch.load and JSON errors alike
        raise ValueError(
            f"Checkpoint {folder} could not be loaded: {path} failed ({_shorten(e)}). The file may be corrupted (an "
            f"interrupted copy, a full disk). {_resume_hint(folder)}"
        ) from e


def _apply(folder: str, what: str, load):
    """`load()`, which puts state that was read into this run's objects; a mismatch means other settings."""
    try:
        return load()
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"Checkpoint {folder} does not fit this run: loading {what} failed ({_shorten(e)}). Its files were read, "
            "so it was most likely written with other settings (model, LoRA or sharding flags, --resolution, "
            f"--method); {SETTINGS_FIX}."
        ) from e


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


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
    run_config: dict | None = None,
) -> int:
    """Restore what `save_checkpoint` wrote; returns the step. The recorded settings are compared with `run_config`
    first: a changed flag is an error naming it and both values. A damaged folder is an error that names the file that
    failed and, where there is one, the previous checkpoint to resume instead; state that was read but does not fit
    this run's objects is an error that points to changed settings."""
    state_path = os.path.join(folder, "training_state.json")
    try:
        meta = _read_json(state_path)
    except (OSError, ValueError):
        meta = None  # missing or damaged: reported below
    if isinstance(meta, dict):
        _check_settings(folder, meta, run_config, modules, optimizers)
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
    meta = _read(folder, state_path, _read_json)
    if sharded is not None:  # reads and loads at once: a failure may be either
        try:
            load_sharded_state(folder, sharded, optimizer, ema)
        except Exception as e:
            previous = _previous_checkpoint(folder)
            instead = f"resume the previous one with --resume_from_checkpoint {previous}" if previous else None
            raise ValueError(
                f"Checkpoint {folder} could not be loaded: {os.path.join(folder, SHARDED_STATE)} failed "
                f"({_shorten(e)}). Either it was written with other settings ({SETTINGS_FIX}), or its files are "
                f"damaged (an interrupted copy, a full disk){': ' + instead if instead else ''}."
            ) from e
    else:
        for name, module in modules.items():
            weights = _read(folder, os.path.join(folder, f"{name}.safetensors"), load_file)
            _apply(folder, f"the {name} weights", lambda: accelerator.unwrap_model(module).load_state_dict(weights))
        path = os.path.join(folder, "optimizer.pt")
        state = _read(folder, path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        _apply(folder, "the optimizer state", lambda: optimizer.load_state_dict(state))
    for name, extra in (optimizers or {}).items():
        path = os.path.join(folder, f"optimizer_{name}.pt")
        state = _read(folder, path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        _apply(folder, f"the {name} optimizer state", lambda: extra.load_state_dict(state))
    if ema is not None:
        _apply(folder, "the EMA", lambda: setattr(ema, "num_updates", int(meta["ema_num_updates"])))
        if sharded is None:
            shadow = _read(folder, os.path.join(folder, "ema.safetensors"), load_file)
            _apply(folder, "the EMA", lambda: ema.load_state_dict({"shadow": shadow, "num_updates": ema.num_updates}))
    if counters is not None:  # updated in place
        counters.update(meta.get("counters", {}))
    if lr_scheduler is not None and "lr_scheduler" in meta:
        _apply(folder, "the learning-rate schedule", lambda: lr_scheduler.load_state_dict(meta["lr_scheduler"]))
    if accelerator.scaler is not None and "grad_scaler" in meta:
        _apply(folder, "the gradient scaler", lambda: accelerator.scaler.load_state_dict(meta["grad_scaler"]))
    rng_path = os.path.join(folder, f"rng_state_{accelerator.process_index}.safetensors")
    if os.path.isfile(rng_path):
        rng = _read(folder, rng_path, load_file)

        def set_rng():
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            for name, generator in (generators or {}).items():
                if f"generator.{name}" in rng:
                    generator.set_state(rng[f"generator.{name}"])

        _apply(folder, "the random number generator states", set_rng)
    return int(meta["step"])
