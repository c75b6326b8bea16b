"""bgesmall as a Chroma embedding function: `BgeSmallEmbeddingFunction`.

    import chromadb
    from bgesmall.chroma import BgeSmallEmbeddingFunction

    client = chromadb.EphemeralClient(chromadb.Settings(anonymized_telemetry=False))
    docs = client.create_collection("docs", embedding_function=BgeSmallEmbeddingFunction())
    docs.add(ids=["1", "2"], documents=["a passage", "another passage"])    # __call__: no instruction
    docs.query(query_texts=["a question"], n_results=1)                       # embed_query: BGE's instruction

Chroma calls the function on documents and `embed_query` on query texts; both return one float32 numpy vector
per text, as Chroma expects. The function is registered with Chroma under the name "bgesmall", so a persisted
collection rebuilds it from its config (the model folder as given, threads and load options).
Needs the `chroma` extra: pip install "bgesmall[chroma]".
"""

from __future__ import annotations

from typing import Any

from .adapters import load_arguments, missing_extra, passage_vectors, query_vectors, shared_model
from .model import Model

try:
    from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
    from chromadb.utils.embedding_functions import register_embedding_function
except ImportError as e:
    raise missing_extra("Chroma (chromadb)", "chroma") from e


@register_embedding_function
class BgeSmallEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma embeddings from a bgesmall model: documents as passages, `embed_query` with BGE's instruction.

    model: a model folder, None for the BGE-small weights bgesmall.load finds, or a loaded bgesmall.Model;
    threads and any other keyword go to bgesmall.load. Instances asking for the same model share one.
    """

    def __init__(self, model: Model | str | None = None, *, threads: int | None = None, **load_kwargs: Any):
        self.model = shared_model(model, threads=threads, **load_kwargs)
        self._arguments = load_arguments(model, threads, load_kwargs)

    def embed_documents(self, input: Documents) -> Embeddings:
        """[n] documents -> n float32 vectors (unit length), no instruction; None or [] -> []."""
        return list(passage_vectors(self.model, input))

    __call__ = embed_documents  # what Chroma calls on documents (see the end of this module)

    def embed_query(self, input: Documents) -> Embeddings:
        """[n] query texts -> n float32 vectors (unit length), each with BGE's query instruction."""
        return list(query_vectors(self.model, input))

    @staticmethod
    def name() -> str:
        return "bgesmall"

    def default_space(self) -> str:
        return "cosine"  # the vectors are unit length: cosine, inner product and l2 rank alike

    def is_legacy(self) -> bool:
        return False  # name, get_config and build_from_config are all here (Chroma's own test builds a copy)

    def get_config(self) -> dict[str, Any]:
        return dict(self._arguments)  # the folder as given (None: the BGE-small weights), threads, load options

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> BgeSmallEmbeddingFunction:
        return BgeSmallEmbeddingFunction(**config)


# Chroma wraps each subclass's __call__ in a check that refuses an empty result. bgesmall gives [] for [], as
# Model.embed gives a [0, dim] array; every vector it returns is already what that check wants (a 1-d float32
# array), so __call__ is put back as written.
BgeSmallEmbeddingFunction.__call__ = BgeSmallEmbeddingFunction.embed_documents
