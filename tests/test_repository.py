"""What a user's clone must hold: nothing reaches outside the repository, nothing takes PyPI's `pangu` name."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A folder named "shared" next to the repository exists on developer machines only.
_SIBLING = re.compile(r"(\.\./|[^a-z_])" + "shared" + r"/|parents\[\d\]\s*/\s*[\"']" + "shared")


def test_no_file_reads_a_sibling_shared_folder():
    offenders = []
    for top in ("pangu_infer", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*")):
            if path == Path(__file__).resolve():
                continue  # this file spells the pattern out
            if path.is_file() and path.suffix in (".py", ".md", ".json", ".txt", ".toml", ".html", ".js", ".css"):
                text = path.read_text(encoding="utf-8", errors="replace")
                offenders += [f"{path.relative_to(ROOT)}:{m.group(0)!r}" for m in _SIBLING.finditer(text)]
    for name in ("Makefile", "pyproject.toml", ".ci/run"):
        text = (ROOT / name).read_text(encoding="utf-8")
        offenders += [f"{name}:{m.group(0)!r}" for m in _SIBLING.finditer(text)]
    assert not offenders, f"these reach for a folder a clone does not have: {offenders}"


def test_the_pattern_catches_what_it_should():
    assert _SIBLING.search('Path(__file__).parents[2] / "shared" / "models"')
    assert _SIBLING.search("see ../" + "shared/docs/architecture.md")
    assert not _SIBLING.search("shared_expert.gate_proj")


def test_distribution_installs_pangu_infer_only():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["name"] == "pangu-infer"
    assert set(meta["project"]["scripts"]) == {"pangu-infer"}
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["pangu_infer*"]
    # PyPI's `pangu` (text spacing) owns `import pangu`: nothing of ours may answer to it.
    assert not (ROOT / "pangu").exists()


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "pangu_infer", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: pangu-infer")
