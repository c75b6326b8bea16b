"""bgesmall as Haystack embedders: `BgeSmallTextEmbedder` (queries) and `BgeSmallDocumentEmbedder` (documents).

    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from bgesmall.haystack import BgeSmallDocumentEmbedder, BgeSmallTextEmbedder

    store = InMemoryDocumentStore()
    docs = BgeSmallDocumentEmbedder().run([Document(content="a passage"), ...])["documents"]  # no instruction
    store.write_documents(docs)
    query = Pipeline()
    query.add_component("embedder", BgeSmallTextEmbedder())                                 # BGE's instruction
    query.add_component("retriever", InMemoryEmbeddingRetriever(store))
    query.connect("embedder.embedding", "retriever.query_embedding")
    query.run({"embedder": {"text": "a question"}})["retriever"]["documents"]

Both are Haystack 2+ components with `run` and `run_async`, serialize with to_dict/from_dict (the model by its
folder), and load their model in warm_up (or on first run); instances asking for the same model share one.
Needs the `haystack` extra: pip install "bgesmall[haystack]".
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from .adapters import check_model_argument, load_arguments, missing_extra, one_text, passage_vectors, query_vectors, shared_model
from .model import Model

try:
    from haystack import Document, component, default_from_dict, default_to_dict
except ImportError as e:
    raise missing_extra("Haystack (haystack-ai)", "haystack") from e


class _ModelSpec:
    """The model an embedder was given, kept as given until warm_up loads it (Haystack builds and
    deserializes pipelines without running them), and written back by to_dict."""

    def __init__(self, model: Model | str | None, threads: int | None, load_kwargs: dict[str, Any]):
        check_model_argument(model)
        # a loaded Model is used as it is (shared_model refuses threads or load options beside it)
        self.loaded = shared_model(model, threads=threads, **load_kwargs) if isinstance(model, Model) else None
        self.arguments = load_arguments(model, threads, load_kwargs)

    def load(self) -> Model:
        if self.loaded is None:
            self.loaded = shared_model(**self.arguments)
        return self.loaded


@component
class BgeSmallTextEmbedder:
    """Embeds one query text, with BGE's query instruction, for a retriever: run(text) -> {"embedding": [dim floats]}.

    model: a model folder, None for the BGE-small weights bgesmall.load finds, or a loaded bgesmall.Model
    (serialized as its folder); threads and any other keyword go to bgesmall.load.
    """

    def __init__(self, model: Model | str | None = None, threads: int | None = None, **load_kwargs: Any):
        self._spec = _ModelSpec(model, threads, load_kwargs)

    def warm_up(self) -> None:
        """Load the model (once; later calls and other instances asking for it reuse it)."""
        self._spec.load()

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, **self._spec.arguments)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BgeSmallTextEmbedder:
        return default_from_dict(cls, data)

    @component.output_types(embedding=list[float])
    def run(self, text: str) -> dict[str, Any]:
        """text: one query (a str; BgeSmallDocumentEmbedder embeds documents) -> {"embedding": [dim floats]}."""
        query = one_text(text, "text")
        return {"embedding": query_vectors(self._spec.load(), [query])[0].tolist()}

    @component.output_types(embedding=list[float])
    async def run_async(self, text: str) -> dict[str, Any]:
        """run, on a worker thread off the event loop."""
        return await asyncio.to_thread(self.run, text)


@component
class BgeSmallDocumentEmbedder:
    """Embeds documents as passages (no instruction): run(documents) -> {"documents": [copies with .embedding]}.

    The text embedded is each document's content, after the values of `meta_fields_to_embed` that it has
    (None skipped), joined with `embedding_separator`, as Haystack's own document embedders do.
    model, threads and other keywords: as for BgeSmallTextEmbedder.
    """

    def __init__(
        self,
        model: Model | str | None = None,
        threads: int | None = None,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        **load_kwargs: Any,
    ):
        self._spec = _ModelSpec(model, threads, load_kwargs)
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator

    def warm_up(self) -> None:
        """Load the model (once; later calls and other instances asking for it reuse it)."""
        self._spec.load()

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(
            self,
            meta_fields_to_embed=self.meta_fields_to_embed,
            embedding_separator=self.embedding_separator,
            **self._spec.arguments,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BgeSmallDocumentEmbedder:
        return default_from_dict(cls, data)

    def _text_to_embed(self, doc: Document) -> str:
        meta = [str(doc.meta[k]) for k in self.meta_fields_to_embed if doc.meta.get(k) is not None]
        return self.embedding_separator.join([*meta, doc.content or ""])

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, Any]:
        """documents: Haystack Documents (None or [] -> none) -> {"documents": copies, each with its embedding}."""
        documents = _check_documents(documents)
        vectors = passage_vectors(self._spec.load(), [self._text_to_embed(d) for d in documents])
        return {"documents": [replace(d, embedding=v) for d, v in zip(documents, vectors.tolist())]}

    @component.output_types(documents=list[Document])
    async def run_async(self, documents: list[Document]) -> dict[str, Any]:
        """run, on a worker thread off the event loop."""
        return await asyncio.to_thread(self.run, documents)


def _check_documents(documents) -> list[Document]:
    if documents is None:
        return []
    if isinstance(documents, (str, Document)):
        raise TypeError(
            f"documents is a {type(documents).__name__}: pass a list of Documents "
            "(BgeSmallTextEmbedder embeds a query string)"
        )
    documents = list(documents)
    for i, d in enumerate(documents):
        if not isinstance(d, Document):
            raise TypeError(f"input {i} is {type(d).__name__}, not a haystack Document")
    return documents
