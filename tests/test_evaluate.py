"""examples/evaluate.py and the FID wrapper: counted NFE, metrics against independent computations, merged tables."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_scm import SCMPipeline, SCMUNet2DModel, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.metrics import InceptionFeatures, fid, load_digits_classifier, to_uint8


ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FID's textbook formula with scipy's general matrix square root (independent of metrics.frechet_distance)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    torch.manual_seed(0)
    net = SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=1).eval()
    teacher = SCMPipeline(unet=net, scheduler=TrigFlowODEScheduler(sigma_data=0.5, solver="dpmsolver++"))
    student = SCMPipeline(unet=net, scheduler=TrigFlowScheduler(sigma_data=0.5))
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    return root


def test_evaluate_counts_nfe_and_matches_independent_metrics(pipelines, tmp_path):
    evaluate = load_example("evaluate")
    out = tmp_path / "report"
    common = ["--num_samples", "120", "--batch_size", "48", "--output_dir", str(out), "--num_grid_images", "9"]
    evaluate.main(["--pipeline", str(pipelines / "teacher"), "--steps", "3", "5", *common])
    evaluate.main(
        ["--pipeline", str(pipelines / "teacher"), "--name", "teacher", "--solver", "heun", "--steps", "3"] + common
    )
    results = evaluate.main(
        ["--pipeline", str(pipelines / "student"), "--steps", "1", "2", "--paired_teacher", str(pipelines / "teacher")]
        + ["--paired_teacher_steps", "4", *common]
    )
    rows = {(r["model"], r["sampler"], r["steps"]): r for r in results["rows"]}
    # NFE counted on the network: consistency k steps -> k; DPM-Solver++ k -> k; Heun k -> 2k - 1 (Euler last step)
    assert rows["teacher", "ode-dpmsolver++", 3]["nfe"] == 3 and rows["teacher", "ode-dpmsolver++", 5]["nfe"] == 5
    assert rows["teacher", "ode-heun", 3]["nfe"] == 5
    assert rows["student", "consistency", 1]["nfe"] == 1 and rows["student", "consistency", 2]["nfe"] == 2
    assert all(r["sec_per_image"] > 0 for r in rows.values())

    # recompute the 2-step student's images and metrics independently
    noise = torch.randn(120, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    student = SCMPipeline.from_pretrained(pipelines / "student")
    generators = [torch.Generator().manual_seed(i + 1) for i in range(120)]  # evaluate.image_seed(0, i)
    images = (
        student(batch_size=120, num_inference_steps=2, latents=noise, generator=generators, output_type="pt").images
        * 2
        - 1
    )
    classifier, accuracy = load_digits_classifier()
    from diffusers_scm.training.data.images import DigitsDataset

    with torch.no_grad():
        fa = classifier.embed(images).double().numpy()
        fb = classifier.embed(DigitsDataset(8, "train").images).double().numpy()
    assert rows["student", "consistency", 2]["fd_digits"] == pytest.approx(reference_fd(fa, fb), rel=1e-5)
    teacher = SCMPipeline.from_pretrained(pipelines / "teacher")
    teacher.scheduler = TrigFlowODEScheduler.from_config({**teacher.scheduler.config, "solver": "heun"})
    paired = teacher(batch_size=120, num_inference_steps=4, latents=noise, output_type="pt").images * 2 - 1
    expected_rmse = (images - paired).double().flatten(1).pow(2).mean(1).mean().sqrt().item()
    assert rows["student", "consistency", 2]["paired_rmse"] == pytest.approx(expected_rmse, rel=1e-5)
    assert results["classifier_accuracy"] == pytest.approx(accuracy)

    # the table holds every row once; re-running a configuration replaces its row
    evaluate.main(["--pipeline", str(pipelines / "student"), "--steps", "1", *common])
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 5
    (one_step,) = [r for r in saved["rows"] if r["model"] == "student" and r["steps"] == 1]
    assert "paired_rmse" not in one_step
    table = (out / "results.md").read_text()
    assert table.count("| student | consistency |") == 2 and table.count("| teacher | ode-") == 3
    assert (out / "grids" / "student-2step.png").is_file() and (out / "grids" / "teacher-5step.png").is_file()


def test_saved_teacher_images_serve_as_the_paired_reference(pipelines, tmp_path):
    """--save_images writes a row's images; --paired_reference FILE gives the same paired RMSE as running that teacher
    again with --paired_teacher, and a reference drawn with another seed or sample count is refused."""
    evaluate = load_example("evaluate")
    common = ["--num_samples", "40", "--batch_size", "16", "--num_grid_images", "0"]
    teacher_dir, out = tmp_path / "teacher-eval", tmp_path / "report"
    evaluate.main(
        ["--pipeline", str(pipelines / "teacher"), "--name", "teacher", "--steps", "4", "--save_images"]
        + [*common, "--output_dir", str(teacher_dir)]
    )
    reference = teacher_dir / "images" / "teacher-4step.safetensors"
    student = ["--pipeline", str(pipelines / "student"), "--steps", "1", "2", *common]
    ran = evaluate.main(
        student
        + ["--paired_teacher", str(pipelines / "teacher"), "--paired_teacher_solver", "dpmsolver++"]
        + ["--paired_teacher_steps", "4", "--output_dir", str(tmp_path / "ran")]
    )
    loaded = evaluate.main(student + ["--paired_reference", str(reference), "--output_dir", str(out)])
    for a, b in zip(ran["rows"], loaded["rows"]):
        assert a["steps"] == b["steps"] and b["paired_rmse"] == pytest.approx(a["paired_rmse"], rel=1e-6)
    assert loaded["paired_reference"]["steps"] == 4 and loaded["paired_reference"]["solver"] == "ode-dpmsolver++"
    with pytest.raises(ValueError, match="seed 0 \\(here 3\\)"):
        evaluate.main(student + ["--paired_reference", str(reference), "--seed", "3", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="num_samples 40 \\(here 20\\)"):
        evaluate.main(
            student + ["--num_samples", "20", "--paired_reference", str(reference), "--output_dir", str(out)]
        )


def test_class_conditional_model_gets_class_accuracy_by_default(tmp_path):
    """Image i of a class-conditional model is drawn for class i mod 10; class_accuracy is the classifier's agreement,
    recomputed here from the pipeline's own images; an unconditional model asked for it gets an error."""
    evaluate = load_example("evaluate")
    torch.manual_seed(0)
    net = SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=1, num_classes=10).eval()
    SCMPipeline(unet=net, scheduler=TrigFlowScheduler(sigma_data=0.5)).save_pretrained(tmp_path / "student")
    common = ["--num_samples", "30", "--batch_size", "16", "--num_grid_images", "0"]
    out = tmp_path / "report"
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", *common, "--output_dir", str(out)]
    )
    (row,) = results["rows"]
    noise = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    student = SCMPipeline.from_pretrained(tmp_path / "student")
    labels = [i % 10 for i in range(30)]
    images = student(batch_size=30, num_inference_steps=1, latents=noise, class_labels=labels, output_type="pt")
    classifier, _ = load_digits_classifier()
    with torch.no_grad():
        predicted = classifier(images.images * 2 - 1).argmax(1)
    expected = (predicted == torch.tensor(labels)).float().mean().item()
    assert row["class_accuracy"] == pytest.approx(expected) and "class_accuracy" in (out / "results.md").read_text()
    # fd_digits only, when the metrics are given
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", *common, "--output_dir", str(tmp_path / "b")]
        + ["--metrics", "fd_digits"]
    )
    assert "class_accuracy" not in results["rows"][0]
    unconditional = SCMPipeline(
        unet=SCMUNet2DModel.from_preset("tiny", sample_size=8, in_channels=1), scheduler=TrigFlowScheduler()
    )
    unconditional.save_pretrained(tmp_path / "unconditional")
    with pytest.raises(ValueError, match="class_accuracy needs a class-conditional model"):
        evaluate.main(
            ["--pipeline", str(tmp_path / "unconditional"), "--steps", "1", *common, "--metrics", "class_accuracy"]
            + ["--output_dir", str(tmp_path / "c")]
        )


def test_fid_without_weights_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    monkeypatch.setitem(sys.modules, "cleanfid", None)
    monkeypatch.setitem(sys.modules, "cleanfid.inception_torchscript", None)
    with pytest.raises(RuntimeError, match="inception_weights") as info:
        InceptionFeatures()
    assert "torch-fidelity is not installed" in str(info.value) and "clean-fid is not installed" in str(info.value)
    with pytest.raises(ValueError, match="Unknown Inception backend"):
        InceptionFeatures(backend="tf")


def test_fid_through_torch_fidelity_reads_weights_without_pickle(monkeypatch, tmp_path):
    """torch-fidelity's extractor is replaced at the import boundary by a linear map whose weights come from the file:
    the wrapper must hand it the weights (read tensors-only) and uint8 RGB images, and FID is the FD of its features."""
    weight = torch.randn(2048, 3, generator=torch.Generator().manual_seed(1))

    class FakeExtractor(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert name == "inception-v3-compat" and features_list == ["2048"]
            self.weight = torch.load(feature_extractor_weights_path, weights_only=True)["weight"]

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return (x.float().mean((2, 3)) @ self.weight.T,)

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeExtractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    with pytest.raises(RuntimeError, match="no weights file"):
        InceptionFeatures(backend="torch-fidelity", weights_path=str(tmp_path / "missing.pth"))
    path = tmp_path / "inception.pth"
    torch.save({"weight": weight}, path)
    extractor = InceptionFeatures(backend="torch-fidelity", weights_path=str(path))
    a = torch.rand(50, 1, 8, 8) * 2 - 1
    b = torch.rand(60, 3, 8, 8) * 1.5 - 0.7
    fa = (to_uint8(a).float().mean((2, 3)) @ weight.T).double().numpy()
    fb = (to_uint8(b).float().mean((2, 3)) @ weight.T).double().numpy()
    # 2048 features of rank 3: compare the closed form for rank-deficient covariances through the means and a
    # 3-d projection (the FD is invariant to an orthonormal change of basis of the feature space)
    q, _ = np.linalg.qr(weight.double().numpy())
    expected = reference_fd(fa @ q, fb @ q)
    assert fid(a, b, extractor) == pytest.approx(expected, rel=1e-5)
    assert to_uint8(torch.tensor([[[[-1.0, 0.0, 1.0]]]])).tolist() == [[[[0, 128, 255]]] * 3]


@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_evaluate_text_to_image_against_the_family_pipeline(family, tmp_path, one_thread):
    """A family teacher folder sampled by its own pipeline with guidance, and a student SCMPipeline, on digit prompts:
    NFE counts both guidance branches; the paired reference, the teacher's images and the prompt accuracy equal
    calls of the family pipeline and of the classifier made here."""
    import math

    from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline

    from diffusers_scm.conditioning import TEXT_COMPONENTS, LatentCodec
    from diffusers_scm.metrics import DigitsClassifier, digit_of_prompt

    evaluate = load_example("evaluate")
    teacher = save_tiny_pipeline(family, tmp_path / "teacher")
    parts = {k: getattr(teacher, k) for k in TEXT_COMPONENTS if getattr(teacher, k, None) is not None}
    SCMPipeline(
        transformer=teacher.transformer,
        vae=teacher.vae,
        scheduler=TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2),
        family_pipeline=type(teacher).__name__,
        **parts,
    ).save_pretrained(tmp_path / "student")
    prompts = ["digit zero", "digit one", "digit two"]
    out = tmp_path / "report"
    common = ["--num_samples", "5", "--batch_size", "3", "--output_dir", str(out), "--num_grid_images", "0"]
    common += ["--prompts", *prompts, "--guidance_scale", "3", "--resolution", str(IMAGE_SIZE)]
    evaluate.main(["--pipeline", str(tmp_path / "teacher"), "--name", "teacher", "--steps", "2", *common])
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", "--paired_teacher", str(tmp_path / "teacher")]
        + ["--paired_teacher_steps", "2", *common]
    )
    rows = {(r["model"], r["steps"]): r for r in results["rows"]}
    assert rows[("teacher", 2)]["nfe"] == 4 and rows[("teacher", 2)]["guidance_scale"] == 3  # 2 steps x 2 branches
    assert rows[("student", 1)]["nfe"] == 1

    # the same noise, prompts and guidance through the family pipeline itself
    codec = LatentCodec(teacher.vae)
    h = IMAGE_SIZE // codec.scale_factor
    noise = torch.randn((5, codec.latent_channels, h, h), generator=torch.Generator().manual_seed(0))
    extra = {"use_resolution_binning": False} if family == "sana" else {}
    cycled = [prompts[i % 3] for i in range(5)]
    images = torch.cat(
        [
            teacher(
                prompt=cycled[i : i + 3],
                latents=noise[i : i + 3],
                num_inference_steps=2,
                guidance_scale=3.0,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                output_type="pt",
                **extra,
            ).images
            for i in (0, 3)
        ]
    )
    images = images.float() * 2 - 1
    student = SCMPipeline.from_pretrained(tmp_path / "student")
    student_images = student(prompt=cycled, latents=noise, output_type="pt", height=IMAGE_SIZE, width=IMAGE_SIZE)
    student_images = student_images.images.float() * 2 - 1
    expected_rmse = (student_images - images).double().square().mean().sqrt().item()
    assert rows[("student", 1)]["paired_rmse"] == pytest.approx(expected_rmse, rel=1e-4)

    classifier, _ = load_digits_classifier()
    assert isinstance(classifier, DigitsClassifier)
    labels = torch.tensor([digit_of_prompt(p) for p in cycled])
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert rows[("teacher", 2)]["prompt_accuracy"] == pytest.approx(accuracy)
    table = (out / "results.md").read_text()
    assert "prompt_accuracy" in table and "| CFG |" in table


def test_digit_of_prompt():
    from diffusers_scm.metrics import digit_of_prompt

    assert [digit_of_prompt(f"digit {w}") for w in ("zero", "four", "nine")] == [0, 4, 9]
    assert digit_of_prompt("a handwritten 7") == 7 and digit_of_prompt("Digit SIX.") == 6
    assert digit_of_prompt("a cat") is None and digit_of_prompt("one or two") is None


def test_grid_rows_are_prompts():
    evaluate = load_example("evaluate")
    images = torch.arange(30.0)[:, None, None, None]  # image i, drawn for prompt i mod 3
    grid = evaluate.grid_images(images, 9, 3)
    assert grid.flatten().tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]  # row p: prompt p's first three images
    assert evaluate.grid_images(images, 16, 3).flatten().tolist() == list(range(16))  # not n^2: the first ones


def test_a_short_t5_tokenizer_sets_the_sequence_length_of_every_call(tmp_path):
    """A teacher whose T5 tokenizer's `model_max_length` is below the pipeline's default `max_sequence_length`: the
    student pipeline encodes prompts with that many T5 tokens (equal to the family's `encode_prompt` told so), and
    evaluate.py calls the family pipeline with it; the default stays where the tokenizer is longer (as released)."""
    from diffusers import StableDiffusion3Pipeline
    from t2i_pipelines import tiny_pipeline

    from diffusers_scm.conditioning import TEXT_COMPONENTS
    from diffusers_scm.families import prompt_sequence_length

    evaluate = load_example("evaluate")
    teacher = tiny_pipeline("sd3")
    assert prompt_sequence_length(teacher) == 256  # T5 tokenizer 512 > SD3's default 256
    teacher.tokenizer_3.model_max_length = 8
    teacher.save_pretrained(tmp_path / "teacher")
    teacher = StableDiffusion3Pipeline.from_pretrained(tmp_path / "teacher", local_files_only=True)
    assert prompt_sequence_length(teacher) == 8
    parts = {k: getattr(teacher, k) for k in TEXT_COMPONENTS}
    student = SCMPipeline(
        transformer=teacher.transformer,
        vae=teacher.vae,
        scheduler=TrigFlowScheduler(parameterization="flow_matching", max_timesteps=1.5),
        family_pipeline="StableDiffusion3Pipeline",
        **parts,
    )
    cond, _ = student.encode_prompt(["digit two", "a red fox"])
    pe, _, ppe, _ = teacher.encode_prompt(
        prompt=["digit two", "a red fox"],
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=8,
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled_projections"], ppe)
    chunk = torch.randn(2, 4, 4, 4)
    kwargs = evaluate.text_call(teacher, chunk, 0, {"prompts": ["digit two"], "guidance_scale": 2.0, "resolution": 32})
    assert kwargs["max_sequence_length"] == 8 and kwargs["prompt"] == ["digit two"] * 2


def _mean_pairwise_distance_loop(features: np.ndarray) -> float:
    """The mean distance over distinct pairs, written out pair by pair (independent of metrics.group_diversity)."""
    from itertools import combinations

    return float(np.mean([np.linalg.norm(a - b) for a, b in combinations(features, 2)]))


def test_fd_to_the_teacher_samples_and_its_yardstick_from_saved_images(pipelines, tmp_path):
    """The teacher's samples saved once (--save_images) serve as the reference of `fd_to_teacher`: for its own rows at
    fewer steps (the yardstick) and for a student, equal to the textbook FD between digit features of the two image
    sets; `diversity` (one group for an unconditional model) equals the mean pairwise feature distance."""
    evaluate = load_example("evaluate")
    out = tmp_path / "report"
    common = ["--num_samples", "120", "--batch_size", "60", "--num_grid_images", "0", "--output_dir", str(out)]
    teacher = ["--pipeline", str(pipelines / "teacher"), "--name", "teacher"]
    evaluate.main(teacher + ["--steps", "6", "--save_images", *common])
    reference = out / "images" / "teacher-6step.safetensors"
    paired = ["--paired_reference", str(reference), "--metrics", "fd_digits", "fd_to_teacher", "diversity"]
    evaluate.main(teacher + ["--steps", "2", "--save_images", *paired, *common])
    results = evaluate.main(
        ["--pipeline", str(pipelines / "student"), "--steps", "1", "--save_images", *paired, *common]
    )
    rows = {(r["model"], r["steps"]): r for r in results["rows"]}
    assert "fd_to_teacher" not in rows["teacher", 6]  # the reference itself

    from safetensors.torch import load_file

    classifier, _ = load_digits_classifier()
    with torch.no_grad():
        features = {
            name: classifier.embed(load_file(out / "images" / f"{name}.safetensors")["images"]).double().numpy()
            for name in ("teacher-6step", "teacher-2step", "student-1step")
        }
    for key, name in ((("teacher", 2), "teacher-2step"), (("student", 1), "student-1step")):
        expected = reference_fd(features[name], features["teacher-6step"])
        assert rows[key]["fd_to_teacher"] == pytest.approx(expected, rel=1e-5)
        assert rows[key]["diversity"] == pytest.approx(_mean_pairwise_distance_loop(features[name]), rel=1e-6)
    assert rows["teacher", 2]["fd_to_teacher"] > 0 and "fd_to_teacher" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):  # the metric needs a reference
        evaluate.parse_args(["--pipeline", "x", "--metrics", "fd_to_teacher"])


def test_text_to_image_diversity_is_per_prompt_and_on_by_default(tmp_path, one_thread):
    """With --prompts (image i for prompt i mod n) the diversity is taken within each prompt's images and averaged;
    fd_to_teacher and diversity are default metrics of a text-to-image student evaluated against saved teacher
    images."""
    from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline

    from diffusers_scm.conditioning import TEXT_COMPONENTS
    from diffusers_scm.metrics import feature_statistics, frechet_distance

    evaluate = load_example("evaluate")
    teacher = save_tiny_pipeline("sd3", tmp_path / "teacher")
    parts = {k: getattr(teacher, k) for k in TEXT_COMPONENTS if getattr(teacher, k, None) is not None}
    SCMPipeline(
        transformer=teacher.transformer,
        vae=teacher.vae,
        scheduler=TrigFlowScheduler(parameterization="flow_matching", max_timesteps=1.5),
        family_pipeline=type(teacher).__name__,
        **parts,
    ).save_pretrained(tmp_path / "student")
    prompts = ["digit zero", "digit one", "digit two"]
    out = tmp_path / "report"
    common = ["--num_samples", "9", "--batch_size", "9", "--output_dir", str(out), "--num_grid_images", "0"]
    common += ["--prompts", *prompts, "--guidance_scale", "3", "--resolution", str(IMAGE_SIZE), "--save_images"]
    evaluate.main(["--pipeline", str(tmp_path / "teacher"), "--name", "teacher", "--steps", "2", *common])
    reference = str(out / "images" / "teacher-2step.safetensors")
    results = evaluate.main(
        ["--pipeline", str(tmp_path / "student"), "--steps", "1", "--paired_reference", reference, *common]
    )
    row = {r["model"]: r for r in results["rows"]}["student"]

    from safetensors.torch import load_file

    classifier, _ = load_digits_classifier()
    with torch.no_grad():
        student = classifier.embed(load_file(out / "images" / "student-1step.safetensors")["images"]).double()
        teacher_features = classifier.embed(load_file(reference)["images"]).double()
    per_prompt = [_mean_pairwise_distance_loop(student[p::3].numpy()) for p in range(3)]
    assert row["diversity_per_group"] == pytest.approx(per_prompt, rel=1e-6)
    assert row["diversity"] == pytest.approx(np.mean(per_prompt), rel=1e-6)
    expected = frechet_distance(*feature_statistics(student), *feature_statistics(teacher_features))
    assert row["fd_to_teacher"] == pytest.approx(expected, rel=1e-6) and row["paired_rmse"] > 0
    assert "diversity" in {r["model"]: r for r in results["rows"]}["teacher"]
