"""Multi-process training as users start it: `corral train --nproc-per-node 2` and `torchrun -m
corral train`, two CPU processes on gloo (DDP).

Two processes with per-device batch 2 must train exactly like one process with batch 4 (same
per-step losses, same weights), save the same folder, resume from their checkpoints, and a rank
that fails must end the whole run with its error shown instead of leaving the others waiting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.infer.engine import ChatEngine
from corral.train import callbacks
from corral.train.workflow import run_training

pytestmark = pytest.mark.slow  # each run starts three Python processes

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water, and it floats on lakes in winter."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
]
RUN_SECONDS = 240  # a hang fails the test instead of stalling CI
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _write_rows(path: Path, pairs) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in pairs]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return _write_rows(tmp_path / "qa.json", QA * 2)  # 16 rows: 4 steps of 4


def _args(model, data, out, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={model}",
        f"dataset={data}",
        f"output_dir={out}",
        "template=chatml",
        "cutoff_len=64",
        "learning_rate=3e-3",
        "lr_scheduler_type=constant",
        "logging_steps=1",
        "save_steps=1000",
        "stop_check_samples=0",
        "seed=0",
        *extra,
    ]


def _two_processes(args: list[str], *, launcher: str) -> subprocess.CompletedProcess:
    """`corral train ARGS` in two processes, started by corral's flag or by torchrun."""
    if launcher == "corral":
        command = [sys.executable, "-m", "corral", "train", *args, "--nproc-per-node", "2"]
    else:
        command = [*TORCHRUN, "-m", "corral", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_SECONDS, env=env, check=False
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _one_process(args: list[str]) -> None:
    run_training(load_config(None, args))


def _losses(out: Path) -> list[float]:
    lines = (out / callbacks.LOG_FILE).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def _files(folder: Path) -> set[str]:
    """The saved files, checkpoints' included, without the per-process RNG states."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith("rng_state")
    }


def _assert_same_weights(a: Path, b: Path, name: str) -> None:
    first, second = load_file(a / name), load_file(b / name)
    assert first.keys() == second.keys()
    for key in first:
        # Adam divides by the gradient's running scale: float-level gradient differences
        # (a sum over 2 processes vs over 1 batch) move a weight by up to ~2e-5 in 4 steps
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-4)


def test_lora_two_processes_equal_one_with_twice_the_batch_and_resume(
    tiny_llama_dir, qa_file, tmp_path
):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ("finetuning_type=lora", "save_steps=2")
    _one_process(
        _args(
            tiny_llama_dir, qa_file, single, *common, "per_device_train_batch_size=4", "max_steps=4"
        )
    )
    # Interrupted at a checkpoint: 2 of 4 steps; overwrite_cache makes rank 0 tokenise again
    # while rank 1 waits for the new cache.
    first = _ok(
        _two_processes(
            _args(
                tiny_llama_dir,
                qa_file,
                multi,
                *common,
                "per_device_train_batch_size=2",
                "max_steps=2",
                "overwrite_cache=true",
            ),
            launcher="corral",
        )
    )
    assert first.stderr.count("[corral] step 1/2") == 1, first.stderr  # rank 0 alone logs
    assert first.stderr.count("[corral] tokenised 16 records") == 1
    resumed = _ok(
        _two_processes(
            _args(
                tiny_llama_dir,
                qa_file,
                multi,
                *common,
                "per_device_train_batch_size=2",
                "max_steps=4",
                "resume_from_checkpoint=true",
            ),
            launcher="torchrun",
        )
    )
    assert "step 3/4" in resumed.stderr and "step 1/4" not in resumed.stderr

    assert _losses(multi) == pytest.approx(_losses(single), rel=1e-5)
    assert len(_losses(multi)) == 4  # one log line per step: rank 0 alone writes
    _assert_same_weights(single, multi, "adapter_model.safetensors")
    assert _files(multi) == _files(single)
    results = [json.loads((out / "train_results.json").read_text()) for out in (multi, single)]
    # steps 3-4 of the resumed run: every rank's tokens counted, as the single process did
    assert results[0]["real_tokens"] > 0
    # the saved adapter names its base and template, and chats
    reply = ChatEngine(ModelConfig(adapter_name_or_path=[str(multi)])).chat(
        [{"role": "user", "content": "What is ice?"}], max_new_tokens=4, temperature=0.0
    )
    assert reply.completion_tokens > 0


def _eval_losses(out: Path) -> list[float]:
    lines = (out / callbacks.LOG_FILE).read_text().splitlines()
    return [json.loads(line)["eval_loss"] for line in lines if '"eval_loss"' in line]


@pytest.mark.parametrize(("method", "launcher"), [("full", "torchrun"), ("freeze", "corral")])
def test_full_and_freeze_two_processes_equal_one(tiny_llama_dir, tmp_path, method, launcher):
    single, multi = tmp_path / "single", tmp_path / "multi"
    qa_file = _write_rows(tmp_path / "qa.json", QA * 3)  # 16 to train, 8 to validate
    common = (f"finetuning_type={method}", "max_steps=4", "val_size=8", "eval_steps=2")
    # the same global batches in training and in validation (a validation loss is the mean of
    # its batches' token-normalised losses)
    one = ("per_device_train_batch_size=4", "per_device_eval_batch_size=8")
    _one_process(_args(tiny_llama_dir, qa_file, single, *common, *one))
    two = ("per_device_train_batch_size=2", "per_device_eval_batch_size=4")
    _ok(
        _two_processes(
            _args(tiny_llama_dir, qa_file, multi, *common, *two),
            launcher=launcher,
        )
    )
    assert _losses(multi) == pytest.approx(_losses(single), rel=1e-5)
    assert len(_eval_losses(single)) == 2
    assert _eval_losses(multi) == pytest.approx(_eval_losses(single), rel=1e-5)
    _assert_same_weights(single, multi, "model.safetensors")
    assert _files(multi) == _files(single)
    results = [json.loads((out / "train_results.json").read_text()) for out in (multi, single)]
    assert results[0]["real_tokens"] == results[1]["real_tokens"]  # both ranks' tokens summed
    assert results[0]["trained_tokens"] == results[1]["trained_tokens"]


@pytest.fixture
def tokenizer_ahead_of_model(tiny_llama_dir, tmp_path) -> Path:
    """The tiny model with a tokenizer that has one token more than its embedding rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "mismatched"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<|not_in_the_model|>"])
    tokenizer.save_pretrained(folder)
    return folder


def test_a_rank_failing_on_its_batch_ends_the_run_with_its_error(
    tokenizer_ahead_of_model, tmp_path
):
    # One row holds a token the model has no embedding for: only the rank whose batch has it
    # fails, while the other waits in the gradient all-reduce.
    pairs = [*QA, *QA[:7], ("Say the word.", "<|not_in_the_model|>")]
    data = _write_rows(tmp_path / "bad.json", pairs)
    out = tmp_path / "out"
    result = _two_processes(
        _args(tokenizer_ahead_of_model, data, out, "per_device_train_batch_size=2", "max_steps=4"),
        launcher="torchrun",
    )
    assert result.returncode != 0
    assert "IndexError: index out of range" in result.stderr
    assert "Root Cause" in result.stderr  # torchrun's summary names the failed rank
    assert not (out / "train_results.json").exists()


def test_bad_data_while_rank_0_tokenises_ends_the_waiting_ranks(tiny_llama_dir, qa_file, tmp_path):
    result = _two_processes(
        _args(tiny_llama_dir, qa_file, tmp_path / "out", "cutoff_len=4", "max_steps=1"),
        launcher="corral",
    )
    assert result.returncode != 0
    assert "no train examples are left after tokenisation" in result.stderr


def test_multi_node_flags_become_torchrun_rendezvous_flags():
    from corral.cli import build_parser
    from corral.train.launch import torchrun_command

    parser, _ = build_parser()
    args = parser.parse_args(
        ["train", "cfg.yaml", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1"]
        + ["--master-addr", "10.0.0.1"]
    )
    assert torchrun_command(args, ["train", "cfg.yaml"]) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "8",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29500",
        "-m",
        "corral",
        "train",
        "cfg.yaml",
    ]


@pytest.mark.parametrize(
    ("flags", "environment", "message"),
    [
        (["--nproc-per-node", "2", "--nnodes", "2"], {}, "--nnodes above 1 needs --master-addr"),
        (["--nnodes", "2"], {}, "need --nproc-per-node"),
        (["--nproc-per-node", "two"], {}, "give a positive number"),
        (["--nproc-per-node", "2"], {"WORLD_SIZE": "2"}, "already runs under a launcher"),
    ],
)
def test_launch_flag_mistakes_are_one_clear_error(
    tiny_llama_dir, qa_file, tmp_path, monkeypatch, capsys, flags, environment, message
):
    from corral.cli import main

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code = main(["train", *_args(tiny_llama_dir, qa_file, tmp_path / "out"), *flags])
    assert code == 1
    assert message in capsys.readouterr().err


def test_a_finished_run_destroys_its_process_group(tmp_path):
    """A run that ended well destroys torch.distributed's group itself: left to the exit,
    gloo's threads can abort the process (SIGABRT) and torchrun calls the run failed."""
    from corral.utils.distributed import end_process_group

    end_process_group()  # no group yet: nothing to do
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        end_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
