"""Teacher loading, EMA, data and checkpoints of the training library."""

import json
import os

import pytest
import torch
from conftest import tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    SCMScheduler,
)

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.training import ConstantDecayEMA, PowerFunctionEMA, load_teacher, sigma_rel_to_gamma
from diffusers_scm.training.data.images import DigitsDataset, to_model_channels
from diffusers_scm.training.machinery.checkpointing import find_checkpoint, load_checkpoint, rotate_checkpoints


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        (
            EDMEulerScheduler(sigma_data=0.6, prediction_type="v_prediction"),
            ("edm", {"sigma_data": 0.6, "prediction_type": "v_prediction"}),
        ),
        (FlowMatchEulerDiscreteScheduler(num_train_timesteps=500), ("flow_matching", {"timestep_scale": 500.0})),
        (
            DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_end=0.012),
            ("vp_v", {"beta_schedule": "scaled_linear", "beta_end": 0.012}),
        ),
        (SCMScheduler(sigma_data=0.5), ("trigflow", {"prediction_type": "velocity"})),
        (TrigFlowODEScheduler(sigma_data=0.7, parameterization="edm"), ("edm", {"sigma_data": 0.7})),
    ],
)
def test_load_teacher_infers_parameterization(tmp_path, scheduler, expected):
    unet = tiny_unet()
    if isinstance(scheduler, TrigFlowODEScheduler):
        SCMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    name, params = expected
    assert teacher.parameterization.name == name
    for key, value in params.items():
        assert getattr(teacher.parameterization, key) == value, key
    assert not any(p.requires_grad for p in teacher.parameters())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 1.0])
    with torch.no_grad():  # the teacher's F goes through the inferred parameterization
        sample, time = teacher.parameterization.model_inputs(x, t)
        raw = unet(sample, time).sample
        torch.testing.assert_close(teacher(x, t), teacher.parameterization.to_trigflow(raw, x, t))
    override = load_teacher(str(tmp_path), parameterization="trigflow", sigma_data=0.9)
    assert override.parameterization.name == "trigflow" and override.sigma_data == 0.9


def test_load_teacher_errors(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "net")
    with pytest.raises(ValueError, match="No scheduler config found.*parameterization="):
        load_teacher(str(tmp_path / "net"))
    assert load_teacher(str(tmp_path / "net"), parameterization="edm").parameterization.name == "edm"
    os.makedirs(tmp_path / "weird")
    (tmp_path / "weird" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"neither a diffusers pipeline.*readme.md"):
        load_teacher(str(tmp_path / "weird"))
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    config_path = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config = json.load(open(config_path))
    config["_class_name"] = "MyOwnScheduler"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ValueError, match="MyOwnScheduler.*Pass `parameterization=`"):
        load_teacher(str(tmp_path / "pipe"))


def test_power_function_ema_matches_closed_form():
    assert abs(sigma_rel_to_gamma(0.05) - 16.97) < 0.01  # EDM2's value
    model = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(model, sigma_rel=0.1)
    gamma = ema.gamma
    values = torch.arange(1, 41, dtype=torch.float64)
    for v in values:
        model.weight.data.fill_(float(v))
        ema.step(model)
    # beta_n = (1 - 1/n)^(gamma + 1) gives step k of n the weight (k^(gamma+1) - (k-1)^(gamma+1)) / n^(gamma+1),
    # the discrete form of EDM2's profile proportional to k^gamma
    weights = values ** (gamma + 1) - (values - 1) ** (gamma + 1)
    expected = (weights * values).sum() / values[-1] ** (gamma + 1)
    assert abs(ema.shadow["weight"].item() - expected.item()) < 1e-4 * expected.item()
    state = ema.state_dict()
    other = PowerFunctionEMA(torch.nn.Linear(1, 1, bias=False), sigma_rel=0.1)
    other.load_state_dict(state)
    target = torch.nn.Linear(1, 1, bias=False)
    other.copy_to(target)
    assert abs(target.weight.item() - expected.item()) < 1e-4 * expected.item()


def test_constant_decay_ema():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = ConstantDecayEMA(model, decay=0.9)
    for v in (1.0, 2.0, 3.0):
        model.weight.data.fill_(v)
        ema.step(model)
    expected = (1.0 * 0.9 + 2.0 * 0.1) * 0.9 + 3.0 * 0.1
    assert abs(ema.shadow["weight"].item() - expected) < 1e-6


def test_digits_dataset_and_channels():
    data = DigitsDataset(resolution=16, split="train")
    assert len(data) == 1500 and len(DigitsDataset(8, "test")) == 297
    item = data[0]
    assert item["pixel_values"].shape == (1, 16, 16) and 0 <= int(item["class_labels"]) <= 9
    assert set(DigitsDataset(8, "train").labels.tolist()) == set(range(10))
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert to_model_channels(torch.zeros(2, 1, 4, 4), 3).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="data has 3 channels but the network takes 4"):
        to_model_channels(torch.zeros(2, 3, 4, 4), 4)


class _FakeAccelerator:
    process_index, is_main_process, scaler = 0, True, None

    def unwrap_model(self, m):
        return m

    def wait_for_everyone(self):
        pass


def test_checkpoints_round_trip_rotate_and_detect_corruption(tmp_path):
    from diffusers_scm.training.machinery.checkpointing import save_checkpoint

    acc = _FakeAccelerator()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ema = PowerFunctionEMA(model)
    ema.step(model)
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3):
        save_checkpoint(acc, str(tmp_path), step, {"student": model}, opt, ema, {"noise": gen}, total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert not any(f.endswith((".pkl", ".bin")) for f in os.listdir(tmp_path / "checkpoint-3"))
    expected_draw = torch.randn(3, generator=torch.Generator().manual_seed(5))
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    other_ema = PowerFunctionEMA(other)
    other_gen = torch.Generator().manual_seed(99)
    folder, step = find_checkpoint(str(tmp_path), "latest")
    assert (
        step == 3 and load_checkpoint(acc, folder, {"student": other}, other_opt, other_ema, {"noise": other_gen}) == 3
    )
    assert torch.equal(other.weight, model.weight) and other_ema.num_updates == 1
    assert torch.equal(torch.randn(3, generator=other_gen), expected_draw)
    assert other_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    (tmp_path / "checkpoint-3" / "student.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(acc, str(tmp_path / "checkpoint-3"), {"student": other}, other_opt, other_ema)
    os.remove(tmp_path / "checkpoint-3" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"missing \['optimizer.pt'\]"):
        load_checkpoint(acc, str(tmp_path / "checkpoint-3"), {"student": other}, other_opt)
    rotate_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    with pytest.raises(ValueError, match="not a checkpoint"):
        find_checkpoint(str(tmp_path), str(tmp_path / "elsewhere"))


def test_interrupted_save_keeps_the_existing_checkpoint(tmp_path, monkeypatch):
    import diffusers_scm.training.machinery.checkpointing as ckpt

    acc = _FakeAccelerator()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(acc, str(tmp_path), 5, {"student": model}, opt)
    before = (tmp_path / "checkpoint-5" / "student.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(acc, str(tmp_path), 5, {"student": torch.nn.Linear(2, 2)}, opt)
    assert (tmp_path / "checkpoint-5" / "student.safetensors").read_bytes() == before


@pytest.mark.parametrize("tensorboard_installed", [True, False])
def test_report_to_names_missing_trackers(monkeypatch, tensorboard_installed):
    """A named tracker that is not installed is an error with the fix (accelerate would only warn, and log nothing);
    the default is tensorboard when it is installed, else no tracker."""
    import importlib.util

    from diffusers_scm.training.machinery.arguments import resolve_report_to

    installed = {"tensorboard"} if tensorboard_installed else set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    assert resolve_report_to(None) == (["tensorboard"] if tensorboard_installed else None)
    assert resolve_report_to("none") is None and resolve_report_to("all") == "all"
    with pytest.raises(ValueError, match="pip install wandb.*--report_to none"):
        resolve_report_to("wandb")
    with pytest.raises(ValueError, match="pip install (tensorboard )?wandb"):
        resolve_report_to("tensorboard,wandb")
    if tensorboard_installed:
        assert resolve_report_to("tensorboard") == ["tensorboard"]
        assert resolve_report_to("comet_ml, tensorboard") == ["comet_ml", "tensorboard"]  # others: accelerate's check
    else:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            resolve_report_to("tensorboard")


def test_adam_is_fused_where_torch_can_and_follows_the_adam_update():
    """`adam` takes torch's fused kernel for plain CPU tensors and keeps its default for a sharded model;
    either way the update is Adam's, checked against the closed form in float64 (bias-corrected moments; the weight
    decay added to the gradient, as torch's Adam adds it)."""
    from diffusers_scm.training.machinery.run import adam

    torch.manual_seed(0)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    start = w.detach().clone()
    lr, (b1, b2), eps, decay = 1e-2, (0.9, 0.99), 1e-8, 0.1
    optimizer = adam([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=decay)
    assert optimizer.param_groups[0]["fused"] is True
    assert adam([w], sharded=True, lr=lr).param_groups[0]["fused"] is None
    grads = [torch.randn_like(start) for _ in range(4)]
    m, v, ref = torch.zeros_like(start), torch.zeros_like(start), start.clone()
    for k, g in enumerate(grads, start=1):
        w.grad = g.clone()
        optimizer.step()
        g = g + decay * ref
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    assert (w.detach() - ref).abs().max().item() < 1e-12
    assert (ref - start).abs().max().item() > 1e-2  # the check has teeth: the parameters moved


def test_list_flags_reach_tensorboard_as_text(tmp_path):
    """A run with list-valued flags (--dmd_step_weights, --validation_prompts) starts its tensorboard tracker:
    tensorboard's hparams take only numbers, strings and booleans, so lists are passed as their JSON."""
    pytest.importorskip("tensorboard")
    import argparse

    from diffusers_scm.training.machinery.arguments import add_common_args, tracker_config
    from diffusers_scm.training.machinery.run import make_accelerator

    p = argparse.ArgumentParser()
    add_common_args(p, str(tmp_path / "run"))
    p.add_argument("--weights", type=float, nargs="+", default=[3.0, 1.0])
    args = p.parse_args(["--report_to", "tensorboard"])
    config = tracker_config(vars(args))
    assert config["weights"] == "[3.0, 1.0]" and "hub_token" not in config  # None dropped
    accelerator = make_accelerator(args, "run")
    accelerator.log({"loss": 1.0}, step=1)
    accelerator.end_training()
    assert any(name.startswith("events.") for _, _, names in os.walk(tmp_path / "run") for name in names)
