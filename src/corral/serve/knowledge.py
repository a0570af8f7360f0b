"""`corral serve --kb NAME`: chat completions answered from a knowledge base.

The retrieval and the prompt are `corral kb ask`'s (`KnowledgeBase.ground`); the passages given
to the model come back in the response's extra `sources` field, as `kb ask --json` prints them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from corral.kb.answer import open_kb
from corral.serve.protocol import ParamError


class ServedKb:
    """A knowledge base owned by one worker thread: an SQLite connection belongs to the thread
    that opened it, and the embedder is not shared between threads, so requests' retrievals run
    there one at a time, off the event loop.

    Raises:
        CorralError: no such knowledge base, or its store cannot be reached (at construction).
    """

    def __init__(self, name: str, settings) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kb")
        try:
            self.kb = self.executor.submit(open_kb, name, settings).result()
        except BaseException:
            self.executor.shutdown()
            raise

    async def ground(self, messages: list[dict]) -> tuple[list[dict], list[dict], str | None]:
        """The messages to generate from, the sources (JSON) and, when no passage is relevant
        enough, the fixed answer (kb_no_answer) to give instead of generating."""
        last = messages[-1]
        if last["role"] != "user" or not last["content"].strip():
            raise ParamError(
                "with --kb the last message must be the user's question (non-empty text)",
                "messages",
            )
        loop = asyncio.get_running_loop()
        grounded, hits = await loop.run_in_executor(self.executor, self.kb.ground, messages)
        answer = None if hits else self.kb.no_answer(last["content"])
        return grounded, [hit.to_json() for hit in hits], answer

    def close(self) -> None:
        self.executor.submit(self.kb.store.close).result()
        self.executor.shutdown()
