"""A tiny model that calls a tool: the weather exchange the tool-calling tests drive.

`train_on_exchange` fits a tiny random Llama (a few seconds on CPU) to one conversation, as the
chatml template's tool format renders it: a question, a get_weather call, the tool's result and
the answer. Its greedy replies are then that call and that answer.
"""

from __future__ import annotations

import json

TEMPLATE = "chatml"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, TIME]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
ARGUMENTS = {"city": "Paris"}
RESULT = "sunny, 21 C"
ANSWER = "It is sunny and 21 C in Paris."


def exchange(call_id: str = "call_1") -> list[dict]:
    """The conversation the model is trained on: question, call, tool result, answer."""
    call = {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}
    return [
        QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": call_id, "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": RESULT},
        {"role": "assistant", "content": ANSWER},
    ]


def train_on_exchange(base_dir, folder, max_steps: int = 300) -> None:
    """Fit the tiny model to the exchange's replies, as sft trains them (prompt tokens masked),
    until every reply token is its greedy choice with a margin (loss under 0.02)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.data.processors.conversation import label_turns
    from corral.data.templates import encode_turns, get_template

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    turns = encode_turns(get_template(TEMPLATE, tokenizer), tokenizer, exchange(), tools=TOOLS)
    ids, labels = label_turns(turns, train_on_prompt=False, mask_history=False)
    labels = torch.tensor(labels[1:])
    # the LM head only where a reply token is predicted: the 49k-word head is most of the cost
    where = (labels != -100).nonzero().squeeze(1)
    targets = labels[where]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small: more threads only wait on each other
    try:
        logits, loss = _fit(model, torch.tensor([ids]), where, targets, max_steps)
    finally:
        torch.set_num_threads(threads)
    assert (logits.argmax(-1) == targets).all(), f"the exchange was not learned (loss {loss})"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _fit(model, ids, where, targets, max_steps: int) -> tuple:
    """Adam on the reply tokens until their loss is under 0.02; the last (logits, loss)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(max_steps):
        hidden = model.model(input_ids=ids).last_hidden_state[0, where]
        logits = model.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if loss.item() < 0.02:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return logits, loss.item()
