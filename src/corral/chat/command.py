"""`corral chat`: streaming terminal chat with history.

    corral chat                                  # the default model
    corral chat --adapter saves/quickstart       # a tuned adapter with its base and template
    corral chat --prompt "Who are you?" --temperature 0    # one reply on stdout, for scripts

In the interactive session `/clear` forgets the history, `/exit` (or Ctrl-D) quits, and Ctrl-C
stops the reply being written without ending the session.
"""

from __future__ import annotations

import argparse
import sys
import threading

from corral.config.cli_args import add_config_args, config_from_args

# flag -> config key; help comes from the config field so it is written once.
FLAGS = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--system": "default_system",
    "--max-new-tokens": "max_new_tokens",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--top-k": "top_k",
    "--repetition-penalty": "repetition_penalty",
    "--seed": "generation_seed",
}

HELP = "commands: /clear forgets the conversation, /exit quits; Ctrl-C stops a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Chat flags, each documented by its config field's help text."""
    from corral.config.fields import all_fields

    table = all_fields()
    add_config_args(parser)
    for flag, key in FLAGS.items():
        kwargs = {"nargs": "+"} if key == "adapter_name_or_path" else {}
        parser.add_argument(
            flag, dest=key, default=None, help=table[key][1].metadata["help"], **kwargs
        )
    parser.add_argument("--prompt", help="Answer this one message, print only the reply, and exit.")


def run(args: argparse.Namespace) -> int:
    """Build the engine from the config and chat once (`--prompt`) or interactively."""
    from corral.infer.engine import ChatEngine
    from corral.utils.log import get_logger, quiet_libraries

    quiet_libraries()
    config = config_from_args(args, {key: getattr(args, key) for key in FLAGS.values()})
    for note in config.notes:
        get_logger().warning(note)
    engine = ChatEngine(config.model, config.generation)
    if args.prompt is not None:
        for piece in engine.stream([{"role": "user", "content": args.prompt}]):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    return interactive(engine)


def interactive(engine) -> int:
    """The read-reply loop; returns the exit code."""
    print(
        f"corral chat — {engine.model_config.model_name_or_path} ({engine.template.name} template)"
    )
    print(HELP)
    history: list[dict] = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history.clear()
            print("(history cleared)")
            continue
        if not text:
            continue
        reply = _reply(engine, [*history, {"role": "user", "content": text}])
        if reply is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def _reply(engine, messages: list[dict]) -> str | None:
    """Stream one reply; Ctrl-C ends it early and keeps what was written; None on error."""
    from corral.utils.errors import CorralError

    stop = threading.Event()
    text = ""
    print("Assistant: ", end="", flush=True)
    stream = engine.stream(messages, stop_event=stop)
    while True:
        try:
            piece = next(stream)
        except StopIteration:
            break
        except KeyboardInterrupt:
            stop.set()
            print(" [stopped]", end="", flush=True)
            continue
        except CorralError as exc:
            print(f"\n(error: {exc})")
            return None
        text += piece
        print(piece, end="", flush=True)
    print()
    return text
