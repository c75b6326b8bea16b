"""The RAG framework adapters, end to end with the real frameworks, in memory and offline, on MiniLM.

Each framework indexes CORPUS through its adapter and must retrieve the right paragraph for each query; the
vectors the adapter hands the framework must equal Model.embed (passages) and Model.embed_queries (queries) of a
separately loaded reference model, with BGE's query instruction applied exactly once, to queries only. A
framework that is not installed fails its tests with the pip line (CI installs every adapter's extra), and no
test may open a network connection (see `no_network`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

import bgesmall
from bgesmall import QUERY_INSTRUCTION, adapters

# Haystack reads this once, when it is first imported: without it, running a pipeline sends usage statistics.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"

CORPUS = {
    "photosynthesis": "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose, releasing oxygen as a by-product. It takes place in the chloroplasts of leaf cells.",
    "eiffel": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was built by "
    "Gustave Eiffel's company for the 1889 World's Fair and is 330 metres tall.",
    "gil": "CPython's global interpreter lock lets only one thread execute Python bytecode at a time, so CPU-bound "
    "threads do not run in parallel; I/O and C extensions can release the lock.",
    "sourdough": "Sourdough bread is leavened by a starter of wild yeast and lactic acid bacteria instead of baker's "
    "yeast. The long fermentation gives the loaf its sour taste and chewy crumb.",
    "apollo": "In July 1969 the Apollo 11 mission landed the first two people on the Moon. Neil Armstrong and Buzz "
    "Aldrin walked on the lunar surface while Michael Collins orbited above.",
}
QUERIES = {
    "how do plants turn light into sugar?": "photosynthesis",
    "who were the first astronauts to walk on the moon": "apollo",
    "why don't python threads speed up number crunching": "gil",
}
QUERY = "how tall is the tower in Paris?"  # the query whose vectors are checked in detail

ADAPTERS = {  # module -> (the framework's top-level package, the extra)
    "langchain": ("langchain_core", "langchain"),
    "llama_index": ("llama_index", "llama-index"),
    "haystack": ("haystack", "haystack"),
    "chroma": ("chromadb", "chroma"),
}


def adapter(module: str):
    """bgesmall.<module>; a framework that is not installed fails the test (never skips it)."""
    try:
        return importlib.import_module(f"bgesmall.{module}")
    except ImportError as e:
        pytest.fail(f"{e} (CI installs it: see .ci/run)")


# -- no network -----------------------------------------------------------------------------------------------

_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "", None}


def _is_local(host) -> bool:
    return host in _LOCAL_NAMES or str(host).startswith("127.")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuses, and records, every attempt to resolve or connect to anything but this machine; the test fails
    if there was one (telemetry threads that swallow the refusal included)."""
    attempts = []
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(what):
        attempts.append(what)
        raise OSError(f"the adapter tests are offline: refused {what!r}")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            refuse(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            refuse(address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"a network request was made: {attempts}"


# -- what every adapter must hand its framework -----------------------------------------------------------------


def assert_same(got, want: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6


def assert_differs(got, other: np.ndarray) -> None:
    assert np.abs(np.asarray(got, dtype=np.float64) - other).max() > 1e-3


def assert_passages(reference: bgesmall.Model, texts: list[str], got) -> None:
    """got: the passages' vectors as Model.embed gives them, with no instruction."""
    assert_same(got, reference.embed(texts))
    assert_differs(got, reference.embed_queries(texts))


def assert_query(reference: bgesmall.Model, query: str, got) -> None:
    """got: one query's vector with BGE's instruction prepended exactly once."""
    assert_same([got], reference.embed_queries([query]))
    assert_same([got], reference.embed([QUERY_INSTRUCTION + query]))
    assert_differs([got], reference.embed([query]))
    assert_differs([got], reference.embed([QUERY_INSTRUCTION + QUERY_INSTRUCTION + query]))


def assert_floats(vector) -> None:
    assert isinstance(vector, list) and all(type(x) is float for x in vector)


@pytest.fixture
def model_threads(monkeypatch):
    """The threads that run the model's embed calls (any adapter instance's shared model)."""
    seen = []
    real = bgesmall.Model.embed

    def embed(self, *args, **kwargs):
        seen.append(threading.get_ident())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bgesmall.Model, "embed", embed)
    return seen


def run_off_loop(coroutine_fn, model_threads):
    """Runs an async adapter call; asserts the model ran on a thread other than the event loop's."""
    loop_thread = []

    async def main():
        loop_thread.append(threading.get_ident())
        return await coroutine_fn()

    before = len(model_threads)
    result = asyncio.run(main())
    assert len(model_threads) > before and loop_thread[0] not in model_threads[before:]
    return result


# -- LangChain ------------------------------------------------------------------------------------------------


def test_langchain_in_memory_vector_store_retrieves_the_right_paragraph(minilm_dir, minilm):
    from_bgesmall = adapter("langchain")
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(from_bgesmall.BgeSmallEmbeddings(minilm_dir))
    store.add_texts(list(CORPUS.values()), ids=list(CORPUS))
    for query, key in QUERIES.items():
        assert store.similarity_search(query, k=1)[0].id == key
    assert_passages(minilm, list(CORPUS.values()), [store.store[k]["vector"] for k in CORPUS])


def test_langchain_vectors_sync_and_async(minilm_dir, minilm, model_threads):
    emb = adapter("langchain").BgeSmallEmbeddings(minilm_dir)
    texts = list(CORPUS.values())
    docs = emb.embed_documents(texts)
    assert_passages(minilm, texts, docs)
    query = emb.embed_query(QUERY)
    assert_floats(query)
    assert_query(minilm, QUERY, query)
    assert_passages(minilm, texts, run_off_loop(lambda: emb.aembed_documents(texts), model_threads))
    assert_query(minilm, QUERY, run_off_loop(lambda: emb.aembed_query(QUERY), model_threads))


def test_langchain_bad_input(minilm_dir):
    emb = adapter("langchain").BgeSmallEmbeddings(minilm_dir)
    assert emb.embed_documents([]) == [] and emb.embed_documents(None) == []
    with pytest.raises(TypeError, match="input 1 is int"):
        emb.embed_documents(["fine", 3])
    with pytest.raises(TypeError, match="the query is NoneType"):
        emb.embed_query(None)


# -- LlamaIndex -----------------------------------------------------------------------------------------------


def test_llama_index_vector_store_index_retrieves_the_right_paragraph(minilm_dir, minilm):
    from_bgesmall = adapter("llama_index")
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.llms import MockLLM

    Settings.llm = MockLLM()  # never the OpenAI default
    emb = from_bgesmall.BgeSmallEmbedding(minilm_dir)
    docs = [Document(text=text, id_=key) for key, text in CORPUS.items()]
    index = VectorStoreIndex.from_documents(docs, embed_model=emb)
    retriever = index.as_retriever(similarity_top_k=1)
    for query, key in QUERIES.items():
        assert retriever.retrieve(query)[0].node.ref_doc_id == key
    answer = index.as_query_engine(llm=MockLLM(), similarity_top_k=1).query(QUERY)
    assert answer.source_nodes[0].node.ref_doc_id == "eiffel"
    nodes = list(index.docstore.docs.values())
    stored = [index.vector_store.get(n.node_id) for n in nodes]
    assert_passages(minilm, [n.get_content(metadata_mode="embed") for n in nodes], stored)


def test_llama_index_vectors_sync_and_async(minilm_dir, minilm, model_threads):
    emb = adapter("llama_index").BgeSmallEmbedding(minilm_dir)
    texts = list(CORPUS.values())
    assert_passages(minilm, texts, emb.get_text_embedding_batch(texts))
    assert_passages(minilm, texts[:1], [emb.get_text_embedding(texts[0])])
    query = emb.get_query_embedding(QUERY)
    assert_floats(query)
    assert_query(minilm, QUERY, query)
    assert_passages(minilm, texts, run_off_loop(lambda: emb.aget_text_embedding_batch(texts), model_threads))
    assert_passages(minilm, texts[:1], [run_off_loop(lambda: emb.aget_text_embedding(texts[0]), model_threads)])
    assert_query(minilm, QUERY, run_off_loop(lambda: emb.aget_query_embedding(QUERY), model_threads))


def test_llama_index_bad_input_and_settings(minilm_dir, minilm):
    emb = adapter("llama_index").BgeSmallEmbedding(minilm_dir, embed_batch_size=2)
    assert emb.embed_batch_size == 2 and emb.model_name == minilm.name
    assert emb.get_text_embedding_batch([]) == [] and emb.get_text_embedding_batch(None) == []
    with pytest.raises(TypeError, match="input 3 is int"):  # its index in the list, not in a batch of 2
        emb.get_text_embedding_batch(["a", "b", "c", 5])
    with pytest.raises(TypeError, match="input 2 is NoneType"):
        asyncio.run(emb.aget_text_embedding_batch(["a", "b", None]))
    with pytest.raises(TypeError, match="the query is int"):
        emb.get_query_embedding(7)


# -- Haystack -------------------------------------------------------------------------------------------------


def test_haystack_pipelines_retrieve_the_right_paragraph(minilm_dir, minilm):
    from_bgesmall = adapter("haystack")
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.components.writers import DocumentWriter
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    store = InMemoryDocumentStore(index=f"corpus-{uuid.uuid4().hex[:8]}")
    indexing = Pipeline()
    indexing.add_component("embedder", from_bgesmall.BgeSmallDocumentEmbedder(minilm_dir))
    indexing.add_component("writer", DocumentWriter(store))
    indexing.connect("embedder.documents", "writer.documents")
    indexing.run({"embedder": {"documents": [Document(id=k, content=t) for k, t in CORPUS.items()]}})
    stored = {d.id: d.embedding for d in store.filter_documents()}
    assert_passages(minilm, list(CORPUS.values()), [stored[k] for k in CORPUS])

    querying = Pipeline()
    querying.add_component("embedder", from_bgesmall.BgeSmallTextEmbedder(minilm_dir))
    querying.add_component("retriever", InMemoryEmbeddingRetriever(store, top_k=1))
    querying.connect("embedder.embedding", "retriever.query_embedding")
    for query, key in QUERIES.items():
        assert querying.run({"embedder": {"text": query}})["retriever"]["documents"][0].id == key
    # the pipeline serializes (YAML, through to_dict/from_dict) and runs the same after loading (its store's
    # index names the same in-memory documents); Haystack 3 rebuilds components only from modules one trusts
    reloaded = Pipeline.loads(querying.dumps(), allowed_modules=["bgesmall.haystack"])
    out = reloaded.run({"embedder": {"text": QUERY}}, include_outputs_from={"embedder"})
    assert out["retriever"]["documents"][0].id == "eiffel"
    assert_query(minilm, QUERY, out["embedder"]["embedding"])


def test_haystack_vectors_meta_fields_and_async(minilm_dir, minilm, model_threads):
    from_bgesmall = adapter("haystack")
    from haystack import Document

    text = from_bgesmall.BgeSmallTextEmbedder(minilm_dir)
    query = text.run(QUERY)["embedding"]
    assert_floats(query)
    assert_query(minilm, QUERY, query)
    assert_query(minilm, QUERY, run_off_loop(lambda: text.run_async(QUERY), model_threads)["embedding"])

    docs = from_bgesmall.BgeSmallDocumentEmbedder(
        minilm_dir, meta_fields_to_embed=["title", "empty", "missing"], embedding_separator=" | "
    )
    given = [
        Document(content="Paris has a tall iron tower.", meta={"title": "Eiffel", "empty": None}),
        Document(content=None, meta={"title": "only a title"}),
    ]
    out = docs.run(given)["documents"]
    assert [d.content for d in out] == [d.content for d in given] and all(d.embedding is None for d in given)
    assert_floats(out[0].embedding)
    assert_passages(minilm, ["Eiffel | Paris has a tall iron tower.", "only a title | "], [d.embedding for d in out])
    again = run_off_loop(lambda: docs.run_async(documents=given), model_threads)["documents"]
    assert [d.embedding for d in again] == [d.embedding for d in out]


def test_haystack_serialization_and_bad_input(minilm_dir, minilm):
    from_bgesmall = adapter("haystack")
    from haystack import Document

    docs = from_bgesmall.BgeSmallDocumentEmbedder(str(minilm_dir), threads=1, meta_fields_to_embed=["title"])
    data = docs.to_dict()
    assert data == {
        "type": "bgesmall.haystack.BgeSmallDocumentEmbedder",
        "init_parameters": {
            "model": str(minilm_dir),
            "threads": 1,
            "meta_fields_to_embed": ["title"],
            "embedding_separator": "\n",
        },
    }
    assert from_bgesmall.BgeSmallDocumentEmbedder.from_dict(data).to_dict() == data
    text = from_bgesmall.BgeSmallTextEmbedder(minilm)  # a loaded Model serializes as its folder
    assert text.to_dict()["init_parameters"] == {"model": str(minilm.path), "threads": minilm.threads,
                                                 "precision": minilm.precision}

    assert docs.run([])["documents"] == [] and docs.run(None)["documents"] == []
    with pytest.raises(TypeError, match="input 1 is str, not a haystack Document"):
        docs.run([Document(content="fine"), "not a document"])
    with pytest.raises(TypeError, match="pass a list of Documents"):
        docs.run(Document(content="one"))
    with pytest.raises(TypeError, match="text is list, not str"):
        text.run(["a query in a list"])


# -- Chroma ---------------------------------------------------------------------------------------------------


@pytest.fixture
def chroma_client():
    adapter("chroma")
    import chromadb

    return chromadb.EphemeralClient(settings=chromadb.Settings(anonymized_telemetry=False))


def test_chroma_collection_retrieves_the_right_paragraph(minilm_dir, minilm, chroma_client):
    ef = adapter("chroma").BgeSmallEmbeddingFunction(minilm_dir)
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    docs = chroma_client.create_collection(name, embedding_function=ef)
    docs.add(ids=list(CORPUS), documents=list(CORPUS.values()))
    found = docs.query(query_texts=list(QUERIES), n_results=1)
    assert [ids[0] for ids in found["ids"]] == list(QUERIES.values())
    stored = docs.get(ids=list(CORPUS), include=["embeddings"])
    assert_passages(minilm, list(CORPUS.values()), [stored["embeddings"][stored["ids"].index(k)] for k in CORPUS])
    # Chroma embedded the query with embed_query: its cosine distance is that of the instructed query vector
    hit = docs.query(query_texts=[QUERY], n_results=1)
    assert hit["ids"] == [["eiffel"]]
    cosine = float(minilm.embed_queries([QUERY])[0] @ minilm.embed([CORPUS["eiffel"]])[0])
    assert abs(hit["distances"][0][0] - (1 - cosine)) <= 1e-5
    # the collection keeps its embedding function's name and config: fetched again, it rebuilds it
    again = chroma_client.get_collection(name)
    assert isinstance(again.configuration["embedding_function"], type(ef))
    assert again.query(query_texts=[QUERY], n_results=1)["distances"] == hit["distances"]


def test_chroma_vectors_config_and_bad_input(minilm_dir, minilm):
    from_bgesmall = adapter("chroma")
    ef = from_bgesmall.BgeSmallEmbeddingFunction(minilm_dir, threads=1)
    texts = list(CORPUS.values())
    got = ef(texts)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (minilm.dim,) for v in got)
    assert_passages(minilm, texts, got)
    assert_query(minilm, QUERY, ef.embed_query([QUERY])[0])
    assert ef.get_config() == {"model": str(minilm_dir), "threads": 1}
    rebuilt = from_bgesmall.BgeSmallEmbeddingFunction.build_from_config(ef.get_config())
    assert rebuilt.model is ef.model and not ef.is_legacy() and ef.name() == "bgesmall"
    given_model = from_bgesmall.BgeSmallEmbeddingFunction(minilm)
    assert given_model.get_config() == {"model": str(minilm.path), "threads": minilm.threads,
                                        "precision": minilm.precision}
    # no folder given: the config says so, and a machine that rebuilds it finds its own BGE-small weights
    assert adapters.load_arguments(None, None, {}) == {"model": None, "threads": None}
    assert ef([]) == [] and ef(None) == [] and ef.embed_query([]) == []
    with pytest.raises(TypeError, match="input 1 is bytes"):
        ef(["fine", b"bytes"])
    with pytest.raises(TypeError, match="single str"):
        ef.embed_query(QUERY)


# -- what all four share --------------------------------------------------------------------------------------


def _all_four(*args, **kwargs) -> list:
    """One instance of each adapter on the same model; the Haystack one loaded (warm_up)."""
    haystack_embedder = adapter("haystack").BgeSmallTextEmbedder(*args, **kwargs)
    haystack_embedder.warm_up()
    return [
        adapter("langchain").BgeSmallEmbeddings(*args, **kwargs).model,
        adapter("llama_index").BgeSmallEmbedding(*args, **kwargs).model,
        adapter("chroma").BgeSmallEmbeddingFunction(*args, **kwargs).model,
        haystack_embedder._spec.load(),
    ]


def test_adapters_share_one_model(minilm_dir, minilm):
    models = _all_four(minilm_dir)
    assert all(m is models[0] for m in models) and models[0] is not minilm
    assert adapters.shared_model(str(minilm_dir) + "/.") is models[0]  # the same folder, spelled otherwise
    assert adapters.shared_model(minilm_dir, threads=1) is not models[0]
    assert all(m is minilm for m in _all_four(minilm))
    with pytest.raises(ValueError, match="threads apply when bgesmall loads the model"):
        adapter("langchain").BgeSmallEmbeddings(minilm, threads=1)
    with pytest.raises(TypeError, match="model is int"):
        adapter("chroma").BgeSmallEmbeddingFunction(3)


def test_shared_model_loads_once_under_concurrent_calls(minilm_dir, monkeypatch):
    loads = []
    real = adapters.load
    monkeypatch.setattr(adapters, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    start = threading.Barrier(4)
    got = []

    def ask():
        start.wait()
        got.append(adapters.shared_model(minilm_dir, threads=3))

    workers = [threading.Thread(target=ask) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(loads) == 1 and len(got) == 4 and all(m is got[0] for m in got)


def test_unknown_keywords_go_to_load(minilm, monkeypatch):
    """A load option bgesmall.load may gain reaches it through every adapter unchanged."""
    calls = []
    monkeypatch.setattr(adapters, "load", lambda path, **kwargs: calls.append(kwargs) or minilm)
    models = _all_four("some/model", threads=2, future_option="a future option")
    assert all(m is minilm for m in models)
    assert calls == [{"threads": 2, "future_option": "a future option"}]  # one load, shared by all four
    haystack_embedder = adapter("haystack").BgeSmallTextEmbedder("some/model", future_option="a future option")
    assert haystack_embedder.to_dict()["init_parameters"]["future_option"] == "a future option"


def test_precision_reaches_load_from_every_adapter(minilm, monkeypatch):
    """precision="bf16" (any case) reaches bgesmall.load from each adapter, canonical; "BF16" and "bf16" share
    one model, fp32 is another; saved configs keep it; a value that is not a tier fails before any load."""
    class Loaded:  # a stand-in for the model each load makes (a new one per load)
        name = "stand-in"

    calls = []
    monkeypatch.setattr(adapters, "load", lambda path, **kwargs: calls.append(kwargs) or Loaded())
    monkeypatch.delenv("BGESMALL_PRECISION", raising=False)
    bf16 = _all_four("some/model", threads=2, precision="BF16")
    assert calls == [{"threads": 2, "precision": "bf16"}] and all(m is bf16[0] for m in bf16)
    assert all(m is bf16[0] for m in _all_four("some/model", threads=2, precision="bf16"))
    monkeypatch.setenv("BGESMALL_PRECISION", "bf16")  # the default tier is keyed as the tier asked for
    assert adapters.shared_model("some/model", threads=2) is bf16[0] and len(calls) == 1
    monkeypatch.delenv("BGESMALL_PRECISION")
    fp32 = _all_four("some/model", threads=2, precision="fp32")
    assert fp32[0] is not bf16[0] and calls[1:] == [{"threads": 2, "precision": "fp32"}]
    assert adapter("haystack").BgeSmallDocumentEmbedder("some/model", precision="BF16").to_dict()[
        "init_parameters"]["precision"] == "bf16"
    assert adapter("chroma").BgeSmallEmbeddingFunction("some/model", threads=2, precision="BF16").get_config() == {
        "model": "some/model", "threads": 2, "precision": "bf16"}
    for make in (adapter("langchain").BgeSmallEmbeddings, adapter("llama_index").BgeSmallEmbedding,
                 adapter("chroma").BgeSmallEmbeddingFunction, adapter("haystack").BgeSmallTextEmbedder,
                 adapter("haystack").BgeSmallDocumentEmbedder):
        with pytest.raises(ValueError, match=r"precision 'int8' is not a tier.*'fp32', 'bf16'"):
            make("some/model", precision="int8")
    assert len(calls) == 2


def test_a_bf16_adapter_embeds_within_the_tiers_fidelity(minilm_dir, minilm):
    from bgesmall.kernels.matmul import HAS_BF16

    embeddings = adapter("langchain").BgeSmallEmbeddings(minilm_dir, precision="bf16")
    assert embeddings.model.precision == ("bf16" if HAS_BF16 else "fp32") and embeddings.model is not minilm
    texts = list(CORPUS.values())
    got = np.array(embeddings.embed_documents(texts), np.float32)
    exact = minilm.embed(texts)
    assert np.sum(got * exact, axis=1).min() >= 0.9995  # unit rows: the dot product is the cosine
    query = np.array(embeddings.embed_query(QUERY), np.float32)
    assert float(query @ minilm.embed_queries([QUERY])[0]) >= 0.9995
    chroma = adapter("chroma").BgeSmallEmbeddingFunction(embeddings.model)  # a loaded bf16 model, saved as such
    assert chroma.get_config()["precision"] == embeddings.model.precision
    assert adapter("chroma").BgeSmallEmbeddingFunction.build_from_config(chroma.get_config()).model is embeddings.model


def test_a_missing_framework_names_its_extra():
    """With the framework hidden, importing its adapter raises ImportError with the pip line."""
    code = (
        "import importlib, json, sys\n"
        f"adapters = {ADAPTERS!r}\n"
        "out = {}\n"
        "for module, (framework, extra) in adapters.items():\n"
        "    saved = {n: m for n, m in sys.modules.items() if n == framework or n.startswith(framework + '.')}\n"
        "    for n in saved: del sys.modules[n]\n"
        "    sys.modules[framework] = None\n"
        "    try:\n"
        "        importlib.import_module('bgesmall.' + module)\n"
        "        out[module] = 'imported'\n"
        "    except ImportError as e:\n"
        "        out[module] = str(e)\n"
        "    del sys.modules[framework]\n"
        "    sys.modules.update(saved)\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    messages = json.loads(r.stdout)
    for module, (_, extra) in ADAPTERS.items():
        assert f'pip install "bgesmall[{extra}]"' in messages[module], messages[module]
