"""Everything worth measuring on one GPU, in one process, under a time budget: writes DIR/gpu_check.json and a report,
DIR/gpu_check.md.

    python benchmarks/gpu_check.py --output_dir DIR [--budget_s 420] [--sections attention jvp_model ...]
    python benchmarks/gpu_check.py --quick --output_dir DIR      # the same code at toy sizes on CPU (under a minute)

Sections (each calls the measuring code of the benchmark named, with GPU sizes):
    attention   JVP attention (`bench_jvp_attention`): backends math / blocked / triton, bfloat16 and float32, self- and
                cross-attention (300 text keys), without and with a padding mask (as a key-padding mask, and for
                self-attention also as the full boolean mask the Triton kernel takes), 1k / 4k / 16k tokens: relative
                error of the output and of its tangent against float64 "math" on the same (rounded) inputs, time and
                peak memory. Triton runs only where `route` sends the call.
    jvp_model   one JVP pass / one no-grad forward (`bench_jvp_model`) of SD3-, Flux-, Sana- and Wan-shaped networks
                (diffusers' own classes, random weights, 100-300M parameters, 1024x1024-sized latents) under bfloat16
                autocast, per backend ("auto" routes to Triton where the call fits).
    train_step  one sCD step (teacher with guidance, JVP, gradient pass, Adam, EMA) / one diffusion step of the same
                SD3-shaped network (`bench_train_step.training_step`), bfloat16 autocast; the JVP in float32
                (distill.py's default) and in bfloat16.
    sampling    seconds per image at 1024x1024 (`bench_sampling.seconds_per_image`): `SCMPipeline` 1 and 2 steps
                against `StableDiffusion3Pipeline` with `FlowMatchLCMScheduler` loaded from the same folder (a random
                SD3-shaped transformer and SD3's VAE architecture, bfloat16, prompt embeddings given).
    memory      the memory planner (`diffusers_scm.memory.plan_memory`) against `torch.cuda.max_memory_allocated` of
                sCD steps (`bench_memory.scd_setup`): full, LoRA (rank 16) and full with gradient checkpointing.

Each section has a share of `--budget_s` (time a section leaves unused goes to the next) and checks it before each
measurement, recording "skipped: out of time" instead of overrunning; a failing section or measurement is recorded and
the rest still run. CUDA peak memory is reset around each measurement; on CPU that column reads "n/a: no CUDA".
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import best_time, peak_memory_baseline, peak_memory_since  # noqa: E402


NO_CUDA = "n/a: no CUDA"
OUT_OF_TIME = "skipped: out of time"
SECTIONS = ("attention", "jvp_model", "train_step", "sampling", "memory")
SHARES = {"attention": 0.22, "jvp_model": 0.22, "train_step": 0.14, "sampling": 0.16, "memory": 0.16}
FAMILIES = ("sd3", "flux", "sana", "wan")

# SD3's VAE (stabilityai/stable-diffusion-3-medium, vae/config.json): 16 latent channels, 8x downsampling
SD3_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}


@dataclasses.dataclass
class Sizes:
    """What each section measures at one scale."""

    attention_lengths: tuple  # query tokens
    attention_heads: int
    attention_head_dim: int
    text_tokens: int  # keys of cross-attention; prompt tokens of the sampling section
    block_size: int | None  # key block of "blocked" (None: the default, 512)
    reference_chunk: int  # queries per float64 reference call
    repeats: int
    families: dict  # family -> bench_jvp_model.build keywords (width, depth, latent)
    resolution: int  # sampling: image side in pixels
    vae: dict
    sampling_batch: int
    memory_limit_fraction: float  # "math" attention is skipped where its N x N matrices would pass this share


GPU = Sizes(
    attention_lengths=(1024, 4096, 16384),
    attention_heads=8,
    attention_head_dim=64,
    text_tokens=300,
    block_size=None,
    reference_chunk=1024,
    repeats=5,
    families={
        "sd3": {"width": 768, "depth": 2, "latent": 128},  # 251M parameters, 4096 tokens
        "flux": {"width": 768, "depth": 2, "latent": 128},  # 178M, 4096 tokens (2 x 2 packed)
        "sana": {"width": 768, "depth": 2, "latent": 32},  # 153M, 1024 tokens (a 32x downsampling autoencoder)
        "wan": {"width": 768, "depth": 2, "latent": 64},  # 119M, 4 frames x 1024 tokens
    },
    resolution=1024,
    vae=SD3_VAE,
    sampling_batch=2,
    memory_limit_fraction=0.5,
)
QUICK = Sizes(
    attention_lengths=(64, 128),
    attention_heads=2,
    attention_head_dim=32,
    text_tokens=20,
    block_size=32,  # several key blocks: the online-softmax recurrence runs
    reference_chunk=48,  # several reference chunks
    repeats=1,
    families={name: {"width": 128, "depth": 0.2, "latent": 8} for name in FAMILIES},
    resolution=32,
    vae={**SD3_VAE, "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
    sampling_batch=1,
    memory_limit_fraction=0.5,
)


class Budget:
    """The run's deadline, and each section's: its share of the budget plus what earlier sections left."""

    def __init__(self, seconds: float, start: float):
        self.total, self.start, self.banked = seconds, start, 0.0
        self.section_end = start

    def open_section(self, name: str):
        now = time.perf_counter()
        self.section_end = min(self.start + self.total, now + SHARES[name] * self.total + self.banked)

    def close_section(self):
        self.banked = max(0.0, self.section_end - time.perf_counter())

    def left(self) -> float:
        return self.section_end - time.perf_counter()


@dataclasses.dataclass
class Context:
    device: str
    sizes: Sizes
    budget: Budget
    quick: bool
    reserve_s: float  # the least time a measurement is started with

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def has_time(self) -> bool:
        return self.budget.left() > self.reserve_s


def _peak_start(ctx):
    return peak_memory_baseline(ctx.device) if ctx.cuda else None


def _peak_mb(ctx, baseline):
    """MiB of CUDA memory allocated at the peak since `_peak_start`, above what was allocated then."""
    return peak_memory_since(ctx.device, baseline) / 2**20 if ctx.cuda else NO_CUDA


def _free(ctx):
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _failure(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _triton_state(ctx) -> str | None:
    """Why the Triton kernel cannot run at all here, or None."""
    from diffusers_scm.jvp.attention import _triton_installed

    if not ctx.cuda:
        return NO_CUDA
    if not _triton_installed():
        return "not installed"
    return None


# ---- attention ------------------------------------------------------------------------------------------------------
def _attention_inputs(ctx, n_q, kind, mask_kind, generator):
    """float64 inputs of one configuration: q, k, v, their tangents (cross-attention: none on the text's keys and values,
    as in a network) and the mask (padding: the last eighth of the keys, or of the text's tokens beyond the first
    quarter, are padding)."""
    s = ctx.sizes
    n_k = n_q if kind == "self" else s.text_tokens
    q_shape, k_shape = (
        (1, s.attention_heads, n_q, s.attention_head_dim),
        (1, s.attention_heads, n_k, s.attention_head_dim),
    )

    def draw(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(ctx.device)

    q, dq, k, v = draw(q_shape), draw(q_shape), draw(k_shape), draw(k_shape)
    dk, dv = (draw(k_shape), draw(k_shape)) if kind == "self" else (None, None)
    mask = None
    if mask_kind != "none":
        valid = n_k - n_k // 8 if kind == "self" else max(1, n_k // 4)
        mask = torch.zeros(1, n_k, dtype=torch.bool, device=ctx.device)
        mask[:, :valid] = True  # key-padding mask (batch, keys)
        if mask_kind == "padding_full":  # the full (batch, heads, N, N) boolean mask the Triton kernel takes
            mask = mask[:, None, None, :].expand(1, s.attention_heads, n_q, n_k).contiguous()
    return q, k, v, dq, dk, dv, mask


def _reference(q, k, v, dq, dk, dv, mask, chunk):
    """float64 "math" output and tangent, computed for `chunk` queries at a time (rows are independent)."""
    from diffusers_scm.jvp import jvp_attention

    outs, douts = [], []
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        m = mask[..., rows, :] if mask is not None and mask.ndim == 4 else mask
        out, dout = jvp_attention(q[..., rows, :], k, v, dq[..., rows, :], dk, dv, m, backend="math")
        outs.append(out)
        douts.append(dout)
    return torch.cat(outs, dim=-2), torch.cat(douts, dim=-2)


def _rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def section_attention(ctx: Context) -> dict:
    from bench_jvp_attention import attention_call

    from diffusers_scm.jvp.attention import route

    s = ctx.sizes
    dtypes = (torch.float32, torch.bfloat16)
    backends = ("math", "blocked", "triton")
    capacity = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.cuda else None
    triton_state = _triton_state(ctx)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in s.attention_lengths:
        for kind in ("self", "cross"):
            for mask_kind in ("none", "padding", "padding_full") if kind == "self" else ("none", "padding"):
                inputs = _attention_inputs(ctx, n, kind, mask_kind, g) if ctx.has_time() else None
                for dtype in dtypes:
                    cast = None
                    if inputs is not None:
                        cast = [None if x is None or x.dtype == torch.bool else x.to(dtype) for x in inputs[:6]]
                        cast.append(inputs[6])
                        ref = None
                    for backend in backends:
                        row = {"tokens": n, "attention": kind, "mask": mask_kind, "dtype": str(dtype)[6:]}
                        row["backend"] = backend
                        rows.append(row)
                        fields = ("out_rel_err", "tangent_rel_err", "seconds", "peak_mb")
                        if cast is None or not ctx.has_time():
                            row.update(dict.fromkeys(fields, OUT_OF_TIME))
                            continue
                        if backend == "triton":
                            why = triton_state
                            if why is None:
                                chosen, reason = route(*cast[:3], cast[6], "auto")
                                why = None if chosen == "triton" else f"not routed: {reason}"
                            if why is not None:
                                row.update(dict.fromkeys(fields, why))
                                continue
                        if backend == "math" and capacity is not None:
                            n_k = cast[1].shape[-2]
                            matrices = 5 * s.attention_heads * n * n_k * dtype.itemsize
                            if matrices > s.memory_limit_fraction * capacity:
                                row.update(dict.fromkeys(fields, f"skipped: ~{matrices / 2**30:.0f} GiB of N x N"))
                                continue
                        try:
                            if ref is None:  # float64 math on the rounded inputs: the backend's own error only
                                wide = [None if x is None or x.dtype == torch.bool else x.double() for x in cast[:6]]
                                ref = _reference(*wide, cast[6], s.reference_chunk)
                            run = attention_call(backend, *cast, block_size=s.block_size)
                            out, dout = run()
                            row["out_rel_err"], row["tangent_rel_err"] = _rel_err(out, ref[0]), _rel_err(dout, ref[1])
                            del out, dout
                            baseline = _peak_start(ctx)
                            row["seconds"] = best_time(run, s.repeats, ctx.device, warmup=False)
                            row["peak_mb"] = _peak_mb(ctx, baseline)
                        except Exception as e:  # noqa: BLE001 (one failed measurement is a result; go on)
                            row.update({k: _failure(e) for k in fields if k not in row})
                            _free(ctx)
                    cast = ref = None
                inputs = None
                _free(ctx)
    return {
        "config": {
            "batch": 1,
            "heads": s.attention_heads,
            "head_dim": s.attention_head_dim,
            "cross_attention_keys": s.text_tokens,
            "block_size": s.block_size or 512,
            "repeats": s.repeats,
        },
        "rows": rows,
    }


# ---- JVP / forward of whole networks --------------------------------------------------------------------------------
@contextlib.contextmanager
def _count_routes(counts: dict):
    """Count the attention calls `route` sends to each backend (the JVP attention looks it up at each call)."""
    module = importlib.import_module("diffusers_scm.jvp.attention")  # the package exports a function of that name
    original = module.route

    def counting(*args, **kwargs):
        chosen = original(*args, **kwargs)
        counts[chosen[0]] = counts.get(chosen[0], 0) + 1
        return chosen

    module.route = counting
    try:
        yield counts
    finally:
        module.route = original


def _autocast_dtype(ctx):
    return torch.bfloat16


def section_jvp_model(ctx: Context) -> dict:
    from bench_jvp_model import build, interleaved_times, passes

    from diffusers_scm import TrigFlowDenoiser

    s = ctx.sizes
    rows = []
    triton_state = _triton_state(ctx)
    for name in FAMILIES:
        backends = ("math", "blocked", "auto")
        if not ctx.has_time():
            rows += [{"family": name, "backend": b, "ratio": OUT_OF_TIME} for b in backends]
            continue
        torch.manual_seed(0)
        with torch.device(ctx.device):
            net, shape, cond, parameterization, tokens = build(name, 1, **s.families[name])
            x = torch.randn(shape)
            t = torch.rand(1) * 1.4 + 0.1
        den = TrigFlowDenoiser(net.eval().requires_grad_(False), parameterization, sigma_data=0.5)
        params = sum(p.numel() for p in net.parameters())
        for backend in backends:
            row = {"family": name, "class": type(net).__name__, "params_M": params / 1e6, "tokens": tokens}
            row["backend"] = backend if backend != "auto" else "auto (triton)"
            rows.append(row)
            fields = ("forward_s", "jvp_s", "ratio", "jvp_peak_mb")
            if backend == "auto" and triton_state is not None:
                row.update(dict.fromkeys(fields, triton_state))
                continue
            if not ctx.has_time():
                row.update(dict.fromkeys(fields, OUT_OF_TIME))
                continue
            try:
                forward, jvp_pass = passes(den, x, t, cond, backend, autocast_dtype=_autocast_dtype(ctx))
                with _count_routes({}) as counts:
                    forward()  # warm-up
                    baseline = _peak_start(ctx)
                    jvp_pass()
                    row["jvp_peak_mb"] = _peak_mb(ctx, baseline)
                if backend == "auto":
                    row["routed"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                row["forward_s"], row["jvp_s"] = interleaved_times(forward, jvp_pass, s.repeats, ctx.device)
                row["ratio"] = row["jvp_s"] / row["forward_s"]
            except Exception as e:  # noqa: BLE001
                row.update({k: _failure(e) for k in fields if k not in row})
        del net, den, x, cond
        _free(ctx)
    return {"config": {"batch": 1, "autocast": "bfloat16", "families": s.families, "repeats": s.repeats}, "rows": rows}


# ---- one sCD step vs one diffusion step -----------------------------------------------------------------------------
def section_train_step(ctx: Context) -> dict:
    import copy

    from bench_jvp_model import build, interleaved_times
    from bench_train_step import training_step

    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training import LogVarHead, SCMLoss, TrigFlowDiffusionLoss, make_ema

    s = ctx.sizes
    torch.manual_seed(0)
    with torch.device(ctx.device):
        net, shape, cond, parameterization, tokens = build("sd3", 1, **s.families["sd3"])
        x0 = torch.randn(shape)
        head = LogVarHead()
    teacher = TrigFlowDenoiser(copy.deepcopy(net).eval().requires_grad_(False).to(torch.bfloat16), parameterization)
    student = TrigFlowDenoiser(net.train(), parameterization)
    optimizer = torch.optim.Adam(list(student.parameters()) + list(head.parameters()), lr=1e-5)
    ema = make_ema(net)
    uncond = {k: torch.zeros_like(v) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    autocast = _autocast_dtype(ctx)
    common = {"cond": cond, "head": head, "ema": ema, "autocast_dtype": autocast}
    diffusion = training_step("diffusion", TrigFlowDiffusionLoss(), student, x0, optimizer, **common)
    rows = []
    for jvp_dtype, label in ((torch.float32, "float32 (distill.py default)"), (None, "bfloat16 (--jvp_dtype auto)")):
        row = {"network": "SD3Transformer2DModel", "params_M": sum(p.numel() for p in net.parameters()) / 1e6}
        row.update(tokens=tokens, jvp_dtype=label)
        rows.append(row)
        fields = ("diffusion_s", "scd_s", "ratio", "diffusion_peak_mb", "scd_peak_mb")
        if not ctx.has_time():
            row.update(dict.fromkeys(fields, OUT_OF_TIME))
            continue
        try:
            loss = SCMLoss(tangent_warmup_steps=0, guidance_scale=2.0, jvp_dtype=jvp_dtype)
            scd = training_step("scd", loss, student, x0, optimizer, teacher, uncond=uncond, **common)
            for name, step in (("diffusion", diffusion), ("scd", scd)):
                step()  # warm-up; the peak of one step
                baseline = _peak_start(ctx)
                value = step().detach()
                row[f"{name}_peak_mb"] = _peak_mb(ctx, baseline)
                if not math.isfinite(float(value)):
                    raise FloatingPointError(f"non-finite {name} loss {float(value)}")
            row["diffusion_s"], row["scd_s"] = interleaved_times(diffusion, scd, s.repeats, ctx.device)
            row["ratio"] = row["scd_s"] / row["diffusion_s"]
        except Exception as e:  # noqa: BLE001
            row.update({k: _failure(e) for k in fields if k not in row})
    return {
        "config": {"batch": 1, "autocast": "bfloat16", "guidance_scale": 2.0, "teacher": "bfloat16 copy"},
        "rows": rows,
        "limit": "sCD step / diffusion step about 2",
    }


# ---- seconds per image ----------------------------------------------------------------------------------------------
def _student_folder(ctx, folder):
    """A random SD3-shaped student saved as an SCMPipeline folder (transformer, VAE, flow-matching TrigFlowScheduler,
    the family pipeline named), as distill.py saves a text-to-image student."""
    from bench_jvp_model import build
    from diffusers import AutoencoderKL

    from diffusers_scm import SCMPipeline, TrigFlowScheduler

    s = ctx.sizes
    levels = len(s.vae["block_out_channels"])
    vae_cfg = dict(s.vae.items())
    torch.manual_seed(0)
    with torch.device(ctx.device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **vae_cfg,
        )
        latent = s.resolution // 2 ** (levels - 1)
        net = build("sd3", 1, **{**s.families["sd3"], "latent": latent})[0]
    scheduler = TrigFlowScheduler(parameterization="flow_matching", sigma_data=0.5)
    pipe = SCMPipeline(transformer=net, scheduler=scheduler, vae=vae, family_pipeline="StableDiffusion3Pipeline")
    pipe.save_pretrained(folder)
    return sum(p.numel() for p in net.parameters()), sum(p.numel() for p in vae.parameters()), latent


def section_sampling(ctx: Context) -> dict:
    from bench_sampling import seconds_per_image
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    from diffusers_scm import SCMPipeline

    s = ctx.sizes
    b, dtype = s.sampling_batch, torch.bfloat16
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        params, vae_params, latent = _student_folder(ctx, folder)
        _free(ctx)
        student = SCMPipeline.from_pretrained(folder, torch_dtype=dtype).to(ctx.device)
        text = dict.fromkeys(("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2"))
        family = StableDiffusion3Pipeline.from_pretrained(
            folder, scheduler=FlowMatchLCMScheduler(shift=1.0), tokenizer_3=None, torch_dtype=dtype, **text
        ).to(ctx.device)
        width = student.transformer.config.joint_attention_dim
        pooled = student.transformer.config.pooled_projection_dim
        g = torch.Generator(ctx.device).manual_seed(0)
        embeds = {
            "prompt_embeds": torch.randn(b, s.text_tokens, width, generator=g, device=ctx.device, dtype=dtype),
            "pooled_prompt_embeds": torch.randn(b, pooled, generator=g, device=ctx.device, dtype=dtype),
        }
        size = {"height": s.resolution, "width": s.resolution, "output_type": "pt"}
        for steps in (1, 2):
            for name, pipe in (("SCMPipeline", student), ("StableDiffusion3Pipeline + FlowMatchLCMScheduler", family)):
                row = {"pipeline": name, "steps": steps, "resolution": s.resolution, "batch": b}
                rows.append(row)
                if not ctx.has_time():
                    row.update(seconds_per_image=OUT_OF_TIME, peak_mb=OUT_OF_TIME)
                    continue
                extra = {}
                if pipe is family:  # the student's own times, as flow sigmas; no classifier-free guidance
                    extra = {"sigmas": student.scheduler.flow_sigmas(steps), "guidance_scale": 1.0}
                try:
                    call = {**embeds, **size, **extra, "num_inference_steps": steps}
                    images = pipe(**call).images
                    if not torch.isfinite(images).all():
                        raise FloatingPointError("non-finite images")
                    baseline = _peak_start(ctx)
                    row["seconds_per_image"] = seconds_per_image(pipe, b, s.repeats, ctx.device, **call)
                    row["peak_mb"] = _peak_mb(ctx, baseline)
                except Exception as e:  # noqa: BLE001
                    row.update({k: _failure(e) for k in ("seconds_per_image", "peak_mb") if k not in row})
        del student, family
    _free(ctx)
    config = {"transformer_params_M": params / 1e6, "vae_params_M": vae_params / 1e6, "latent": latent}
    config.update(dtype="bfloat16", prompt_tokens=s.text_tokens, repeats=s.repeats)
    return {"config": config, "rows": rows}


# ---- the memory planner against the measured peak -------------------------------------------------------------------
def section_memory(ctx: Context) -> dict:
    from bench_memory import scd_setup

    from diffusers_scm.memory import plan_memory

    s = ctx.sizes
    rows = []
    for label, mode, checkpointing in (
        ("full", "full", False),
        ("LoRA rank 16", "lora", False),
        ("full, gradient checkpointing", "full", True),
    ):
        row = {"configuration": label}
        rows.append(row)
        fields = ("predicted_mb", "measured_mb", "ratio")
        if not ctx.has_time():
            row.update(dict.fromkeys(fields, OUT_OF_TIME))
            continue
        try:
            _free(ctx)
            baseline = _peak_start(ctx)  # before the networks are built: they are part of the peak
            step, info = scd_setup(
                "sd3",
                mode,
                ctx.device,
                s.families["sd3"],
                gradient_checkpointing=checkpointing,
                teacher_dtype=torch.bfloat16,
                autocast_dtype=_autocast_dtype(ctx),
                jvp_dtype=torch.float32,
            )
            for _ in range(2):  # the second step has Adam's moments
                loss = step().detach()
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite loss {float(loss)}")
            measured = _peak_mb(ctx, baseline)
            del step
            plan = plan_memory(
                info["config"],
                mode="lora" if mode == "lora" else "ddp",
                lora_rank=16,
                gradient_checkpointing=checkpointing,
                resolution=info["latent"],
                vae_scale_factor=1,
                text_tokens=info["text_tokens"],
                act_bytes=2,
                teacher_bytes=info["teacher_bytes"],
                overhead_gb=0,
            )
            row["predicted_mb"] = plan.total / 2**20
            row["measured_mb"] = measured
            row["ratio"] = row["predicted_mb"] / measured if ctx.cuda else NO_CUDA
            row["parameters_M"] = plan.parameters / 1e6
            row["trainable_M"] = plan.trainable / 1e6
            row["tokens"] = plan.tokens
        except Exception as e:  # noqa: BLE001
            row.update({k: _failure(e) for k in fields if k not in row})
        _free(ctx)
    config = {"network": "SD3Transformer2DModel", **s.families["sd3"], "batch": 1, "autocast": "bfloat16"}
    config.update(teacher="bfloat16", jvp_dtype="float32", steps=2)
    return {"config": config, "rows": rows, "target": "predicted / measured within 25%"}


SECTION_FUNCTIONS = {
    "attention": section_attention,
    "jvp_model": section_jvp_model,
    "train_step": section_train_step,
    "sampling": section_sampling,
    "memory": section_memory,
}
TITLES = {
    "attention": "JVP attention: error against float64, time, peak memory",
    "jvp_model": "One JVP pass / one forward pass, bfloat16 autocast",
    "train_step": "One sCD training step / one diffusion training step",
    "sampling": "Seconds per image: SCMPipeline against the family pipeline with FlowMatchLCMScheduler",
    "memory": "Memory planner against the measured peak",
}


# ---- the report -----------------------------------------------------------------------------------------------------
def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value).replace("|", "/")


def markdown(report: dict) -> str:
    lines = ["# GPU check", ""]
    lines.append(
        f"Device: {report['device_name']} ({report['device']}); torch {report['torch']}, diffusers "
        f"{report['diffusers']}, jvp-flash-attention: {report['jvp_flash_attention']}; "
        f"{'quick (toy sizes)' if report['quick'] else 'GPU sizes'}; {report['elapsed_s']:.0f} s of a "
        f"{report['budget_s']:.0f} s budget."
    )
    for name, section in report["sections"].items():
        lines += ["", f"## {TITLES[name]}", "", f"Status: {section['status']} ({section.get('seconds', 0):.1f} s)."]
        if section.get("config"):
            lines += ["", "Configuration: " + ", ".join(f"{k} {v}" for k, v in section["config"].items()) + "."]
        for key in ("limit", "target"):
            if key in section:
                lines += ["", f"{key.capitalize()}: {section[key]}."]
        rows = section.get("rows") or []
        if rows:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
        if section.get("error"):
            lines += ["", "```", section["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--budget_s", type=float, default=420.0, help="seconds for all sections together")
    parser.add_argument("--quick", action="store_true", help="toy sizes on CPU: the same code, in under a minute")
    parser.add_argument("--device", default=None, help="default: cuda (CPU with --quick)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    device = args.device or ("cpu" if args.quick else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --quick (toy sizes on CPU), or --device cpu for GPU sizes on CPU")
    import diffusers

    from diffusers_scm.jvp.attention import _triton_installed

    if _triton_installed():
        from importlib.metadata import version

        flash = version("jvp-flash-attention")
    else:
        flash = "not installed"
    budget = Budget(args.budget_s, start)
    ctx = Context(device, QUICK if args.quick else GPU, budget, args.quick, reserve_s=1.0 if args.quick else 5.0)
    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if ctx.cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "jvp_flash_attention": flash,
        "quick": args.quick,
        "budget_s": args.budget_s,
        "sections": {},
    }
    os.makedirs(args.output_dir, exist_ok=True)
    for name in args.sections:
        budget.open_section(name)
        began = time.perf_counter()
        if not ctx.has_time():
            section = {"status": OUT_OF_TIME}
        else:
            try:
                section = {"status": "ok", **SECTION_FUNCTIONS[name](ctx)}
            except Exception as e:  # noqa: BLE001 (a GPU run is precious: record it, run the rest)
                section = {"status": _failure(e), "error": traceback.format_exc()[-4000:]}
        section["seconds"] = time.perf_counter() - began
        budget.close_section()
        _free(ctx)
        report["sections"][name] = section
        print(f"{name}: {section['status']} ({section['seconds']:.1f} s)", flush=True)
    report["elapsed_s"] = time.perf_counter() - start
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {os.path.join(args.output_dir, 'gpu_check.json')} and gpu_check.md")
    return report


if __name__ == "__main__":
    main()
