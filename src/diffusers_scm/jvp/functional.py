"""`jvp`: the forward-mode derivative the sCD/sCT training step needs (SPEC.md section 3, pitfalls 1-6).

    output, jvp_output = jvp(student, (x_t / sd, t), (dx / sd, dt))

It runs the pass inside `jvp_mode` (any attention intercepted with a forward-mode rule; no module needed, so plain
closures work), forks and restores the RNG state (so the
dropout masks of the following gradient pass are the same), switches gradient checkpointing off, differentiates the
unwrapped module of a DDP / compiled wrapper (the gradient pass still goes through the wrapper), and can run in
float32 when the surrounding step uses bf16/fp16 autocast.
"""

import contextlib
import functools

import torch
from torch import nn

from .processors import float64_precision, jvp_mode


__all__ = ["jvp", "unwrap_model", "METHODS"]

METHODS = ("forward_ad", "func", "finite_difference")


def unwrap_model(module):
    """The module inside DistributedDataParallel / DataParallel / FSDP-free wrappers and `torch.compile`."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _find_module(fn, module):
    """The module a function calls: `module`, `fn` itself, a partial's function, a bound method's owner, or the first
    module among a closure's free variables (e.g. `lambda x, t: den(x, t, **cond)`)."""
    if module is not None:
        return module
    if isinstance(fn, nn.Module):
        return fn
    if isinstance(fn, functools.partial):
        return _find_module(fn.func, None)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, nn.Module):
            return value
    code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    for name in code.co_names if code is not None else ():
        if isinstance(names.get(name), nn.Module):
            return names[name]
    return None


@contextlib.contextmanager
def _no_gradient_checkpointing(module):
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def _fork_rng(tensors):
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def _cast(values, dtype):
    return tuple(v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for v in values)


@contextlib.contextmanager
def _module_dtype(module, dtype):
    """Temporarily cast a module's floating parameters and buffers to `dtype` (exactly restored afterwards)."""
    if module is None or dtype is None:
        yield
        return
    saved = [(t, t.data) for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    for t, data in saved:
        t.data = data.to(dtype)
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def _finite_difference(fn, primals, tangents, eps, dtype):
    # central differences (f(x + eps v) - f(x - eps v)) / (2 eps), with the perturbation made in `dtype`
    primals, tangents = _cast(primals, dtype), _cast(tangents, dtype)
    plus = tuple(p + eps * t if torch.is_tensor(t) else p for p, t in zip(primals, tangents))
    minus = tuple(p - eps * t if torch.is_tensor(t) else p for p, t in zip(primals, tangents))
    return fn(*primals), (fn(*plus) - fn(*minus)) / (2 * eps)


def jvp(
    fn,
    primals,
    tangents,
    *,
    method: str = "forward_ad",
    backend: str = "auto",
    block_size: int | None = None,
    module: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    create_graph: bool = False,
    fd_eps: float | None = None,
):
    """
    Jacobian-vector product of `fn` at `primals` along `tangents`: returns `(output, jvp_output)`.

    Args:
        fn (`Callable`): a module or function of tensors, e.g. a `TrigFlowDenoiser` called as `fn(x_t, t)`; it may
            be wrapped in DistributedDataParallel (its unwrapped module is differentiated).
        primals (`tuple`): the inputs.
        tangents (`tuple`): one tangent per input (same shapes).
        method (`str`, defaults to "forward_ad"): "forward_ad" (`torch.autograd.forward_ad` dual tensors),
            "func" (`torch.func.jvp`), or "finite_difference": central differences, in float64 unless `dtype` says
            otherwise; an approximation (error O(eps^2) plus rounding), for models or wrappers without forward-mode
            support.
        backend (`str`, defaults to "auto"): JVP attention backend ("math", "blocked", "triton", "auto").
        block_size (`int`, *optional*): key block length of the "blocked" backend (default 512).
        module (`nn.Module`, *optional*): the module whose gradient checkpointing and xformers processors to manage,
            when `fn` is a plain function (default: found in `fn`, a partial or a closure's free variables).
        dtype (`torch.dtype`, *optional*): run the pass in this dtype (autocast off, floating inputs cast), e.g.
            `torch.float32` inside a bf16 step (SPEC.md pitfall 6).
        create_graph (`bool`, defaults to `False`): keep the autograd graph of the outputs (off: the pass runs under
            `no_grad`, as the stop-gradient JVP of sCD/sCT needs).
        fd_eps (`float`, *optional*): finite-difference step (default 1e-6 in float64, 1e-3 otherwise).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown JVP method {method!r}: choose one of {METHODS}.")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"Got {len(primals)} primals but {len(tangents)} tangents.")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if torch.is_tensor(p) and torch.is_tensor(t) and p.shape != t.shape:
            raise ValueError(f"Tangent {i} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}.")

    target = _find_module(fn, module)
    inner = unwrap_model(target) if target is not None else None
    call = inner if isinstance(fn, nn.Module) else fn  # differentiate the unwrapped module (SPEC.md pitfall 4)
    tensors = [x for x in primals if torch.is_tensor(x)]
    device_type = tensors[0].device.type if tensors else "cpu"

    with contextlib.ExitStack() as stack:
        stack.enter_context(_fork_rng(tensors))  # same dropout masks in the gradient pass (pitfall 2)
        if inner is not None:
            stack.enter_context(_no_gradient_checkpointing(inner))  # pitfall 3
        if not create_graph:
            stack.enter_context(torch.no_grad())
        if method == "finite_difference":  # plain forward passes: no attention interception needed
            fd_dtype = dtype or torch.float64
            if fd_dtype == torch.float64:
                stack.enter_context(float64_precision())
            eps = fd_eps if fd_eps is not None else (1e-6 if fd_dtype == torch.float64 else 1e-3)
            stack.enter_context(torch.autocast(device_type, enabled=False))
            stack.enter_context(_module_dtype(inner, fd_dtype))
            out, tangent_out = _finite_difference(call, primals, tangents, eps, fd_dtype)
            stack.close()  # cast back outside float64_precision
            out_dtype = tensors[0].dtype if tensors else out.dtype
            return out.to(out_dtype), tangent_out.to(out_dtype)
        stack.enter_context(
            jvp_mode(inner, backend=backend, block_size=block_size)
        )  # pitfall 1: any attention, with or without a module
        if dtype is not None:
            stack.enter_context(torch.autocast(device_type, enabled=False))
            primals, tangents = _cast(primals, dtype), _cast(tangents, dtype)
        if method == "func":
            return torch.func.jvp(call, primals, tangents)
        fwad = torch.autograd.forward_ad
        with fwad.dual_level():
            duals = [
                fwad.make_dual(p, t) if torch.is_tensor(p) and torch.is_tensor(t) else p
                for p, t in zip(primals, tangents)
            ]
            output = call(*duals)
            primal_out, tangent_out = fwad.unpack_dual(output)
        if tangent_out is None:  # the output does not depend on the inputs
            tangent_out = torch.zeros_like(primal_out)
        return primal_out, tangent_out
