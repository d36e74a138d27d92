"""Run by tests/test_fsdp.py in 2 processes (torch.distributed.run, gloo on CPU): the package's FSDP2 path against
the unsharded network. Each check writes its numbers into the JSON file named on the command line (rank 0)."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor


sys.path.insert(0, os.path.dirname(__file__))

from families import FAMILIES  # noqa: E402

from diffusers_scm import TrigFlowDenoiser  # noqa: E402
from diffusers_scm.jvp import jvp  # noqa: E402
from diffusers_scm.training import make_ema  # noqa: E402
from diffusers_scm.training.machinery.fsdp import (
    block_class_names,
    is_sharded,
    load_sharded_state,
    save_sharded_state,
    shard_module,
    unsharded_copy,
)


def full(v):
    return v.full_tensor() if hasattr(v, "full_tensor") else v  # buffers (e.g. position tables) stay unsharded


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_family(name: str, folder: str) -> dict:
    family = FAMILIES[name]
    torch.manual_seed(0)
    network = family.make().float().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(family.shape, generator=g)
    cond = family.conditioning(g, torch.float32)
    t, dx, dt = torch.rand(x.shape[0], generator=g) * 1.5, torch.randn(x.shape, generator=g), torch.rand(x.shape[0])
    reference = TrigFlowDenoiser(copy.deepcopy(network), family.parameterization, 0.5)
    student = TrigFlowDenoiser(network, family.parameterization, 0.5)
    shard_module(student)
    out = {"sharded": is_sharded(student), "blocks": block_class_names(reference.inner_model)}

    # JVP through the sharded student (FSDP2 all-gathers each block inside the forward-mode pass)
    for backend in ("math", "blocked"):
        f_s, j_s = jvp(lambda a, b: student(a, b, **cond), (x, t), (dx, dt), backend=backend, block_size=3)
        f_r, j_r = jvp(lambda a, b: reference(a, b, **cond), (x, t), (dx, dt), backend=backend, block_size=3)
        out[f"jvp_{backend}"] = [rel(f_s, f_r), rel(j_s, j_r)]

    # EMA kept sharded: the same updates on both sides, then the gathered average against the unsharded one
    ema_s, ema_r = make_ema(student.inner_model, 0.05), make_ema(reference.inner_model, 0.05)
    for step in range(3):
        gen = torch.Generator().manual_seed(10 + step)
        for (key, p_s), p_r in zip(student.inner_model.named_parameters(), reference.inner_model.parameters()):
            delta = 0.01 * torch.randn(p_r.shape, generator=gen)
            with torch.no_grad():
                p_r.add_(delta)
                p_s.add_(distribute_tensor(delta, p_s.device_mesh, p_s.placements))
        ema_s.step(student.inner_model)
        ema_r.step(reference.inner_model)
    parameters = dict(student.inner_model.named_parameters())
    out["ema_shadow_is_sharded"] = all(hasattr(v, "full_tensor") for k, v in ema_s.shadow.items() if k in parameters)
    averaged = ema_s.averaged_model(student.inner_model)
    expected = ema_r.averaged_model(reference.inner_model)
    copied = unsharded_copy(student.inner_model)
    if dist.get_rank() == 0:
        out["ema_max_abs"] = max(
            (a - b).abs().max().item() for a, b in zip(averaged.state_dict().values(), expected.state_dict().values())
        )
        out["copy_max_abs"] = max(
            (a - b).abs().max().item()
            for a, b in zip(copied.state_dict().values(), reference.inner_model.state_dict().values())
        )
        out["copy_class"] = type(copied).__name__
    else:
        out["others_get_none"] = averaged is None and copied is None

    # sharded checkpoint: save, disturb, load back
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    student(x, t, **cond).square().mean().backward()
    optimizer.step()
    before = {k: full(v).clone() for k, v in student.state_dict().items()}
    moments = {k: v["exp_avg"].full_tensor().clone() for k, v in optimizer.state_dict()["state"].items()}
    shadow = {k: full(v).clone() for k, v in ema_s.shadow.items()}
    path = os.path.join(folder, name)
    save_sharded_state(path, student, optimizer, ema_s)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.0)
        for v in ema_s.shadow.values():
            v.mul_(0.0)
    optimizer.zero_grad()
    student(x, t, **cond).square().mean().backward()
    optimizer.step()
    load_sharded_state(path, student, optimizer, ema_s)
    out["reload_weights"] = max((full(v) - before[k]).abs().max().item() for k, v in student.state_dict().items())
    out["reload_moments"] = max(
        (v["exp_avg"].full_tensor() - moments[k]).abs().max().item()
        for k, v in optimizer.state_dict()["state"].items()
    )
    out["reload_ema"] = max((full(v) - shadow[k]).abs().max().item() for k, v in ema_s.shadow.items())
    return out


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result_file, folder, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {name: check_family(name, folder) for name in names}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(gathered, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
