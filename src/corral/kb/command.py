"""`corral kb`: question answering over your own documents, with sources.

    corral kb add notes ~/docs report.pdf      # index files and folders (again: only changes)
    corral kb ls                               # knowledge bases; `corral kb ls notes`: its files
    corral kb search notes "vault code" -k 5   # passages: file, lines or page, score
    corral kb ask notes "What is the vault code?"   # streamed answer, then numbered sources
    corral kb eval notes questions.jsonl       # hit@k, MRR, fact match, ROUGE
    corral kb rm notes [FILE ...]              # delete the knowledge base, or some files

`--json` on `search`, `ask` and `eval` prints one JSON object. The settings (store, embedding
model, chunking, prompts, threshold) are config keys (`corral.config.fields.KbConfig`), set in
`--config FILE.yaml` or by the flags below.
"""

from __future__ import annotations

import argparse
import json
import sys

# flag -> config key, shared by the sub-commands that take it; help comes from the field.
COMMON = {"--store": "kb_store"}
ADD = {
    "--embedding-model": "embedding_model",
    "--chunk-size": "chunk_size",
    "--chunk-overlap": "chunk_overlap",
}
ASK = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--max-new-tokens": "max_new_tokens",
    "--threshold": "kb_score_threshold",
}

# the kb flags of `corral chat --kb` and `corral serve --kb`
ANSWER = {
    "--kb-store": "kb_store",
    "--kb-top-k": "kb_top_k",
    "--kb-score-threshold": "kb_score_threshold",
}


def add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    """`--kb NAME` and the kb settings, for the commands that can answer from a knowledge base
    (their values reach the config through `ANSWER`'s keys)."""
    parser.add_argument(
        "--kb",
        metavar="NAME",
        default=None,
        help="Answer from this knowledge base (built with `corral kb add NAME PATH`), with sources.",
    )
    _add_flags(parser, ANSWER)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The kb sub-commands and their flags."""
    sub = parser.add_subparsers(dest="kb_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, *, kb_name: str = "NAME") -> argparse.ArgumentParser:
        parser_ = sub.add_parser(name, help=help_text, description=help_text)
        parser_.add_argument("name", metavar="NAME", nargs="?" if kb_name == "[NAME]" else None)
        parser_.add_argument("--config", metavar="FILE.yaml", help="A YAML file of config keys.")
        _add_flags(parser_, COMMON)
        return parser_

    add = action("add", "Index files and folders (re-adding replaces changed files).")
    add.add_argument("paths", nargs="+", metavar="PATH")
    _add_flags(add, ADD)
    action("ls", "List knowledge bases, or the files of one.", kb_name="[NAME]")
    rm = action("rm", "Delete a knowledge base, or only the files named.")
    rm.add_argument("paths", nargs="*", metavar="FILE")
    search = action("search", "The passages that best match a query.")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=None, help="Passages to show (default kb_top_k).")
    ask = action("ask", "Answer a question from the knowledge base, with sources.")
    ask.add_argument("question")
    ask.add_argument(
        "--temperature", type=float, default=0.0, help="Sampling temperature (default 0: greedy)."
    )
    evaluate = action("eval", "Score retrieval and answers on a questions file (JSON lines).")
    evaluate.add_argument("questions", metavar="QUESTIONS.jsonl")
    evaluate.add_argument(
        "--retrieval-only", action="store_true", help="Score hit@k and MRR only (no model)."
    )
    for parser_ in (search, ask, evaluate):
        parser_.add_argument("--json", action="store_true", help="Print one JSON object.")
    for parser_ in (ask, evaluate):
        _add_flags(parser_, ASK)


def _add_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from corral.config.fields import all_fields

    table = all_fields()
    for flag, key in flags.items():
        kwargs = {"nargs": "+"} if key == "adapter_name_or_path" else {}
        field = table[key][1]
        kwargs["type"] = {"int": int, "float": float}.get(str(field.type), str)
        parser.add_argument(flag, dest=key, default=None, help=field.metadata["help"], **kwargs)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    from corral.config.parse import load_config
    from corral.utils.log import quiet_libraries

    quiet_libraries()
    keys = {**COMMON, **ADD, **ASK}.values()
    config = load_config(args.config, [], {k: getattr(args, k, None) for k in keys})
    action = {"add": _add, "ls": _ls, "rm": _rm, "search": _search, "ask": _ask, "eval": _eval}
    return action[args.kb_command](args, config)


def _add(args, config) -> int:
    from corral.kb.embed import Embedder
    from corral.kb.index import add_files, collect_files, embedding_folder
    from corral.kb.store import open_store

    files = collect_files(args.paths)
    store = open_store(args.name, config.kb.kb_store, create=True).connect()
    try:
        embedder = Embedder(embedding_folder(store, config.kb.embedding_model))
        summary = add_files(store, files, embedder, config.kb.chunk_size, config.kb.chunk_overlap)
    finally:
        store.close()
    print(f"knowledge base '{args.name}' ({store.describe()})")
    print("\n".join(summary.lines()))
    return 0


def _ls(args, config) -> int:
    from corral.kb.store import list_names, open_store

    if args.name is None:
        for name in list_names(config.kb.kb_store):
            print(name)
        return 0
    store = open_store(args.name, config.kb.kb_store).connect()
    files = store.files()
    count, _ = store.stats()
    store.close()
    for path, (_, chunks) in sorted(files.items()):
        print(f"{chunks:6d}  {path}")
    print(f"{len(files)} file(s), {count} chunks in {store.describe()}")
    return 0


def _rm(args, config) -> int:
    from pathlib import Path

    from corral.kb.store import open_store
    from corral.utils.errors import CorralError

    store = open_store(args.name, config.kb.kb_store).connect()
    if not args.paths:
        store.drop()
        print(f"deleted knowledge base '{args.name}'")
        return 0
    known = store.files()
    paths = [str(Path(p).expanduser().resolve()) for p in args.paths]
    missing = [p for p, full in zip(args.paths, paths, strict=True) if full not in known]
    if missing:
        store.close()
        raise CorralError(f"not in knowledge base '{args.name}': {', '.join(missing)}")
    store.update({}, [], removed=paths)
    store.close()
    print(f"removed {len(paths)} file(s) from '{args.name}'")
    return 0


def _search(args, config) -> int:
    from corral.kb.answer import open_kb, source_lines

    kb = open_kb(args.name, config.kb)
    hits = kb.search(args.query, args.k)
    if args.json:
        print(
            json.dumps(
                {"query": args.query, "sources": [h.to_json() for h in hits]}, ensure_ascii=False
            )
        )
        return 0
    for line, hit in zip(source_lines(hits), hits, strict=True):
        print(line)
        print("    " + hit.passage.text.replace("\n", "\n    "))
    return 0


def _ask(args, config) -> int:
    from corral.infer.engine import ChatEngine
    from corral.kb.answer import open_kb, source_lines

    kb = open_kb(args.name, config.kb)
    question = [{"role": "user", "content": args.question}]
    pieces, hits = kb.answer(
        lambda: ChatEngine(config.model, config.generation),
        question,
        temperature=args.temperature,
    )
    answer = ""
    for piece in pieces:
        answer += piece
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        sources = [h.to_json() for h in hits]
        print(json.dumps({"answer": answer.strip(), "sources": sources}, ensure_ascii=False))
        return 0
    print()
    if hits:
        print("\nSources:\n" + "\n".join(source_lines(hits)))
    return 0


def _eval(args, config) -> int:
    from corral.kb.answer import open_kb
    from corral.kb.evaluate import evaluate, read_questions

    questions = read_questions(args.questions)
    kb = open_kb(args.name, config.kb)
    engine = None
    if not args.retrieval_only:
        from corral.infer.engine import ChatEngine

        engine = ChatEngine(config.model, config.generation)
    report = evaluate(kb, questions, engine)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        for key, value in report["metrics"].items():
            print(f"{key:>14}: {value:.4f}")
    return 0
