"""The documentation site: `mkdocs build --strict` passes (no broken link, anchor or API reference), every page is in
the navigation, every public class and function has an entry in the API reference, and the README stays a front page.

The packages the build needs (mkdocs, mkdocs-material, mkdocstrings) are in the `test` extra, so these tests are never
skipped where the suite runs.
"""

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once by `mkdocs build --strict` from the repository root; the build's output on failure."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return res, site_dir


def test_mkdocs_build_strict(site):
    res, site_dir = site
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{(res.stdout + res.stderr)[-6000:]}"
    assert (site_dir / "index.html").is_file()


def _nav_files(entries) -> list[str]:
    files = []
    for entry in entries:
        if isinstance(entry, str):
            files.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                files.extend(_nav_files(value) if isinstance(value, list) else [value])
        elif isinstance(entry, list):
            files.extend(_nav_files(entry))
    return files


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [f for f in _nav_files(config["nav"]) if f.endswith(".md")]
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, (
        f"pages not in the nav: {sorted(set(pages) - set(nav))}; nav entries without a page: "
        f"{sorted(set(nav) - set(pages))}"
    )
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


def _public_callables() -> dict[str, set[str]]:
    """{module: names in its `__all__` that are classes or functions}, for every module of the package."""
    import diffusers_scm

    modules = ["diffusers_scm"] + [m.name for m in pkgutil.walk_packages(diffusers_scm.__path__, "diffusers_scm.")]
    found = {}
    for name in modules:
        module = importlib.import_module(name)
        public = {n for n in getattr(module, "__all__", ()) if inspect.isclass(getattr(module, n, None))}
        public |= {n for n in getattr(module, "__all__", ()) if inspect.isfunction(getattr(module, n, None))}
        if public:
            found[name] = public
    return found


def test_every_public_class_and_function_is_in_the_api_reference(site):
    res, site_dir = site
    if res.returncode != 0:
        pytest.fail("the site did not build (see test_mkdocs_build_strict)")
    html = "".join(p.read_text() for p in (site_dir / "api").rglob("*.html"))
    documented = {anchor.rsplit(".", 1)[-1] for anchor in re.findall(r'id="(diffusers_scm\.[\w.]+)"', html)}
    missing = sorted(
        f"{module}.{name}" for module, names in _public_callables().items() for name in names - documented
    )
    assert not missing, (
        f"public names without an entry in docs/api/: {missing}. Add a `::: module` block (or give the object a "
        "docstring, or a block with `show_if_no_docstring: true`)."
    )


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; it is the site's front page (at most {README_MAX_LINES}): move the "
        "details into docs/."
    )
