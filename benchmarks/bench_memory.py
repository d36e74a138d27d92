"""The memory planner (`diffusers_scm.memory`) against the measured peak memory of sCD steps on CPU.

    python benchmarks/bench_memory.py [--json PATH]

For several families of `bench_jvp_model.py` (16-36M parameters), full fine-tuning with a separate teacher copy and
a LoRA student (rank 16): one sCD step with guidance (teacher passes, JVP pass, gradient pass, Adam step, EMA update),
each in a fresh process; measured = growth of the peak resident set from before the models are built. The planner is
run with this setting's precisions (float32 activations and teacher, no CUDA overhead). Target: within 25%.
"""

import argparse
import copy
import json
import multiprocessing as mp

import torch
from _timing import peak_memory_baseline, peak_memory_since, write_results


def scd_setup(
    family,
    mode,
    device="cpu",
    build_kwargs=None,
    gradient_checkpointing=False,
    teacher_dtype=None,
    autocast_dtype=None,
    jvp_dtype=None,
):
    """One step of full (`mode` "full": a separate frozen teacher copy) or LoRA (`mode` "lora", rank 16: the teacher is
    the base network with its adapters off) sCD training with guidance, for a family of `bench_jvp_model.build`
    (`build_kwargs` size it), on `device`; the teacher (LoRA: the base weights) in `teacher_dtype` when given. Returns
    `(step, info)`, or None for a LoRA row of a network without LoRA support. `step()` runs the teacher passes, the
    JVP pass, the gradient pass, the Adam step and the EMA update; `info` holds the network's config, its prompt
    length, the teacher's bytes per parameter and the latent side."""
    from bench_jvp_model import build
    from bench_train_step import training_step

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training import LogVarHead, SCMLoss, make_ema
    from diffusers_scm.training.machinery.lora import BaseModelDenoiser, add_lora

    torch.manual_seed(0)
    with torch.device(device):
        net, shape, cond, parameterization, tokens = build(family, 1, **(build_kwargs or {}))
    config = json.loads(net.to_json_string())  # plain JSON types: the result crosses a process queue
    if mode == "lora" and not hasattr(net, "add_adapter"):  # no PeftAdapterMixin (DiT): no LoRA row
        return None
    if mode == "lora":
        teacher_bytes = net.to(teacher_dtype or net.dtype).dtype.itemsize  # the base weights are the teacher's
        add_lora(net, 16)
        student, teacher = TrigFlowDenoiser(net.train(), parameterization), BaseModelDenoiser(net, parameterization)
    else:
        frozen = copy.deepcopy(net).eval().requires_grad_(False)
        teacher = TrigFlowDenoiser(frozen.to(teacher_dtype or frozen.dtype), parameterization)
        teacher_bytes = teacher.inner_model.dtype.itemsize
        student = TrigFlowDenoiser(net.train(), parameterization)
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    head = LogVarHead().to(device)
    params = [p for p in student.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-5)
    ema = make_ema(net, trainable_only=mode == "lora")
    loss_fn = SCMLoss(tangent_warmup_steps=0, guidance_scale=2.0, jvp_dtype=jvp_dtype)
    x0 = torch.randn(shape, device=device)
    uncond = {k: torch.zeros_like(v) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    step = training_step(
        "scd", loss_fn, student, x0, optimizer, teacher, cond, uncond, head, ema, autocast_dtype=autocast_dtype
    )
    text = next((v.shape[1] for v in cond.values() if torch.is_tensor(v) and v.ndim == 3), 0)
    return step, {"config": config, "text_tokens": text, "teacher_bytes": teacher_bytes, "latent": shape[-1]}


def measure(family, mode, queue):
    base = peak_memory_baseline("cpu")
    setup = scd_setup(family, mode)
    if setup is None:
        queue.put(None)
        return
    step, info = setup
    for _ in range(2):
        step()
    measured = peak_memory_since("cpu", base)
    queue.put(
        {
            "family": family,
            "mode": mode,
            "config": info["config"],
            "text_tokens": info["text_tokens"],
            "measured": measured,
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["dit", "sd3", "flux", "pixart", "qwenimage"])
    parser.add_argument("--json", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    from diffusers_scm.memory import plan_memory

    ctx = mp.get_context("spawn")
    rows = []
    sizes = {"dit": (32, 2), "pixart": (32, 2), "sd3": (32, 2), "flux": (32, 2), "qwenimage": (32, 2)}
    for family in args.families:
        for mode in ("full", "lora"):
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(family, mode, queue))
            proc.start()
            row = queue.get(timeout=900)  # a crashed child would leave the queue empty
            proc.join()
            if row is None:
                continue
            latent, _ = sizes.get(family, (32, 2))
            plan = plan_memory(
                row.pop("config"),
                mode="lora" if mode == "lora" else "ddp",
                lora_rank=16,
                resolution=latent,
                vae_scale_factor=1,
                text_tokens=row["text_tokens"],
                act_bytes=4,
                teacher_bytes=4,
                overhead_gb=0,
            )
            row.update(predicted=plan.total, ratio=plan.total / row["measured"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nPredicted vs measured peak memory of one sCD step (CPU, float32, batch 1)")
    print(f"{'family':10} {'mode':5} {'measured MB':>12} {'predicted MB':>13} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['family']:10} {r['mode']:5} {r['measured'] / 2**20:>12.0f} {r['predicted'] / 2**20:>13.0f} {r['ratio']:>6.2f}"
        )
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest deviation: {worst:.0%} ({'meets' if worst <= 0.25 else 'misses'} the 25% target)")
    write_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
