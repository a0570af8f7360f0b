"""The layer rule, enforced: cli > serve/webui > train/eval/export/chat > kb > infer >
data/model > config > utils. A module may import its own package and any lower layer, never a higher layer
or a sibling package of the same layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "corral"

LAYERS = {
    "cli": 7,
    "__main__": 8,  # python -m corral: above the CLI it starts
    "serve": 6,
    "webui": 6,
    "train": 5,
    "eval": 5,
    "export": 5,
    "vocab": 5,
    "chat": 5,
    "kb": 4.5,  # under chat and serve, which answer from a knowledge base
    "infer": 4,
    "data": 3,
    "model": 3,
    "config": 2,
    "utils": 1,
    "__init__": 0,
}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "corral" or name.startswith("corral.")]


def test_every_package_has_a_layer():
    packages = {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert packages - LAYERS.keys() == set(), "add new packages to LAYERS and the README's rule"


def test_no_import_goes_up_or_sideways():
    violations = []
    for path in SRC.rglob("*.py"):
        module = "corral." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        own = _package_of(module)
        for line, target in _imports(path):
            other = _package_of(target)
            if other == own or other == "__init__":
                continue
            if LAYERS[other] >= LAYERS[own]:
                violations.append(f"{path.relative_to(SRC.parent)}:{line}: {own} imports {target}")
    assert violations == []


def test_layer_checker_catches_a_back_edge(tmp_path, monkeypatch):
    # The checker itself must be able to fail: plant a data -> train import in a copy.
    bad = tmp_path / "corral" / "data"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("from corral.train import stages\n")
    assert _imports(bad / "x.py") == [(1, "corral.train")]
    assert LAYERS[_package_of("corral.train")] > LAYERS[_package_of("corral.data.x")]


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import corral\n"
        "from corral.cli import main\n"
        "for argv in (['--help'], ['chat', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
