"""bgesmall as a LlamaIndex embedding model: `BgeSmallEmbedding`, a llama_index.core `BaseEmbedding`.

    from llama_index.core import Document, Settings, VectorStoreIndex
    from bgesmall.llama_index import BgeSmallEmbedding

    Settings.embed_model = BgeSmallEmbedding()                 # or BgeSmallEmbedding("path/to/model", threads=2)
    index = VectorStoreIndex.from_documents([Document(text="a passage"), ...])   # texts: no instruction
    index.as_retriever(similarity_top_k=3).retrieve("a question")               # queries: BGE's instruction

Needs the `llama-index` extra: pip install "bgesmall[llama-index]".
"""

from __future__ import annotations

import asyncio
from typing import Any, List

from .adapters import framework_texts, missing_extra, one_text, passage_vectors, query_vectors, shared_model
from .model import Model

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.embeddings import BaseEmbedding
except ImportError as e:
    raise missing_extra("LlamaIndex (llama-index-core)", "llama-index") from e

# Texts per call into the model. bgesmall batches by tokens itself and spreads a call over its threads, so a
# call should hold many texts; LlamaIndex's default (10) would leave the threads idle.
DEFAULT_EMBED_BATCH_SIZE = 256


class BgeSmallEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from a bgesmall model: texts as passages, queries with BGE's instruction.

    model: a model folder, None for the BGE-small weights bgesmall.load finds, or a loaded bgesmall.Model;
    threads goes to bgesmall.load. Keywords that are BaseEmbedding fields (embed_batch_size, callback_manager,
    num_workers, embeddings_cache, ...) go to BaseEmbedding; any other keyword goes to bgesmall.load.
    Instances asking for the same model share one. The async methods run the model on a worker thread.
    """

    _model: Model = PrivateAttr()

    def __init__(self, model: Model | str | None = None, *, threads: int | None = None, **kwargs: Any):
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in BaseEmbedding.model_fields}
        loaded = shared_model(model, threads=threads, **kwargs)
        fields.setdefault("model_name", loaded.name)
        fields.setdefault("embed_batch_size", DEFAULT_EMBED_BATCH_SIZE)
        super().__init__(**fields)
        self._model = loaded

    @classmethod
    def class_name(cls) -> str:
        return "BgeSmallEmbedding"

    @property
    def model(self) -> Model:
        return self._model

    # -- what BaseEmbedding calls -------------------------------------------------------------------------

    def _get_query_embedding(self, query: str) -> List[float]:
        return query_vectors(self._model, [one_text(query)])[0].tolist()

    def _get_text_embedding(self, text: str) -> List[float]:
        return passage_vectors(self._model, [one_text(text, "the text")])[0].tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return passage_vectors(self._model, texts).tolist()

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    # -- the batch entry points check the whole list first, so a bad item's index is its index in the list,
    # not in one of the embed_batch_size slices BaseEmbedding cuts it into; None counts as an empty list --------

    def get_text_embedding_batch(self, texts: List[str], show_progress: bool = False, **kwargs: Any) -> List[List[float]]:
        return super().get_text_embedding_batch(framework_texts(texts), show_progress, **kwargs)

    async def aget_text_embedding_batch(
        self, texts: List[str], show_progress: bool = False, **kwargs: Any
    ) -> List[List[float]]:
        return await super().aget_text_embedding_batch(framework_texts(texts), show_progress, **kwargs)
