"""`corral train` re-executes itself under tcmalloc where installed (corral.utils.allocator)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.utils import allocator

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda environ: "libtcmalloc_minimal.so.4")


def test_tcmalloc_is_added_to_ld_preload_once(installed):
    env = allocator.preload_environment({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4:libfoo.so", "PATH": "/bin"}
    assert allocator.preload_environment(env) is None  # the re-executed process goes on
    assert allocator.preload_environment({allocator.ENV: "system"}) is None


def test_allocator_choices_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="CORRAL_ALLOCATOR='jemalloc': choose one of auto"):
        allocator.preload_environment({allocator.ENV: "jemalloc"})
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda environ: None)
    assert allocator.preload_environment({}) is None  # auto: glibc's, and a hint in the log
    with pytest.raises(ValueError, match="no tcmalloc library is installed"):
        allocator.preload_environment({allocator.ENV: "tcmalloc"})


def test_a_conda_or_venv_copy_is_found_first(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("tcmalloc is preloaded on Linux only")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    found = allocator.find_tcmalloc({"CONDA_PREFIX": str(tmp_path)})
    assert found == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")


def test_the_running_environments_copy_is_found_unactivated(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("tcmalloc is preloaded on Linux only")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # `.venv/bin/corral`: no VIRTUAL_ENV set
    assert allocator.find_tcmalloc({}) == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")


def test_make_puts_debians_tcmalloc_into_the_venv(tmp_path):
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and shutil.which("make")):
        pytest.skip("`make tcmalloc` fetches Debian's package: needs apt-get, dpkg-deb and make")
    venv = tmp_path / "venv"
    plan = subprocess.run(  # `make install` (so quickstart and test) fetches it, not only this
        ["make", "-n", "-C", str(ROOT), "install", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "apt-get download -qq libtcmalloc-minimal4" in plan.stdout, plan.stdout + plan.stderr
    done = subprocess.run(
        ["make", "-C", str(ROOT), "tcmalloc", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    library = venv / "lib" / "libtcmalloc_minimal.so.4"
    assert done.returncode == 0, done.stdout + done.stderr
    assert library.is_file(), done.stdout  # fetched: CI's machines reach Debian's mirrors
    assert allocator.find_tcmalloc({"VIRTUAL_ENV": str(venv)}) == str(library)
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_PRELOAD": str(library)},
        timeout=60,
    )
    assert maps.returncode == 0, maps.stderr
    assert str(library) in maps.stdout  # the dynamic loader took it: no missing dependency


def test_corral_train_runs_under_tcmalloc_when_installed(tiny_llama_dir, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello."}] * 4))
    args = [f"model_name_or_path={tiny_llama_dir}", f"dataset={data}", "template=chatml"]
    args += [f"output_dir={tmp_path / 'out'}", "max_steps=1", "stop_check_samples=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "corral", "train", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "tcmalloc" if allocator.find_tcmalloc(env) else "glibc's malloc (install"
    assert f"memory allocator: {expected}" in done.stderr
    system = subprocess.run(
        [*command, "overwrite_output_dir=true"],
        capture_output=True,
        text=True,
        env={**env, allocator.ENV: "system"},
        timeout=300,
    )
    assert system.returncode == 0, system.stderr
    assert "memory allocator: the system's malloc" in system.stderr
