"""The layout's promises: the HTTP side never imports torch; the model side never
imports FastAPI; torch/transformers live only in the transformers engine package."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def imported_modules(package: str, exclude: str | None = None) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        if exclude and exclude in path.parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_serve_app_never_imports_torch_even_transitively():
    code = (
        "import sys, serve_app.app, serve_app.ingress;"
        "bad = {'torch', 'transformers'} & set(sys.modules);"
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployments_never_import_the_web_framework_or_serve_app():
    for path, names in imported_modules("deployments").items():
        assert not names & {"fastapi", "starlette", "serve_app"}, path


def test_torch_and_transformers_only_in_the_engine_package():
    for package in ("deployments", "serve_app"):
        for path, names in imported_modules(package, exclude="transformers_engine").items():
            assert not names & {"torch", "transformers"}, path


def test_the_engine_process_never_loads_ray():
    """It is no Ray worker: its metrics go to its replica, and importing Ray would cost
    every replica start 0.4 s and 44 MiB for nothing."""
    code = (
        "import sys, deployments.engine_process, deployments.transformers_engine;"
        "from deployments import metrics;"
        "metrics.record_elsewhere(lambda name, args: None);"
        "metrics.record_batch_size('m', 3);"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'));"
        "print(bad[:5]); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
