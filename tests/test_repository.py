"""What a user's clone must hold: nothing reaches outside the repository, nothing takes PyPI's `pangu` name."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A folder beside the repository exists on developer machines only; its name is spelled in pieces
# so that this file itself never names the path it guards against.
_NAME = "sha" + "red"
_SIBLING = re.compile(r"(\.\./|[^a-z_])" + _NAME + r"/|parents\[\d\]\s*/\s*[\"']" + _NAME)


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
    assert _SIBLING.search(f'Path(__file__).parents[2] / "{_NAME}" / "models"')
    assert _SIBLING.search(f"see ../{_NAME}/docs/architecture.md")
    assert not _SIBLING.search(f"{_NAME}_expert.gate_proj")


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


def _import_graph() -> dict[str, set[str]]:
    """pangu_infer's modules and what each imports, counting imports inside functions and under
    TYPE_CHECKING (every `import` statement anywhere in the file)."""
    import ast

    package = ROOT / "pangu_infer"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one.
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            targets |= {t for n in names if n.startswith("pangu_infer") and (t := resolve(n)) and t != module}
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 40 and "pangu_infer.models.dense" in graph["pangu_infer.loader.safetensors"] | graph["pangu_infer.quant.loading"]
    assert _cycles(graph) == [], "modules that import each other (directly or around a circle)"


def test_the_cycle_check_sees_a_function_local_import():
    graph = _import_graph()
    graph["pangu_infer.errors"] = graph["pangu_infer.errors"] | {"pangu_infer.llm"}  # llm imports errors, somewhere down
    assert _cycles(graph)
