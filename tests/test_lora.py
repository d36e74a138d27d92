"""LoRA students (SPEC.md section 9): the JVP through peft's LoRA layers, adapter-only training and EMA, the one-copy
teacher, and the saved student in diffusers' LoRA format (the family pipeline's `load_lora_weights`) and merged (in
SCMPipeline)."""

import copy
import functools

import pytest
import torch
from conftest import load_script
from families import FAMILIES
from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline
from test_distill_script import _launch
from test_t2i_distill import COMMON, PROMPTS, data_dir  # noqa: F401 (data_dir is a fixture)

from diffusers_scm import SCMPipeline, TrigFlowDenoiser
from diffusers_scm.jvp import float64_precision, jvp
from diffusers_scm.training import LogVarHead, SCMLoss, make_ema
from diffusers_scm.training.machinery.lora import BaseModelDenoiser, add_lora, lora_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_network(name="sd3", rank=4, seed=0):
    family = FAMILIES[name]
    network = family.make()
    add_lora(network, rank)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        g = torch.Generator().manual_seed(seed)
        for p in lora_parameters(network):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return family, network


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15_unet"])
def test_jvp_through_lora_layers_matches_float64_finite_differences(name):
    family, network = _lora_network(name)
    den = TrigFlowDenoiser(network.double(), family.parameterization, sigma_data=0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(family.shape, generator=g, dtype=torch.float64)
    cond = family.conditioning(g, torch.float64)
    t, dt = torch.tensor([0.5, 1.2], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    dx = torch.randn_like(x)
    f = functools.partial(den, **cond)
    _, tangent = jvp(f, (x, t), (dx, dt))
    h = 1e-6
    with float64_precision(), torch.no_grad():
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_one_copy_teacher_equals_a_separate_frozen_copy_and_only_the_adapter_trains():
    family = FAMILIES["sd3"]
    teacher_net = family.make()
    separate = TrigFlowDenoiser(copy.deepcopy(teacher_net), "flow_matching", sigma_data=0.5)
    add_lora(teacher_net, rank=4)
    network = teacher_net
    student = TrigFlowDenoiser(network.train(), "flow_matching", sigma_data=0.5)
    one_copy = BaseModelDenoiser(network, "flow_matching", sigma_data=0.5)
    base_before = {k: v.clone() for k, v in network.state_dict().items() if "lora_" not in k}
    ema = make_ema(network, trainable_only=True)
    assert ema.shadow and all("lora_" in k for k in ema.shadow)
    head = LogVarHead()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad] + list(head.parameters()), 1e-2)
    loss_fn = SCMLoss(tangent_warmup_steps=0, guidance_scale=2.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(family.shape, generator=g)
    cond = family.conditioning(g, torch.float32)
    uncond = family.conditioning(g, torch.float32)
    t, noise = torch.tensor([0.4, 1.1]), torch.randn(family.shape, generator=g)
    for step in range(3):
        a, _ = loss_fn(student, x0, one_copy, step, t, noise, head, uncond, **cond)
        b, _ = loss_fn(student, x0, separate, step, t, noise, head, uncond, **cond)
        torch.testing.assert_close(a, b)  # the same teacher velocity from one copy as from two
        optimizer.zero_grad()
        a.backward()
        optimizer.step()
        ema.step(network)
    after = network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # base weights untouched
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in network.named_parameters() if "lora_B" in n)
    with torch.no_grad():  # the teacher view still equals the frozen copy after training
        x = torch.randn(family.shape, generator=g)
        torch.testing.assert_close(one_copy(x, t, **cond), separate(x, t, **cond))


def test_lora_distillation_two_processes_family_lora_loading_and_merged_student(tmp_path, data_dir):  # noqa: F811
    """`--lora_rank`: two processes with gloo; the adapter in diffusers' LoRA format loads into the teacher's own
    pipeline (`load_lora_weights`, the LCM-LoRA use) and samples what the merged student in SCMPipeline samples."""
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    teacher = tmp_path / "sd3"
    save_tiny_pipeline("sd3", teacher)
    out = tmp_path / "lora-student"
    _launch(
        ["--teacher", str(teacher), "--dataset_name", str(data_dir), "--lora_rank", "4", "--learning_rate", "1e-2"]
        + ["--output_dir", str(out), "--max_train_steps", "2", "--guidance_scale", "3.0", *COMMON]
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    student = SCMPipeline.from_pretrained(out)
    family = StableDiffusion3Pipeline.from_pretrained(teacher, scheduler=FlowMatchLCMScheduler(shift=1.0))
    for pipe in (student, family):
        pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 16, IMAGE_SIZE // 4, IMAGE_SIZE // 4, generator=torch.Generator().manual_seed(0))
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "output_type": "pt", "latents": noise}
    sigmas = student.scheduler.flow_sigmas(1)
    base = family(prompt=PROMPTS[:2], num_inference_steps=1, sigmas=sigmas, guidance_scale=1.0, **size).images
    family.load_lora_weights(out)
    with_lora = family(prompt=PROMPTS[:2], num_inference_steps=1, sigmas=sigmas, guidance_scale=1.0, **size).images
    merged = student(prompt=PROMPTS[:2], num_inference_steps=1, **size).images
    torch.testing.assert_close(with_lora, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, merged, atol=1e-4)  # the adapter trained


def test_fuse_lora_saves_only_the_merged_student_and_tcm_is_refused(tmp_path):
    distill = load_script("distill")
    teacher = tmp_path / "sd15"
    save_tiny_pipeline("sd15", teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "fused"
    distill.main(
        ["--teacher", str(teacher), "--dataset_name", str(prompts), "--lora_rank", "2", "--fuse_lora"]
        + ["--teacher_ode_steps", "2", "--output_dir", str(out), "--max_train_steps", "1", *COMMON]
    )
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    student = SCMPipeline.from_pretrained(out)
    assert not any("lora_" in k for k in student.unet.state_dict())
    with pytest.raises(SystemExit):
        distill.parse_args(["--teacher", str(teacher), "--method", "tcm", "--lora_rank", "2"])
