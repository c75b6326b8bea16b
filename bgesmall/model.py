"""The public model: texts in, unit-length embedding rows out, in input order."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import encoder, precision as tiers
from .batching import token_budget_batches
from .config import BertConfig, EmbedderConfig, read_bert_config
from .progress import Progress
from .plan import Plan, default_plan
from .threads import SplitGuard, default_workers, engine_pass, run_small_pass, single_threaded_blas, usable_workers
from .tokenizer import Tokenizer, check_texts
from .tune import known_plan, plan_for
from .weights import BertWeights, load_weights

QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "

# Below this many tokens in one call, one worker does it all: handing off costs more than it saves.
MIN_TOKENS_TO_SPLIT = 64


@dataclass(frozen=True)
class ModelFiles:
    folder: Path
    config: Path
    weights: Path
    tokenizer: Path

    @classmethod
    def in_folder(cls, folder) -> "ModelFiles":
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"model folder {folder} does not exist: pass a folder holding config.json, model.safetensors "
                "and tokenizer.json, or run `bgesmall download` to fetch BAAI/bge-small-en-v1.5"
            )
        files = cls(folder, folder / "config.json", folder / "model.safetensors", folder / "tokenizer.json")
        missing = [p.name for p in (files.config, files.weights, files.tokenizer) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"model folder {folder} lacks {', '.join(missing)}: a model folder holds config.json, "
                "model.safetensors and tokenizer.json (the Hugging Face layout); `bgesmall download` fetches them"
            )
        return files


class Model:
    """A loaded BERT embedding model. Thread-safe; batches run on `threads` worker threads, one per core."""

    def __init__(
        self,
        files: ModelFiles,
        config: BertConfig,
        embedder: EmbedderConfig,
        weights: BertWeights,
        threads: int,
        plan: Plan | None = None,
    ):
        self.path = files.folder
        self.config = config
        self.embedder = embedder
        self.weights = weights
        self.tokenizer = Tokenizer(files.tokenizer, embedder.max_seq_length, config.vocab_size)
        self.threads = usable_workers(threads)
        # which kernels run, measured for this machine (bgesmall/plan.py); the weights take the formats it reads
        self.plan = plan if plan is not None else default_plan(config)
        weights.prepare(self.plan)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()  # each thread's own Workspace
        self._split_guard = SplitGuard()  # a query splits only while splitting pays (bgesmall/threads.py)

    def __repr__(self) -> str:
        return (f"bgesmall.Model({str(self.path)!r}, dim={self.dim}, layers={self.config.num_hidden_layers}, "
                f"pooling={self.pooling!r}, precision={self.precision!r})")

    @property
    def precision(self) -> str:
        """The tier that runs (bgesmall/precision.py): "fp32", the exact one, or "bf16"."""
        return self.weights.precision

    @property
    def name(self) -> str:
        """The folder's name; for a Hugging Face cache snapshot (models--ORG--NAME/snapshots/REV), ORG/NAME."""
        repo = self.path.parent.parent.name
        if self.path.parent.name == "snapshots" and repo.startswith("models--"):
            return repo[len("models--") :].replace("--", "/")
        return self.path.name

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def max_tokens(self) -> int:
        return self.embedder.max_seq_length

    @property
    def pooling(self) -> str:
        return self.embedder.pooling

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters

    # -- tokens -----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True, truncate: bool = True) -> list[list[int]]:
        """Token ids per text; with add_special_tokens, [CLS] ... [SEP] and cut to max_tokens."""
        texts = check_texts(texts)
        content = self.tokenizer.content_ids(texts)
        if not add_special_tokens:
            return [ids[: self.max_tokens - 2] for ids in content] if truncate else content
        return self.tokenizer.wrap(content, truncate=truncate)

    def count_tokens(self, texts: Sequence[str], *, truncate: bool = True) -> list[int]:
        """Tokens each text costs, [CLS] and [SEP] included (after truncation, unless truncate=False)."""
        full = [len(ids) + 2 for ids in self.tokenizer.content_ids(check_texts(texts))]
        return [min(n, self.max_tokens) for n in full] if truncate else full

    # -- embeddings -------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = True) -> np.ndarray:
        """[n] texts -> [n, dim] float32, unit rows (normalize=True), in input order."""
        return self._embed_sequences(self.tokenize(texts, truncate=truncate), normalize=normalize)

    def embed_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Like embed, with BGE's retrieval instruction prepended to each query."""
        return self.embed([QUERY_INSTRUCTION + t for t in check_texts(texts)], **kwargs)

    def embed_token_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        add_special_tokens: bool = True,
        truncate: bool = True,
        normalize: bool = True,
    ) -> np.ndarray:
        """Already-tokenized input: [n] lists of vocabulary ids -> [n, dim].

        With add_special_tokens (the default) the ids are a text's WordPiece ids and [CLS] ... [SEP] is added,
        so embed_token_ids(tokenize(texts, add_special_tokens=False)) == embed(texts). Without it, each
        sequence is fed to the encoder as it is.
        """
        seqs = self._check_ids(ids)
        if add_special_tokens:
            seqs = self.tokenizer.wrap(seqs, truncate=truncate)
        else:
            limit = self.config.max_position_embeddings
            for i, s in enumerate(seqs):
                if not s:
                    raise ValueError(f"input {i} is empty: the encoder needs at least one token")
                if len(s) > limit and not truncate:
                    raise ValueError(f"input {i} has {len(s)} tokens, over the model's {limit} positions")
            seqs = [s[:limit] for s in seqs]
        return self._embed_sequences(seqs, normalize=normalize)

    def _check_ids(self, ids) -> list[list[int]]:
        if isinstance(ids, (str, bytes)):
            raise TypeError("expected a list of token-id lists")
        out = []
        vocab = self.config.vocab_size
        for i, seq in enumerate(ids):
            try:
                arr = np.asarray(seq)
            except Exception:
                raise TypeError(f"input {i} is not a list of integers") from None
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise TypeError(f"input {i} is not a list of integers")
            if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                raise ValueError(f"input {i} has a token id outside this model's vocabulary [0, {vocab})")
            out.append(arr.astype(np.int64).tolist())
        return out

    def _embed_sequences(self, seqs: list[list[int]], *, normalize: bool) -> np.ndarray:
        # [n] token sequences -> [n, dim]: batches by token budget, spread over the workers, rows in order
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        lengths = [len(s) for s in seqs]
        total = sum(lengths)
        budget = self.plan.batch_tokens
        if total >= MIN_TOKENS_TO_SPLIT:  # at least one batch per worker
            budget = min(budget, max(MIN_TOKENS_TO_SPLIT, -(-total // self.threads)))
        batches = list(token_budget_batches(lengths, budget))
        if len(batches) == 1:  # one small pass (a query): its products may be shared by the cores
            with single_threaded_blas():
                split = self.threads if self.plan.query == "split" else 1
                out[:] = run_small_pass(split, lambda parts: self._forward(seqs, parts), total, self._split_guard)
        else:  # data-parallel: each worker takes whole batches, single-threaded
            with single_threaded_blas(), engine_pass():
                if self.threads == 1:
                    for batch in batches:
                        out[batch] = self._forward([seqs[i] for i in batch])
                else:
                    pool = self._workers()
                    jobs = [(b, pool.submit(self._forward, [seqs[i] for i in b])) for b in batches]
                    for batch, job in jobs:
                        out[batch] = job.result()
        return encoder.l2_normalize(out) if normalize else out

    def _workers(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bgesmall")
            return self._pool

    def _forward(self, seqs: list[list[int]], parts: int = 1) -> np.ndarray:
        # [b] token sequences -> [b, dim] pooled, not normalized; runs in the calling thread, each matrix product
        # shared by `parts` threads (1: this thread alone)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        ids = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        ws = getattr(self._local, "workspace", None)
        if ws is None or ws.capacity < ids.shape[0]:
            ws = self._local.workspace = encoder.Workspace.allocate(self.config, max(ids.shape[0], 128))
        return encoder.encode(self.config, self.weights, ids, offsets, ws, self.pooling, parts, self.plan.long_sequence,
                              self.plan.blocks_from)

    # -- conveniences -----------------------------------------------------------------------------------

    def embed_iter(self, texts: Iterable[str], *, chunk_size: int = 256, query: bool = False, truncate: bool = True) -> Iterator[np.ndarray]:
        """Stream: pulls `chunk_size` texts at a time, yields one [k, dim] block per chunk, in order."""
        if isinstance(texts, str):
            raise TypeError("expected an iterable of strings, got a single str: wrap it as [text]")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
        embed = self.embed_queries if query else self.embed
        chunk: list[str] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"input {i} is {type(t).__name__}, not str")
            chunk.append(t)
            if len(chunk) == chunk_size:
                yield embed(chunk, truncate=truncate)
                chunk = []
        if chunk:
            yield embed(chunk, truncate=truncate)

    def encode(
        self,
        sentences,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
        prompt: str | None = None,
        **unused,
    ) -> np.ndarray:
        """sentence-transformers' `SentenceTransformer.encode`, for drop-in use.

        As there, a single str gives a [dim] vector and a list gives [n, dim]; rows are normalized when the
        model folder's modules.json has a Normalize module (as BGE's and all-MiniLM's do) or when
        normalize_embeddings=True. Batches are formed by token budget; batch_size sets the progress step.
        """
        single = isinstance(sentences, str)
        texts = check_texts([sentences] if single else sentences)
        if prompt:
            texts = [prompt + t for t in texts]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        normalize = normalize_embeddings or self.embedder.normalize
        bar = Progress(len(texts), enabled=bool(show_progress_bar))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            part = texts[start : start + batch_size]
            out[start : start + len(part)] = self.embed(part, normalize=normalize)
            bar.update(len(part))
        bar.close()
        return out[0] if single else out


def load(path=None, *, threads: int | None = None, plan=None, precision: str | None = None) -> Model:
    """Load a model folder (Hugging Face layout). With no path, find the BGE-small weights (see bgesmall.locate).

    threads: worker threads (default: the cores this process may use, or $BGESMALL_NUM_THREADS).
    precision: "fp32" (the exact tier, the default) or "bf16" (any case; default $BGESMALL_PRECISION, else
    fp32). bf16 needs a CPU with AVX512_BF16; without it the exact tier runs, with a warning, and
    `Model.precision` says "fp32" (bgesmall/precision.py).
    plan: which kernels run (bgesmall/plan.py). Default: $BGESMALL_PLAN if set, else the plan measured for this
    machine (about a second, on the first load only; kept beside numba's cache). A string forces choices, e.g.
    "default" (the built-in plan) or "linear=blas,query=single"; a bgesmall.plan.Plan is used as it is.
    """
    tier = tiers.runnable(tiers.requested(precision))  # a bad value fails before anything is read
    if path is None:
        from .locate import find_model_dir

        path = find_model_dir()
    if threads is None:
        threads = default_workers()
    elif not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    files = ModelFiles.in_folder(path)
    config = read_bert_config(files.folder)
    embedder = EmbedderConfig.from_folder(files.folder, config)
    threads = usable_workers(threads)  # the plan is measured for the threads the model will run
    known = known_plan(config, threads, plan, tier)  # forced or kept: the weights are built in its formats directly
    weights = load_weights(files.weights, config, known, tier)
    model = Model(files, config, embedder, weights, threads, known or plan_for(config, weights, threads, plan))
    weights.keep()  # after the plan: the kept file then holds the plain matrices of the layers BLAS runs
    return model
