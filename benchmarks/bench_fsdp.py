"""One sCD training step in 2 processes (gloo on CPU): FSDP2 (the student, its Adam moments and EMA sharded per block
by `diffusers_scm.training.fsdp.shard_module`, optionally the frozen teacher too) versus DDP (everything replicated):
wall time and memory per process.

    python benchmarks/bench_fsdp.py [--family sd3] [--repeats 3] [--json PATH]

The network is the SD3 transformer of `bench_jvp_model.py` (31M parameters, 256 tokens). A step is what
`examples/distill.py` runs: `SCMLoss` (teacher forward with guidance 2, JVP pass, gradient pass), backward, gradient
clipping, an Adam step and an EMA update. Each configuration runs in fresh processes (`torch.distributed.run`).
Memory per process: the bytes of training state it holds (its shards of weights, gradients, Adam moments and EMA, and
the teacher), counted tensor by tensor, and the growth of its peak resident set above the process before the models
are built (which adds the activations, the all-gathered blocks and the communication buffers). Prints a table and
writes JSON.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch
from _timing import best_time, peak_memory_baseline, peak_memory_since, write_results


MODES = {"ddp": "DDP", "fsdp": "FSDP2 student", "fsdp_teacher": "FSDP2 student + teacher"}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(family: str, mode: str, repeats: int, out: str):
    import torch.distributed as dist
    from bench_jvp_model import build
    from torch.nn.parallel import DistributedDataParallel

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training import LogVarHead, SCMLoss, make_ema
    from diffusers_scm.training.machinery.fsdp import shard_module

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    base = peak_memory_baseline("cpu")
    torch.manual_seed(0)
    net, shape, cond, parameterization, tokens = build(family, 1)
    teacher = TrigFlowDenoiser(copy.deepcopy(net).eval().requires_grad_(False), parameterization)
    student = TrigFlowDenoiser(net.train(), parameterization)
    head = LogVarHead()
    if mode == "ddp":
        model, head_model = DistributedDataParallel(student), DistributedDataParallel(head)
        params = list(student.parameters()) + list(head.parameters())
    else:
        student.add_module("logvar_head", head)
        model = head_model = shard_module(student, extra_units=(head,))
        params = list(student.parameters())
        if mode == "fsdp_teacher":
            shard_module(teacher)
    optimizer = torch.optim.Adam(params, lr=1e-5)
    ema = make_ema(student.inner_model, 0.05)
    loss_fn = SCMLoss(tangent_warmup_steps=0, guidance_scale=2.0)
    g = torch.Generator().manual_seed(dist.get_rank())
    x0 = torch.randn(shape, generator=g)
    uncond = {k: torch.zeros_like(v) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    logvar = head_model.logvar_head if mode != "ddp" else head_model

    def step():
        loss, _ = loss_fn(model, x0, teacher, 0, None, None, logvar, uncond, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(student.inner_model)

    seconds = best_time(step, repeats)
    state = list(student.parameters()) + [p.grad for p in params] + list(teacher.parameters())
    state += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    state += list(ema.shadow.values())
    row = {
        "rank": dist.get_rank(),
        "step_s": seconds,
        "state_mb": _local_bytes(state) / 2**20,
        "peak_rss_mb": peak_memory_since("cpu", base) / 2**20,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        params_m = sum(p.numel() for p in teacher.parameters()) / 1e6
        summary = {"family": family, "mode": mode, "params_m": params_m, "tokens": tokens}
        summary.update({k: max(r[k] for r in rows) for k in ("step_s", "state_mb", "peak_rss_mb")})
        with open(out, "w") as f:
            json.dump(summary, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/fsdp.json")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.family, args.worker[0], args.repeats, args.worker[1])
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        for i, mode in enumerate(MODES):
            out = os.path.join(folder, f"{mode}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["--master_port", str(29400 + i), os.path.abspath(__file__), "--family", args.family]
            cmd += ["--repeats", str(args.repeats), "--worker", mode, out]
            subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
            with open(out) as f:
                rows.append(json.load(f))
            print(json.dumps(rows[-1]), flush=True)
    ddp = rows[0]
    print(f"\n{rows[0]['family']}: {ddp['params_m']:.1f}M parameters, {ddp['tokens']} tokens, 2 processes (gloo, CPU)")
    print(f"{'mode':<26}{'s/step':>8}{'state MB':>10}{'peak RSS MB':>13}{'time':>7}{'state':>7}{'RSS':>7}")
    for row in rows:
        row["time_vs_ddp"] = row["step_s"] / ddp["step_s"]
        row["state_vs_ddp"] = row["state_mb"] / ddp["state_mb"]
        row["rss_vs_ddp"] = row["peak_rss_mb"] / ddp["peak_rss_mb"]
        print(
            f"{MODES[row['mode']]:<26}{row['step_s']:>8.3f}{row['state_mb']:>10.0f}{row['peak_rss_mb']:>13.0f}"
            f"{row['time_vs_ddp']:>6.2f}x{row['state_vs_ddp']:>6.2f}x{row['rss_vs_ddp']:>6.2f}x"
        )
    write_results(args.json, {"rows": rows, "processes": 2, "backend": "gloo", "device": "cpu"})


if __name__ == "__main__":
    main()
