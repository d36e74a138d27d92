"""The memory planner (`python -m diffusers_scm.memory`): closed forms of each part per parameter (SPEC.md section
9), FSDP and LoRA, and the real models' parameter counts from their configs (built on the meta device)."""

import os

import pytest

from diffusers_scm.memory import GB, main, plan_memory


CONFIGS = os.path.join(os.path.dirname(__file__), "data", "memory_configs")


@pytest.mark.parametrize(
    "name, billions",
    [("flux1_dev", 11.9), ("sd35_large", 8.06), ("sana_1600m_1024px", 1.60), ("wan21_t2v_14b", 14.3)],
)
def test_parameter_counts_of_real_configs(name, billions):
    plan = plan_memory(os.path.join(CONFIGS, f"{name}.json"))
    assert plan.parameters / 1e9 == pytest.approx(billions, rel=0.02)


def test_parts_per_parameter_ddp_fsdp_and_lora():
    config = os.path.join(CONFIGS, "flux1_dev.json")
    ddp = plan_memory(config, gpus=8, mode="ddp")
    p = ddp.parameters
    assert ddp.parts["student weights (float32)"] == 4 * p
    assert ddp.parts["gradients"] == 4 * p and ddp.parts["Adam moments"] == 8 * p and ddp.parts["EMA"] == 4 * p
    assert ddp.parts["frozen teacher"] == 2 * p  # 22 bytes per parameter before activations
    assert not ddp.fits  # 12B x 22 bytes = 262 GB
    fsdp = plan_memory(config, gpus=8, mode="fsdp")
    assert fsdp.parts["student weights (float32)"] == 4 * p / 8 and fsdp.parts["frozen teacher"] == 2 * p / 8
    assert fsdp.parts["activations, gradient pass"] == ddp.parts["activations, gradient pass"]
    lora = plan_memory(config, gpus=8, mode="lora", lora_rank=64)
    assert lora.parts["base weights (student = teacher)"] == 2 * p
    assert 0 < lora.trainable < p / 50 and lora.parts["adapter Adam moments"] == 8 * lora.trainable
    checkpointed = plan_memory(config, gpus=8, mode="fsdp", gradient_checkpointing=True)
    assert checkpointed.parts["activations, gradient pass"] < fsdp.parts["activations, gradient pass"] / 5
    assert checkpointed.total < fsdp.total


def test_tokens_follow_resolution_packing_and_frames():
    flux = plan_memory(os.path.join(CONFIGS, "flux1_dev.json"), resolution=1024)
    assert flux.tokens == 64 * 64 + 512  # 2x2-packed 128x128 latent + T5 tokens
    wan = plan_memory(os.path.join(CONFIGS, "wan21_t2v_14b.json"), resolution=640, frames=21, text_tokens=512)
    assert wan.tokens == 21 * 40 * 40 + 512


def test_command_line_prints_the_table(capsys):
    plan = main(["--model", os.path.join(CONFIGS, "sd35_medium.json"), "--gpus", "8", "--mode", "fsdp"])
    out = capsys.readouterr().out
    assert "total" in out and ("fits" in out) and f"{plan.total / GB:.2f}" in out
    with pytest.raises(ValueError, match="not a diffusers network class"):
        plan_memory({"_class_name": "Nope"})


def test_edm2_presets_by_name():
    """EDM2's published sizes (SPEC.md section 10), built on the meta device from `EDM2_PRESETS`."""
    from diffusers_scm.memory import list_models

    counts = {name: count for name, count, _ in list_models()}
    expected = {"img512-xs": 124.7, "img512-s": 280.2, "img512-m": 497.8, "img512-l": 777.5, "img512-xl": 1119.3}
    for name, millions in {**expected, "img512-xxl": 1523.2, "img64-s": 280.2, "img64-xl": 1119.3}.items():
        assert counts[name] / 1e6 == pytest.approx(millions, abs=0.05), name


def test_unet_activations_are_measured_on_fake_tensors():
    """A UNet's gradient pass is what autograd saves, measured on fake tensors: the same bytes as a real CPU forward
    pass of a small EDM2 network (float32), linear in the batch size beyond the per-pass weight copies, and smaller
    with gradient checkpointing; the sample is the config's size unless a resolution is given (latents: / 8)."""
    import torch

    from diffusers_scm.models.unet_edm2 import EDM2UNet2DModel

    config = {"_class_name": "EDM2UNet2DModel", "sample_size": 16, "in_channels": 4, "model_channels": 32}
    torch.manual_seed(0)
    network = EDM2UNet2DModel.from_config(config).train()
    seen, saved = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(torch.randn(2, 4, 16, 16), torch.rand(2))
    plan = plan_memory(config, batch_size=2, act_bytes=4)
    assert plan.parts["activations, gradient pass"] == saved[0] and plan.tokens == 16 * 16
    one, two, three = (plan_memory(config, batch_size=b, act_bytes=4) for b in (1, 2, 3))
    per_sample = two.parts["activations, gradient pass"] - one.parts["activations, gradient pass"]
    assert three.parts["activations, gradient pass"] - two.parts["activations, gradient pass"] == per_sample > 0
    checkpointed = plan_memory(config, batch_size=2, act_bytes=4, gradient_checkpointing=True)
    assert checkpointed.parts["activations, gradient pass"] < plan.parts["activations, gradient pass"] / 3
    assert plan_memory(config, resolution=64).tokens == 8 * 8  # 64 pixels, a latent network: 8x8 latents


def test_command_line_lists_the_edm2_presets(capsys):
    assert main(["--list"]) is None
    out = capsys.readouterr().out
    for name, size in [("img512-xs", "124.7M"), ("img512-xxl", "1523.2M"), ("img64-xl", "1119.3M")]:
        assert any(line.split()[:2] == [name, size] for line in out.splitlines())
    plan = main(["--model", "img512-xs", "--batch_size", "4", "--gpus", "8"])
    assert plan.tokens == 64 * 64 and f"{plan.total / GB:.2f}" in capsys.readouterr().out
