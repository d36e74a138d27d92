"""One sCD training step of a LoRA student (rank 16, one copy of the base weights) versus full fine-tuning (a float32
student beside a frozen teacher copy): wall time and peak memory.

    python benchmarks/bench_lora.py [--family sd3] [--rank 16] [--json PATH]

The network is the SD3 transformer of `bench_jvp_model.py` (31M parameters, 256 tokens). A step is `SCMLoss` (teacher
forward with guidance 2, JVP pass, gradient pass), backward and an Adam step, as `examples/distill.py` runs it. Each
configuration runs in a fresh process: peak memory is the growth of the peak resident set above the process before
the models are built (so it includes the weights, the teacher copy, Adam's moments and the activations). Prints a
table and writes JSON.
"""

import argparse
import copy
import json
import multiprocessing as mp

import torch
from _timing import best_time, peak_memory_baseline, peak_memory_since, write_results


def measure(family, mode, rank, repeats, queue):
    from bench_jvp_model import build

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training import LogVarHead, SCMLoss
    from diffusers_scm.training.machinery.lora import BaseModelDenoiser, add_lora

    base = peak_memory_baseline("cpu")
    torch.manual_seed(0)
    net, shape, cond, parameterization, tokens = build(family, 1)
    if mode == "lora":
        add_lora(net, rank)
        student = TrigFlowDenoiser(net.train(), parameterization)
        teacher = BaseModelDenoiser(net, parameterization)
    else:
        teacher = TrigFlowDenoiser(copy.deepcopy(net).eval().requires_grad_(False), parameterization)
        student = TrigFlowDenoiser(net.train(), parameterization)
    head = LogVarHead()
    params = [p for p in student.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-5)
    loss_fn = SCMLoss(tangent_warmup_steps=0, guidance_scale=2.0)
    x0 = torch.randn(shape)
    uncond = {k: torch.zeros_like(v) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}

    def step():
        loss, _ = loss_fn(student, x0, teacher, 0, None, None, head, uncond, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = best_time(step, repeats)
    queue.put(
        {
            "family": family,
            "mode": mode,
            "rank": rank if mode == "lora" else None,
            "trainable_params": sum(p.numel() for p in params),
            "step_s": seconds,
            "peak_mb": peak_memory_since("cpu", base) / 2**20,
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd3")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/lora.json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for mode in ("full", "lora"):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args.family, mode, args.rank, args.repeats, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(json.dumps(rows[-1]), flush=True)
    full, lora = rows
    print(f"\nOne sCD step, {args.family} (CPU, {torch.get_num_threads()} threads, batch 1)")
    print(f"{'mode':6} {'trainable':>12} {'step s':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['mode']:6} {r['trainable_params']:>12} {r['step_s']:>8.3f} {r['peak_mb']:>8.0f}")
    print(
        f"LoRA / full: time {lora['step_s'] / full['step_s']:.2f}x, peak memory {lora['peak_mb'] / full['peak_mb']:.2f}x"
    )
    write_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
