"""Safe loading: no code from a model folder or a request runs or is read unless the user
started the server with it. Pickles are weights-only, remote code is opt-in, the API key is
compared in constant time, an open bind without a key warns, request names are not paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.config.fields import ModelConfig
from corral.model.load import load_model
from corral.utils.errors import ModelError

SRC = Path(__file__).resolve().parents[1] / "src"


class _RunsCode:
    """Unpickling this runs a command: what a malicious pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_without_safetensors(tiny_llama_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    return folder


def test_a_pickle_with_code_is_refused_and_never_run(tiny_llama_dir, tmp_path):
    import torch

    marker = tmp_path / "ran"
    folder = _copy_without_safetensors(tiny_llama_dir, tmp_path / "evil")
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="loads only safetensors or weights-only pickles"):
        load_model(ModelConfig(model_name_or_path=str(folder), device="cpu"))
    assert not marker.exists()


def test_a_weights_only_pickle_loads(tiny_llama_dir, tmp_path, tiny_llama):
    import torch

    folder = _copy_without_safetensors(tiny_llama_dir, tmp_path / "plain")
    state = {k: v.clone() for k, v in tiny_llama[0].state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    model, _ = load_model(ModelConfig(model_name_or_path=str(folder), device="cpu"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_remote_code_is_off_and_the_error_says_so(tiny_llama_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, folder)
    marker = tmp_path / "ran"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "my_custom_llama"
    config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_my.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelError, match="trust_remote_code: true"):
        load_model(ModelConfig(model_name_or_path=str(folder), device="cpu"))
    assert not marker.exists()


def test_the_api_key_is_compared_in_constant_time(monkeypatch):
    from fastapi.testclient import TestClient

    import corral.serve.app as app_module

    compared = []
    real = app_module.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", recording)
    app = app_module.create_app(_EchoBackend(), served_model_name="m", api_key="right")
    with TestClient(app) as client:
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        right = client.get("/v1/models", headers={"Authorization": "Bearer right"})
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert compared == [(b"wrong", b"right"), (b"right", b"right")]


def test_an_open_host_without_a_key_warns():
    environ = {k: v for k, v in os.environ.items() if k != "CORRAL_API_KEY"}
    environ["PYTHONPATH"] = str(SRC)
    command = [sys.executable, "-m", "corral", "serve", "--host", "0.0.0.0", "--model", "/no/such"]
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)
    assert "--host 0.0.0.0 without an API key" in done.stderr
    keyed = subprocess.run(
        [*command, "--api-key", "k"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert "without an API key" not in keyed.stderr and keyed.returncode == 1


class _EchoBackend:
    """Answers every request at once with the same text."""

    template = None
    context_len = 64
    tokenizer = list(range(100))

    def text_ids(self, prompt):
        return [1, 2, 3]

    def submit(self, prompt_ids, params, sink):
        from corral.infer.batching import Delta

        sink(Delta("hello", "stop", 1))

        class Handle:
            finished = True

            def cancel(self):
                pass

        return Handle()

    def load(self):
        return 0

    def close(self):
        pass


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secret.txt", "SECRET", "file:///etc"])
def test_model_names_in_requests_are_not_paths(name, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from corral.serve.app import create_app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    opened = []
    real_open = open

    def watching(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    app = create_app(_EchoBackend(), served_model_name="served")
    with TestClient(app) as client:
        monkeypatch.setattr("builtins.open", watching)
        body = {"model": name, "prompt": "hi", "max_tokens": 2, "adapter": name, "lora": name}
        reply = client.post("/v1/completions", json=body)
        monkeypatch.setattr("builtins.open", real_open)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "served" and "TOPSECRET" not in reply.text
    assert not [path for path in opened if "secret" in path.lower() or "passwd" in path]
