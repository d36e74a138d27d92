"""Run by tests/test_edm_guidance.py in 2 processes (torch.distributed.run, gloo on CPU): `fsdp_worker`'s checks (sharded
JVP, EMA, gathering, sharded checkpoints against the unsharded network) for a tiny EDM2 network, whose learned gains
FSDP2 shards like every other parameter, and EDM2's forced weight normalization on the sharded weights."""

import json
import os
import sys

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.dirname(__file__))

import fsdp_worker  # noqa: E402
from families import Family  # noqa: E402
from nvlabs_pickles import tiny_network  # noqa: E402

from diffusers_scm import TrigFlowDenoiser  # noqa: E402
from diffusers_scm.models.unet_edm2 import normalize  # noqa: E402
from diffusers_scm.training.machinery.fsdp import full_tensors, shard_module  # noqa: E402


def edm2_family() -> Family:
    """A tiny class-conditional EDM2 network (non-zero gains), called with c_in x and c_noise as the Precond does."""

    def call(model, x, timestep, cond):
        return model(x, timestep, **cond).sample

    def make():  # as distill.py's `trainable`: the uncertainty head, which the forward never calls, is frozen
        network = tiny_network("UNet", num_classes=3, seed=0)
        for module in (network.logvar_fourier, network.logvar_linear):
            module.requires_grad_(False)
        return network

    return Family(
        "edm2",
        make,
        (2, 2, 8, 8),
        lambda g, d: {"class_labels": torch.tensor([1, 2])},
        call,
        "edm",
    )


def forced_normalization() -> dict:
    """A training-mode forward of the sharded student normalizes its stored (sharded) weights as the unsharded
    network's forward normalizes its own (EDM2's forced weight normalization, Algorithm 1)."""
    torch.manual_seed(0)
    network = tiny_network("UNet", num_classes=3, seed=0).train()
    with torch.no_grad():  # weights far from unit norm, as after optimizer steps
        for name, p in network.named_parameters():
            if name.endswith("weight"):
                p.mul_(3.0)
    reference = TrigFlowDenoiser(tiny_network("UNet", num_classes=3, seed=0).train(), "edm", 0.5)
    reference.inner_model.load_state_dict(network.state_dict())
    student = TrigFlowDenoiser(network, "edm", 0.5)
    shard_module(student)
    x, t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.3, 1.2])
    labels = torch.tensor([1, 2])
    student(x, t, class_labels=labels).square().mean().backward()
    reference(x, t, class_labels=labels).square().mean().backward()
    gathered = full_tensors(student.inner_model.state_dict())
    out = {}
    if dist.get_rank() == 0:
        expected = reference.inner_model.state_dict()
        weights = [k for k in expected if k.endswith("weight") and not k.startswith("logvar")]
        out["stored_max_abs"] = max((gathered[k] - expected[k]).abs().max().item() for k in weights)
        out["unit_rows_max_abs"] = max(
            (gathered[k] - normalize(gathered[k])).abs().max().item() for k in weights
        )  # normalized: a further normalization changes them by O(eps) at most
    return out


def main():
    fsdp_worker.FAMILIES["edm2"] = edm2_family()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result_file, folder = sys.argv[1], sys.argv[2]
    results = {"edm2": fsdp_worker.check_family("edm2", folder), "forced": forced_normalization()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(gathered, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
