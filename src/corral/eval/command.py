"""`corral eval`: measure a model, base and tuned side by side.

    corral eval generate --dataset identity --output saves/eval/base
    corral eval generate --adapter saves/quickstart --dataset identity --output saves/eval/tuned
    corral eval compare saves/eval/base saves/eval/tuned
    corral eval ppl --dataset identity
    corral eval mc --task-dir src/corral/resources/mc_sample --n-shot 5
    corral eval pref --adapter saves/rm-lora --dataset dpo_en_demo --output saves/eval/rm

Like every command, each takes an optional YAML file and key=value overrides; the flags are
shortcuts for config keys and their help is the config field's. Generation is greedy unless
--temperature is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corral.config.cli_args import add_config_args, config_from_args

MODEL_FLAGS = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--batch-size": "per_device_eval_batch_size",
    "--output": "save_dir",
}
DATA_FLAGS = {
    "--dataset": "dataset",
    "--dataset-dir": "dataset_dir",
    "--split": "eval_split",
    "--max-samples": "max_samples",
}
GENERATION_FLAGS = {
    "--lang": "lang",
    "--max-new-tokens": "max_new_tokens",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--top-k": "top_k",
    "--repetition-penalty": "repetition_penalty",
    "--seed": "generation_seed",
}
SUBCOMMANDS = {
    "generate": (
        "Generate replies to a dataset's prompts and score them (BLEU-4, ROUGE, exact match).",
        {**MODEL_FLAGS, **DATA_FLAGS, **GENERATION_FLAGS},
    ),
    "ppl": (
        "Perplexity on a dataset, masked as in training (documents: all tokens; "
        "conversations: replies only).",
        {**MODEL_FLAGS, **DATA_FLAGS, "--cutoff-len": "cutoff_len"},
    ),
    "mc": (
        "Multiple-choice benchmark accuracy (MMLU / C-Eval / CMMLU layout), per subject and "
        "category.",
        {
            **MODEL_FLAGS,
            "--task-dir": "task_dir",
            "--subjects": "subjects",
            "--split": "task_split",
            "--n-shot": "n_shot",
            "--lang": "lang",
        },
    ),
    "pref": (
        "Preference accuracy and mean margin on pairs: a reward model's scores, or a policy's "
        "implicit reward beta x (log pi - log ref) against the model without its adapter.",
        {**MODEL_FLAGS, **DATA_FLAGS, "--cutoff-len": "cutoff_len"},
    ),
}
LIST_KEYS = ("adapter_name_or_path", "subjects")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per kind of evaluation, each flag documented by its config field."""
    from corral.config.fields import all_fields

    table = all_fields()
    sub = parser.add_subparsers(
        dest="eval_command", metavar="SUBCOMMAND", required=True, parser_class=type(parser)
    )
    for name, (help_text, flags) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        add_config_args(child)
        for flag, key in flags.items():
            kwargs = {"nargs": "+"} if key in LIST_KEYS else {}
            child.add_argument(
                flag, dest=key, default=None, help=table[key][1].metadata["help"], **kwargs
            )
    child = sub.add_parser("compare", help="Put evaluation folders side by side in one table.")
    child.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Folders with metrics.json.")
    child.add_argument("--json", action="store_true", help="Print JSON instead of Markdown.")
    child.add_argument("--output", help="Also write compare.md and compare.json into this folder.")


def run(args: argparse.Namespace) -> int:
    """Run the chosen evaluation and print its metrics table."""
    if args.eval_command == "compare":
        return _compare(args)
    from corral.eval import run as workflows
    from corral.infer.evaluate import report_markdown
    from corral.infer.preflight import check_inputs
    from corral.utils.log import get_logger, quiet_libraries

    flags = SUBCOMMANDS[args.eval_command][1]
    values = {key: getattr(args, key) for key in flags.values()}
    if args.eval_command == "generate" and values["temperature"] is None:
        values["temperature"] = 0.0  # evaluation is greedy unless asked otherwise
    config = config_from_args(args, values)
    check_inputs(config.model, config.data)
    quiet_libraries()
    for note in config.notes:
        get_logger().warning(note)
    result = getattr(workflows, f"run_{args.eval_command}")(config)
    print(report_markdown(result, examples=False).rstrip())
    if config.eval.save_dir:
        print(f"\nwritten to {config.eval.save_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from corral.eval.compare import compare, to_markdown

    table = compare(args.runs)
    markdown = to_markdown(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(markdown, encoding="utf-8")
        text = json.dumps(table, indent=2, ensure_ascii=False) + "\n"
        (out / "compare.json").write_text(text, encoding="utf-8")
    print(json.dumps(table, indent=2, ensure_ascii=False) if args.json else markdown.rstrip())
    return 0
