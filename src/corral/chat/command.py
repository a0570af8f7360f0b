"""`corral chat`: streaming terminal chat with history.

    corral chat                                  # the default model
    corral chat --adapter saves/quickstart       # a tuned adapter with its base and template
    corral chat --prompt "Who are you?" --temperature 0    # one reply on stdout, for scripts
    corral chat --template qwen --tools tools.json  # the model may call the tools in the file
    corral chat --kb notes                       # answers from a knowledge base, with sources

In the interactive session `/clear` forgets the history, `/exit` (or Ctrl-D) quits, and Ctrl-C
stops the reply being written without ending the session. With `--tools` (a JSON file holding an
OpenAI `tools` list), a reply that calls a tool is shown as `→ get_weather({"city": "Paris"})`,
and `/tool TEXT` answers the oldest unanswered call as the tool would; the model then goes on.
With `--kb NAME` every question is answered as `corral kb ask` answers it (the relevant
passages put before it, or "I don't know" without asking the model), then its sources listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from pathlib import Path

from corral.config.cli_args import add_config_args, config_from_args
from corral.kb.command import ANSWER as KB_FLAGS
from corral.kb.command import add_answer_arguments

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
TOOL_HELP = "/tool TEXT answers the model's oldest unanswered tool call with TEXT"


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
    parser.add_argument(
        "--tools",
        metavar="FILE",
        help="A JSON file with OpenAI tool definitions (a `tools` list) the model may call; "
        "calls are shown as → name(arguments) and answered with /tool TEXT.",
    )
    add_answer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build the engine from the config and chat once (`--prompt`) or interactively."""
    from corral.infer.engine import ChatEngine
    from corral.infer.preflight import check_inputs
    from corral.utils.errors import CorralError
    from corral.utils.log import get_logger, quiet_libraries

    quiet_libraries()
    keys = [*FLAGS.values(), *KB_FLAGS.values()]
    config = config_from_args(args, {key: getattr(args, key) for key in keys})
    for note in config.notes:
        get_logger().warning(note)
    if args.tools and args.kb:
        raise CorralError("--kb and --tools cannot be used together: choose one")
    kb = _open_kb(args.kb, config.kb) if args.kb else None  # before the model is touched
    check_inputs(config.model)
    if args.tools and not Path(args.tools).is_file():
        raise CorralError(f"--tools {args.tools}: no such file")
    engine = ChatEngine(config.model, config.generation)
    tools = read_tools(args.tools, engine.template) if args.tools else None
    if args.prompt is not None:
        text = ""
        pieces, hits = _stream(engine, [{"role": "user", "content": args.prompt}], tools, kb)
        for piece in pieces:
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_sources(hits)
        _assistant_turn(engine, text, tools)
        return 0
    return interactive(engine, tools, kb)


def _open_kb(name: str, settings):
    from corral.kb.answer import open_kb

    return open_kb(name, settings)


def _stream(engine, messages: list[dict], tools: list[dict] | None, kb, **overrides):
    """The reply's pieces and, with a knowledge base, the passages it was given."""
    if kb is None:
        return engine.stream(messages, tools=tools, **overrides), []
    return kb.answer(lambda: engine, messages, **overrides)


def _print_sources(hits: list) -> None:
    from corral.kb.answer import source_lines

    if hits:
        print("\nSources:\n" + "\n".join(source_lines(hits)), flush=True)


def read_tools(path: str, template) -> list[dict]:
    """The OpenAI `tools` list in the JSON file `path`, for a template that can call tools.

    Raises:
        CorralError: unreadable file, not a list of tools, or a template without a tool format.
    """
    from corral.data.templates.tools import check_can_render_tools
    from corral.utils.errors import CorralError

    check_can_render_tools(template)
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorralError(f"--tools {path}: cannot read a JSON file ({exc})") from exc
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools
    ):
        raise CorralError(
            f'--tools {path}: expected a list like [{{"type": "function", "function": '
            f'{{"name": ..., "parameters": {{...}}}}}}]'
        )
    return tools


def interactive(engine, tools: list[dict] | None = None, kb=None) -> int:
    """The read-reply loop (answering from `kb` when given); returns the exit code."""
    print(
        f"corral chat — {engine.model_config.model_name_or_path} ({engine.template.name} template)"
    )
    if kb is not None:
        print(f"answering from knowledge base '{kb.store.name}' ({kb.store.describe()})")
    print(HELP + (f"; {TOOL_HELP}" if tools else ""))
    history: list[dict] = []
    unanswered: list[str] = []  # ids of the last reply's tool calls, oldest first
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
            unanswered.clear()
            print("(history cleared)")
            continue
        if not text:
            continue
        turn = _user_turn(text, unanswered)
        if turn is None:
            print("(no tool call to answer)")
            continue
        if turn["role"] == "tool" and unanswered:  # the model goes on once every call has a result
            history.append(turn)
            print(f"(answered; {len(unanswered)} call(s) left)")
            continue
        reply = _reply(engine, [*history, turn], tools, kb)
        if reply is not None:
            history += [turn, reply]
            unanswered = [call["id"] for call in reply.get("tool_calls", [])]


def _user_turn(text: str, unanswered: list[str]) -> dict | None:
    """The turn the user typed: a message, or with `/tool` the result of the oldest unanswered
    call (taken off `unanswered`); None for `/tool` when no call waits for a result."""
    if not text.startswith("/tool"):
        return {"role": "user", "content": text}
    if not unanswered:
        return None
    return {"role": "tool", "tool_call_id": unanswered.pop(0), "content": text[5:].strip()}


def _assistant_turn(engine, text: str, tools: list[dict] | None) -> dict:
    """The reply as a history turn; with tools, the calls the template reads in it are shown
    (`→ name(arguments)`) and kept as OpenAI `tool_calls`."""
    calls = []
    if tools:
        from corral.data.templates import parse_reply

        content, calls = parse_reply(engine.template, text)
    if not calls:
        return {"role": "assistant", "content": text}
    for call in calls:
        print(f"→ {call.name}({call.arguments})", flush=True)
    wire = [
        {
            "id": f"call_{uuid.uuid4().hex[:8]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]
    return {"role": "assistant", "content": content, "tool_calls": wire}


def _reply(engine, messages: list[dict], tools: list[dict] | None, kb=None) -> dict | None:
    """Stream one reply and return it as a history turn; Ctrl-C ends it early and keeps what
    was written; None on error. With `kb`, the reply is from its passages and their sources
    are listed after it; the history keeps the question as typed."""
    from corral.utils.errors import CorralError

    stop = threading.Event()
    text = ""
    print("Assistant: ", end="", flush=True)
    stream, hits = _stream(engine, messages, tools, kb, stop_event=stop)
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
    _print_sources(hits)
    return _assistant_turn(engine, text, tools)
