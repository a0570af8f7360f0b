"""Local knowledge-base QA (`corral kb`): your documents, chunked, embedded and searched by
dense vectors plus BM25, answered by corral's chat engine with numbered sources.

Modules, in the order data flows: readers (files into paragraphs), chunking (paragraphs into
passages), embed (vectors and BM25 words), store (SQLite or PostgreSQL+pgvector), index
(`kb add`), retrieve (fusion), answer (prompt and "I don't know"), evaluate (`kb eval`),
command (the CLI).
"""
