"""Chat templates: exact published formats, training spans that match inference, stop tokens."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from types import SimpleNamespace

import pytest

from conftest import CHAT_TEMPLATES, LLAMA2_TOKENIZER
from corral.data.templates import (
    Template,
    encode_prompt,
    encode_turns,
    get_template,
    render,
    stop_strings,
    stop_token_ids,
    template_names,
)
from corral.data.templates.encoding import _token_starts
from corral.utils.errors import CorralError

SYS = "You are a geography tutor."
U1, A1 = "What is the capital of France?", "Paris."
U2, A2 = "And of Italy?", "Rome."


def conversation(*contents: str, system: str | None = None) -> list[dict]:
    """user, assistant, user, ... with the given contents, after an optional system message."""
    head = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return head + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


@cache
def word_tokenizer(bos: str | None, eos: str):
    """A tokenizer that only supplies bos/eos to templates (rendering never tokenizes)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    """Meta's Llama 2 SentencePiece tokenizer (byte fallback, "▁" spaces): the tricky offsets.

    Set up as Meta's tokenizer_config.json does, adding <s> unless told not to, so a template
    writing <s> itself would get two if encoding forgot add_special_tokens=False.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER, add_bos_token=True)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- Exact rendered text, as each family publishes it ----------------------------------------

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# (template, single turn: prompt for U1; multi-turn with system, whole; multi-turn, prompt for U2)
EXPECTED = {
    "alpaca": (
        f"{ALPACA}### Instruction:\n{U1}\n\n### Response:\n",
        f"{SYS}\n\n### Instruction:\n{U1}\n\n### Response:\n{A1}</s>"
        f"\n\n### Instruction:\n{U2}\n\n### Response:\n{A2}</s>",
        f"{ALPACA}### Instruction:\n{U1}\n\n### Response:\n{A1}</s>"
        f"\n\n### Instruction:\n{U2}\n\n### Response:\n",
    ),
    "vicuna": (
        f"<s>{VICUNA} USER: {U1} ASSISTANT:",
        f"<s>{SYS} USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT: {A2}</s>",
        f"<s>{VICUNA} USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT:",
    ),
    "llama2": (
        f"<s>[INST] {U1} [/INST]",
        f"<s>[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{U1} [/INST] {A1} </s><s>[INST] {U2} [/INST] {A2} </s>",
        f"<s>[INST] {U1} [/INST] {A1} </s><s>[INST] {U2} [/INST]",
    ),
    "llama3": (
        "<|begin_of_text|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|>"
        f"<|start_header_id|>system<|end_header_id|>\n\n{SYS}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U2}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>",
        "<|begin_of_text|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U2}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n"
        f"<|im_start|>assistant\n{A2}<|im_end|>\n",
        f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "mistral": (
        f"<s>[INST] {U1} [/INST]",
        f"<s>[INST] {SYS}\n\n{U1} [/INST]{A1}</s>[INST] {U2} [/INST]{A2}</s>",
        f"<s>[INST] {U1} [/INST]{A1}</s>[INST] {U2} [/INST]",
    ),
    "qwen": (
        f"{QWEN}<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n",
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
        f"<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{U2}<|im_end|>\n"
        f"<|im_start|>assistant\n{A2}<|im_end|>\n",
        f"{QWEN}<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "default": (  # LLaMA-Factory 0.9.5's
        f"Human: {U1}</s>\nAssistant:",
        f"System: {SYS}</s>\nHuman: {U1}</s>\nAssistant:{A1}</s>\n"
        f"Human: {U2}</s>\nAssistant:{A2}</s>\n",
        f"Human: {U1}</s>\nAssistant:{A1}</s>\nHuman: {U2}</s>\nAssistant:",
    ),
    "empty": (
        U1,
        f"{SYS}{U1}{A1}</s>{U2}{A2}</s>",
        f"{U1}{A1}</s>{U2}",
    ),
}


# the single-turn prompt for U1 after a system message
SINGLE_WITH_SYSTEM = {
    "alpaca": f"{SYS}\n\n### Instruction:\n{U1}\n\n### Response:\n",
    "vicuna": f"<s>{SYS} USER: {U1} ASSISTANT:",
    "llama2": f"<s>[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{U1} [/INST]",
    "llama3": "<|begin_of_text|>"
    f"<|start_header_id|>system<|end_header_id|>\n\n{SYS}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "mistral": f"<s>[INST] {SYS}\n\n{U1} [/INST]",
    "qwen": f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "default": f"System: {SYS}</s>\nHuman: {U1}</s>\nAssistant:",
    "empty": f"{SYS}{U1}",
}


def family_tokenizer(name: str):
    return word_tokenizer("<|begin_of_text|>" if name == "llama3" else "<s>", "</s>")


def test_every_named_template_has_expected_text():
    assert sorted(EXPECTED) == template_names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendered_text_is_the_published_format(name):
    tokenizer = family_tokenizer(name)
    template = get_template(name, tokenizer)
    single, multi_with_system, multi = EXPECTED[name]

    assert render(template, tokenizer, conversation(U1), add_generation_prompt=True) == single
    whole = conversation(U1, A1, U2, A2, system=SYS)
    assert render(template, tokenizer, whole, add_generation_prompt=False) == multi_with_system
    follow_up = conversation(U1, A1, U2)
    assert render(template, tokenizer, follow_up, add_generation_prompt=True) == multi
    with_system = conversation(U1, system=SYS)
    prompt = render(template, tokenizer, with_system, add_generation_prompt=True)
    assert prompt == SINGLE_WITH_SYSTEM[name]


def test_alpaca_with_input_uses_the_stanford_input_prompt():
    tokenizer = family_tokenizer("alpaca")
    user = {"role": "user", "content": "Translate.\nBonjour", "instruction": "Translate."}
    messages = [{**user, "input": "Bonjour"}, {"role": "assistant", "content": "Hello"}]

    text = render(
        get_template("alpaca", tokenizer), tokenizer, messages, add_generation_prompt=False
    )

    assert text == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\nHello</s>"
    )


def test_system_argument_replaces_the_default_but_not_a_system_message():
    tokenizer = family_tokenizer("vicuna")
    vicuna = get_template("vicuna", tokenizer)

    text = render(
        vicuna, tokenizer, conversation(U1), add_generation_prompt=True, system="Be brief."
    )
    assert text == f"<s>Be brief. USER: {U1} ASSISTANT:"
    own = conversation(U1, system=SYS)
    text = render(vicuna, tokenizer, own, add_generation_prompt=True, system="Be brief.")
    assert text == f"<s>{SYS} USER: {U1} ASSISTANT:"


def test_tools_reach_the_template_as_a_list_or_json_text():
    """Bare definitions (as glaive rows hold them) arrive wrapped as OpenAI's, as HF expects."""
    tokenizer = family_tokenizer("chatml")
    jinja = "{{ tools[0]['type'] }} {{ tools[0]['function']['name'] }}:{{ messages[0]['content'] }}"
    template = Template("tools", jinja, (), tool_format="qwen")

    for tools in ([{"name": "calc"}], '[{"name": "calc"}]'):
        text = render(
            template, tokenizer, conversation("hi"), add_generation_prompt=False, tools=tools
        )
        assert text == "function calc:hi"
    with pytest.raises(CorralError, match="tools is not valid JSON"):
        render(template, tokenizer, conversation("hi"), add_generation_prompt=False, tools="[{")


def test_a_role_the_template_cannot_place_is_an_error():
    tokenizer = family_tokenizer("llama2")
    messages = [*conversation(U1), {"role": "critic", "content": "42"}]

    with pytest.raises(CorralError, match="'llama2' chat template.*critic message"):
        render(get_template("llama2", tokenizer), tokenizer, messages, add_generation_prompt=True)


def test_tools_on_a_template_without_a_tool_format_are_an_error_naming_those_with_one():
    tokenizer = family_tokenizer("llama2")
    template = get_template("llama2", tokenizer)
    with_result = [*conversation(U1), {"role": "tool", "content": "42"}]

    for messages, tools in ((conversation(U1), [{"name": "calc"}]), (with_result, None)):
        with pytest.raises(
            CorralError,
            match="'llama2' chat template has no place for tools.*"
            r"llama3 \(llama3\).*chatml \(qwen\)",
        ):
            render(template, tokenizer, messages, add_generation_prompt=True, tools=tools)


# --- Training spans ------------------------------------------------------------------------


def test_chatml_turns_are_exact_prompt_and_response_pieces(smol_tokenizer):
    tok = smol_tokenizer
    pairs = encode_turns(get_template("chatml", tok), tok, conversation(U1, A1, U2, A2))

    expected = [
        (
            ids(tok, f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n"),
            ids(tok, f"{A1}<|im_end|>\n"),
        ),
        (
            ids(tok, f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n"),
            ids(tok, f"{A2}<|im_end|>\n"),
        ),
    ]
    assert pairs == expected
    labels = [label for prompt, response in pairs for label in [-100] * len(prompt) + response]
    p0, r0 = expected[0]
    p1, r1 = expected[1]
    assert labels == [-100] * len(p0) + r0 + [-100] * len(p1) + r1
    assert tok.decode(pairs[1][1]) == "Rome.<|im_end|>\n"


# SmolLM2 pre-tokenizes like GPT-2: "\n\n" ending a prompt is one token, but "\n\nRome" splits
# into "\n", "\n", "Rome", so llama3's header end would train other ids than chat prompts with.
# corral refuses that pair; llama3 is tested on a tokenizer that splits as Llama 3's does.
ON_SMOL = [None, *sorted(n for n in EXPECTED if n != "llama3")]


@pytest.mark.parametrize("name", ON_SMOL)
def test_turns_concatenate_to_the_whole_tokenization(smol_tokenizer, name):
    tok = smol_tokenizer
    template = get_template(name, tok)
    messages = conversation(U1, A1, U2, A2, system=SYS)

    pairs = encode_turns(template, tok, messages)

    whole = ids(tok, render(template, tok, messages, add_generation_prompt=False))
    assert [i for prompt, response in pairs for i in prompt + response] == whole
    assert len(pairs) == 2
    for (_, response), content in zip(pairs, (A1, A2), strict=True):
        text = tok.decode(response)
        assert content in text
        assert any(word in text for word in template.stop_words)  # trained to stop


@pytest.mark.parametrize("name", [*ON_SMOL, "llama3"])
@pytest.mark.parametrize("system", [None, SYS])
def test_training_prompt_equals_the_inference_prompt(
    smol_tokenizer, llama3_style_tokenizer, name, system
):
    """What training sees before reply k is exactly what `chat` feeds the model for reply k."""
    tok = llama3_style_tokenizer if name == "llama3" else smol_tokenizer
    template = get_template(name, tok)
    messages = conversation(U1, A1, U2, A2, "Thanks!", "You're welcome.", system=system)
    replies = [i for i, message in enumerate(messages) if message["role"] == "assistant"]

    pairs = encode_turns(template, tok, messages)

    seen: list[int] = []
    for (prompt, response), i in zip(pairs, replies, strict=True):
        assert seen + prompt == encode_prompt(template, tok, messages[:i])
        seen += prompt + response


def test_a_template_whose_prompt_tokenizes_apart_from_the_reply_cannot_train(smol_tokenizer):
    """llama3 on a GPT-2 style tokenizer: the prompt alone ends in "\n\n", one id; before a
    reply the same text is "\n", "\n". Training would see ids chat never sends: refused."""
    template = get_template("llama3", smol_tokenizer)
    messages = conversation(U1, A1)
    prompt = encode_prompt(template, smol_tokenizer, messages[:1])
    whole = ids(
        smol_tokenizer, render(template, smol_tokenizer, messages, add_generation_prompt=False)
    )
    assert whole[: len(prompt)] != prompt  # the mismatch being refused

    with pytest.raises(CorralError, match="'llama3' chat template does not suit this tokenizer"):
        encode_turns(template, smol_tokenizer, messages)


@pytest.mark.parametrize("system", [None, SYS])
@pytest.mark.parametrize("turns", [(U1,), (U1, A1, U2)])
def test_own_template_prompt_equals_apply_chat_template(smol_tokenizer, system, turns):
    tok = smol_tokenizer
    messages = conversation(*turns, system=system)

    reference = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(reference, list):  # transformers 5 returns a BatchEncoding
        reference = reference["input_ids"]
    assert encode_prompt(get_template(None, tok), tok, messages) == reference


# The published chat templates, as their models ship them.
CHATML_REFERENCE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN25_REFERENCE = (CHAT_TEMPLATES / "qwen2.5-instruct.jinja").read_text()
LLAMA3_REFERENCE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def reference_ids(tok, messages: list[dict], jinja: str | None, generation: bool) -> list[int]:
    encoded = tok.apply_chat_template(
        messages, chat_template=jinja, add_generation_prompt=generation, tokenize=True
    )
    return encoded if isinstance(encoded, list) else encoded["input_ids"]  # transformers 5


@pytest.mark.parametrize(
    ("name", "jinja"),
    [
        ("chatml", CHATML_REFERENCE),
        ("qwen", QWEN25_REFERENCE),
        ("llama3", LLAMA3_REFERENCE),
        (None, None),  # the default model's own template
    ],
)
@pytest.mark.parametrize("system", [None, SYS])
def test_turns_and_prompts_equal_the_models_own_chat_template(
    smol_tokenizer, llama3_style_tokenizer, name, jinja, system
):
    tok = llama3_style_tokenizer if name == "llama3" else smol_tokenizer
    template = get_template(name, tok)
    messages = conversation(U1, A1, U2, A2, "Thanks!", "You're welcome.", system=system)

    pairs = encode_turns(template, tok, messages)

    whole = reference_ids(tok, messages, jinja, generation=False)
    assert [i for prompt, response in pairs for i in prompt + response] == whole
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            reference = reference_ids(tok, messages[:i], jinja, generation=True)
            assert encode_prompt(template, tok, messages[:i]) == reference


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sentencepiece_turns_split_on_reply_boundaries(llama2_tokenizer, name):
    tok = llama2_tokenizer
    template = get_template(name, tok)
    reply = "Rome 😀, crème brûlée."  # byte-fallback and accented pieces inside the reply
    messages = conversation(U1, A1, U2, reply, system=SYS)

    pairs = encode_turns(template, tok, messages)

    whole = ids(tok, render(template, tok, messages, add_generation_prompt=False))
    assert [i for prompt, response in pairs for i in prompt + response] == whole
    for (_, response), content in zip(pairs, (A1, reply), strict=True):
        text = tok.decode(response).strip()
        assert text.startswith(content)
        # llama3's markers are plain text here, so "<|eot_id|><" may merge: "in", not "ends".
        assert any(word in text[len(content) :] for word in template.stop_words)
    seen: list[int] = []
    for (prompt, response), i in zip(pairs, (2, 4), strict=True):
        assert seen + prompt == encode_prompt(template, tok, messages[:i])
        seen += prompt + response


def metas_chat_encoding(sp, contents: list[str], system: str | None = None) -> list[list[int]]:
    """Meta's `chat_completion` (llama/generation.py): the system prompt merged into the first
    user message, each exchange <s> + SentencePiece("[INST] u [/INST] a ") + </s>, an open
    user turn <s> + SentencePiece("[INST] u [/INST]")."""
    contents = list(contents)
    if system:
        contents[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{contents[0]}"
    pieces = [
        [sp.bos_id(), *sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} "), sp.eos_id()]
        for user, answer in zip(contents[::2], contents[1::2], strict=False)
    ]
    if len(contents) % 2:
        pieces.append([sp.bos_id(), *sp.encode(f"[INST] {contents[-1].strip()} [/INST]")])
    return pieces


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("system", [None, SYS])
def test_llama2_turns_are_metas_reference_tokens(legacy, system):
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER, add_bos_token=True, legacy=legacy)
    # The setting is real: tokenized whole, legacy=False glues the text after <s> to it.
    glued = tok.convert_ids_to_tokens(ids(tok, "<s>[INST]"))
    assert glued == ["<s>", "▁[" if legacy else "[", "INST", "]"]
    template = get_template("llama2", tok)

    pairs = encode_turns(template, tok, conversation(U1, A1, U2, A2, system=system))

    reference = metas_chat_encoding(sp, [U1, A1, U2, A2], system)
    assert [prompt + response for prompt, response in pairs] == reference  # </s>: trained
    for prompt, _ in pairs:
        assert tok.convert_ids_to_tokens(prompt)[-4:] == ["▁[", "/", "INST", "]"]
    assert tok.convert_ids_to_tokens(pairs[1][1]) == ["▁Rome", ".", "▁", "</s>"]
    follow_up = encode_prompt(template, tok, conversation(U1, A1, U2, system=system))
    assert follow_up == [
        i for piece in metas_chat_encoding(sp, [U1, A1, U2], system) for i in piece
    ]
    prompt = encode_prompt(template, tok, conversation(U1))
    assert prompt == [sp.bos_id(), *sp.encode(f"[INST] {U1} [/INST]")]  # one <s>, not two


def test_a_token_straddling_the_reply_start_belongs_to_the_prompt(smol_tokenizer):
    tok = smol_tokenizer
    # The generation prompt ends with a space, which BPE merges into the reply's first word.
    jinja = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\nA: ' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    template = Template("spaced", jinja, ())

    [(prompt, response)] = encode_turns(template, tok, conversation(U1, A1))

    assert tok.convert_ids_to_tokens(prompt[-1]) == "ĠParis"
    assert tok.convert_ids_to_tokens(response) == [".", "<|im_end|>"]


def test_trimmed_offsets_give_the_gap_to_the_next_token():
    # ByteLevel(trim_offsets=True) reports "Ġworld" at (6, 11) in "hello world": the space
    # belongs to it, so it starts where "hello" ended.
    assert _token_starts([(0, 5), (6, 11), (11, 12)]) == [0, 5, 11]
    # Byte tokens of one character overlap: " 😀" is "ĠðŁĺ" (5, 7) then "Ģ" (6, 7).
    assert _token_starts([(0, 5), (5, 7), (6, 7), (7, 9)]) == [0, 5, 6, 7]


def test_conversation_without_replies_has_no_turns(smol_tokenizer):
    assert (
        encode_turns(get_template("chatml", smol_tokenizer), smol_tokenizer, conversation(U1)) == []
    )


def test_template_rewriting_earlier_turns_cannot_train(smol_tokenizer):
    # Like templates that drop past reasoning: earlier replies render differently later.
    jinja = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[...]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    template = Template("forgetful", jinja, ())

    with pytest.raises(CorralError, match="'forgetful' chat template is not prefix-stable"):
        encode_turns(template, smol_tokenizer, conversation(U1, A1, U2, A2))


def test_slow_tokenizer_cannot_train():
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(CorralError, match="fast tokenizer"):
        encode_turns(get_template("empty", family_tokenizer("empty")), slow, conversation(U1, A1))


# --- Stopping ------------------------------------------------------------------------------


def test_own_template_stops_on_its_end_of_turn_token(smol_tokenizer):
    template = get_template(None, smol_tokenizer)

    assert template.name == "tokenizer"
    assert template.stop_words == ("<|im_end|>",)
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(
        template, smol_tokenizer
    )
    assert stop_strings(template, smol_tokenizer) == []


def test_own_template_end_of_turn_is_found_when_it_is_not_eos(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    template = get_template(None, tok)

    assert template.stop_words == ("<|endoftext|>", "<|im_end|>")
    assert stop_token_ids(template, tok) == tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>"]
    )


def test_llama3_on_another_tokenizer_stops_on_a_string(smol_tokenizer):
    template = get_template("llama3", smol_tokenizer)

    assert stop_strings(template, smol_tokenizer) == ["<|eot_id|>"]
    assert stop_token_ids(template, smol_tokenizer) == [smol_tokenizer.eos_token_id]


def test_eos_stop_word_resolves_per_tokenizer(smol_tokenizer, llama2_tokenizer):
    assert get_template("alpaca", smol_tokenizer).stop_words == ("<|im_end|>",)
    llama2 = get_template("llama2", llama2_tokenizer)
    assert llama2.stop_words == ("</s>",)
    assert stop_token_ids(llama2, llama2_tokenizer) == [2]
    assert stop_strings(llama2, llama2_tokenizer) == []


# --- Choosing a template -------------------------------------------------------------------


def test_unknown_template_lists_names_and_suggests_one():
    with pytest.raises(CorralError) as error:
        get_template("chatlm", family_tokenizer("chatml"))

    message = str(error.value)
    assert "unknown chat template 'chatlm'" in message
    assert "did you mean 'chatml'?" in message
    assert ", ".join(template_names()) in message


@pytest.mark.parametrize("name", [None, "tokenizer"])
def test_tokenizer_without_chat_template_needs_a_name(name):
    tokenizer = word_tokenizer("<s>", "</s>")
    assert not tokenizer.chat_template

    with pytest.raises(CorralError, match="no chat template of its own.*alpaca, chatml"):
        get_template(name, tokenizer)


def test_importing_templates_does_not_import_transformers():
    code = "import sys, corral.data.templates; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
