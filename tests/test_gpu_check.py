"""`benchmarks/gpu_check.py --quick`: the GPU check's own code at toy sizes on CPU, so that the script a GPU run depends
on cannot rot. Every section must run and report finite numbers, with CUDA-only columns marked "n/a"."""

import json
import math
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_gpu_check_quick_runs_every_section(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.count("Status: ok") >= 5, markdown[:2000]
    assert "n/a: no CUDA" in markdown and "| --- |" in markdown
    numbers = list(_numbers(report))
    assert len(numbers) > 20 and all(math.isfinite(x) for x in numbers)
