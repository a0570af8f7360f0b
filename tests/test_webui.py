"""`corral webui`: the page's fields against the config, the command's errors, and the whole
page driven in a real browser (Debian's chromium through Playwright)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from corral.config.fields import ALL_STAGES, GROUPS, PREFERENCE_LOSSES, all_fields
from corral.webui import form

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# CORRAL_UPDATE_SCREENSHOTS=1 also copies the screenshots into docs/ (the README shows them).
DOCS = REPO / "docs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def corral_env() -> dict[str, str]:
    path = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "GRADIO_ANALYTICS_ENABLED": "False"}


def test_page_fields_are_the_config_fields():
    table = all_fields()
    promised = form.promised_keys()
    assert set(promised) <= set(table), set(promised) - set(table)
    train_keys = {f.name for g in form.TRAIN_GROUPS for f in dataclasses.fields(GROUPS[g])}
    offered = set(promised) | set(form.advanced_keys())
    assert offered | set(form.MANAGED) == train_keys
    assert len(promised) + len(form.advanced_keys()) == len(offered)  # each key once
    stage = form.field_spec("stage")
    assert stage.choices == ALL_STAGES and stage.default == "sft"
    assert form.field_spec("pref_loss").choices == PREFERENCE_LOSSES
    assert form.field_spec("lora_alpha").help == table["lora_alpha"][1].metadata["help"]


@pytest.mark.slow
def test_built_page_has_a_widget_per_field():
    from corral.webui.app import build_app

    app = build_app(tempfile.mkdtemp())
    widgets = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    for key in form.promised_keys() + form.advanced_keys():
        assert f"field-{key}" in widgets, key
    assert [c[0] for c in widgets["field-stage"].choices] == list(ALL_STAGES)


def test_webui_refuses_a_busy_port_and_a_bad_auth():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "corral", "webui", "--port", str(port)],
            env=corral_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(f"corral webui: error: cannot listen on 127.0.0.1:{port}")
    done = subprocess.run(
        [sys.executable, "-m", "corral", "webui", "--auth", "nopassword"],
        env=corral_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "corral webui: error: --auth must be USER:PASSWORD" in done.stderr


def test_webui_warns_when_reachable_without_a_password():
    with socket.socket() as busy:  # the port is taken, so the command stops after warning
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "corral", "webui", "--host", "0.0.0.0", "--port", str(port)],
            env=corral_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert "reachable from other machines without a password" in done.stderr
    assert f"corral webui: error: cannot listen on 0.0.0.0:{port}" in done.stderr


def start_webui(folder: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`corral webui ARGS` on a free port, run from `folder`; (process, URL) once it answers."""
    port = free_port()
    log = open(folder / "webui.log", "w+")  # noqa: SIM115 - closed by stop_webui
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "webui", "--port", str(port), *args],
        cwd=folder,
        env=corral_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process.log = log
    url = f"http://127.0.0.1:{port}"
    _wait_for(url, process, log)
    return process, url


def stop_webui(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)
    process.log.close()


@pytest.fixture
def webui(tmp_path, demo_dir):
    """`corral webui --auth me:secret` run from a folder whose data/ is the demo datasets."""
    (tmp_path / "data").symlink_to(demo_dir)
    process, url = start_webui(tmp_path, "--auth", "me:secret")
    yield url
    stop_webui(process)


def _wait_for(url: str, process: subprocess.Popen, log) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"corral webui exited: {log.read()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("corral webui did not answer in 120 s")


def fill(page, elem_id: str, text: str) -> None:
    """Type into a textbox (or a dropdown that takes typed values) and commit it."""
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(text)
    box.press("Enter")
    box.blur()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"webui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CORRAL_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / path.name)


@pytest.mark.slow
def test_browser_trains_chats_evaluates_and_exports(webui, tmp_path, tiny_llama_dir):
    import urllib.error
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        started = time.monotonic()

        # --auth: nothing but the login form answers until the password is given
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{webui}/config", timeout=10)
        assert refused.value.code == 401
        page.goto(webui)
        page.locator("input:not([type=password]), textarea").first.fill("me")
        page.locator("input[type=password]").fill("secret")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_role("tab", name="Train")).to_be_visible()

        # Train: a config the CLI refuses shows its error, and the page goes on working
        fill(page, "field-model_name_or_path", str(tiny_llama_dir))
        fill(page, "field-template", "chatml")
        fill(page, "field-dataset", "identity")
        fill(page, "field-learning_rate", "-1")
        page.locator("#start").click()
        message = page.locator("#train-message")
        expect(message).to_contain_text("corral train: error: invalid configuration")
        expect(message).to_contain_text("learning_rate: must be > 0, got -1")
        for key, value in {
            "learning_rate": "1e-3",
            "max_steps": "4",
            "logging_steps": "1",
            "cutoff_len": "64",
            "per_device_train_batch_size": "2",
            "output_dir": "saves/tiny",
        }.items():
            fill(page, f"field-{key}", value)
        page.get_by_text("Advanced (every other config key)").click()
        fill(page, "field-stop_check_samples", "0")
        page.get_by_role("button", name="Preview command").click()
        expect(page.locator(".cm-content").first).to_contain_text("max_steps: 4")
        page.get_by_role("button", name="Preview dataset").click()
        expect(page.locator("#preview")).to_contain_text("Hello! I am Corral", timeout=60_000)
        fill(page, "config-path", "tiny.yaml")
        page.locator("#save").click()
        expect(message).to_contain_text("saved tiny.yaml")
        assert "max_steps: 4" in (tmp_path / "tiny.yaml").read_text()
        page.locator("#start").click()
        status = page.locator("#train-status")
        expect(status).to_contain_text("saves_tiny — finished — step 4/4", timeout=150_000)
        expect(page.locator("#curve canvas, #curve svg").first).to_be_visible()
        assert "step 4/4" in page.locator("#log textarea").input_value()
        shoot(page, tmp_path, "train")
        output = tmp_path / "saves" / "tiny"
        assert (output / "adapter_model.safetensors").is_file()
        assert (tmp_path / "saves" / ".webui" / "saves_tiny.yaml").is_file()

        print(f"webui browser test: train done at {time.monotonic() - started:.0f} s")

        # Chat: the output folder brings its base model and template
        page.get_by_role("tab", name="Chat").click()
        fill(page, "chat-adapter", str(output))
        fill(page, "chat-max_new_tokens", "12")
        fill(page, "chat-temperature", "0")
        page.locator("#chat-load").click()
        expect(page.locator("#chat-status")).to_contain_text("(chatml template)", timeout=60_000)
        fill(page, "chat-message", "Who are you?")
        page.locator("#chat-send").click()
        bot = page.locator("#chatbot [data-testid='bot']").last
        expect(bot).not_to_be_empty(timeout=60_000)
        shoot(page, tmp_path, "chat")

        print(f"webui browser test: chat done at {time.monotonic() - started:.0f} s")

        # Evaluate: the tuned model, its metrics and first predictions; then compare two
        # evaluation folders (the second a copy: one more evaluation would add a minute)
        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#eval-kind").get_by_text("generate").click()
        fill(page, "eval-adapter", str(output))
        fill(page, "eval-dataset", "identity")
        fill(page, "eval-max_samples", "4")
        fill(page, "eval-max_new_tokens", "8")
        fill(page, "eval-output", "evals/tuned")
        page.locator("#eval-run").click()
        expect(page.locator("#eval-metrics")).to_contain_text("rouge-l", timeout=90_000)
        expect(page.locator("#eval-command")).to_contain_text("corral eval generate --dataset")
        expect(page.get_by_text('"prediction"').first).to_be_visible()
        assert (tmp_path / "evals" / "tuned" / "predictions.jsonl").is_file()
        shutil.copytree(tmp_path / "evals" / "tuned", tmp_path / "evals" / "again")
        fill(page, "compare-a", "evals/tuned")
        fill(page, "compare-b", "evals/again")
        page.locator("#compare").click()
        expect(page.locator("#compare-table")).to_contain_text("evals/again", timeout=60_000)
        shoot(page, tmp_path, "evaluate")

        print(f"webui browser test: evaluate done at {time.monotonic() - started:.0f} s")

        # Export: a merged Hugging Face folder, its size shown and its files on disk
        page.get_by_role("tab", name="Export").click()
        fill(page, "export-adapter", str(output))
        fill(page, "export-output", "exports/tiny")
        page.locator("#export-run").click()
        expect(page.locator("#export-result")).to_contain_text("MiB", timeout=90_000)
        merged = tmp_path / "exports" / "tiny"
        assert (merged / "config.json").is_file()
        assert list(merged.glob("*.safetensors"))
        shoot(page, tmp_path, "export")

        print(f"webui browser test: export done at {time.monotonic() - started:.0f} s")

        # The page speaks Chinese too
        page.locator("#language").get_by_text("中文").click()
        expect(page.get_by_role("tab", name="训练")).to_be_visible()
        browser.close()


def _wait_until(condition, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_run_stops_with_a_checkpoint_resumes_and_is_found_again(
    tmp_path, tiny_llama_dir, demo_dir, monkeypatch
):
    from corral.webui.runs import RunStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", corral_env()["PYTHONPATH"])
    store = RunStore(tmp_path / "saves")
    output = tmp_path / "saves" / "long"
    overrides = {
        "model_name_or_path": str(tiny_llama_dir),
        "template": "chatml",
        "dataset": "identity",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "per_device_train_batch_size": 2,
        "max_steps": 100_000,  # stopped long before
        "logging_steps": 1,
        "stop_check_samples": 0,
        "output_dir": str(output),
    }
    store.start("long", overrides)
    try:
        _stop_and_resume(store, tmp_path, output)
    finally:  # never leave a 100000-step run behind a failed assertion
        pid_file = tmp_path / "saves" / ".webui" / "long.pid"
        if pid_file.is_file():
            with contextlib.suppress(OSError):
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def _stop_and_resume(store, tmp_path: Path, output: Path) -> None:
    from corral.webui.runs import RunStore

    _wait_until(lambda: store.state("long").step >= 2, "the run's second step")
    assert store.state("long").status == "running"
    assert store.stop("long")
    _wait_until(lambda: store.state("long").status == "stopped", "the graceful stop")
    first = sorted(output.glob("checkpoint-*"))
    assert len(first) == 1, store.log_tail("long")
    stopped_at = int(first[0].name.split("-")[1])

    reopened = RunStore(tmp_path / "saves")  # a new server finds the run from its files
    assert reopened.names() == ["long"]
    assert reopened.resume("long")[1:] == ["train", str(tmp_path / "saves/.webui/long.yaml")]
    _wait_until(lambda: reopened.state("long").step > stopped_at + 1, "steps after resuming")
    assert reopened.stop("long")
    _wait_until(lambda: reopened.state("long").status == "stopped", "the second stop")
    last = max(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert last > stopped_at + 1
    steps = [row["step"] for row in reopened.curves("long") if row["series"] == "loss"]
    assert steps[0] == 1 and max(steps) > stopped_at  # one curve across the stop


def test_dataset_preview_marks_the_reply_trained_and_the_prompt_masked(tiny_llama_dir, demo_dir):
    from corral.config.parse import build_config
    from corral.webui.preview import preview_examples

    raw = {"model_name_or_path": str(tiny_llama_dir), "template": "chatml"}
    raw |= {"dataset": "identity", "dataset_dir": str(demo_dir), "cutoff_len": 128}
    pieces = preview_examples(build_config(raw), count=1)
    masked = "".join(text for text, role in pieces if role == "masked")
    trained = "".join(text for text, role in pieces if role == "trained")
    assert masked == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert trained.startswith("Hello! I am Corral") and trained.endswith("<|im_end|>\n")


@pytest.mark.slow
def test_a_run_that_fails_shows_the_line_the_cli_prints(tmp_path, tiny_llama_dir, monkeypatch):
    from corral.webui.runs import RunStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", corral_env()["PYTHONPATH"])
    store = RunStore(tmp_path / "saves")
    overrides = {"model_name_or_path": str(tiny_llama_dir), "dataset": "no_such_dataset"}
    store.start("broken", {**overrides, "output_dir": str(tmp_path / "saves" / "broken")})
    state = _wait_until(
        lambda: (s := store.state("broken")).status != "running" and s, "the run to fail"
    )
    assert state.status == "failed"
    assert state.error.startswith("corral train: error: dataset 'no_such_dataset' not found")
