"""`corral eval` from the command line: sub-commands, compare tables, errors without
tracebacks, the eval config keys, and evaluation at the end of training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main
from corral.config import load_config
from corral.eval.compare import compare, to_markdown
from corral.eval.run import run_ppl
from corral.utils.errors import ConfigError

QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cows say?", "Cows say moo."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA]))
    return path


def _run_dir(folder: Path, kind: str, metrics: dict, **about) -> Path:
    folder.mkdir(parents=True)
    content = {"kind": kind, "about": about, "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(content))
    return folder


def test_compare_puts_runs_side_by_side_with_the_change(tmp_path, capsys):
    base = _run_dir(
        tmp_path / "base", "generate", {"bleu-4": 10.0, "rouge-l": 20.5}, model="default"
    )
    tuned = _run_dir(
        tmp_path / "tuned", "generate", {"bleu-4": 35.25, "rouge-l": 50.0, "examples": 5}
    )
    table = compare([str(base), str(tuned)])
    assert table["rows"]["bleu-4"] == [10.0, 35.25]
    assert to_markdown(table) == (
        f"| metric | {base} | {tuned} | change |\n"
        "|---|---|---|---|\n"
        "| kind | generate | generate |  |\n"
        "| model | default | — |  |\n"
        "| bleu-4 | 10.00 | 35.25 | +25.25 |\n"
        "| rouge-l | 20.50 | 50.00 | +29.50 |\n"
        "| examples | — | 5 |  |\n"
    )
    out = tmp_path / "cmp"
    assert main(["eval", "compare", str(base), str(tuned), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == to_markdown(table).strip()
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(table))
    assert main(["eval", "compare", str(base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]["rouge-l"] == [20.5]


def test_compare_errors_point_at_the_right_folder(tmp_path, capsys):
    _run_dir(tmp_path / "train" / "predict", "generate", {"bleu-4": 1.0})
    assert main(["eval", "compare", str(tmp_path / "train")]) == 1
    err = capsys.readouterr().err
    assert "holds no metrics.json" in err and "its subfolders predict have one" in err
    assert "Traceback" not in err


def test_mc_without_data_is_one_message(tmp_path, capsys):
    assert main(["eval", "mc", "--task-dir", str(tmp_path / "mmlu")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("corral eval: error: task_dir")
    assert "corral does not download benchmarks" in err and "Traceback" not in err


def test_generate_on_the_command_line(tiny_llama_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "generate", "--model", str(tiny_llama_dir), "--template", "chatml"]
    argv += ["--dataset", str(qa_file), "--max-samples", "3", "--max-new-tokens", "4"]
    assert main([*argv, "--output", str(out), "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| bleu-4 |" in printed and f"written to {out}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["about"]["temperature"] == 0.0  # greedy unless --temperature is given
    assert metrics["metrics"]["examples"] == 3


def test_eval_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from corral.cli import main\n"
        "for argv in (['eval', '--help'], ['eval', 'generate', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_eval_keys_of_llamafactory_are_supported_and_checked():
    config = load_config(None, ["do_eval=true", "val_size=0.1", "lang=zh", "n_shot=3"])
    assert config.notes == [] and config.eval.do_eval and config.eval.n_shot == 3
    with pytest.raises(ConfigError, match="do_predict needs predict_with_generate: true"):
        load_config(None, ["do_predict=true", "val_size=0.1"])
    with pytest.raises(ConfigError, match="do_eval needs a validation set"):
        load_config(None, ["do_eval=true"])
    with pytest.raises(ConfigError, match="do_predict generates replies .* needs stage: sft"):
        load_config(
            None, ["do_predict=true", "predict_with_generate=true", "stage=pt", "val_size=2"]
        )


def test_training_evaluates_at_the_end_like_corral_eval(tiny_llama_dir, qa_file, tmp_path):
    from corral.train.workflow import run_training

    out = tmp_path / "sft"
    common = [f"dataset={qa_file}", "template=chatml", "val_size=2", "seed=0"]
    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            f"output_dir={out}",
            "max_steps=2",
            "stop_check_samples=0",
            "do_eval=true",
            "do_predict=true",
            "predict_with_generate=true",
            "max_new_tokens=4",
            "cutoff_len=64",
            *common,
        ],
    )
    metrics = run_training(config)
    assert sorted(p.name for p in (out / "predict").iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
        "report.md",
    ]
    assert len((out / "predict" / "predictions.jsonl").read_text().splitlines()) == 2
    eval_metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["eval_perplexity"] == eval_metrics["perplexity"]
    # The saved adapter, loaded by `corral eval ppl` on the same validation split, agrees.
    again = run_ppl(
        load_config(
            None, [f"adapter_name_or_path={out}", "eval_split=validation", "cutoff_len=64", *common]
        )
    )
    assert again.metrics["perplexity"] == pytest.approx(eval_metrics["perplexity"], rel=1e-4)
    assert again.metrics["scored_tokens"] == eval_metrics["scored_tokens"]
