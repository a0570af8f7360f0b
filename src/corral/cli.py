"""`corral` command line: dispatch only.

Each subcommand lives in the layer that owns it and exposes `add_arguments(parser)` and
`run(args) -> int`; its module must import nothing heavy at import time, so `corral --help`
starts instantly. User errors (`CorralError`) print one message and exit 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from corral import __version__
from corral.utils.distributed import record_error
from corral.utils.errors import CorralError
from corral.utils.suggest import did_you_mean

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS = {
    "quickstart": (
        "corral.train.quickstart",
        "Tune the default model on the built-in identity data and show before/after.",
    ),
    "train": ("corral.train.command", "Train a model: CONFIG.yaml and/or key=value overrides."),
    "chat": ("corral.chat.command", "Chat with a model in the terminal (streaming)."),
    "export": (
        "corral.export.command",
        "Merge adapters into the model; write a Hugging Face folder or a GGUF file.",
    ),
    "convert": (
        "corral.export.convert_command",
        "Convert other checkpoint formats (Meta's originals) into a Hugging Face folder.",
    ),
    "eval": (
        "corral.eval.command",
        "Evaluate a model: generation metrics, perplexity, multiple choice; compare runs.",
    ),
    "serve": (
        "corral.serve.command",
        "Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming).",
    ),
    "vocab": (
        "corral.vocab.command",
        "Extend a tokenizer's vocabulary from a corpus (and the model's embeddings with it).",
    ),
    "webui": (
        "corral.webui.command",
        "Train, chat, evaluate and export in the browser (each run an ordinary corral command).",
    ),
    "kb": (
        "corral.kb.command",
        "Answer questions from your own documents, with sources (local knowledge base).",
    ),
    "version": (
        "corral.utils.versions",
        "Print corral's and its libraries' versions and the device.",
    ),
}
# Commands that train on the CPU run under tcmalloc where installed (corral.utils.allocator).
TRAINING_COMMANDS = ("train", "quickstart")


class Parser(argparse.ArgumentParser):
    """argparse with did-you-mean suggestions and no traceback on bad input."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._hint(message)}\n")

    def _hint(self, message: str) -> str:
        if "invalid choice: '" in message:
            word = message.split("invalid choice: '")[1].split("'")[0]
            return did_you_mean(word, COMMANDS)
        if message.startswith("unrecognized arguments: "):
            word = message.split(": ", 1)[1].split()[0].split("=")[0]
            return did_you_mean(word, self._option_strings())
        return ""

    def _option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings]


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and one sub-parser per command."""
    parser = Parser(
        prog="corral",
        description="Fine-tune, evaluate, ship and serve your own ChatGPT on LLaMA-family models.",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `corral` console script."""
    parser, subparsers = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extras:
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    if argv is None and args.command in TRAINING_COMMANDS:  # the console script, not a caller
        _reexec_with_tcmalloc(subparsers[args.command])
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except CorralError as exc:
        record_error(exc)
        if args.debug:
            raise
        print(f"corral {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path the user gave: unwritable, a disk that filled up, ...
        record_error(exc)
        if args.debug:
            raise
        print(f"corral {args.command}: error: {exc} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: its traceback follows; under torchrun, the summary too
        record_error(exc)
        raise


def _reexec_with_tcmalloc(parser: Parser) -> None:
    """Start this command again with tcmalloc preloaded, when it is installed and not yet."""
    from corral.utils.allocator import preload_environment

    try:
        environment = preload_environment()
    except ValueError as exc:
        parser.error(str(exc))
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "corral", *sys.argv[1:]], environment)


if __name__ == "__main__":
    raise SystemExit(main())
