"""Run by tests/test_fsdp.py with `accelerate launch` in 2 CPU processes: `prepare_training` with accelerate's own
FSDP2 preparation (the state is switched to FSDP version 2, which accelerate enables on GPUs only) against the same
student sharded by `--fsdp` (torch's fully_shard). Writes the numbers into the JSON file named on the command line."""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


sys.path.insert(0, os.path.dirname(__file__))

from families import FAMILIES  # noqa: E402

from diffusers_scm import TrigFlowDenoiser  # noqa: E402
from diffusers_scm.training import SCMLoss  # noqa: E402
from diffusers_scm.training.machinery.fsdp import is_sharded
from diffusers_scm.training.machinery.loop import _local
from diffusers_scm.training.machinery.run import prepare_training


def train(accelerator, fsdp_flag: bool, family) -> dict:
    torch.manual_seed(0)
    student = TrigFlowDenoiser(family.make().float().train(), family.parameterization)
    teacher = TrigFlowDenoiser(family.make().float().eval().requires_grad_(False), family.parameterization)
    args = argparse.Namespace(
        **{"train_batch_size": 2, "dataloader_num_workers": 0, "learning_rate": 1e-3, "adam_beta1": 0.9},
        **{"adam_beta2": 0.99, "adam_weight_decay": 0.0, "adam_epsilon": 1e-2, "lr_scheduler": "constant"},
        **{"lr_warmup_steps": 0, "max_train_steps": 3, "ema_sigma_rel": None, "ema_decay": None, "seed": 0},
        **{"fsdp": fsdp_flag, "fsdp_block_classes": None, "gradient_accumulation_steps": 1},
    )
    by_accelerate = accelerator.is_fsdp2
    model, head, optimizer, _, ema, _, _ = prepare_training(args, accelerator, student, [{}] * 4, "student")
    units = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
    loss_fn, losses = SCMLoss(tangent_warmup_steps=0), []
    g = torch.Generator().manual_seed(1 + accelerator.process_index)
    for step in range(3):
        x0 = torch.randn(family.shape, generator=g)
        cond = family.conditioning(g, torch.float32)
        loss, _ = loss_fn(model, x0, teacher=teacher, step=step, logvar_head=head, **cond)
        accelerator.backward(loss)
        _local(accelerator.clip_grad_norm_(list(model.inner_model.parameters()), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.inner_model)
        losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
    network = ema.averaged_model(model.inner_model)
    weights = None if network is None else {k: v.clone() for k, v in network.state_dict().items()}
    return {
        "by_accelerate": by_accelerate,
        "sharded": is_sharded(model),
        "units": units,
        "losses": losses,
        "weights": weights,
    }


def main():
    result_file = sys.argv[1]
    family = FAMILIES[sys.argv[2]]
    accelerator = Accelerator(cpu=True)
    ours = train(accelerator, True, family)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT"
    )
    accelerator.state.distributed_type = DistributedType.FSDP
    theirs = train(accelerator, False, family)
    if accelerator.is_main_process:
        diff = max((ours["weights"][k] - theirs["weights"][k]).abs().max().item() for k in ours["weights"])
        out = {
            name: {k: v for k, v in r.items() if k != "weights"}
            for name, r in (("fsdp", ours), ("accelerate", theirs))
        }
        out["ema_max_abs"] = diff
        with open(result_file, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
