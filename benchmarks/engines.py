"""One small adapter per engine: load(checkpoint, threads) once, then embed(texts) -> [n, dim] float32.

Every adapter returns L2-normalized embeddings in input order, truncates at checkpoint.max_tokens and pools as
the checkpoint says (CLS for bge-small), so the outputs can be compared row by row. Imports happen inside load():
the worker times them as part of the cold start, and a missing package only skips that engine.
"""
from __future__ import annotations

import numpy as np
from checkpoint import Checkpoint

BATCH = 32  # the peers' batch size (length-sorted where the engine sorts)


class Engine:
    name = ""
    needs = ()  # importable modules this engine needs (checked before a worker is started)
    needs_onnx = False

    def load(self, ckpt: Checkpoint, threads: int) -> None:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> np.ndarray:  # n texts -> [n, dim]
        raise NotImplementedError

    def describe(self) -> str:
        return ""


class BgeSmall(Engine):
    name = "bgesmall"
    needs = ("bgesmall", "numba")

    def load(self, ckpt, threads):
        import bgesmall

        # threads come from BGESMALL_NUM_THREADS / NUMBA_NUM_THREADS, pinned by the worker; numba.set_num_threads
        # here would start numba's threading layer at load, which bgesmall defers to a query's first split
        self.model = bgesmall.load(ckpt.path, threads=threads)

    def embed(self, texts):
        return self.model.embed(texts)

    def describe(self):
        import bgesmall

        plan = "; ".join(self.model.plan.describe())
        return f"bgesmall {getattr(bgesmall, '__version__', '?')}, its own batching; plan: {plan}"


def _normalize(x: np.ndarray) -> np.ndarray:  # [n, d] -> [n, d]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OnnxRuntime(Engine):
    """Raw ONNX Runtime: our tokenization, length-sorted batches of 32 padded to their longest text."""

    needs = ("onnxruntime", "tokenizers")
    needs_onnx = True
    onnx_file = ""

    def load(self, ckpt, threads):
        import onnxruntime as ort
        from export_onnx import onnx_dir
        from tokenizers import Tokenizer

        self.ckpt = ckpt
        self.tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(ckpt.max_tokens)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(onnx_dir(ckpt) / self.onnx_file), so,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def embed(self, texts):
        encs = self.tok.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
        out = np.empty((len(texts), self.ckpt.hidden_size), np.float32)
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for r, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[r, :n] = encs[i].ids
                mask[r, :n] = 1
            (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                "token_type_ids": np.zeros_like(ids)})  # [b, width, h]
            if self.ckpt.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask[:, :, None].astype(np.float32)
                pooled = (hidden * m).sum(1) / m.sum(1)
            out[idx] = pooled
        return _normalize(out)

    def describe(self):
        return f"onnxruntime {self.version}, {self.onnx_file}, length-sorted batches of {BATCH}"


class OrtFp32(OnnxRuntime):
    name = "ort-fp32"
    onnx_file = "model_fused.onnx"


class OrtInt8(OnnxRuntime):
    name = "ort-int8"
    onnx_file = "model_int8.onnx"


class SentenceTransformers(Engine):
    name = "sentence-transformers"
    needs = ("sentence_transformers", "torch")

    def load(self, ckpt, threads):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(ckpt.path), device="cpu", local_files_only=True)
        self.model.max_seq_length = ckpt.max_tokens
        self.torch = torch

    def embed(self, texts):
        with self.torch.inference_mode():
            return self.model.encode(texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False).astype(np.float32, copy=False)

    def describe(self):
        import sentence_transformers

        return (f"sentence-transformers {sentence_transformers.__version__}, torch {self.torch.__version__} fp32, "
                f"batch {BATCH} (sorts by length itself)")


class FastEmbed(Engine):
    """fastembed with its defaults (batch 256, padded to the batch's longest), pointed at the plain ONNX export."""

    name = "fastembed"
    needs = ("fastembed",)
    needs_onnx = True

    def load(self, ckpt, threads):
        from export_onnx import onnx_dir
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        name = f"bgesmall-bench/{ckpt.key}"
        if name not in {m["model"] for m in TextEmbedding.list_supported_models()}:
            TextEmbedding.add_custom_model(
                model=name,
                pooling=PoolingType.CLS if ckpt.pooling == "cls" else PoolingType.MEAN,
                normalization=True,
                sources=ModelSource(hf=name),  # never fetched: specific_model_path wins
                dim=ckpt.hidden_size,
                model_file="model.onnx",
            )
        self.model = TextEmbedding(model_name=name, specific_model_path=str(onnx_dir(ckpt) / "fastembed"),
                                   threads=threads, local_files_only=True)

    def embed(self, texts):
        return np.stack(list(self.model.embed(texts))).astype(np.float32, copy=False)

    def describe(self):
        import fastembed

        return f"fastembed {fastembed.__version__} defaults (batch 256), plain ONNX export"


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (BgeSmall, OrtFp32, OrtInt8, SentenceTransformers, FastEmbed)}
