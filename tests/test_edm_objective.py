"""EDM / EDM2 training (`train_teacher.py --objective edm`, SPEC.md section 10): `EDMLoss` against EDM's formulas
computed here from a tiny EDM2 network, its identity with the TrigFlow diffusion loss, the optimum of the uncertainty
weighting, the objective's choice of log-variance head, a few-step run saved as a folder that `load_teacher` reads,
and `evaluate.py --reference_stats` against scipy."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import load_script

from diffusers_scm import SCMPipeline, SCMUNet2DModel, TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.models.unet_edm2 import EDM2UNet2DModel
from diffusers_scm.parameterizations import EDMParameterization
from diffusers_scm.training import TrigFlowDiffusionLoss, load_teacher
from diffusers_scm.training.objectives.edm import EDMLoss, NetworkLogVar, network_logvar
from diffusers_scm.training.objectives.logvar import LogVarHead
from diffusers_scm.training.objectives.objective import EDMObjective
from diffusers_scm.training.objectives.time_proposals import lognormal_times


SD = 0.5
TINY_EDM2 = {
    "sample_size": 8,
    "in_channels": 2,
    "num_classes": 3,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attention_resolutions": [4],
    "channels_per_head": 16,
}


def tiny_edm2(seed=0, **overrides) -> EDM2UNet2DModel:
    """A random EDM2 UNet in float64 with its zero-initialized gains set, so that every path reaches the output."""
    torch.manual_seed(seed)
    net = EDM2UNet2DModel(**{**TINY_EDM2, **overrides}).double().eval()
    with torch.no_grad():
        net.out_gain.fill_(0.7)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.3)
    return net


def edm2_reference(net, x0, noise, sigma, labels):
    """EDM2's loss written from the paper (EDM Table 1, EDM2 Eq. 21), independently of the package's TrigFlow maps:
    x = x0 + sigma n, D = c_skip x + c_out F(c_in x, c_noise), lambda = (sigma^2 + sd^2) / (sigma sd)^2,
    loss = lambda / exp(u) * mean (D - x0)^2 + u. Returns (loss, per-sample weighted error, u)."""
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * noise
    c_skip = SD**2 / (s**2 + SD**2)
    c_out = s * SD / (s**2 + SD**2).sqrt()
    c_in = 1 / (s**2 + SD**2).sqrt()
    c_noise = sigma.log() / 4
    out = net(c_in * x, c_noise, class_labels=labels, return_logvar=True)
    denoised = c_skip * x + c_out * out.sample
    weight = (sigma**2 + SD**2) / (sigma * SD) ** 2
    error = weight * (denoised - x0).pow(2).flatten(1).mean(1)
    u = out.logvar.flatten()
    return (error / u.exp() + u).mean(), error, u


def batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)[:n]
    return x0, noise, sigma, torch.tensor([0, 2, 1, 2])[:n]


def test_edm_loss_equals_edm2_formulas_for_an_edm2_network():
    """Same noise and sigma (t = arctan(sigma / sd)): the loss through the "edm" denoiser and the network's own
    log-variance equals EDM2's loss computed from the raw network, and without a head the plain EDM loss."""
    net = tiny_edm2()
    x0, noise, sigma, labels = batch()
    expected, error, u = edm2_reference(net, x0, noise, sigma, labels)
    assert u.abs().min() > 1e-3 and error.min() > 0  # the head and the network both contribute
    denoiser = TrigFlowDenoiser(net, "edm", sigma_data=SD)
    t = torch.atan(sigma / SD)
    loss_fn = EDMLoss(sigma_data=SD)
    loss, logs = loss_fn(denoiser, x0, t=t, noise=noise, logvar_head=network_logvar(denoiser), class_labels=labels)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logs["loss"], error, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logs["logvar"], u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logs["sigma"], sigma, rtol=1e-12, atol=0)
    plain, _ = loss_fn(denoiser, x0, t=t, noise=noise, class_labels=labels)
    torch.testing.assert_close(plain, error.mean(), rtol=1e-10, atol=1e-12)


def test_edm_weighting_is_the_trigflow_diffusion_loss():
    """lambda(sd tan t) ||D - x0||^2 = ||sd F - v_t||^2 / sd^2 at every t (SPEC.md section 1): the per-sample losses
    of EDMLoss and TrigFlowDiffusionLoss agree for any network, here a TrigFlow SCMUNet2DModel."""
    torch.manual_seed(0)
    net = SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=2).double().eval()
    denoiser = TrigFlowDenoiser(net, "trigflow", sigma_data=SD)
    x0, noise, sigma, _ = batch(seed=3)
    t = torch.atan(sigma / SD)
    _, edm = EDMLoss(SD)(denoiser, x0, t=t, noise=noise)
    _, trigflow = TrigFlowDiffusionLoss(SD)(denoiser, x0, t=t, noise=noise)
    torch.testing.assert_close(edm["loss"], trigflow["loss"], rtol=1e-10, atol=1e-14)


def test_uncertainty_gradient_vanishes_at_the_weighted_error():
    """d/du (L / exp(u) + u) = 1 - L exp(-u): zero at u* = ln L (the weighted error of each sample), and
    (1 - exp(-delta)) / B at u* + delta; the loss at the optimum is mean(1 + ln L)."""
    net = tiny_edm2()
    denoiser = TrigFlowDenoiser(net, "edm", sigma_data=SD)
    x0, noise, sigma, labels = batch()
    t = torch.atan(sigma / SD)
    loss_fn = EDMLoss(SD)
    with torch.no_grad():
        _, logs = loss_fn(denoiser, x0, t=t, noise=noise, class_labels=labels)
    error = logs["loss"]
    delta = torch.tensor([0.0, 0.5, -0.25, 1.0], dtype=torch.float64)
    for shift in (torch.zeros(4, dtype=torch.float64), delta):
        u = (error.log() + shift).requires_grad_(True)
        loss, _ = loss_fn(denoiser, x0, t=t, noise=noise, logvar_head=lambda t_: u, class_labels=labels)
        (grad,) = torch.autograd.grad(loss, u)
        torch.testing.assert_close(grad, (1 - torch.exp(-shift)) / 4, rtol=1e-9, atol=1e-13)
    u_star = error.log()
    loss, _ = loss_fn(denoiser, x0, t=t, noise=noise, logvar_head=lambda t_: u_star, class_labels=labels)
    torch.testing.assert_close(loss, (1 + u_star).mean(), rtol=1e-10, atol=1e-12)


def test_edm_objective_trains_the_networks_own_head():
    """EDMObjective: an EDM2 network's log-variance head (its `logvar`, at its own c_noise) carries the uncertainty
    and gets the gradient, the LogVarHead none; a network without one (SCMUNet2DModel) uses the LogVarHead;
    `network_logvar=False` too. The times follow ln(sd tan t) ~ N(P_mean, P_std^2) from the generator."""
    net = tiny_edm2().float().train()
    denoiser = TrigFlowDenoiser(net, "edm", sigma_data=SD)
    head = LogVarHead()
    x0 = torch.rand(6, 2, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = EDMLoss(SD, P_mean=-0.8, P_std=1.6)

    def inputs(_):
        return x0, {"class_labels": labels}, {}

    objective = EDMObjective(loss_fn, denoiser, inputs, torch.Generator().manual_seed(5), logvar_head=head)
    assert isinstance(objective.logvar_head, NetworkLogVar)
    loss, logs = objective(None, 0)
    loss.backward()
    expected_t = lognormal_times(6, -0.8, 1.6, SD, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logs["t"], expected_t)
    c_noise = torch.log(SD * torch.tan(expected_t)) / 4
    with torch.no_grad():
        torch.testing.assert_close(logs["logvar"], net.logvar(c_noise, x0).flatten(), rtol=1e-5, atol=1e-6)
    assert net.logvar_linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())

    torch.manual_seed(0)
    scm = TrigFlowDenoiser(SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=2), "trigflow")
    objective = EDMObjective(loss_fn, scm, lambda _: (x0, {}, {}), torch.Generator().manual_seed(5), logvar_head=head)
    assert objective.logvar_head is head
    off = EDMObjective(
        loss_fn, denoiser, inputs, torch.Generator().manual_seed(5), logvar_head=head, network_logvar=False
    )
    assert off.logvar_head is head


@pytest.fixture
def edm2_config(tmp_path):
    config = {"_class_name": "EDM2UNet2DModel", **TINY_EDM2, "in_channels": 1, "num_classes": 0}
    path = tmp_path / "edm2.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_train_teacher_objective_edm_saves_a_folder_load_teacher_reads(tmp_path, edm2_config, one_thread):
    """A few `--objective edm` steps of an EDM2 network from `--model_config`: the folder's scheduler is the
    TrigFlowODEScheduler of the "edm" parameterization, and `load_teacher` gives the saved network behind EDM's
    preconditioning (F = -raw output at c_in x, ln(sigma) / 4)."""
    train_teacher = load_script("train_teacher")
    out = tmp_path / "teacher"
    train_teacher.main(
        ["--objective", "edm", "--model_config", edm2_config, "--dataset_name", "digits", "--resolution", "8"]
        + ["--train_batch_size", "8", "--max_train_steps", "3", "--learning_rate", "1e-2", "--report_to", "none"]
        + ["--validation_steps", "3", "--num_validation_images", "4", "--validation_nfe", "2"]
        + ["--output_dir", str(out)]
    )
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "TrigFlowODEScheduler" and scheduler["parameterization"] == "edm"
    recorded = json.loads((out / "training_args.json").read_text())
    assert (recorded["objective"], recorded["P_mean"], recorded["P_std"]) == ("edm", -0.4, 1.0)
    losses = [json.loads(line)["loss"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

    teacher = load_teacher(str(out))
    assert isinstance(teacher.parameterization, EDMParameterization) and teacher.parameterization.name == "edm"
    assert isinstance(teacher.inner_model, EDM2UNet2DModel)
    network = EDM2UNet2DModel.from_pretrained(out / "unet").eval()
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.9, 1.4])
    with torch.no_grad():
        expected = -network(x_t / SD, torch.log(SD * torch.tan(t)) / 4).sample
        torch.testing.assert_close(teacher(x_t, t), expected, rtol=1e-5, atol=1e-6)


def test_train_teacher_edm_flags(tmp_path, edm2_config, capsys):
    train_teacher = load_script("train_teacher")

    def parse_error(argv, message):
        with pytest.raises(SystemExit):
            train_teacher.parse_args(argv)
        assert message in capsys.readouterr().err

    parse_error(["--edm2_preset", "img512-xs"], "--edm2_preset needs --objective edm")
    parse_error(
        ["--objective", "edm", "--edm2_preset", "img512-xs", "--model_config", edm2_config], "give one network"
    )
    parse_error(["--objective", "edm", "--vae", str(tmp_path)], "--vae is for --objective flow_matching")
    args = train_teacher.parse_args(["--objective", "edm", "--P_std", "1.2"])
    assert (args.P_mean, args.P_std) == (-0.4, 1.2)  # EDM2's default mean, the given spread
    assert (train_teacher.parse_args([]).P_mean, train_teacher.parse_args([]).P_std) == (-0.8, 1.6)
    args = train_teacher.parse_args(["--objective", "edm", "--edm2_preset", "img512-xs", "--resolution", "8"])
    network = train_teacher.build_model(args).inner_model
    assert isinstance(network, EDM2UNet2DModel) and network.config.model_channels == 128
    assert (network.config.sample_size, network.config.in_channels, network.config.num_classes) == (8, 1, 0)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"_class_name": "EDM2UNet2DModel", **TINY_EDM2}))  # 2 channels, digits have 1
    args = train_teacher.parse_args(["--objective", "edm", "--model_config", str(wrong), "--resolution", "8"])
    with pytest.raises(ValueError, match="set them to 8 and 1"):
        train_teacher.build_model(args)


def fake_inception(monkeypatch, tmp_path):
    """torch-fidelity's extractor replaced at the import boundary by a linear map of the per-channel pixel means whose
    weights come from a file (as in tests/test_evaluate.py): 2048 features of rank 3. Returns (weight, weights file)."""
    weight = torch.randn(2048, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    class FakeExtractor(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            self.weight = torch.load(feature_extractor_weights_path, weights_only=True)["weight"]

        def forward(self, x):
            return (x.double().mean((2, 3)) @ self.weight.T,)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeExtractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    path = tmp_path / "inception.pth"
    torch.save({"weight": weight}, path)
    return weight, str(path)


def test_evaluate_fid_against_reference_statistics(monkeypatch, tmp_path):
    """`evaluate.py --reference_stats FILE.npz` (EDM's fid-refs layout): the FID of the student's images against the
    file's `mu` and `sigma` equals the Frechet distance computed here with scipy from the same features. The
    reference covariance is Q B Q^T + c (I - Q Q^T), with Q spanning the features (rank 3): then
    tr sqrt(S1 S2) = tr sqrt(A B) with A the features' covariance in that basis."""
    evaluate = load_script("evaluate")
    weight, weights_file = fake_inception(monkeypatch, tmp_path)
    q, r = np.linalg.qr(weight.numpy())  # features f = Q (R m), m the channel means
    rng = np.random.default_rng(0)
    b_half = rng.normal(size=(3, 3))
    b = b_half @ b_half.T + np.eye(3)
    c = 0.37
    mu_ref = rng.normal(size=2048)
    sigma_ref = q @ b @ q.T + c * (np.eye(2048) - q @ q.T)
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=mu_ref.astype(np.float32), sigma=sigma_ref)

    torch.manual_seed(0)
    net = SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=1).eval()
    SCMPipeline(unet=net, scheduler=TrigFlowScheduler(sigma_data=SD)).save_pretrained(tmp_path / "student")
    common = [
        "--num_samples",
        "40",
        "--batch_size",
        "40",
        "--num_grid_images",
        "0",
        "--output_dir",
        str(tmp_path / "r"),
    ]
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", "--metrics", "fid"]
        + ["--reference_stats", str(stats), "--inception_backend", "torch-fidelity", "--inception_weights"]
        + [weights_file, *common]
    )
    (row,) = results["rows"]
    assert results["fid_reference"] == str(stats)

    noise = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = SCMPipeline.from_pretrained(tmp_path / "student")
    images = pipe(batch_size=40, num_inference_steps=1, latents=noise, output_type="pt").images * 2 - 1
    uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round()  # what the Inception network sees, 3 channels alike
    means = uint8.double().mean((2, 3)).repeat(1, 3).numpy()
    coords = means @ r.T  # the features in the basis Q
    mu = q @ coords.mean(0)
    a = np.cov(coords, rowvar=False)
    trace_sqrt = np.trace(scipy.linalg.sqrtm(a @ b)).real
    expected = ((mu - mu_ref.astype(np.float32).astype(np.float64)) ** 2).sum()
    expected += np.trace(a) + np.trace(sigma_ref) - 2 * trace_sqrt
    assert row["fid"] == pytest.approx(expected, rel=1e-6)


def test_reference_statistics_are_checked(tmp_path):
    evaluate = load_script("evaluate")
    path = tmp_path / "small.npz"
    np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"need \(2048,\) and \(2048, 2048\)"):
        evaluate.load_reference_statistics(str(path))
    np.savez(path, mean=np.zeros(2048))
    with pytest.raises(ValueError, match="has no `mu` and `sigma` \\(it holds mean\\)"):
        evaluate.load_reference_statistics(str(path))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        evaluate.load_reference_statistics(str(tmp_path / "single.npy"))
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npz"):
        evaluate.load_reference_statistics(str(tmp_path / "text.npz"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.load_reference_statistics(str(tmp_path / "missing.npz"))
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--pipeline", "x", "--metrics", "fd_digits", "--reference_stats", str(path)])
    assert "fid" in evaluate.parse_args(["--pipeline", "x", "--reference_stats", str(path)]).metrics


@pytest.mark.slow
def test_two_process_launch_synchronizes_the_networks_own_head(tmp_path, edm2_config):
    """Under DDP the network's log-variance head is called outside the wrapper's forward pass; its gradients are still
    all-reduced (each process draws its own times and noise, so unsynchronized heads would drift apart)."""
    from test_distill_script import _free_port

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_teacher.py")
    out = tmp_path / "two"
    cmd = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), script]
    cmd += ["--objective", "edm", "--model_config", edm2_config, "--dataset_name", "digits", "--resolution", "8"]
    cmd += ["--train_batch_size", "8", "--max_train_steps", "3", "--learning_rate", "1e-2", "--report_to", "none"]
    cmd += ["--validation_steps", "100", "--output_dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3 and summary["replicas_in_sync"]
