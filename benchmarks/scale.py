"""Scale-out benchmark: DeepSpeed ZeRO-3 + offload, FSDP and QLoRA against one-GPU training.

    python benchmarks/scale.py                              # GPU: default model + 1B random Llama, bf16
    python benchmarks/scale.py --models tiny-1b --steps 10  # one model
    python benchmarks/scale.py --device cpu --tiny --steps 3   # CPU plumbing check (CI)

Each run is a real `corral train` subprocess (multi-process runs through `--nproc-per-node N`,
N = the visible GPUs, or 2 gloo processes on the CPU) on the same data, steps, schedule, seed and
global batch (N processes get per-device batch B/N, so the losses are comparable):

- single-lora, single-full: one process, bf16 LoRA and full fine-tuning (the baselines);
- ddp-full: plain DDP over N processes (skipped with one GPU: it is the single run);
- zero3-offload-full: examples/deepspeed/ds_z3_offload_config.json over N processes;
- fsdp-full: the Trainer's FSDP (`full_shard auto_wrap`, wrapping LlamaDecoderLayer) over N
  processes (skipped on the CPU, where corral refuses FSDP);
- qlora4-lora, qlora8-lora: `quantization_bit: 4` (nf4, double quantisation) and `8`, LoRA.

Read from each run's train_results.json and trainer_log.jsonl: real tokens/s (every process's
tokens over the training time, as corral reports it), peak GPU memory (rank 0's
torch.cuda.max_memory_allocated), peak RSS (rank 0's), the per-step losses. Each sharded,
DDP or QLoRA run is compared with its single-process baseline (full or LoRA): tok/s ratio,
memory ratio (GPU memory; peak RSS on the CPU), final-loss difference and the largest per-step
loss difference. The table goes to stdout and, after every run (so a cut-off session keeps
what ran), to OUT/scale.json and OUT/scale.md.

The models: `default` (SmolLM2-135M-Instruct), `tiny-1b` (a random Llama in TinyLlama's shape,
1.1B parameters, with the default model's tokenizer; built once into the scratch folder, no
download) and, for --tiny, `tiny` (2 layers, hidden 64).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import train as train_bench  # benchmarks/train.py: model building, corral's environment

ROOT = train_bench.ROOT
DS_Z3_OFFLOAD = ROOT / "examples" / "deepspeed" / "ds_z3_offload_config.json"
FSDP_CONFIG = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
LEARNING_RATES = {"lora": 2e-4, "full": 1e-5}


@dataclass(frozen=True)
class Run:
    name: str
    method: str  # lora | full
    sharded: bool  # over every process (--nproc-per-node N) rather than one
    overrides: tuple[str, ...] = ()

    @property
    def baseline(self) -> str:
        return f"single-{self.method}"


RUNS = (
    Run("single-lora", "lora", False),
    Run("single-full", "full", False),
    Run("ddp-full", "full", True),
    Run("zero3-offload-full", "full", True, (f"deepspeed={DS_Z3_OFFLOAD}", "fused_ops=false")),
    Run("fsdp-full", "full", True, ("fsdp=full_shard auto_wrap", "fsdp_config={fsdp_config}")),
    Run("qlora4-lora", "lora", False, ("quantization_bit=4",)),
    Run("qlora8-lora", "lora", False, ("quantization_bit=8",)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama only")
    parser.add_argument("--models", help="comma-separated: default, tiny-1b, tiny, or a folder")
    parser.add_argument("--runs", default=",".join(r.name for r in RUNS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, help="global batch (default 8; 4 with --tiny)")
    parser.add_argument("--cutoff", type=int, help="cutoff_len (default 512; 128 with --tiny)")
    parser.add_argument("--nproc", type=int, help="processes of the sharded runs (default: GPUs)")
    parser.add_argument("--out", type=Path, default=Path("scale-results"))
    args = parser.parse_args()
    runs = [r for r in RUNS if r.name in args.runs.split(",")]
    unknown = set(args.runs.split(",")) - {r.name for r in RUNS}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {[r.name for r in RUNS]}")
    procs = _processes(args, parser)
    batch = args.batch or (4 if args.tiny else 8)
    if batch % procs:
        parser.error(f"--batch {batch} must divide among the {procs} processes")
    models = (args.models or ("tiny" if args.tiny else "default,tiny-1b")).split(",")
    settings = {
        "device": args.device,
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "processes": procs,
        "global_batch": batch,
        "steps": args.steps,
        "cutoff": args.cutoff or (128 if args.tiny else 512),
    }
    print(f"settings: {json.dumps(settings)}")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-scale-") as scratch:
        fsdp_config = Path(scratch) / "fsdp_config.json"
        fsdp_config.write_text(json.dumps(FSDP_CONFIG))
        for model in models:
            folder = _model_folder(model, Path(scratch))
            results[model] = {}
            for run in runs:
                results[model][run.name] = _measure(run, folder, settings, Path(scratch))
                print(f"  {model} {run.name}: {_brief(results[model][run.name])}", flush=True)
                _write(args.out, settings, results)
    print(_markdown(settings, results))
    print(f"written: {args.out / 'scale.json'}, {args.out / 'scale.md'}")
    failed = [f"{m} {r}" for m, rs in results.items() for r, v in rs.items() if "error" in v]
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)}")


def _processes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """How many processes the sharded runs use; refuses a GPU run without a GPU."""
    import torch

    if args.device == "cpu":
        if not args.tiny:
            parser.error("--device cpu is a plumbing check: it needs --tiny")
        return args.nproc or 2
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/scale.py measures GPU training and found no CUDA device "
            "(torch.cuda.is_available() is False). On a machine without one, check the "
            "plumbing with: python benchmarks/scale.py --device cpu --tiny"
        )
    return args.nproc or torch.cuda.device_count()


def _model_folder(model: str, scratch: Path) -> str:
    """A Hugging Face folder: random models are built once into `scratch/model-NAME`."""
    workload = train_bench.Workload(model=model)
    if model in ("tiny", "tiny-1b"):
        (scratch / model).mkdir()
        started = time.perf_counter()
        folder = train_bench.prepare_model(workload, scratch / model, None)
        print(f"built random {model} in {time.perf_counter() - started:.0f} s: {folder}")
        return folder
    return train_bench.prepare_model(workload, scratch, None)


def _measure(run: Run, model: str, settings: dict, scratch: Path) -> dict:
    """One `corral train` subprocess; its numbers, or why it was skipped or failed."""
    procs = settings["processes"] if run.sharded else 1
    if run.name == "fsdp-full" and settings["device"] == "cpu":
        return {"skipped": "the Trainer's FSDP needs GPUs (corral refuses fsdp on the CPU)"}
    if run.name == "ddp-full" and procs == 1:
        return {"skipped": "one GPU: DDP over one process is the single-GPU run"}
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "corral", "train", *_overrides(run, model, settings, out)]
    if run.sharded:
        command += ["--nproc-per-node", str(procs)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(settings))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"}
    metrics = json.loads((out / "train_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # a 1B model's save is gigabytes
    return {
        "processes": procs,
        "real_tok_s": metrics["real_tokens_per_second"],
        "training_s": metrics["training_seconds"],
        "wall_s": round(wall, 1),
        "gpu_peak_mb": metrics.get("peak_gpu_memory_mb"),
        "rss_peak_mb": metrics["peak_memory_mb"],
        "losses": [entry["loss"] for entry in log if "loss" in entry],
    }


def _overrides(run: Run, model: str, settings: dict, out: Path) -> list[str]:
    batch = settings["global_batch"] // (settings["processes"] if run.sharded else 1)
    fsdp_config = out.parent / "fsdp_config.json"
    return [
        f"model_name_or_path={model}",
        "dataset=alpaca_en_demo",
        f"dataset_dir={train_bench.DEMO_DIR}",
        f"max_samples={settings['steps'] * settings['global_batch']}",
        f"cutoff_len={settings['cutoff']}",
        f"per_device_train_batch_size={batch}",
        f"max_steps={settings['steps']}",
        f"learning_rate={LEARNING_RATES[run.method]}",
        "lr_scheduler_type=cosine",
        "warmup_ratio=0",
        "seed=42",
        f"finetuning_type={run.method}",
        "lora_target=all",
        "lora_rank=8",
        "logging_steps=1",
        f"save_steps={10 * settings['steps']}",
        "stop_check_samples=0",
        "plot_loss=false",
        "report_to=none",
        f"device={'cpu' if settings['device'] == 'cpu' else 'auto'}",
        f"bf16={settings['dtype'] == 'bf16'}",
        f"output_dir={out}",
        "overwrite_output_dir=true",
        *(o.format(fsdp_config=fsdp_config) for o in run.overrides),
    ]


def _environment(settings: dict) -> dict[str, str]:
    """corral's own (its allocator), with this checkout's source first on the path."""
    env = train_bench._environment("corral")
    env["PYTHONPATH"] = os.pathsep.join([str(train_bench.SRC), env.get("PYTHONPATH", "")])
    if settings["device"] == "cpu":  # N processes share the cores: one thread each, everywhere
        env["OMP_NUM_THREADS"] = "1"
    return env


# ---------------------------------------------------------------------------------- report


def compare(results: dict[str, dict]) -> dict[str, dict]:
    """Each measured run with its ratios to its single-process baseline."""
    rows = {}
    for name, run in results.items():
        if "losses" not in run:
            rows[name] = run
            continue
        base = results.get(next(r.baseline for r in RUNS if r.name == name), {})
        memory = "gpu_peak_mb" if run["gpu_peak_mb"] is not None else "rss_peak_mb"
        row = {**run, "final_loss": run["losses"][-1]}
        if "losses" in base:
            steps = list(zip(run["losses"], base["losses"], strict=True))
            row.update(
                tok_s_ratio=run["real_tok_s"] / base["real_tok_s"],
                memory_ratio=run[memory] / base[memory],
                final_loss_diff=run["losses"][-1] - base["losses"][-1],
                max_step_loss_diff=max(abs(a - b) for a, b in steps),
            )
        rows[name] = row
    return rows


def _write(out: Path, settings: dict, results: dict[str, dict[str, dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = {model: compare(runs) for model, runs in results.items()}
    (out / "scale.json").write_text(json.dumps({"settings": settings, "results": table}, indent=1))
    (out / "scale.md").write_text(_markdown(settings, results))


def _markdown(settings: dict, results: dict[str, dict[str, dict]]) -> str:
    memory = "peak GPU MB" if settings["device"] == "cuda" else "peak RSS MB"
    lines = [
        f"settings: {json.dumps(settings)}",
        "",
        f"| model | run | procs | real tok/s | x base | {memory} | x base | final loss "
        "| Δ final | max Δ step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        for name, row in compare(runs).items():
            if "losses" not in row:
                why = row.get("skipped") or "failed: " + row["error"].splitlines()[-1][:120]
                lines.append(f"| {model} | {name} | {why} |")
                continue
            mb = row["gpu_peak_mb"] if settings["device"] == "cuda" else row["rss_peak_mb"]
            lines.append(
                f"| {model} | {name} | {row['processes']} | {row['real_tok_s']:.1f} "
                f"| {_ratio(row, 'tok_s_ratio')} | {mb:.0f} | {_ratio(row, 'memory_ratio')} "
                f"| {row['final_loss']:.4f} | {_diff(row, 'final_loss_diff')} "
                f"| {_diff(row, 'max_step_loss_diff')} |"
            )
    return "\n".join(lines) + "\n"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def _diff(row: dict, key: str) -> str:
    return f"{row[key]:+.4f}" if key in row else "-"


def _brief(run: dict) -> str:
    if "losses" not in run:
        return run.get("skipped") or "FAILED " + run["error"][-1500:]
    gpu = f", GPU {run['gpu_peak_mb']:.0f} MB" if run["gpu_peak_mb"] is not None else ""
    return (
        f"{run['real_tok_s']:.1f} real tok/s{gpu}, RSS {run['rss_peak_mb']:.0f} MB, "
        f"final loss {run['losses'][-1]:.4f} ({run['wall_s']} s)"
    )


if __name__ == "__main__":
    main()
