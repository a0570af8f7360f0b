"""What survives a crash: `corral train` killed with SIGKILL at chosen and random moments and
rerun resumes from its last whole checkpoint and ends as an uninterrupted run; a full disk or
out-of-memory ends in one clear error and leaves the previous checkpoint resumable."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corral.config import load_config
from corral.train import callbacks
from corral.train.trainer import CorralTrainer
from corral.train.workflow import run_training
from corral.utils.errors import CorralError

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "kill_child.py"
SAVE_STEPS, MAX_STEPS = 3, 9
QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]


@pytest.fixture
def sft_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty dataset cache (CORRAL_HOME), so the first run tokenises."""
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _args(tiny_llama_dir, data_file, out, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={tiny_llama_dir}",
        f"dataset={data_file}",
        f"output_dir={out}",
        "template=chatml",
        "cutoff_len=64",
        "per_device_train_batch_size=2",  # 4 steps an epoch: 9 steps cross two epochs
        "learning_rate=3e-3",
        "lr_scheduler_type=constant",
        "logging_steps=1",
        f"save_steps={SAVE_STEPS}",
        f"max_steps={MAX_STEPS}",
        "stop_check_samples=0",
        "seed=0",
        "plot_loss=true",
        *extra,
    ]


def _train_child(point: str, step: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, str(CHILD), point, str(step), "train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(child: subprocess.Popen) -> tuple[int, str]:
    output, _ = child.communicate(timeout=600)
    return child.returncode, output.decode(errors="replace")


def _logged_steps(out: Path) -> list[int]:
    path = out / callbacks.LOG_FILE
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


def _logged_losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / callbacks.LOG_FILE).read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def _assert_recoverable(out: Path, what: str) -> None:
    """Every checkpoint-N is whole, and the last is at most save_steps behind the last step."""
    for step in _checkpoint_steps(out):
        folder = out / f"checkpoint-{step}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == step, what
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert (folder / name).stat().st_size > 0, f"{what}: {folder}/{name}"
        assert list(folder.glob("*.safetensors")), f"{what}: {folder} has no weights"
    reached = max(_logged_steps(out), default=0)
    assert reached - max(_checkpoint_steps(out), default=0) <= SAVE_STEPS, what


def _kill_and_rerun(args: list[str], out: Path, kills: list[tuple[str, int]], rng) -> None:
    """Run `corral train args` once per kill (each killed as it says), then to the end."""
    for point, step in kills:
        if point == "random":  # from outside, some time after training has started
            child = _train_child("none", 0, args)
            before = max(_logged_steps(out), default=0)
            deadline = time.monotonic() + 300
            while max(_logged_steps(out), default=0) <= before and child.poll() is None:
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            child.send_signal(signal.SIGKILL)
            code, output = _finish(child)
            assert code in (-signal.SIGKILL, 0), output  # it may have finished first
        else:
            code, output = _finish(_train_child(point, step, args))
            assert code == -signal.SIGKILL, output
        _assert_recoverable(out, f"after a kill {point} {step}")
    if (out / "train_results.json").is_file():  # the random kill came after the run finished
        with pytest.raises(CorralError, match="holds a finished run"):
            run_training(load_config(None, args))
        return
    code, output = _finish(_train_child("none", 0, args))
    assert code == 0, output
    assert "Traceback" not in output, output


def _assert_same_run(resumed: Path, reference: Path, weights_file: str) -> None:
    assert _logged_steps(resumed) == list(range(1, MAX_STEPS + 1))  # each step once
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, MAX_STEPS + 1))  # plot
    assert (resumed / "training_loss.png").is_file()
    losses, expected = _logged_losses(resumed), _logged_losses(reference)
    assert losses == pytest.approx(expected, abs=2e-4)
    got, want = load_file(resumed / weights_file), load_file(reference / weights_file)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_lora_run_killed_four_times_ends_as_an_uninterrupted_run(
    tiny_llama_dir, sft_file, home, tmp_path
):
    out = tmp_path / "killed"
    args = _args(tiny_llama_dir, sft_file, out, "resume_from_checkpoint=auto")
    rng = random.Random()
    seed = rng.randrange(2**16)
    rng.seed(seed)
    print(f"random kill seed {seed}")

    # mid-tokenisation: the cache's temporary folder is half-written, never read
    code, output = _finish(_train_child("tokenise", 0, args))
    assert code == -signal.SIGKILL, output
    cache = home / "datasets"
    assert [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in cache.iterdir() if (p / "stats.json").is_file()]
    # the same command without resume_from_checkpoint says how to resume, after a checkpoint
    code, output = _finish(_train_child("step", 5, args))  # mid-step 5: checkpoint-3 is whole
    assert code == -signal.SIGKILL, output
    assert _checkpoint_steps(out) == [3] and max(_logged_steps(out)) == 4
    plain = load_config(None, _args(tiny_llama_dir, sft_file, out))
    with pytest.raises(CorralError, match="holds an interrupted run .*checkpoint-3.*"):
        run_training(plain)
    # mid-save of checkpoint-6: weights and optimizer written, trainer state not
    code, output = _finish(_train_child("save", 6, args))
    assert code == -signal.SIGKILL, output
    assert _checkpoint_steps(out) == [3] and (out / ".tmp-checkpoint-6").is_dir()
    _assert_recoverable(out, "after a kill mid-save")
    _kill_and_rerun(args, out, [("random", 0)], rng)

    reference = tmp_path / "reference"
    run_training(load_config(None, _args(tiny_llama_dir, sft_file, reference)))
    _assert_same_run(out, reference, "adapter_model.safetensors")
    assert not list(out.glob(".tmp-*"))
    # the same command after the run finished: nothing to resume, and no step trained again
    with pytest.raises(CorralError, match="holds a finished run"):
        run_training(load_config(None, args))


@pytest.mark.slow
def test_full_run_killed_mid_save_and_mid_step_ends_as_an_uninterrupted_run(
    tiny_llama_dir, sft_file, home, tmp_path
):
    out = tmp_path / "killed"
    args = _args(
        tiny_llama_dir, sft_file, out, "finetuning_type=full", "resume_from_checkpoint=auto"
    )
    # the "final" kill leaves checkpoint-9 (= max_steps) without the final outputs: the rerun
    # writes them and trains no step past max_steps; the "plot" kill leaves the model saved but
    # no plot and no train_results.json (the finished-run marker), so the rerun finishes it
    kills = [("save", 3), ("step", 8), ("final", 0), ("plot", 0)]
    _kill_and_rerun(args, out, kills, random.Random(0))
    reference = tmp_path / "reference"
    run_training(
        load_config(None, _args(tiny_llama_dir, sft_file, reference, "finetuning_type=full"))
    )
    _assert_same_run(out, reference, "model.safetensors")


def test_auto_starts_a_run_when_there_is_no_checkpoint(tiny_llama_dir, sft_file, home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / callbacks.LOG_FILE).write_text('{"step": 1, "loss": 9.0}\n')  # killed before a save
    config = load_config(
        None, _args(tiny_llama_dir, sft_file, out, "max_steps=2", "resume_from_checkpoint=auto")
    )
    run_training(config)
    assert _logged_steps(out) == [1, 2]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(folder, fill): a folder on a 24 MiB tmpfs, and fill(), which leaves no space on it.

    Where mounting is not allowed (not root), the folder is plain and fill(owner, name)
    replaces the writer `owner.name` by one that fails with ENOSPC, as a full disk does.
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0

    def fill(owner, name):
        if not mounted:

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

            monkeypatch.setattr(owner, name, no_space)
            return
        handle = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT)
        for chunk in (2**20, 2**12, 1):
            try:
                while True:
                    os.write(handle, b"\0" * chunk)
            except OSError:
                pass
        os.close(handle)

    def free():
        (folder / ".filler").unlink(missing_ok=True)
        monkeypatch.undo()

    yield folder, fill, free
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_while_saving_keeps_the_last_checkpoint_resumable(
    tiny_llama_dir, sft_file, home, small_disk, monkeypatch
):
    from transformers import Trainer

    folder, fill, free = small_disk
    out = folder / "run"
    original = callbacks.JsonlLogCallback.on_log

    def fill_after_step_4(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 4:
            fill(Trainer, "_save_optimizer_and_scheduler")

    monkeypatch.setattr(callbacks.JsonlLogCallback, "on_log", fill_after_step_4)
    args = _args(tiny_llama_dir, sft_file, out, "max_steps=6")
    with pytest.raises(CorralError, match=f"disk full while saving '{out}/checkpoint-6'") as error:
        run_training(load_config(None, args))
    assert "checkpoints in" in str(error.value) and "are intact" in str(error.value)
    assert _checkpoint_steps(out) == [3] and not list(out.glob(".tmp-*"))
    _assert_recoverable(out, "after a full disk")
    free()
    run_training(load_config(None, [*args, "resume_from_checkpoint=true"]))
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_full_disk_while_caching_the_dataset_names_the_cache(
    tiny_llama_dir, sft_file, small_disk, monkeypatch, tmp_path
):
    import datasets

    folder, fill, _ = small_disk
    monkeypatch.setenv("CORRAL_HOME", str(folder / "home"))
    (folder / "home").mkdir()
    fill(datasets.Dataset, "save_to_disk")
    with pytest.raises(CorralError, match=f"caching the tokenised dataset in '{folder}/home/"):
        run_training(load_config(None, _args(tiny_llama_dir, sft_file, tmp_path / "run")))
    assert not [p for p in (folder / "home" / "datasets").iterdir() if p.is_dir()]


def test_full_disk_while_exporting_leaves_no_output(tiny_llama_dir, small_disk, capsys):
    from corral.cli import main
    from corral.export import hf_folder

    folder, fill, _ = small_disk
    fill(hf_folder, "write_hf_folder")
    output = folder / "exported"
    command = ["export", "--model", str(tiny_llama_dir), "--template", "chatml"]
    assert main([*command, "--output", str(output)]) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1
    assert re.fullmatch(
        f"corral export: error: disk full while writing '{re.escape(str(output))}' "
        r"\(\d+ MiB free there\): free some space; nothing was replaced",
        errors[0],
    )
    assert [p.name for p in folder.iterdir() if p.name != ".filler"] == []


@pytest.mark.parametrize(
    "error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")]
)
def test_out_of_memory_names_the_knobs_and_keeps_the_checkpoint(
    tiny_llama_dir, sft_file, home, tmp_path, monkeypatch, error
):
    compute = CorralTrainer.compute_loss

    def out_of_memory_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise error
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(CorralTrainer, "compute_loss", out_of_memory_at_step_5)
    out = tmp_path / "out"
    args = _args(tiny_llama_dir, sft_file, out, "finetuning_type=full", "max_steps=6")
    with pytest.raises(CorralError, match="out of memory at step 5") as raised:
        run_training(load_config(None, args))
    for knob in (
        "per_device_train_batch_size (now 2)",
        "cutoff_len (now 64)",
        "gradient_checkpointing: true",
        "finetuning_type: lora",
    ):
        assert knob in str(raised.value)
    assert _checkpoint_steps(out) == [3] and not list(out.glob(".tmp-*"))
    _assert_recoverable(out, "after running out of memory")
