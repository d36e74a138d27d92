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
