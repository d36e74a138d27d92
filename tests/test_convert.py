"""`diffusers_scm.convert`: NVlabs' EDM/EDM2 pickles read as data and converted into pipeline folders (SPEC.md
section 10).

The pickles are written by `nvlabs_pickles` in the layout of NVlabs' `torch_utils.persistence` from tiny networks of
ours. Exactness is checked against D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) computed here from the
raw network with SPEC.md section 10's table, for every wrapper and sigma on a log grid from 0.002 to 80. With
`DIFFUSERS_SCM_NVLABS_EDM` / `DIFFUSERS_SCM_NVLABS_EDM2` pointing to checkouts of NVlabs' edm / edm2, pickles written
by their own code (in a subprocess) are converted and compared with their own D.
"""

import builtins
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from nvlabs_pickles import (
    Call,
    EasyDict,
    Persistent,
    iddpm_table,
    official_layout,
    precond_object,
    tiny_network,
    write_pickle,
)

from diffusers_scm import EDMParameterization, SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.convert import (
    AttrDict,
    ModuleRecord,
    PersistentRecord,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint,
    main,
    module_state_dict,
    read_checkpoint,
)
from diffusers_scm.training import load_teacher


pytestmark = pytest.mark.usefixtures("one_thread")

# sigma on a log grid from 0.002 to 80 (SPEC.md section 10's exactness range)
SIGMAS = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 13, dtype=torch.float64))
# wrapper -> (network family, its variant, output channels factor)
CASES = {
    "EDMPrecond": ("DhariwalUNet", {}, 1),
    "VPPrecond": ("SongUNet", {}, 1),  # DDPM++
    "VEPrecond": (
        "SongUNet",
        {
            "embedding_type": "fourier",
            "channel_mult_noise": 2,
            "encoder_type": "residual",
            "resample_filter": [1, 3, 3, 1],
        },
        1,
    ),  # NCSN++
    "iDDPMPrecond": ("DhariwalUNet", {}, 2),  # learned variance
    "Precond": ("UNet", {}, 1),  # EDM2, float16 weights
}


def make_checkpoint(path, precond, num_classes=3, module_src=None, extra=None, **pickle_kwargs):
    """A tiny network of the case's family in NVlabs' wrapper, pickled in the official layout; returns the network
    as the file holds it (EDM2: its weights rounded to float16)."""
    family, variant, factor = CASES[precond]
    net = tiny_network(family, num_classes=num_classes, out_factor=factor, **variant)
    src = {} if module_src is None else {"module_src": module_src}
    obj = precond_object(precond, net, **src)
    write_pickle(path, official_layout(obj, edm2=precond == "Precond", extra=extra), **pickle_kwargs)
    if precond == "Precond":
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.half().float())
            for b in net.buffers():
                b.copy_(b.half().float())
    return net


def reference_denoiser(net, precond, x, sigma, labels=None):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels), SPEC.md section 10's table (float64 maps, the
    network's input in float32, one-hot labels), written independently of the package's parameterizations. c_noise
    stays float64, as the package passes it for float64 times: rounding it to float32 (as NVlabs' wrappers do) moves
    NCSN++'s Fourier features (scale 16) enough to change D by ~1e-5 at sigma = 80."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    if precond in ("EDMPrecond", "Precond"):
        sd = 0.5
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / torch.sqrt(s**2 + sd**2)
        c_in, c_noise = 1 / torch.sqrt(s**2 + sd**2), torch.log(s) / 4
    elif precond == "VPPrecond":
        beta_d, beta_min, M = 19.9, 0.1, 1000
        c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / torch.sqrt(s**2 + 1)
        c_noise = (M - 1) * (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log(s**2 + 1)) - beta_min) / beta_d
    elif precond == "VEPrecond":
        c_skip, c_out, c_in, c_noise = torch.ones_like(s), s, torch.ones_like(s), torch.log(s / 2)
    else:  # iDDPMPrecond: M - 1 - argmin_j |u_j - sigma| over its own table u
        M, u = 1000, iddpm_table().double()
        c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / torch.sqrt(s**2 + 1)
        c_noise = (M - 1 - (s.reshape(-1, 1) - u).abs().argmin(dim=1)).double()
    rows = None
    if labels is not None:
        rows = torch.nn.functional.one_hot(labels, net.config.num_classes).float()
    with torch.no_grad():
        F = net((c_in * x).float(), c_noise.flatten(), class_labels=rows).sample
    F = F[:, : x.shape[1]].double()  # iDDPM: drop the learned-variance channels
    return c_skip * x.double() + c_out * F


def noisy_batch(seed=0, channels=2, sigma_data=0.5):
    """x = x0 + sigma n on the grid, and class labels. x is the point a float32 TrigFlow input x_t = cos(t) x stands
    for (x = x_t / cos t in float64), so that the comparisons measure the maps, not the rounding of x_t."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(SIGMAS), channels, 8, 8, generator=g, dtype=torch.float64) * 0.5
    x = x0 + SIGMAS.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cos_t = torch.cos(torch.atan(SIGMAS / sigma_data)).reshape(-1, 1, 1, 1)
    x = (cos_t * x).float().double() / cos_t
    labels = torch.randint(0, 3, (len(SIGMAS),), generator=g)
    return x, labels


def teacher_x0(folder, x, labels, sigma_data=0.5):
    """The data estimate of `load_teacher(folder)` at sigma: t = arctan(sigma / sd), x_t = cos(t) x (SPEC.md 10)."""
    teacher = load_teacher(folder)
    t = torch.atan(SIGMAS / sigma_data)
    x_t = (torch.cos(t).reshape(-1, 1, 1, 1) * x).float()
    with torch.no_grad():
        return teacher.denoise(x_t, t, class_labels=labels).double(), teacher


def relative_errors(a, b):
    return ((a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1)).tolist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every wrapper converted once: precond -> (network, output folder)."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for precond in CASES:
        net = make_checkpoint(root / f"{precond}.pkl", precond)
        convert_checkpoint(str(root / f"{precond}.pkl"), str(root / precond))
        out[precond] = (net, str(root / precond))
    return out


# ---- reading as data ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("numpy_module", ["numpy.core", None])  # numpy 1.x's name, numpy 2's numpy._core
def test_official_layout_is_read_as_data(tmp_path, protocol, numpy_module):
    path = tmp_path / "edm2.pkl"
    net = make_checkpoint(path, "Precond", protocol=protocol, numpy_module=numpy_module)
    raw = path.read_bytes()
    assert b"torch_utils.persistence" in raw and b"_load_from_bytes" in raw and b"dnnlib.util" in raw
    assert (b"numpy.core.multiarray" in raw) == (numpy_module == "numpy.core")

    data = read_checkpoint(str(path))
    assert type(data) is AttrDict and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
    assert data.dataset_kwargs.class_name == "training.dataset.ImageFolderDataset"
    ema = data.ema
    assert isinstance(ema, PersistentRecord) and ema.class_name == "Precond" and ema.version == 6
    assert ema.module_src.startswith("# stand-in") and isinstance(ema.init_kwargs, dict)
    assert ema.attribute("sigma_data") == 0.5 and ema.modules["unet"].class_name == "UNet"
    enc = ema.modules["unet"].modules["enc"]
    assert type(enc).__mro__[1] is ModuleRecord and enc.class_name == "torch.nn.modules.container.ModuleDict"
    assert isinstance(ema.modules["unet"].init_kwargs["dropout"], np.float64)  # numpy scalars stay data
    # the tensors, bit for bit (float16 as stored): "unet." + ours, the log-variance head beside it
    state = module_state_dict(ema)
    ours = net.state_dict()
    assert len(state) == len(ours)
    for key, value in ours.items():
        stored = state[key if key.startswith("logvar") else "unet." + key]
        if key.endswith(("emb_gain", "out_gain")):  # 0-dim in NVlabs' files, shape (1,) in ours (FSDP shards it)
            assert stored.shape == () and value.shape == (1,)
            stored = stored.reshape(1)
        assert stored.dtype == torch.float16 and torch.equal(stored.float(), value)
    scale = np.asarray(data.encoder.state["scale"])
    np.testing.assert_allclose(scale, 0.5 / np.array([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)


def test_stored_module_source_never_runs(tmp_path, monkeypatch):
    # module_src that writes a file when executed, as NVlabs' loader would execute it
    marker = tmp_path / "module_src_ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    probe = tmp_path / "payload_is_live"
    exec(compile(payload.replace(str(marker), str(probe)), "<payload>", "exec"), {})  # the payload does run
    assert probe.exists()
    # an installed torch_utils / dnnlib would run it (and mark that they were used): the converter must use neither
    used = tmp_path / "nvlabs_modules_used"

    def reconstruct(meta):
        used.write_text("persistence")
        exec(meta["module_src"], {})

    for name, attrs in {
        "torch_utils": {},
        "torch_utils.persistence": {"_reconstruct_persistent_obj": reconstruct},
        "dnnlib": {},
        "dnnlib.util": {"EasyDict": lambda *a: used.write_text("dnnlib")},
    }.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    path = tmp_path / "payload.pkl"
    net = make_checkpoint(path, "EDMPrecond", module_src=payload)
    with monkeypatch.context() as patch:  # and no exec / eval / compile while reading
        for name in ("exec", "eval", "compile"):

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"builtins.{_name} called while reading a checkpoint")

            patch.setattr(builtins, name, refuse)
        data = read_checkpoint(str(path))
    assert data["ema"].module_src == payload  # kept as a string
    assert not marker.exists() and not used.exists()

    convert_checkpoint(str(path), str(tmp_path / "out"))
    assert not marker.exists() and not used.exists()
    x, labels = noisy_batch()
    x0, _ = teacher_x0(str(tmp_path / "out"), x, labels)
    assert max(relative_errors(x0, reference_denoiser(net, "EDMPrecond", x, SIGMAS, labels))) < 1e-5


@pytest.mark.parametrize(
    "module, name",
    [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"), ("torch", "load")],
)
def test_forbidden_global_is_refused_by_name(tmp_path, module, name):
    marker = tmp_path / "payload_ran"
    command = {
        "system": f"touch {marker}",
        "Popen": ["touch", str(marker)],
        "load": str(marker),
    }.get(name, f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')")
    path = tmp_path / "evil.pkl"
    make_checkpoint(path, "EDMPrecond", extra={"dataset_kwargs": EasyDict(hook=Call(module, name, command))})
    with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
        read_checkpoint(str(path))
    with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
        main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_global_inside_a_persistent_state_is_refused(tmp_path):
    # the call sits in a module's state, where NVlabs' loader would reach it while rebuilding the network
    path = tmp_path / "evil_state.pkl"
    bad = Persistent("EDMPrecond", {"_modules": {}, "sigma_data": Call("posix", "system", "true")})
    write_pickle(path, {"ema": bad})
    with pytest.raises(UnsafeCheckpointError, match=r"'posix\.system'"):
        read_checkpoint(str(path))


# ---- exactness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precond", list(CASES))
def test_converted_teacher_reproduces_the_preconditioned_network(converted, precond):
    net, folder = converted[precond]
    x, labels = noisy_batch(seed=1)
    x0, teacher = teacher_x0(folder, x, labels)
    reference = reference_denoiser(net, precond, x, SIGMAS, labels)
    errors = relative_errors(x0, reference)
    assert max(errors) < 1e-5, errors
    expected = {"EDMPrecond": "edm", "Precond": "edm", "VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm"}
    p = teacher.parameterization
    assert isinstance(p, EDMParameterization) and p.preconditioning == expected[precond] and p.sigma_data == 0.5
    # unconditional calls: zero label rows, as NVlabs' wrappers pass them
    with torch.no_grad():
        t = torch.atan(SIGMAS / 0.5)
        x_t = (torch.cos(t).reshape(-1, 1, 1, 1) * x).float()
        errors = relative_errors(teacher.denoise(x_t, t).double(), reference_denoiser(net, precond, x, SIGMAS))
    assert max(errors) < 1e-5, errors


def test_iddpm_time_input_is_the_nearest_level_of_its_table():
    p = EDMParameterization(preconditioning="iddpm")
    u = iddpm_table().double()
    assert torch.equal(p.iddpm_sigmas, u)  # its float32 recurrence, bit for bit
    for j in (0, 1, 17, 500, 998, 999):  # at the table's own levels: c_noise = M - 1 - j
        t = torch.atan(u[j : j + 1] / 0.5)
        assert p.model_inputs(torch.zeros(1, 1), t)[1].item() == 999 - j


def test_converted_folders_config_and_record(converted):
    for precond, (_, folder) in converted.items():
        sched = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
        assert sched["_class_name"] == "TrigFlowODEScheduler" and sched["parameterization"] == "edm"
        assert sched["solver"] == "heun" and sched["timestep_spacing"] == "karras" and sched["rho"] == 7.0
        if precond in ("EDMPrecond", "Precond"):  # plain EDM: the config of before, no preconditioning keys
            assert sched["preconditioning"] is None and sched["vp_beta_d"] is None
        index = json.load(open(os.path.join(folder, "model_index.json")))
        assert index["_class_name"] == "SCMPipeline" and index["unet"][0] == "diffusers_scm"
        record = json.load(open(os.path.join(folder, "conversion.json")))
        assert record["precond"] == precond and record["source"] == f"{precond}.pkl" and len(record["sha256"]) == 64
    vp = json.load(open(os.path.join(converted["VPPrecond"][1], "scheduler", "scheduler_config.json")))
    assert (vp["preconditioning"], vp["vp_beta_d"], vp["vp_beta_min"], vp["num_train_timesteps"]) == (
        "vp",
        19.9,
        0.1,
        1000,
    )
    # the wrapper's own noise range (VP: sigma(epsilon_t) to sigma(1)), clamped to EDM's sampling range [0.002, 80]
    record = json.load(open(os.path.join(converted["VPPrecond"][1], "conversion.json")))
    assert record["sigma_min"] == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)))
    assert record["sigma_max"] == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)))
    assert (vp["sigma_min"], vp["sigma_max"]) == (0.002, 80.0)
    iddpm = json.load(open(os.path.join(converted["iDDPMPrecond"][1], "conversion.json")))
    u = iddpm_table()
    assert iddpm["sigma_min"] == pytest.approx(float(u[999]), rel=1e-4)
    assert iddpm["sigma_max"] == pytest.approx(float(u[0]), rel=1e-4)
    ve = json.load(open(os.path.join(converted["VEPrecond"][1], "scheduler", "scheduler_config.json")))
    assert (ve["preconditioning"], ve["sigma_min"], ve["sigma_max"]) == ("ve", 0.02, 80.0)
    edm2 = json.load(open(os.path.join(converted["Precond"][1], "conversion.json")))
    encoder = edm2["encoder"]
    assert encoder["class_name"] == "StabilityVAEEncoder" and encoder["vae_name"] == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(encoder["raw_mean"], [5.81, 3.25, 0.12, -2.15], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoder["raw_std"], [4.17, 4.62, 3.71, 3.28], rtol=1e-6)
    assert (encoder["final_mean"], encoder["final_std"]) == (0.0, 0.5)
    assert edm2["loss_fn"]["class_name"] == "EDM2Loss" and edm2["network"] == "UNet"
    edm = json.load(open(os.path.join(converted["EDMPrecond"][1], "conversion.json")))
    assert edm["augment_pipe"]["class_name"] == "AugmentPipe" and edm["precond_constants"]["sigma_max"] == "inf"


@pytest.mark.parametrize("precond", ["Precond", "VPPrecond"])
def test_pipeline_samples_like_edms_euler_sampler(converted, precond):
    # SCMPipeline.from_pretrained(OUT) with the first-order solver equals EDM's Euler sampler in sigma, run here with
    # the reference D: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i; sigma_i)) / sigma_i
    net, folder = converted[precond]
    pipe = SCMPipeline.from_pretrained(folder)
    pipe.scheduler = TrigFlowODEScheduler.from_config(pipe.scheduler.config, solver="ddim")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 2])
    steps = 6
    out = pipe(batch_size=2, num_inference_steps=steps, latents=noise, class_labels=labels, output_type="latent")
    sd = 0.5
    t = torch.tensor(pipe.scheduler.time_grid(steps)[:-1].tolist(), dtype=torch.float64)
    sigmas = torch.cat([sd * torch.tan(t), torch.zeros(1, dtype=torch.float64)])
    x = sd * noise.double() / torch.cos(t[0])  # the pipeline's start x_t = sd n, in sigma coordinates
    for i in range(steps):
        D = reference_denoiser(net, precond, x, sigmas[i].expand(2), labels)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - D) / sigmas[i]
    assert max(relative_errors(out.images.double(), x)) < 1e-3  # float32 sampling of a chaotic random network
    assert torch.isfinite(pipe(batch_size=2, num_inference_steps=2, class_labels=1, output_type="pt").images).all()


def test_students_keep_the_edm_teachers_parameterization(converted):
    # what distill.py does with a converted EDM/EDM2 teacher: the student's consistency scheduler takes its config
    for precond in ("EDMPrecond", "Precond"):
        p = load_teacher(converted[precond][1]).parameterization
        sched = TrigFlowScheduler(parameterization=p.name, **p.config())
        assert sched.parameterization.config() == p.config() == {"sigma_data": 0.5, "prediction_type": "epsilon"}
    for precond in ("VPPrecond", "VEPrecond", "iDDPMPrecond"):
        p = load_teacher(converted[precond][1]).parameterization
        sched = TrigFlowODEScheduler(parameterization=p.name, **p.config())
        assert sched.parameterization.config() == p.config()


# ---- state dicts with a config --------------------------------------------------------------------------------------


def test_state_dict_with_config_converts(converted, tmp_path):
    from safetensors.torch import save_file

    # VPPrecond: NVlabs' wrapper keys ("model.*") in safetensors, EDM's training-options `network_kwargs`
    net, folder = converted["VPPrecond"]
    save_file({"model." + k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "vp.safetensors"))
    options = {
        "network_kwargs": {
            "class_name": "training.networks.VPPrecond",
            "model_type": "SongUNet",
            "model_channels": 8,
            "channel_mult": [1, 2],
            "num_blocks": 1,
            "attn_resolutions": [4],
            "dropout": 0.0,
        }
    }  # img_resolution, img_channels and label_dim are read off the weights
    (tmp_path / "options.json").write_text(json.dumps(options))
    args = ["--checkpoint", str(tmp_path / "vp.safetensors"), "--config", str(tmp_path / "options.json")]
    main([*args, "--output_dir", str(tmp_path / "vp")])
    x, labels = noisy_batch(seed=2)
    a, _ = teacher_x0(str(tmp_path / "vp"), x, labels)
    b, _ = teacher_x0(folder, x, labels)
    assert torch.equal(a, b)

    # EDM2: our key names in a .pt read with weights_only, nested under "ema"
    net, folder = converted["Precond"]
    torch.save({"ema": net.state_dict(), "step": 7}, tmp_path / "edm2.pt")
    config = {"precond": "Precond", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1}
    config.update(attn_resolutions=[4], channels_per_head=8)
    convert_checkpoint(str(tmp_path / "edm2.pt"), str(tmp_path / "edm2"), config=config)
    a, _ = teacher_x0(str(tmp_path / "edm2"), x, labels)
    b, _ = teacher_x0(folder, x, labels)
    assert torch.equal(a, b)


def test_errors_name_the_problem(tmp_path):
    net = tiny_network("DhariwalUNet")
    path = tmp_path / "bare.pkl"
    write_pickle(path, {"ema": precond_object("EDMPrecond", net).state["_modules"]["model"]})
    with pytest.raises(ValueError, match="bare DhariwalUNet without its preconditioning wrapper"):
        load_checkpoint(str(path))
    wrong = precond_object("EDMPrecond", net)
    wrong.class_name = "MyPrecond"
    write_pickle(path, {"ema": wrong})
    with pytest.raises(ValueError, match="MyPrecond; expected one of NVlabs' wrappers"):
        load_checkpoint(str(path))
    write_pickle(path, {"net_g": precond_object("EDMPrecond", net)})
    with pytest.raises(ValueError, match="--network_key"):
        load_checkpoint(str(path))
    assert load_checkpoint(str(path), network_key="net_g")[0].family == "DhariwalUNet"
    torch.save({"model." + k: v for k, v in net.state_dict().items()}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="pass --config"):
        load_checkpoint(str(tmp_path / "sd.pt"))
    with pytest.raises(ValueError, match="do not describe these weights"):
        load_checkpoint(str(tmp_path / "sd.pt"), config={"precond": "EDMPrecond", "model_channels": 32})
    with pytest.raises(ValueError, match="sigma_data = 0.5"):
        load_checkpoint(str(path), network_key="net_g", sigma_data=1.0)


def test_python_dash_m_entry_point(converted, tmp_path):
    path = tmp_path / "edm.pkl"
    make_checkpoint(path, "EDMPrecond")
    cmd = [
        sys.executable,
        "-m",
        "diffusers_scm.convert",
        "--checkpoint",
        str(path),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "DhariwalUNet2DModel" in res.stderr and os.path.isfile(tmp_path / "o" / "unet" / "config.json")


# ---- the new preconditionings of the "edm" parameterization ---------------------------------------------------------


@pytest.mark.parametrize("preconditioning", ["vp", "ve", "iddpm"])
def test_preconditionings_invert_and_differentiate(preconditioning):
    p = EDMParameterization(sigma_data=0.7, preconditioning=preconditioning)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.01, 0.3, 0.9, 1.3, 1.55], dtype=torch.float64)
    x_t, raw = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 2, 4, 4, generator=g).double()
    torch.testing.assert_close(p.from_trigflow(p.to_trigflow(raw, x_t, t), x_t, t), raw, rtol=1e-10, atol=1e-10)
    # x0 = c_skip x + c_out raw with x = x_t / cos t, sigma = sd tan t (SPEC.md section 10)
    sigma = (0.7 * torch.tan(t)).reshape(-1, 1, 1, 1)
    c_out = sigma if preconditioning == "ve" else -sigma
    torch.testing.assert_close(p.predict_x0(raw, x_t, t), x_t / torch.cos(t).reshape(-1, 1, 1, 1) + c_out * raw)

    def outputs(tt):
        sample, time = p.model_inputs(x_t, tt)
        return p.to_trigflow(raw, x_t, tt), sample, time

    _, jvps = torch.func.jvp(outputs, (t,), (torch.ones_like(t),))
    h = 1e-6
    for got, a, b in zip(jvps, outputs(t + h), outputs(t - h)):
        ref = (a - b) / (2 * h)
        assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() < 1e-6
    q = EDMParameterization(**p.config())
    assert q.config() == p.config() and q.preconditioning == preconditioning
    sched = TrigFlowODEScheduler(parameterization="edm", **p.config())
    assert TrigFlowODEScheduler.from_config(sched.config).parameterization.config() == p.config()


def test_edm_preconditioning_keeps_its_config_and_checks_its_arguments():
    assert EDMParameterization().config() == {"sigma_data": 0.5, "prediction_type": "epsilon"}
    with pytest.raises(ValueError, match="Unknown EDM preconditioning 'vesde'"):
        EDMParameterization(preconditioning="vesde")
    with pytest.raises(ValueError, match="only applies to preconditioning='edm'"):
        EDMParameterization(preconditioning="vp", prediction_type="v_prediction")


# ---- against NVlabs' own code (when a checkout is given) ------------------------------------------------------------

NVLABS_SCRIPT = textwrap.dedent(
    """
    import math, pickle, sys
    import torch
    repo, kind, out = sys.argv[1:4]
    sys.path.insert(0, repo)
    torch.manual_seed(0)
    common = dict(img_resolution=8, img_channels=2, label_dim=3)
    tiny = dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    if kind == "Precond":
        from training.networks_edm2 import Precond
        net = Precond(**common, model_channels=16, channels_per_head=8, logvar_channels=8, **tiny)
    else:
        import training.networks as networks
        song = dict(model_type="SongUNet", model_channels=8, dropout=0.0, augment_dim=9)
        adm = dict(model_type="DhariwalUNet", model_channels=16, dropout=0.0)
        ncsn = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual")
        ncsn.update(resample_filter=[1, 3, 3, 1])
        kwargs = {"EDMPrecond": adm, "VPPrecond": song, "VEPrecond": dict(song, **ncsn), "iDDPMPrecond": adm}[kind]
        net = getattr(networks, kind)(**common, **tiny, **kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.abs().max() < 1e-3 or name.endswith("gain"):  # (almost) zero-initialized layers and gains
                p.normal_(0, 0.3)
    net = net.eval().requires_grad_(False)
    if kind == "Precond":
        net = net.to(torch.float16)  # as EDM2's published files
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 13, dtype=torch.float64))
    noise = torch.randn(13, 2, 8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(13, 2, 8, 8, generator=g, dtype=torch.float64) * 0.5 + sigma.reshape(-1, 1, 1, 1) * noise
    cos_t = torch.cos(torch.atan(sigma / 0.5)).reshape(-1, 1, 1, 1)
    x_t = (cos_t * x).float()  # the TrigFlow input, and the x it stands for
    x = (x_t.double() / cos_t).float()
    labels = torch.randint(0, 3, (13,), generator=g)
    with open(out + ".pkl", "wb") as f:
        pickle.dump(dict(ema=net, dataset_kwargs=dict(resolution=8)), f)
    net = net.to(torch.float32)  # D of the stored weights in float32 (on CPU, float16 gains would round in float16)
    with torch.no_grad():
        D = net(x, sigma.float(), torch.nn.functional.one_hot(labels, 3).float())
    torch.save(dict(x_t=x_t, sigma=sigma, labels=labels, D=D), out + ".pt")
    """
)


@pytest.mark.parametrize("precond", list(CASES))
def test_against_nvlabs_code(tmp_path, precond):
    variable = "DIFFUSERS_SCM_NVLABS_EDM2" if precond == "Precond" else "DIFFUSERS_SCM_NVLABS_EDM"
    repo = os.environ.get(variable)
    if not repo:
        pytest.skip(f"set {variable} to a checkout of NVlabs' {'edm2' if precond == 'Precond' else 'edm'}")
    out = str(tmp_path / precond)
    res = subprocess.run(
        [sys.executable, "-c", NVLABS_SCRIPT, repo, precond, out], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    raw = open(out + ".pkl", "rb").read()
    assert b"_reconstruct_persistent_obj" in raw and b"module_src" in raw  # their own persistence layout
    convert_checkpoint(out + ".pkl", str(tmp_path / "converted"))
    ref = torch.load(out + ".pt", weights_only=True)
    teacher = load_teacher(str(tmp_path / "converted"))
    t = torch.atan(ref["sigma"] / 0.5)
    with torch.no_grad():
        x0 = teacher.denoise(ref["x_t"], t, class_labels=ref["labels"]).double()
    errors = relative_errors(x0, ref["D"].double())
    assert max(errors) < 1e-5, errors
