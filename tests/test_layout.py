"""The package's layout: no import cycle anywhere in `src/` (module-level or inside functions), the pipeline imports
only the loading part of `hub`, and the module paths the README names still import."""

import ast
import importlib
from pathlib import Path

import pytest


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "diffusers_scm"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions (relative imports resolved;
    `from pkg import name` counts as importing `pkg.name` where that is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, the module pkg
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from pkg import name`: the module pkg
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith(PACKAGE):
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "diffusers_scm.hub.folders" in graph["diffusers_scm.pipelines.pipeline_scm"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_pipeline_imports_only_the_loading_part_of_hub():
    graph = import_graph()
    hub = {m for m in graph["diffusers_scm.pipelines.pipeline_scm"] if m.startswith("diffusers_scm.hub")}
    assert hub == {"diffusers_scm.hub.folders"}
    assert not {
        m
        for m in graph["diffusers_scm.hub.folders"]
        if m.startswith(("diffusers_scm.pipelines", "diffusers_scm.training"))
    }


@pytest.mark.parametrize(
    "old, new",
    [
        ("diffusers_scm.training.fsdp", "diffusers_scm.training.machinery.fsdp"),
        ("diffusers_scm.training.lora", "diffusers_scm.training.machinery.lora"),
        ("diffusers_scm.training.vae", "diffusers_scm.training.objectives.vae"),
        ("diffusers_scm.training.text_encoders", "diffusers_scm.training.data.text_encoders"),
        ("diffusers_scm.training.flow_matching", "diffusers_scm.training.objectives.flow_matching"),
    ],
)
def test_module_paths_of_earlier_releases_still_import(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_documented_names_keep_their_import_paths():
    from diffusers_scm.hub import render_model_card, save_model_card  # noqa: F401
    from diffusers_scm.training import SCMLoss, TCMLoss, load_teacher  # noqa: F401
    from diffusers_scm.training.data import load_image_dataset, save_captioned_digits  # noqa: F401
    from diffusers_scm.training.lora import BaseModelDenoiser  # noqa: F401
