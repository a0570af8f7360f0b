"""How often a served model calls the right tool on the held-out rows of a tool-calling run.

Reads the validation split of a training config (its dataset, `val_size` and `seed`, so
exactly the rows the run held out), cuts each conversation before its first tool call, sends
the turns before it and the row's tools to a running `corral serve` through the official
`openai` client, and counts the replies that come back as parsed `tool_calls`, that call the
function the row called, and with JSON-equal arguments.

    corral serve --adapter saves/sft-lora-glaive &
    python examples/tool_calls_heldout.py examples/sft_lora_glaive_toolcall.yaml
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

from corral.config import load_config
from corral.data.loader import load_records
from corral.data.records import Record
from corral.data.templates import chat_tools


def first_call(record: Record) -> tuple[list[dict], dict] | None:
    """The OpenAI messages before the record's first tool call, and that call."""
    for i, turn in enumerate(record.messages):
        if turn["role"] == "function_call":
            call = json.loads(turn["content"])
            call = call[0] if isinstance(call, list) else call
            head = [{"role": "system", "content": record.system}] if record.system else []
            return head + record.messages[:i], call
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the training config whose held-out rows to use")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    config = load_config(args.config)
    held_out = load_records(config.data, seed=config.train.seed).eval
    cases = [(row, case) for row in held_out if (case := first_call(row)) is not None]
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    parsed = named = exact = 0
    for row, (messages, expected) in cases:
        choice = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=chat_tools(row.tools),
            temperature=0,
            max_tokens=args.max_tokens,
        ).choices[0]
        calls = choice.message.tool_calls or []
        parsed += bool(calls)
        named += bool(calls) and calls[0].function.name == expected["name"]
        exact += bool(calls) and (
            calls[0].function.name == expected["name"]
            and json.loads(calls[0].function.arguments) == expected.get("arguments")
        )
        shown = f"{calls[0].function.name}({calls[0].function.arguments})" if calls else "text"
        print(f"expected {expected['name']:<24} got {shown[:100]}")
    n = len(cases)
    print(f"{n} held-out rows with a tool call (of {len(held_out)} held out)")
    print(
        f"parsed tool_calls: {parsed}/{n}, right function: {named}/{n}, same arguments: {exact}/{n}"
    )


if __name__ == "__main__":
    main()
