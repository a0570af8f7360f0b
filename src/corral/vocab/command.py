"""`corral vocab extend`: learn new tokens from a corpus; write the model with them.

    corral vocab extend --model default --corpus data/alpaca_zh_demo.json --add 4000 --output models/smol-zh
    corral train stage=pt model_name_or_path=models/smol-zh dataset=... additional_target=embed_tokens,lm_head

SentencePiece tokenizers (LLaMA 1/2) get the new pieces of a SentencePiece model trained on the
corpus; byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen) get merges learned with `tokenizers`.
Old ids never change; new embedding and LM head rows start as the mean of the old tokens' rows.
"""

from __future__ import annotations

import argparse

ACTIONS = {"extend": "learn up to --add new tokens from --corpus and write the extended model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`vocab extend --model M --corpus FILE... --add N --output DIR`."""
    parser.add_argument(
        "action", choices=ACTIONS, help="; ".join(f"{k}: {v}" for k, v in ACTIONS.items())
    )
    parser.add_argument("--model", default="default", help="The model folder (or 'default').")
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        help="UTF-8 text files (.txt: one text a line; .json/.jsonl: records' text fields).",
    )
    parser.add_argument(
        "--add", type=int, required=True, help="How many new tokens to learn (at most)."
    )
    parser.add_argument("--output", required=True, help="The model folder to write (new or empty).")


def run(args: argparse.Namespace) -> int:
    """Extend, then print what changed on the corpus."""
    from corral.utils.log import quiet_libraries
    from corral.vocab.extend import extend_vocabulary

    quiet_libraries()
    report = extend_vocabulary(args.model, args.corpus, args.add, args.output)
    ids = f"ids {report.first_id}-{report.first_id + report.added - 1}" if report.added else "none"
    print(
        f"{report.kind}: {report.added} new tokens ({ids}); corpus tokens per character "
        f"{report.tokens_per_char_before:.3f} -> {report.tokens_per_char_after:.3f}; "
        f"wrote {args.output}"
    )
    return 0
