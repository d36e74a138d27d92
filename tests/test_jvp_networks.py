"""JVP through real diffusers networks (SPEC.md section 3, pitfalls 1-6): float64 finite differences as the oracle,
and the RNG, checkpointing, DDP and precision discipline of `jvp`."""

import pytest
import torch
from conftest import tiny_cond_unet, tiny_dit, tiny_unet
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffusers_scm import TrigFlowDenoiser
from diffusers_scm.jvp import jvp, jvp_mode


def _case(kind):
    g = torch.Generator().manual_seed(11)
    if kind == "unet":
        return tiny_unet(), torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), {}
    if kind == "cond_unet":
        ctx = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # padded text tokens of the first sample
        return (
            tiny_cond_unet(),
            torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64),
            {"encoder_hidden_states": ctx, "encoder_attention_mask": mask},
        )
    return (
        tiny_dit(),
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
        {"class_labels": torch.tensor([1, 7])},
    )


@pytest.mark.parametrize("method", ["forward_ad", "func"])
@pytest.mark.parametrize("parameterization", ["trigflow", "vp_v"])
@pytest.mark.parametrize("kind", ["unet", "cond_unet", "dit"])
def test_jvp_in_x_and_t_matches_float64_finite_differences(kind, parameterization, method):
    net, x, cond = _case(kind)
    den = TrigFlowDenoiser(net.double(), parameterization, sigma_data=0.5)
    t = torch.tensor([0.35, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.8, -1.1], dtype=torch.float64)

    def f(a, b):
        return den(a, b, **cond)

    out, tangent = jvp(f, (x, t), (dx, dt), module=den, method=method, backend="blocked")
    h = 1e-6
    with jvp_mode(den), torch.no_grad():  # same float64 time embedding as the JVP pass
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
        plain = f(x, t)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_without_jvp_mode_sdpa_has_no_forward_ad():
    den = TrigFlowDenoiser(tiny_unet().double(), "trigflow")
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(den, (x, torch.ones(1, dtype=torch.float64)), (x, torch.ones(1, dtype=torch.float64)))


def test_jvp_mode_restores_everything_even_on_error():
    from diffusers.models import embeddings
    from diffusers.models.attention_processor import XFormersAttnProcessor

    net = tiny_unet()
    name = next(n for n, m in net.named_modules() if isinstance(m, Attention))
    xformers = XFormersAttnProcessor()  # calls xformers directly: switched to SDPA for the pass
    net.get_submodule(name).set_processor(xformers)
    original_embedding = embeddings.get_timestep_embedding
    with jvp_mode(net, backend="math") as mode:
        assert isinstance(net.get_submodule(name).processor, AttnProcessor2_0)
        assert embeddings.get_timestep_embedding is not original_embedding
        net(torch.randn(1, 1, 8, 8), torch.ones(1))
    assert mode.attention_calls > 0
    with pytest.raises(RuntimeError, match="boom"):
        with jvp_mode(net):
            raise RuntimeError("boom")
    assert net.get_submodule(name).processor is xformers
    assert embeddings.get_timestep_embedding is original_embedding


def test_user_processors_work_and_unmappable_kernels_get_a_clear_error():
    net = tiny_unet().double()

    class CustomProcessor(AttnProcessor2_0):  # a user's processor calling F.scaled_dot_product_attention
        pass

    class XFormersCustomProcessor(AttnProcessor2_0):  # calls a kernel directly, no SDPA equivalent known
        pass

    name = next(n for n, m in net.named_modules() if isinstance(m, Attention))
    net.get_submodule(name).set_processor(CustomProcessor())
    den = TrigFlowDenoiser(net, "trigflow")
    x, t = torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    _, tangent = jvp(den, (x, t), (x, torch.ones_like(t)))
    _, fd = jvp(den, (x, t), (x, torch.ones_like(t)), method="finite_difference")
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6
    net.get_submodule(name).set_processor(XFormersCustomProcessor())
    with pytest.raises(ValueError, match=f"{name}'.*XFormersCustomProcessor.*set_processor"):
        jvp(den, (x, t), (x, torch.ones_like(t)))
    _, fd2 = jvp(den, (x, t), (x, torch.ones_like(t)), method="finite_difference")  # needs none of it
    torch.testing.assert_close(fd2, fd)


def test_dropout_masks_match_between_jvp_pass_and_gradient_pass():
    torch.manual_seed(0)
    net = tiny_unet(attention=True)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    net.train()
    den = TrigFlowDenoiser(net, "trigflow")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 1.0])
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in net.modules())
    torch.manual_seed(123)
    out, _ = jvp(den, (x, t), (torch.randn_like(x), torch.ones(2)))
    grad_pass = den(x, t)  # the gradient pass right after draws the same dropout masks
    torch.testing.assert_close(out, grad_pass, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grad_pass, den(x, t))  # dropout is really active: a fresh pass differs


def test_gradient_checkpointing_is_off_during_the_pass_and_restored():
    net = tiny_unet()
    net.enable_gradient_checkpointing()
    flagged = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False)]
    assert flagged
    seen = []
    hook = flagged[0].register_forward_pre_hook(lambda m, a: seen.append(m.gradient_checkpointing))
    x = torch.randn(1, 1, 8, 8)
    jvp(TrigFlowDenoiser(net, "trigflow"), (x, torch.ones(1)), (x, torch.ones(1)))
    hook.remove()
    assert seen == [False] and all(m.gradient_checkpointing for m in flagged)


def test_ddp_wrapped_module(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        den = TrigFlowDenoiser(tiny_unet(), "edm")
        ddp = DistributedDataParallel(den)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 1.2])
        dx, dt = torch.randn_like(x), torch.ones(2)
        out, tangent = jvp(ddp, (x, t), (dx, dt))
        ref_out, ref_tangent = jvp(den, (x, t), (dx, dt))
        torch.testing.assert_close(tangent, ref_tangent)
        torch.testing.assert_close(out, ref_out)
        loss = (ddp(x, t) * tangent).sum()  # gradient pass through the wrapper
        loss.backward()
        assert all(p.grad is not None for p in den.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_float32_pass_inside_bf16_autocast():
    den = TrigFlowDenoiser(tiny_unet(), "trigflow")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 1.2])
    dx, dt = torch.randn_like(x), torch.ones(2)
    ref_out, ref_tangent = jvp(den, (x, t), (dx, dt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32, tan32 = jvp(den, (x, t), (dx, dt), dtype=torch.float32)
        out16, tan16 = jvp(den, (x, t), (dx, dt))
    assert tan32.dtype == torch.float32
    torch.testing.assert_close(tan32, ref_tangent)
    torch.testing.assert_close(out32, ref_out)
    assert (tan16.float() - ref_tangent).abs().max() > 10 * (tan32 - ref_tangent).abs().max()


def test_finite_difference_fallback_runs_float64_and_restores_the_model():
    net = tiny_unet()
    den = TrigFlowDenoiser(net, "flow_matching")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 1.2])
    dx, dt = torch.randn_like(x), torch.tensor([1.0, -1.0])
    exact = jvp(den.double(), (x.double(), t.double()), (dx.double(), dt.double()))[1]
    den.float()
    out, approx = jvp(den, (x, t), (dx, dt), method="finite_difference")
    assert approx.dtype == torch.float32 and out.dtype == torch.float32
    assert ((approx.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
    assert all(torch.equal(v, net.state_dict()[k]) and v.dtype == net.state_dict()[k].dtype for k, v in state.items())


def test_argument_errors():
    den = TrigFlowDenoiser(tiny_unet(), "trigflow")
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="Unknown JVP method"):
        jvp(den, (x, torch.ones(1)), (x, torch.ones(1)), method="reverse")
    with pytest.raises(ValueError, match="Tangent 0 has shape"):
        jvp(den, (x, torch.ones(1)), (x[..., :4], torch.ones(1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_rules_of_jvp_mode_equal_pytorch_forward_ad(dtype, affine):
    """diffusers' `RMSNorm` module (elementwise ops in its forward), `F.layer_norm` and `F.rms_norm` under `jvp_mode`:
    the same primal and tangent as PyTorch's own forward-mode rules outside it; the module goes through `F.rms_norm`
    for float32/float64 inputs (one rule) and keeps diffusers' forward for bfloat16, and its forward is restored."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(dtype)
    dx = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(dtype)
    norm = RMSNorm(16, eps=1e-6, elementwise_affine=affine).to(dtype)
    weight = torch.randn(16, generator=g, dtype=torch.float64).to(dtype) if affine else None
    if affine:
        norm.weight.data.copy_(weight)
    bias = torch.randn(16, generator=g, dtype=torch.float64).to(dtype) if affine else None
    ops = {
        "module": norm,
        "layer_norm": lambda h: F.layer_norm(h, (5, 16) if not affine else (16,), weight, bias, 1e-5),
        "rms_norm": lambda h: F.rms_norm(h, (16,), weight, 1e-6),
    }
    original = RMSNorm.forward
    for name, op in ops.items():
        with torch.no_grad(), fwAD.dual_level():
            expected = fwAD.unpack_dual(op(fwAD.make_dual(x, dx)))
            calls = []

            class Spy(torch.overrides.TorchFunctionMode):
                def __torch_function__(self, func, types, args=(), kwargs=None):
                    calls.append(func)
                    return func(*args, **(kwargs or {}))

            with jvp_mode(), Spy():
                got = fwAD.unpack_dual(op(fwAD.make_dual(x, dx)))
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        if name == "module" and dtype == torch.float64:
            tol = 1e-6  # diffusers takes the variance in float32 even for float64 inputs; the rule keeps float64
        torch.testing.assert_close(got.primal, expected.primal, rtol=tol, atol=tol)
        torch.testing.assert_close(got.tangent, expected.tangent, rtol=tol, atol=tol * 4)
        assert got.tangent.dtype == dtype
        if name == "module":
            assert (F.rms_norm in calls) == (dtype != torch.bfloat16), name
    assert RMSNorm.forward is original


def test_elementwise_rules_of_jvp_mode_equal_pytorch_forward_ad():
    """Arithmetic on tensors with tangents under `jvp_mode` (`diffusers_scm.jvp.elementwise`): the same primal and
    tangent as PyTorch's own forward-mode rules, for either operand carrying the tangent or both, broadcasting, numbers
    on either side, dtype promotion, and the ops left to PyTorch (gradients recorded, `out=`)."""
    import torch.autograd.forward_ad as fwAD

    from diffusers_scm.jvp.elementwise import elementwise_jvp

    g = torch.Generator().manual_seed(5)

    def r(*shape, dtype=torch.float64):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)

    x, dx, y, dy = r(2, 3, 4), r(2, 3, 4), r(1, 3, 1), r(1, 3, 1)
    c, c32 = r(3, 4), r(4, dtype=torch.float32)
    cases = {
        "x * c": lambda a, b: a * c,
        "c * x": lambda a, b: c * a,
        "x * y": lambda a, b: a * b,
        "2 * x": lambda a, b: 2.0 * a,
        "torch.mul(y, x)": lambda a, b: torch.mul(b, a),
        "x + c": lambda a, b: a + c,
        "c + y (broadcast up)": lambda a, b: x + b,
        "x + y": lambda a, b: a + b,
        "1 + x": lambda a, b: 1 + a,
        "add alpha": lambda a, b: torch.add(a, b, alpha=-0.5),
        "x - c": lambda a, b: a - c,
        "c - x": lambda a, b: c - a,
        "1 - y": lambda a, b: 1 - b,
        "x - y": lambda a, b: a - b,
        "sub alpha": lambda a, b: torch.sub(c, a, alpha=3),
        "x / c": lambda a, b: a / c,
        "c / x": lambda a, b: c / a,
        "2 / y": lambda a, b: 2 / b,
        "x / y": lambda a, b: a.div(b),
        "x ** 2": lambda a, b: a**2,
        "x.pow(3)": lambda a, b: a.pow(3),
        "sqrt by pow": lambda a, b: torch.pow(a, 0.5),
        "x.pow(0)": lambda a, b: a.pow(0),
        "square": lambda a, b: torch.square(b),
        "addcmul": lambda a, b: torch.addcmul(a, b, c, value=0.3),
        "addcmul const input": lambda a, b: torch.addcmul(c, a, b),
        "addcmul one factor": lambda a, b: c.addcmul(a, c),
        "cat with a constant": lambda a, b: torch.cat([a, x.detach() * 2, a], dim=1),
        "cat axis": lambda a, b: torch.concatenate([b, y], axis=0),
        "mean": lambda a, b: a.mean(-1, keepdim=True),
        "sum": lambda a, b: torch.sum(a, dim=(0, 2)),
        "float32 constant (promotion)": lambda a, b: a * c32 + c32,
        "float32 dual, float64 constant": lambda a, b: a.float() * c - c,
    }
    for name, op in cases.items():
        with torch.no_grad(), fwAD.dual_level():
            expected = fwAD.unpack_dual(op(fwAD.make_dual(x, dx), fwAD.make_dual(y, dy)))
            with jvp_mode():
                got = fwAD.unpack_dual(op(fwAD.make_dual(x, dx), fwAD.make_dual(y, dy)))
        assert got.primal.dtype == expected.primal.dtype and got.tangent.dtype == expected.tangent.dtype, name
        tol = 1e-6 if expected.primal.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.primal, expected.primal, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(got.tangent, expected.tangent, rtol=tol, atol=tol, msg=name)

    # the rules apply only to JVP passes without gradients, and not to ops they do not take
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, dx)
        with torch.no_grad():
            assert elementwise_jvp(torch.mul, (dual, c), {}) is not None
            assert elementwise_jvp(torch.mul, (x, c), {}) is None  # no tangent
            assert elementwise_jvp(torch.div, (dual, c), {"rounding_mode": "floor"}) is None
            assert elementwise_jvp(torch.pow, (dual, c), {}) is None  # a tensor exponent
        assert elementwise_jvp(torch.mul, (dual, c), {}) is None  # gradients are recorded


def test_convolution_and_group_norm_rules_of_jvp_mode_equal_pytorch_forward_ad():
    """Convolutions with frozen weights (1-D, 2-D with groups, stride and 'same' padding, 3-D, with and without bias)
    and group norms of contiguous and channels-last activations under `jvp_mode`: the same primal and tangent as
    PyTorch's own forward-mode rules, and the channels-last layout kept."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(9)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w2, w2g, b = r(6, 4, 3, 3), r(6, 2, 3, 3), r(6)
    cases = {
        "conv1d": (r(2, 4, 9), lambda x: F.conv1d(x, w1, None, 2, 1)),
        "conv2d": (r(2, 4, 7, 7), lambda x: F.conv2d(x, w2, b, 1, "same")),
        "conv2d groups": (r(2, 4, 7, 7), lambda x: F.conv2d(x, w2g, b, 2, 1, 1, 2)),
        "conv3d": (r(1, 4, 3, 5, 5), lambda x: F.conv3d(x, w3, b, 1, 1)),
        "group_norm": (r(2, 8, 5, 5), lambda x: F.group_norm(x, 4, r8, b8, 1e-5)),
        "group_norm channels-last": (
            r(3, 8, 5, 5).contiguous(memory_format=torch.channels_last),
            lambda x: F.group_norm(x, 2, r8, b8, 1e-5),
        ),
    }
    w1, w3, r8, b8 = r(5, 4, 3), r(6, 4, 3, 3, 3), r(8), r(8)
    for name, (x, op) in cases.items():
        dx = torch.randn(x.shape, generator=g, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last if "channels-last" in name else torch.contiguous_format
        )
        with torch.no_grad(), fwAD.dual_level():
            # PyTorch's own group-norm rule fails on channels-last tangents: the reference takes contiguous copies
            expected = fwAD.unpack_dual(op(fwAD.make_dual(x.contiguous(), dx.contiguous())))
            with jvp_mode():
                out = op(fwAD.make_dual(x, dx))
                got = fwAD.unpack_dual(out)
        torch.testing.assert_close(got.primal, expected.primal, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(got.tangent, expected.tangent, rtol=1e-10, atol=1e-10, msg=name)
        if "channels-last" in name:
            assert got.primal.is_contiguous(memory_format=torch.channels_last), name
