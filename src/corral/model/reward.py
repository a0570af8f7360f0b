"""Reward models: a causal LM whose LM head is replaced by a scalar `score` head.

A reward model is transformers' `AutoModelForSequenceClassification` with one label: the
`score` head (Linear(hidden, 1, bias=False)) reads the hidden state of a sequence's last real
token, which for a conversation rendered by the chat template is the end of the final reply.
`stage: rm` trains one; its output folder (a model, or a peft adapter whose modules_to_save
holds `score`) and `corral export` of it load with plain transformers:

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained("saves/rm-full")

The folder's `config.pad_token_id` is its tokenizer's pad token, chosen by training never to be
the token that ends a reply, so transformers' pooling (the rightmost token that is not padding)
picks the same token corral scores. Other stages (ppo, grpo, `corral eval pref`) score with:

    reward = load_reward_model("saves/rm-lora")               # an rm adapter (its base comes too)
    reward = load_reward_model("saves/rm-full", device="cpu")  # a whole reward model
    scores = reward.score([ids_1, ids_2])                      # tensor([s1, s2]), float32

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from corral.config.fields import ModelConfig
from corral.model.prompt_learning import decoder_runs_alone
from corral.utils.errors import ModelError

SCORE_HEAD = "score"  # transformers' name for the head of every *ForSequenceClassification
_HEAD_CLASS_SUFFIX = "ForSequenceClassification"
_HOW_TO_MAKE = (
    "train one with `stage: rm` (e.g. corral train examples/rm_lora.yaml); its output_dir is "
    "the reward model"
)


def reward_folder_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a reward model (None when it is one).

    A reward model folder is a model whose config.json names a *ForSequenceClassification
    architecture with one label, or a peft adapter trained for it (task_type SEQ_CLS).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        return "it does not exist"
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        task = json.loads(adapter_config.read_text(encoding="utf-8")).get("task_type")
        return None if task == "SEQ_CLS" else f"it is an adapter with task_type {task}"
    config_file = path / "config.json"
    if not config_file.is_file():
        return "it has neither config.json nor adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or ["an unnamed architecture"]
    if not architectures[0].endswith(_HEAD_CLASS_SUFFIX):
        return f"its config.json describes {architectures[0]}, a model without a score head"
    labels = len(config.get("id2label") or {"0": 0})
    if labels != 1:
        return f"it is a classifier with {labels} labels, not one scalar score"
    return None


def wants_value_head(model_config: ModelConfig) -> bool:
    """Whether `model_config` names a reward model (its model folder or one of its adapters)."""
    folders = [model_config.model_name_or_path or "", *(model_config.adapter_name_or_path or [])]
    return any(Path(f).expanduser().is_dir() and reward_folder_problem(f) is None for f in folders)


def check_generator(model_config: ModelConfig) -> None:
    """Refuse a reward model where a model must generate (chat, serve, eval generate).

    Raises:
        ModelError: naming the reward model folder and what to do with it instead.
    """
    folders = [model_config.model_name_or_path or "", *(model_config.adapter_name_or_path or [])]
    for folder in folders:
        if Path(folder).expanduser().is_dir() and reward_folder_problem(folder) is None:
            flag = "--adapter" if folder != model_config.model_name_or_path else "--model"
            raise ModelError(
                f"'{folder}' is a reward model (stage: rm): it scores conversations with a score "
                "head and has no LM head, so it cannot generate replies. Score preference pairs "
                f"with `corral eval pref {flag} {folder} --dataset NAME`, or load it with "
                "transformers' AutoModelForSequenceClassification"
            )


def has_value_head(model: Any) -> bool:
    """Whether `model` (a peft model too) carries a one-label `score` head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith(_HEAD_CLASS_SUFFIX) and base.config.num_labels == 1


def prepare_value_head(model: Any, tokenizer: Any, *, new_head: bool) -> None:
    """Make a freshly loaded reward model consistent: a zero head when new, and the pad id.

    A new head starts at zero, so every score starts at 0 (the pairwise loss at log 2) and the
    run does not depend on the global random state. `config.pad_token_id` is set to the
    tokenizer's pad token (eos when it has none), which transformers' pooling relies on.
    """
    import torch

    if new_head:
        with torch.no_grad():
            getattr(model, SCORE_HEAD).weight.zero_()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def use_pooling_pad(model: Any, tokenizer: Any, reply_end_id: int) -> int:
    """Choose a pad token that never ends a reply, for tokenizer and model alike.

    transformers scores the rightmost token that is not padding; if the pad token were the
    template's end-of-reply token (a Llama 3 tokenizer padding with <|eot_id|>, say), it would
    score the token before it. The first of pad, eos, bos and unk that differs from
    `reply_end_id` becomes the pad token.

    Returns:
        The pad token id now in use.

    Raises:
        ModelError: when the tokenizer has no such token.
    """
    for token in (
        tokenizer.pad_token,
        tokenizer.eos_token,
        tokenizer.bos_token,
        tokenizer.unk_token,
    ):
        if token is not None and tokenizer.convert_tokens_to_ids(token) != reply_end_id:
            tokenizer.pad_token = token
            config = (
                model.get_base_model().config if hasattr(model, "get_base_model") else model.config
            )
            config.pad_token_id = tokenizer.pad_token_id
            return tokenizer.pad_token_id
    raise ModelError(
        f"the tokenizer's special tokens are all the reply-ending token {reply_end_id}; add a "
        "pad token to the tokenizer so a reward model can tell padding from the end of a reply"
    )


def sequence_scores(model: Any, input_ids: Any, lengths: Any) -> Any:
    """The score head's output at each row's last real token; differentiable.

    Args:
        model: a reward model (a peft model too); a distributed wrapper without `get_decoder`
            runs its own forward, whose pooling finds the last token by the pad id.
        input_ids: (B, T), right-padded; no attention mask is needed under causal attention.
        lengths: (B,) the real tokens of each row (at least 1).

    Returns:
        (B,) float32 scores.
    """
    import torch

    if not decoder_runs_alone(model):
        mask = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths[:, None]
        return model(input_ids=input_ids, attention_mask=mask.long()).logits[:, 0].float()
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=hidden.device)
    last = hidden[rows, lengths.to(hidden.device) - 1]
    return getattr(model, SCORE_HEAD)(last)[:, 0].float()


@dataclass
class RewardModel:
    """A loaded reward model, ready to score token ids.

    Attributes:
        model: the transformers model (adapters merged), in eval mode.
        tokenizer: its tokenizer; its chat template is the one the reward model trained with.
        template: the template name recorded with the folder, or None.
        path: the folder it was loaded from, as given.
    """

    model: Any
    tokenizer: Any
    template: str | None
    path: str

    def score(self, sequences: list[list[int]], *, batch_size: int = 8) -> Any:
        """Score token-id sequences (each a whole rendered conversation).

        Returns:
            A float32 CPU tensor with one score per sequence, in order.

        Raises:
            ModelError: for an empty sequence.
        """
        import torch

        if any(len(ids) == 0 for ids in sequences):
            raise ModelError("cannot score an empty token sequence")
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        out = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                lengths = torch.tensor([len(ids) for ids in chunk])
                ids = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, : len(seq)] = torch.tensor(seq)
                out.append(sequence_scores(self.model, ids.to(device), lengths.to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(
    path: str,
    *,
    adapters: list[str] | None = None,
    base: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> RewardModel:
    """Load the reward model in `path` (an `stage: rm` output folder or its export).

    Args:
        path: a whole reward model folder (reward_model_type full), or an rm adapter folder
            (reward_model_type lora), which loads on its recorded base model.
        adapters: adapter folders merged before `path` when it is an adapter (e.g. the sft
            adapter an rm adapter was trained on top of), after it when it is a whole model.
        base: the base model for an adapter `path` (default: the one it recorded).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: auto, float32, bfloat16 or float16.

    Raises:
        ModelError: `path` is missing or not a reward model (the message says how to make
            one), or it cannot be loaded.
    """
    from corral.model.load import load_model, resolve_base_for_adapters

    problem = reward_folder_problem(path)
    if problem is not None:
        raise ModelError(f"reward model '{path}' is not a reward model: {problem}; {_HOW_TO_MAKE}")
    is_adapter = (Path(path).expanduser() / "adapter_config.json").is_file()
    if is_adapter:
        model_config = ModelConfig(
            model_name_or_path=base or "default", adapter_name_or_path=[*(adapters or []), path]
        )
    else:
        model_config = ModelConfig(model_name_or_path=path, adapter_name_or_path=adapters)
    model_config = resolve_base_for_adapters(replace(model_config, device=device, dtype=dtype))
    model, tokenizer = load_model(model_config, value_head=True)
    return RewardModel(model.eval(), tokenizer, model_config.template, path)
