"""Benchmark corral's training against a hand-written PyTorch + peft loop (and LLaMA-Factory).

    python benchmarks/train.py                          # CPU default workload, LoRA + full
    python benchmarks/train.py --systems corral-lora,reference-lora --repeats 5
    python benchmarks/train.py --with-llamafactory      # also LLaMA-Factory, in its own venv
    python benchmarks/train.py --device cuda --dtype bf16 --batch 16 --model tiny-1b
    python benchmarks/train.py --smoke                  # 2 steps on a tiny model (CI)
    python benchmarks/train.py --profile --steps 8      # where each system's time goes
    python benchmarks/train.py --stage dpo --with-llamafactory   # DPO: 64 pairs of dpo_en_demo

Every measurement runs in a fresh worker process (so peak memory is its own), interleaved
(A B A B ...) after one warm-up run of each system, and the table shows the median of the
repeats. Same model, data, cutoff, batch size, steps, learning rate and schedule everywhere.

Definitions:
- real tokens: non-padding tokens the model processed (attended over), per second of training
  (first step to last optimizer step; loading, preprocessing and saving excluded);
- trained tokens: tokens with a label (assistant replies), the ones the loss is computed on;
- samples/s: examples per second (a packed LLaMA-Factory row counts as one);
- MFU: real tokens/s x FLOPs per token / the machine's matmul peak measured by this script
  (fp32 on CPU, bf16 on GPU); FLOPs per token = 4 N for LoRA (forward 2N, backward to the
  inputs 2N; the frozen weights get no gradient) and 6 N for full fine-tuning, N = parameters;
- loss: the mean training loss over the steps;
- preprocessing: tokenising (or loading the cached tokens) inside the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
DEMO_DIR = ROOT / "data"  # LLaMA-Factory's demo datasets, shipped in the repository
LF_VENV = ROOT / "benchmarks" / ".llamafactory-venv"
SYSTEMS = (
    "corral-lora",
    "reference-lora",
    "corral-full",
    "reference-full",
    "llamafactory-defaults",
    "llamafactory-tuned",
)


@dataclass
class Workload:
    """What every system trains on: the same everywhere."""

    model: str = "default"  # default | tiny | tiny-1b | a Hugging Face folder
    stage: str = "sft"  # sft | dpo (then the dataset, samples, steps and lr of DPO_DEFAULTS)
    dataset_dir: str = str(DEMO_DIR)
    dataset: str = "alpaca_en_demo"
    samples: int = 256
    cutoff: int = 512
    batch: int = 4
    steps: int = 32
    lora_rank: int = 8
    learning_rate: float = 2e-4
    seed: int = 42
    device: str = "cpu"
    dtype: str = "fp32"


# The dpo workload: LoRA DPO (sigmoid, beta 0.1) on the first 64 pairs of dpo_en_demo, each
# pair seen once, at LLaMA-Factory's example learning rate.
DPO_DEFAULTS = {"dataset": "dpo_en_demo", "samples": 64, "steps": 16, "learning_rate": 5e-6}
# Which kind of data each stage's corral run tokenises (as its stage table row says).
KINDS = {"sft": "conversation", "dpo": "preference"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(Workload()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument(
        "--systems", default="corral-lora,reference-lora,corral-full,reference-full"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-llamafactory", action="store_true")
    parser.add_argument(
        "--llamafactory-venv", type=Path, default=LF_VENV, help="created when missing"
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps, tiny model, 1 repeat")
    parser.add_argument(
        "--tokenizer", help="tokenizer of tiny models (default: the default model's)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one torch.profiler run per system instead of the timed runs: the top operators",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # the workers are started without the flag and read it from here
    os.environ.setdefault("CORRAL_BENCH_LF_VENV", str(args.llamafactory_venv))
    workload = Workload(**{k: getattr(args, k) for k in asdict(Workload())})
    if workload.stage not in KINDS:
        parser.error(f"--stage {workload.stage}: choose from {', '.join(KINDS)}")
    if workload.stage == "dpo" and not args.worker:
        _stage_defaults(workload, DPO_DEFAULTS)
    if args.worker:
        worker = WORKERS[args.worker.split("-")[0]]
        result = profiled(worker, args.worker, workload) if args.profile else None
        result = result or worker(args.worker, workload)
        print("RESULT " + json.dumps(result))
        return
    if args.smoke:
        workload.model, workload.steps, workload.samples, workload.cutoff = "tiny", 2, 16, 128
        args.repeats = 1
    if workload.steps * workload.batch > workload.samples:
        parser.error("--steps x --batch must not exceed --samples: every system sees each once")
    systems = args.systems.split(",")
    if workload.stage == "dpo":
        # the hand-written reference loop is an sft loop; DPO compares with LLaMA-Factory
        systems = [s for s in systems if s == "corral-lora" or s.startswith("llamafactory")]
        systems = systems if "corral-lora" in systems else ["corral-lora", *systems]
    if args.with_llamafactory:
        systems += [s for s in ("llamafactory-defaults", "llamafactory-tuned") if s not in systems]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if any(s.startswith("llamafactory") for s in systems) and not _llamafactory_ready(
        args.llamafactory_venv
    ):
        systems = [s for s in systems if not s.startswith("llamafactory")]
    if args.profile:
        profile_systems(workload, [s for s in systems if not s.startswith("llamafactory")])
        return
    run_benchmark(workload, systems, args.repeats, not args.smoke, args.tokenizer)


def _stage_defaults(workload: Workload, defaults: dict) -> None:
    """The stage's workload values wherever the command line kept the sft default."""
    for name, value in defaults.items():
        if getattr(workload, name) == getattr(Workload(), name):
            setattr(workload, name, value)


def run_benchmark(
    workload: Workload, systems: list[str], repeats: int, warm_up: bool, tokenizer: str | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as scratch:
        workload.model = prepare_model(workload, Path(scratch), tokenizer)
        peak = matmul_peak_flops(workload.device, workload.dtype)
        print(f"matmul peak ({workload.device}, {workload.dtype}): {peak / 1e9:.1f} GFLOP/s")
        allocator = (_environment("corral").get("LD_PRELOAD") or "").split(":")[0]
        print(f"corral's allocator: {allocator or 'the system malloc'} (as corral train runs)")
        print(f"preprocessing of the whole {workload.dataset} file: {preprocessing(workload)}")
        if warm_up:
            for system in systems:  # fills the dataset cache and the OS page cache
                run_worker(system, Workload(**{**asdict(workload), "steps": 2}))
        results: dict[str, list[dict]] = {s: [] for s in systems}
        for round_ in range(repeats):
            for system in systems:
                results[system].append(run_worker(system, workload))
                print(f"  run {round_ + 1}/{repeats} {system}: {_brief(results[system][-1])}")
        report(workload, {s: _median(r) for s, r in results.items()}, peak)


def _environment(system: str) -> dict[str, str]:
    """corral's workers get the allocator `corral train` re-executes itself with (tcmalloc where
    installed, unless CORRAL_ALLOCATOR=system); the others run as they come."""
    from corral.utils.allocator import preload_environment

    environment = preload_environment() if system.startswith("corral") else None
    return environment or dict(os.environ)


def profile_systems(workload: Workload, systems: list[str]) -> None:
    """Each system once under torch.profiler (in its own process): its top operators."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as scratch:
        workload.model = prepare_model(workload, Path(scratch), None)
        for system in systems:
            run_worker(system, Workload(**{**asdict(workload), "steps": 2}))  # warm the cache
            result = run_worker(system, workload, "--profile")
            print(f"\n{system}: {_brief(result)}\n{result['profile']}")


def profiled(worker, system: str, workload: Workload) -> dict:
    """Run `worker` under torch.profiler; its result gains the operator table (self time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if workload.device != "cpu":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        result = worker(system, workload)
    sort = "self_cpu_time_total" if workload.device == "cpu" else "self_cuda_time_total"
    if workload.device != "cpu":
        torch.cuda.synchronize()
    result["profile"] = prof.key_averages().table(
        sort_by=sort, row_limit=15, max_name_column_width=40
    )
    return result


def run_worker(system: str, workload: Workload, *flags: str) -> dict:
    """One measurement in a fresh process; returns its RESULT line."""
    command = [sys.executable, __file__, "--worker", system, *flags]
    for name, value in asdict(workload).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(system))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(
            f"{system} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------- workers


def corral_worker(system: str, workload: Workload) -> dict:
    """`corral train` (in-process, as the CLI runs it) with the workload's settings."""
    from corral.config.parse import load_config
    from corral.train.workflow import run_training

    method = system.split("-")[1]
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, [*_corral_overrides(workload, method), f"output_dir={out}"])
        metrics = run_training(config)
    seconds = metrics["training_seconds"]
    return {
        "real_tokens": metrics["real_tokens"],
        "trained_tokens": metrics["trained_tokens"],
        "samples": workload.steps * workload.batch,
        "seconds": seconds,
        "peak_mb": metrics["peak_memory_mb"],
        "gpu_peak_mb": metrics.get("peak_gpu_memory_mb"),
        "preprocessing_s": metrics["preprocessing_seconds"],
        "loss": metrics["train_loss"],
        "parameters": _parameters(workload.model),
        "flops_factor": 4 if method == "lora" else 6,
    }


def _corral_overrides(workload: Workload, method: str) -> list[str]:
    return [
        f"model_name_or_path={workload.model}",
        f"dataset={workload.dataset}",
        f"dataset_dir={workload.dataset_dir}",
        f"max_samples={workload.samples}",
        f"cutoff_len={workload.cutoff}",
        f"per_device_train_batch_size={workload.batch}",
        f"max_steps={workload.steps}",
        f"learning_rate={workload.learning_rate}",
        "lr_scheduler_type=cosine",
        "warmup_ratio=0",
        f"seed={workload.seed}",
        f"finetuning_type={method}",
        "lora_target=all",
        f"lora_rank={workload.lora_rank}",
        f"logging_steps={workload.steps}",
        f"save_steps={10 * workload.steps}",
        "stop_check_samples=0",
        "report_to=none",
        f"device={workload.device}",
        f"bf16={workload.dtype == 'bf16'}",
        f"stage={workload.stage}",
        *(["pref_beta=0.1", "pref_loss=sigmoid"] if workload.stage == "dpo" else []),
    ]


def reference_worker(system: str, workload: Workload) -> dict:
    """What a person writes by hand: transformers model (+ peft LoRA), AdamW, cosine schedule,
    `model(**batch).loss.backward()`, on corral's tokenised rows in the same order."""
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler, set_seed

    method = system.split("-")[1]
    rows, order, collate = _same_batches(workload)
    started_preprocessing = time.perf_counter()
    dtype = torch.bfloat16 if workload.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        workload.model, dtype=dtype, attn_implementation="sdpa"
    ).to(workload.device)
    parameters = model.num_parameters()
    set_seed(workload.seed)  # as corral does before adding LoRA: the same initial adapter
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=workload.lora_rank,
            lora_alpha=2 * workload.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=workload.learning_rate, weight_decay=0.0)
    schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=0, num_training_steps=workload.steps
    )
    losses, real, trained = [], 0, 0
    preprocessing_s = time.perf_counter() - started_preprocessing
    started = time.perf_counter()
    for step in range(workload.steps):
        batch = collate(
            [rows[i] for i in order[step * workload.batch : (step + 1) * workload.batch]]
        )
        real += int(batch.pop("num_real_tokens"))
        trained += int((batch["labels"][:, 1:] != -100).sum())
        batch = {k: v.to(workload.device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    return {
        "real_tokens": real,
        "trained_tokens": trained,
        "samples": workload.steps * workload.batch,
        "seconds": seconds,
        "peak_mb": _peak_rss_mb(resource.RUSAGE_SELF),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else None,
        "preprocessing_s": preprocessing_s,
        "loss": sum(losses) / len(losses),
        "parameters": parameters,
        "flops_factor": 4 if method == "lora" else 6,
    }


def _same_batches(workload: Workload):
    """corral's cached tokenised rows, its length-grouped order for epoch 0, and its collator."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from corral.config.parse import load_config
    from corral.data.collator import Collator
    from corral.data.dataset import build_dataset
    from corral.data.templates import get_template
    from corral.model.load import load_tokenizer

    config = load_config(None, [*_corral_overrides(workload, "lora"), "output_dir=unused"])
    tokenizer = load_tokenizer(workload.model)
    template = get_template(None, tokenizer)
    data = build_dataset(
        config.data, tokenizer, template, kind=KINDS[workload.stage], seed=workload.seed
    )
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train]
    generator = torch.Generator().manual_seed(workload.seed)
    order = get_length_grouped_indices(data.train["length"], workload.batch, generator=generator)
    return rows, order, Collator(tokenizer.pad_token_id)


def llamafactory_worker(system: str, workload: Workload) -> dict:
    """`llamafactory-cli train` in its own venv, configured like the others (see README)."""
    import yaml

    tuned = system.endswith("tuned")
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model_name_or_path": workload.model,
            "stage": workload.stage,
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": workload.lora_rank,
            "lora_alpha": 2 * workload.lora_rank,
            "lora_target": "all",
            "dataset": workload.dataset,
            "dataset_dir": workload.dataset_dir,
            "template": "smollm2"
            if workload.model.endswith("SmolLM2-135M-Instruct")
            else "default",
            "cutoff_len": workload.cutoff,
            "max_samples": workload.samples,
            "overwrite_cache": True,
            "per_device_train_batch_size": workload.batch,
            "gradient_accumulation_steps": 1,
            "max_steps": workload.steps,
            "learning_rate": workload.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.0,
            "seed": workload.seed,
            "logging_steps": workload.steps,
            "save_steps": 10 * workload.steps,
            "output_dir": out,
            "overwrite_output_dir": True,
            "report_to": "none",
            "bf16": workload.dtype == "bf16",
        }
        if workload.stage == "dpo":
            config.update(pref_beta=0.1, pref_loss="sigmoid")
        if tuned:  # pairs are not packed
            config.update(disable_gradient_checkpointing=True)
            if workload.stage == "sft":
                config.update(packing=True, neat_packing=True)
        path = Path(out) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "USE_MODELSCOPE_HUB": "0"}
        python = Path(os.environ["CORRAL_BENCH_LF_VENV"]) / "bin" / "python"
        runner = Path(__file__).with_name("llamafactory_run.py")  # llamafactory-cli + a count
        counts = Path(out) / "counts.json"
        done = subprocess.run(
            [str(python), str(runner), str(path), str(counts)],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"llamafactory failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        metrics = json.loads((Path(out) / "train_results.json").read_text())
        seen = json.loads(counts.read_text())
    if seen["steps"] != workload.steps:
        raise RuntimeError(f"llamafactory ran {seen['steps']} steps, not {workload.steps}")
    seconds = metrics["train_runtime"]
    return {
        "real_tokens": seen["real_tokens"],
        "trained_tokens": None,
        "samples": workload.steps * workload.batch,
        "seconds": seconds,
        "peak_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
        "gpu_peak_mb": None,
        "preprocessing_s": None,
        "loss": metrics["train_loss"],
        "parameters": _parameters(workload.model),
        "flops_factor": 4,
        "wall_s": wall,
    }


WORKERS = {
    "corral": corral_worker,
    "reference": reference_worker,
    "llamafactory": llamafactory_worker,
}


# ------------------------------------------------------------------------------- measuring


def prepare_model(workload: Workload, scratch: Path, tokenizer_source: str | None) -> str:
    """A Hugging Face folder for `workload.model`; `tiny`, `tiny-1b` and `random:FOLDER` (that
    folder's architecture and tokenizer, no weights needed) get random weights built here."""
    if workload.model == "default":
        from corral.model.default import default_model_dir

        return str(default_model_dir())
    if workload.model not in ("tiny", "tiny-1b") and not workload.model.startswith("random:"):
        return workload.model
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    if workload.model.startswith("random:"):
        source = workload.model.removeprefix("random:")
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
    else:
        if tokenizer_source is None:
            from corral.model.default import default_model_dir

            tokenizer_source = str(default_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        config = _tiny_config(workload.model, tokenizer)
    torch.manual_seed(0)
    folder = scratch / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tiny_config(name: str, tokenizer):
    from transformers import LlamaConfig

    sizes = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, heads=4, kv=2),
        # TinyLlama's shape: 1.1B parameters with this vocabulary
        "tiny-1b": dict(
            hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, heads=32, kv=4
        ),
    }[name]
    heads, kv = sizes.pop("heads"), sizes.pop("kv")
    return LlamaConfig(
        **sizes,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def matmul_peak_flops(device: str, dtype: str) -> float:
    """The best FLOP/s of large square matmuls on `device` (what MFU is measured against)."""
    import torch

    size = 2048 if device == "cpu" else 8192
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    best = float("inf")
    for _ in range(6):
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 3)
    return 2 * size**3 / best


def preprocessing(workload: Workload) -> str:
    """Cold (overwrite_cache) and cached tokenisation of the whole dataset file, in seconds."""
    code = (
        "import json, sys, time\n"
        "from corral.config.parse import load_config\n"
        "from corral.data.dataset import build_dataset\n"
        "from corral.data.templates import get_template\n"
        "from corral.model.load import load_tokenizer\n"
        f"tok = load_tokenizer({workload.model!r}); tpl = get_template(None, tok)\n"
        "times = []\n"
        "for fresh in (True, False):\n"
        f"    c = load_config(None, ['dataset={workload.dataset}', 'dataset_dir={workload.dataset_dir}',"
        f" 'cutoff_len={workload.cutoff}', f'overwrite_cache={{fresh}}', 'output_dir=unused'])\n"
        "    t = time.perf_counter()\n"
        f"    build_dataset(c.data, tok, tpl, kind={KINDS[workload.stage]!r}, seed=0)\n"
        "    times.append(time.perf_counter() - t)\n"
        "print(json.dumps(times))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return f"failed: {done.stderr[-500:]}"
    cold, cached = json.loads(done.stdout.strip().splitlines()[-1])
    return f"{cold:.2f} s cold, {cached:.2f} s cached"


def _parameters(model: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with __import__("torch").device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _median(runs: list[dict]) -> dict:
    """Per-run rates first, then the median of each number over the runs."""
    rates = [_rates(r) for r in runs]
    return {
        k: statistics.median(r[k] for r in rates) if rates[0][k] is not None else None
        for k in rates[0]
    }


def _rates(run: dict) -> dict:
    seconds = run["seconds"]
    return {
        "real_tok_s": run["real_tokens"] / seconds,
        "trained_tok_s": run["trained_tokens"] / seconds if run["trained_tokens"] else None,
        "samples_s": run["samples"] / seconds,
        "peak_mb": run["peak_mb"],
        "gpu_peak_mb": run["gpu_peak_mb"],
        "preprocessing_s": run["preprocessing_s"],
        "loss": run["loss"],
        "flops_per_token": run["flops_factor"] * run["parameters"],
    }


def _brief(run: dict) -> str:
    return f"{run['real_tokens'] / run['seconds']:.1f} real tok/s, peak {run['peak_mb']:.0f} MB, loss {run['loss']:.4f}"


def report(workload: Workload, medians: dict[str, dict], peak: float) -> None:
    print(f"\nworkload: {json.dumps(asdict(workload))}")
    header = (
        f"{'system':<22}{'real tok/s':>11}{'trained tok/s':>14}{'samples/s':>10}{'peak RSS MB':>12}"
    )
    header += f"{'GPU MB':>8}{'prep s':>8}{'loss':>8}{'MFU':>7}"
    print(header)
    for system, m in medians.items():
        mfu = m["real_tok_s"] * m["flops_per_token"] / peak
        print(
            f"{system:<22}{m['real_tok_s']:>11.1f}{_num(m['trained_tok_s'], 14, 1)}"
            f"{m['samples_s']:>10.2f}{m['peak_mb']:>12.0f}{_num(m['gpu_peak_mb'], 8, 0)}"
            f"{_num(m['preprocessing_s'], 8, 2)}{m['loss']:>8.4f}{mfu:>7.1%}"
        )
    print("\nratios (real tokens/s; peak RSS):")
    pairs = [
        ("corral-lora", "reference-lora"),
        ("corral-full", "reference-full"),
        ("corral-lora", "llamafactory-defaults"),
        ("corral-lora", "llamafactory-tuned"),
    ]
    for ours, theirs in pairs:
        if ours in medians and theirs in medians:
            a, b = medians[ours], medians[theirs]
            print(
                f"  {ours} / {theirs}: {a['real_tok_s'] / b['real_tok_s']:.2f}x speed, "
                f"{a['peak_mb'] / b['peak_mb']:.2f}x memory, loss {a['loss']:.4f} vs {b['loss']:.4f}"
            )


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _llamafactory_ready(venv: Path) -> bool:
    """Create `venv` with LLaMA-Factory from PyPI when it is missing."""
    cli = venv / "bin" / "llamafactory-cli"
    if cli.exists():
        _torchaudio_stand_in(venv)
        return True
    print(f"installing LLaMA-Factory into {venv} (once) ...")
    pip = str(venv / "bin" / "pip")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # the same torch as corral's, pinned in the same resolve, so pip keeps the CPU build
        [pip, "install", "-q", f"torch=={_torch_version()}"],
        [pip, "install", "-q", "llamafactory", f"torch=={_torch_version()}"],
        # the torchvision/torchaudio it pulls are built for another torch and break imports;
        # text training needs neither
        [pip, "uninstall", "-q", "-y", "torchvision", "torchaudio"],
    ]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            print(f"LLaMA-Factory could not be installed ({' '.join(step)} failed): skipped")
            return False
    _torchaudio_stand_in(venv)
    return cli.exists()


def _torchaudio_stand_in(venv: Path) -> None:
    """LLaMA-Factory 0.9.5 imports torchaudio when it starts (data/mm_plugin.py), text training
    never calls it, and no torchaudio wheel is built for the torch corral uses: a stand-in
    module lets it start, and any use of audio fails loudly."""
    [site] = venv.glob("lib/python*/site-packages")
    (site / "torchaudio").mkdir(exist_ok=True)
    (site / "torchaudio" / "__init__.py").write_text(
        f'"""{_torchaudio_stand_in.__doc__}"""\n\n\n'
        "def __getattr__(name):\n"
        "    raise AttributeError(f'torchaudio.{name}: a stand-in written by corral benchmarks')\n"
    )


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


if __name__ == "__main__":
    main()
