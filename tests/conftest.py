"""Tiny networks and helpers shared by the tests (everything is built locally; nothing is downloaded)."""

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel


def tiny_unet(in_channels=1, out_channels=None, sample_size=8, attention=True, num_class_embeds=None, seed=0):
    """A random two-level UNet2DModel small enough for CPU tests (eval mode: deterministic kernels)."""
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    model = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
        add_attention=attention,
    )
    return model.eval()


def tiny_dit(num_classes=10, learn_sigma=True, seed=0):
    """A random class-conditional DiT with learned-variance output channels, as the public DiT checkpoints have."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    return model.eval()


def tiny_cond_unet():
    """A random UNet2DConditionModel with cross-attention to 12-dimensional encoder states."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def one_thread():
    """One intra-op thread during the test (tests of whole runs: no oversubscription of small CPU machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str):
    """An example script (`examples/<name>.py`) as a module, for calling its `main(argv)` in the test's process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class TimeConditionedNet(torch.nn.Module):
    """A small convolutional network with a sinusoidal time embedding that stays in the input's precision (float64
    where the test needs it), called as diffusers networks are."""

    def __init__(self, channels=1, width=8, dropout=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.emb = torch.nn.Linear(8, width)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, sample, timestep, return_dict=True):
        freqs = torch.exp(torch.linspace(-4, 0, 4, dtype=sample.dtype))
        arg = timestep[:, None].to(sample.dtype) * freqs
        emb = self.emb(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1))
        h = torch.nn.functional.silu(self.conv1(sample) * (1 + emb[:, :, None, None]))
        out = self.conv2(self.dropout(h))
        return (out,) if not return_dict else type("Out", (), {"sample": out})()


class ToyMLP(torch.nn.Module):
    """An MLP for 2-D data with a positional embedding of the time input."""

    def __init__(self, dim=2, width=64, depth=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers, d = [], dim + 16
        for _ in range(depth):
            layers += [torch.nn.Linear(d, width), torch.nn.SiLU()]
            d = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(d, dim))
        self.register_buffer("freqs", torch.exp(torch.linspace(-4, 0, 8)))

    def forward(self, sample, timestep):
        arg = timestep[:, None].to(sample.dtype) * self.freqs.to(sample.dtype)
        return self.net(torch.cat([sample, torch.sin(arg), torch.cos(arg)], dim=1))
