"""bgesmall as a LangChain embedding model: `BgeSmallEmbeddings`, a langchain_core `Embeddings`.

    from langchain_core.vectorstores import InMemoryVectorStore
    from bgesmall.langchain import BgeSmallEmbeddings

    store = InMemoryVectorStore(BgeSmallEmbeddings())          # or BgeSmallEmbeddings("path/to/model", threads=2)
    store.add_texts(["a passage", ...])                         # embed_documents: no instruction
    store.similarity_search("a question", k=3)                 # embed_query: BGE's query instruction

Needs the `langchain` extra: pip install "bgesmall[langchain]".
"""

from __future__ import annotations

import asyncio

from .adapters import missing_extra, one_text, passage_vectors, query_vectors, shared_model
from .model import Model

try:
    from langchain_core.embeddings import Embeddings
except ImportError as e:
    raise missing_extra("LangChain (langchain-core)", "langchain") from e


class BgeSmallEmbeddings(Embeddings):
    """LangChain embeddings from a bgesmall model: documents as passages, queries with BGE's instruction.

    model: a model folder, None for the BGE-small weights bgesmall.load finds, or a loaded bgesmall.Model;
    threads and any other keyword go to bgesmall.load. Instances asking for the same model share one.
    The async methods run the model on a worker thread, off the event loop.
    """

    def __init__(self, model: Model | str | None = None, *, threads: int | None = None, **load_kwargs):
        self.model = shared_model(model, threads=threads, **load_kwargs)

    def __repr__(self) -> str:
        return f"BgeSmallEmbeddings({self.model!r})"

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """[n] passages -> n vectors of dim floats (unit length); None or [] -> []."""
        return passage_vectors(self.model, texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        """One query -> dim floats (unit length), with BGE's query instruction prepended."""
        return query_vectors(self.model, [one_text(text)])[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
