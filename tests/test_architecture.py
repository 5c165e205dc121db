"""The shape the code keeps (docs/extending.md): no import cycles between flamingo's modules, the
package root imports nothing heavy, and the CLI, the Python API and a spec agree on run keys."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flamingo_cli"


def _module(path: Path) -> str:
    """A module's name below flamingo_cli: ``sink``, ``output.layout``; a package is its folder (``output``)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _exists(name: str) -> bool:
    """``name`` (dotted, below flamingo_cli) is a module or a package of flamingo's."""
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """flamingo modules a file imports, at module level or inside functions (lazy imports count), by
    their full names below flamingo_cli (``output.layout``), so modules in subpackages are nodes too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flamingo_cli"):
            base = node.module.split(".")[1:]
            if base:
                found.add(".".join(base))
            for a in node.names:  # "from flamingo_cli.output import layout" imports output.layout
                if _exists(".".join([*base, a.name])):
                    found.add(".".join([*base, a.name]))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("flamingo_cli."))
    found.discard(_module(path))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_import_graph_sees_modules_in_subpackages() -> None:
    graph = _graph()
    assert {"sink", "output", "output.layout", "output.writers"} <= set(graph)
    assert "output.layout" in graph["sink"] and "output.folder" in graph["output.writers"]
    assert all(dep in graph for deps in graph.values() for dep in deps), "an import names no module of flamingo's"


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    cycles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep == start:
                cycles.append([*path, dep])
            elif dep not in path and dep in graph:
                walk(start, dep, [*path, dep])

    for module in graph:
        walk(module, module, [module])
    assert not cycles, cycles[:5]


def test_the_output_rooms_import_nothing_above_them() -> None:
    """output/ sits below the sink: it imports its own rooms and the bottom layer only; the sink no
    longer reaches up to sources (fingerprints and the change rule live in resume.py)."""
    graph = _graph()
    bottom = {"errors", "env", "paths", "records", "remote"}
    for module, deps in graph.items():
        if module == "output" or module.startswith("output."):
            assert {d for d in deps if not d.startswith("output")} <= bottom, (module, deps)
    assert "sources" not in graph["sink"] and "sources" not in graph["resume"]


def test_the_package_root_imports_nothing_heavy() -> None:
    code = (
        "import sys, flamingo_cli; flamingo_cli.caption; flamingo_cli.CaptionSpec; "
        "print([m for m in ('torch', 'vllm', 'transformers', 'pyarrow', 'librosa') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_and_the_api_build_the_same_spec(tmp_path: Path) -> None:
    """Options arrive by the same names; types from Typer (floats) and Python (ints) give one run key."""
    from flamingo_cli.spec import CaptionSpec, SpecError

    (tmp_path / "a.wav").write_bytes(b"")
    cli_like = CaptionSpec.build([str(tmp_path)], tmp_path / "o", temperature=0.0, max_tokens=8, chunk_seconds=20.0)
    py_like = CaptionSpec.build(str(tmp_path), str(tmp_path / "o"), temperature=0, max_tokens=8, chunk_seconds=20)
    assert cli_like.run_key == py_like.run_key
    assert cli_like.identity()["sampling"]["max_tokens"] == 8
    # the preset's sampling is merged, not replaced (describe-music's max_tokens stays unless overridden)
    mf = CaptionSpec.build([str(tmp_path)], tmp_path / "o", task="describe-music", temperature=0)
    assert mf.sampling.max_tokens == 2048 and mf.sampling.temperature == 0.0
    with pytest.raises(SpecError, match="unknown option"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", temprature=0)
    with pytest.raises(SpecError, match="--top-k"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", top_k=-5)


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": -1}, {"chunk_seconds": 10_000}, {"shard": "3/2"}])
def test_a_bad_value_fails_the_same_way_through_every_face(tmp_path: Path, bad: dict) -> None:
    """The CLI exits 2; the Python API, local or Ray, raises the usage error the CLI maps to 2."""
    from conftest import run_cli

    import flamingo_cli
    from flamingo_cli.errors import UsageError
    from flamingo_cli.spec import SpecError

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    for executor in ("local", "ray"):
        with pytest.raises(UsageError) as caught:
            flamingo_cli.caption([str(tmp_path)], tmp_path / "out", executor=executor, quiet=True, **bad)
        assert isinstance(caught.value, SpecError) or "shard" in str(caught.value)
    ((name, value),) = bad.items()
    res = run_cli(["caption", tmp_path, "--out", tmp_path / "out", f"--{name.replace('_', '-')}", value])
    assert res.status == 2 and str(caught.value).split(": ", 1)[-1] in res.stderr  # the same reason
    assert not (tmp_path / "out").exists()
