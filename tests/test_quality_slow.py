"""Slow end-to-end quality checks (`python -m pytest -m slow`)."""

import importlib.util
import os

import pytest


def _load_example(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scd_on_2d_mixture_reaches_the_teacher():
    """Targets of the sCD issue: 2-step student within 1.25x of the teacher's ODE distance to the data, 1-step 1.5x.
    3,000 sCD steps with the learning rate decayed on a cosine (measured: 1.29x and 1.07x; with a constant rate the
    students stayed near 1.8x even after 20,000 steps)."""
    toy = _load_example("toy_2d")
    result = toy.run(teacher_steps=3000, distill_steps=3000, lr_schedule="cosine", intermediate_timestep=0.4)
    rows = {r["sampler"]: r for r in result["rows"]}
    teacher = rows["teacher ODE, 64 steps"]
    assert teacher["off_mode_fraction"] < 0.1, teacher  # the teacher itself has learned the modes
    assert rows["student, 2-step"]["mmd_to_data"] <= 1.25 * teacher["mmd_to_data"], rows
    assert rows["student, 1-step"]["mmd_to_data"] <= 1.5 * teacher["mmd_to_data"], rows
    # the student is a real one-step generator: far better than one DDIM step of the teacher
    assert rows["student, 1-step"]["mmd_to_data"] < 0.5 * rows["teacher, 1 DDIM step"]["mmd_to_data"]
