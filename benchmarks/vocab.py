"""What vocabulary extension buys on Chinese text: tokens, likelihood and pt speed, before/after.

    python benchmarks/vocab.py                        # the default model, --add 4000
    python benchmarks/vocab.py --add 2000 --pt-records 300 --repeats 3 --workdir /tmp/vocab-bench
    python benchmarks/vocab.py --model TINY_DIR --add 50 --pt-records 16 --corpus-records 100  # CI

`alpaca_zh_demo` (1000 records) is split: the first --corpus-records records are the corpus the
new tokens are learned from, the last 100 are held out. The held-out texts (instruction, input
and output joined) are never trained on. It prints, for the model before and after
`corral vocab extend`:

- tokens per character of the held-out text;
- negative log-likelihood per character (nats) of the held-out text: the summed NLL of every
  token, each text after one end-of-text token (so every text token is predicted), divided by
  the characters; comparable across tokenizers, unlike per-token perplexity;
- the same after one epoch of `corral train stage=pt finetuning_type=full` on the first
  --pt-records records of the corpus (the same characters, hyperparameters and seed for both
  models), and that run's throughput in characters per second of training (first to last
  step; the corpus characters over corral's `training_seconds`; median of --repeats runs,
  interleaved);
- the day-0 NLL per character had the new rows been drawn at random around the mean of all
  rows (transformers' `resize_token_embeddings` default) instead of the mean of their parts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ZH_DEMO = ROOT / "data" / "alpaca_zh_demo.json"
HELD_OUT = 100


def _text(record: dict) -> str:
    return "\n".join(
        part for part in (record["instruction"], record["input"], record["output"]) if part
    )


def split_demo(workdir: Path, corpus_records: int, pt_records: int) -> tuple[Path, Path, list[str]]:
    """The corpus file, a pt dataset folder (dataset `zh_pt`) and the held-out texts."""
    records = json.loads(ZH_DEMO.read_text())
    corpus = workdir / "corpus.json"
    corpus.write_text(json.dumps(records[:corpus_records], ensure_ascii=False))
    pt_dir = workdir / "pt-data"
    pt_dir.mkdir(exist_ok=True)
    with open(pt_dir / "zh_pt.jsonl", "w") as out:
        for record in records[:pt_records]:
            out.write(json.dumps({"text": _text(record)}, ensure_ascii=False) + "\n")
    info = {"zh_pt": {"file_name": "zh_pt.jsonl", "columns": {"prompt": "text"}}}
    (pt_dir / "dataset_info.json").write_text(json.dumps(info))
    return corpus, pt_dir, [_text(r) for r in records[-HELD_OUT:]]


def nll_per_char(model_dir: str, texts: list[str]) -> tuple[float, float]:
    """(NLL per character in nats, tokens per character) of `texts` under the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.model.load import resolve_model

    folder = resolve_model(model_dir).path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = tokenizer.eos_token_id
    total_nll, tokens, chars = 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            batch = torch.tensor([[start, *ids]])
            logits = model(batch).logits[0, :-1].float()
            total_nll += torch.nn.functional.cross_entropy(
                logits, batch[0, 1:], reduction="sum"
            ).item()
            tokens += len(ids)
            chars += len(text)
    return total_nll / chars, tokens / chars


def train_pt(model_dir: str, pt_dir: Path, output: Path, args: argparse.Namespace) -> float:
    """One epoch of full pt; returns the characters per second of training."""
    keys = {
        "stage": "pt",
        "model_name_or_path": model_dir,
        "finetuning_type": "full",
        "dataset": "zh_pt",
        "dataset_dir": str(pt_dir),
        "cutoff_len": args.cutoff,
        "per_device_train_batch_size": args.batch,
        "num_train_epochs": 1,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "seed": 42,
        "output_dir": str(output),
        "overwrite_output_dir": "true",
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "corral", "train", *(f"{k}={v}" for k, v in keys.items())],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"corral train on {model_dir} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((output / "train_results.json").read_text())
    lines = (pt_dir / "zh_pt.jsonl").read_text().splitlines()
    chars = sum(len(json.loads(line)["text"]) for line in lines)
    return chars / metrics["training_seconds"]


def _with_random_rows(model: str, extended: Path, output: Path) -> Path:
    """The old model grown to the extended tokenizer by transformers' own resize (new rows
    sampled around the mean of all rows), saved with the extended tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.model.load import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(extended)
    weights = AutoModelForCausalLM.from_pretrained(resolve_model(model).path, dtype=torch.float32)
    torch.manual_seed(0)
    weights.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    weights.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--add", type=int, default=4000)
    parser.add_argument("--corpus-records", type=int, default=900)
    parser.add_argument("--pt-records", type=int, default=64)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2, help="pt runs per vocabulary")
    parser.add_argument(
        "--workdir", help="where the extended model and runs go (default: a temporary folder)"
    )
    args = parser.parse_args()
    if not 0 < args.pt_records <= args.corpus_records <= 1000 - HELD_OUT:
        parser.error(f"need 0 < --pt-records <= --corpus-records <= {1000 - HELD_OUT}")
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(args.workdir or tmp))


def run(args: argparse.Namespace, workdir: Path) -> None:
    from corral.utils.log import quiet_libraries
    from corral.vocab.extend import extend_vocabulary

    quiet_libraries()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, pt_dir, held_out = split_demo(workdir, args.corpus_records, args.pt_records)
    extended = workdir / "extended"
    report = extend_vocabulary(args.model, [str(corpus)], args.add, str(extended))
    rows = {}
    for name, model_dir in (("before", args.model), ("after", str(extended))):
        nll, tokens_per_char = nll_per_char(model_dir, held_out)
        rows[name] = [tokens_per_char, nll]
    speeds: dict[str, list[float]] = {"before": [], "after": []}
    for repeat in range(args.repeats):  # interleaved: before, after, before, after, ...
        for name, model_dir in (("before", args.model), ("after", str(extended))):
            output = workdir / f"pt-{name}-{repeat}"
            speeds[name].append(train_pt(model_dir, pt_dir, output, args))
    for name in rows:
        trained = str(workdir / f"pt-{name}-0")
        rows[name] += [nll_per_char(trained, held_out)[0], statistics.median(speeds[name])]
    random_rows = _with_random_rows(args.model, extended, workdir / "extended-random")
    random_nll = nll_per_char(str(random_rows), held_out)[0]
    print(
        f"model {args.model}: {report.kind}, {report.added} tokens added from "
        f"{args.corpus_records} records; held out: the last {HELD_OUT} records; pt: "
        f"{args.pt_records} records, 1 epoch, full, cutoff {args.cutoff}, batch {args.batch}, "
        f"lr {args.learning_rate}; chars/s: median of {args.repeats} interleaved runs"
    )
    print("| vocabulary | tokens/char | NLL/char (nats) | NLL/char after pt | pt chars/s |")
    print("|---|---|---|---|---|")
    for name, (tpc, nll, nll_pt, cps) in rows.items():
        print(f"| {name} | {tpc:.3f} | {nll:.3f} | {nll_pt:.3f} | {cps:.1f} |")
    before, after = rows["before"], rows["after"]
    print(
        f"after/before: {before[0] / after[0]:.2f}x fewer tokens, NLL/char day 0 "
        f"{after[1] - before[1]:+.3f} nats, after pt {after[2] - before[2]:+.3f} nats, "
        f"pt speed {after[3] / before[3]:.2f}x characters/s"
    )
    print(
        f"day 0 with the new rows drawn at random (transformers' resize default) instead of "
        f"the mean of their parts: NLL/char {random_nll:.3f} ({random_nll - after[1]:+.3f} nats)"
    )
    rows["random"] = [random_nll]
    assert all(math.isfinite(v) for row in rows.values() for v in row)


if __name__ == "__main__":
    main()
