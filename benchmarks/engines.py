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
    numba_cache = False  # True: bench.py gives it an empty NUMBA_CACHE_DIR of its own for the cold start

    def load(self, ckpt: Checkpoint, threads: int) -> None:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> np.ndarray:  # n texts -> [n, dim]
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def precision(self) -> str:
        """The arithmetic that ran, as the engine itself reports it after load ("fp32", "bf16", ...)."""
        return ""


class BgeSmall(Engine):
    name = "bgesmall"
    needs = ("bgesmall", "numba")
    numba_cache = True
    tier = "fp32"  # passed explicitly: a $BGESMALL_PRECISION in the environment must not change the engine

    def load(self, ckpt, threads):
        import bgesmall

        # threads come from BGESMALL_NUM_THREADS / NUMBA_NUM_THREADS, pinned by the worker; numba.set_num_threads
        # here would start numba's threading layer at load, which bgesmall defers to a query's first split
        self.model = bgesmall.load(ckpt.path, threads=threads, precision=self.tier)

    def embed(self, texts):
        return self.model.embed(texts)

    def describe(self):
        import bgesmall

        plan = "; ".join(self.model.plan.describe())
        ran = self.model.precision
        note = "" if ran == self.tier else f" (asked for {self.tier}: this CPU has no AVX512_BF16)"
        return (f"bgesmall {getattr(bgesmall, '__version__', '?')}, precision {ran}{note}, its own batching; "
                f"plan: {plan}")

    def precision(self):
        return self.model.precision  # what runs: a bf16 request on a CPU without AVX512_BF16 runs fp32


class BgeSmallBf16(BgeSmall):
    """The bf16 tier: linear layers on AVX512_BF16's vdpbf16ps, everything else float32."""

    name = "bgesmall-bf16"
    tier = "bf16"


def _normalize(x: np.ndarray) -> np.ndarray:  # [n, d] -> [n, d]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class PaddedOnnx(Engine):
    """An ONNX runtime fed as ORT is: our tokenization, length-sorted batches of 32 padded to their longest text.

    Subclasses only open the ONNX file (open) and run one padded batch (run); tokenization, batching, pooling
    and normalization are the same code for every such engine."""

    needs_onnx = True
    onnx_file = ""

    def load(self, ckpt, threads):
        from export_onnx import onnx_dir
        from tokenizers import Tokenizer

        self.ckpt = ckpt
        self.tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(ckpt.max_tokens)
        self.open(onnx_dir(ckpt) / self.onnx_file, threads)

    def open(self, path, threads: int) -> None:
        raise NotImplementedError

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # [b, width] int64 x2 -> [b, width, h]
        raise NotImplementedError

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
            hidden = self.run(ids, mask)  # [b, width, h]
            if self.ckpt.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask[:, :, None].astype(np.float32)
                pooled = (hidden * m).sum(1) / m.sum(1)
            out[idx] = pooled
        return _normalize(out)


class OnnxRuntime(PaddedOnnx):
    """Raw ONNX Runtime on one of the exports, one thread pool of `threads`, sequential execution."""

    needs = ("onnxruntime", "tokenizers")

    def open(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def run(self, ids, mask):
        (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                            "token_type_ids": np.zeros_like(ids)})
        return hidden

    def describe(self):
        return f"onnxruntime {self.version}, {self.onnx_file}, length-sorted batches of {BATCH}"

    def precision(self):
        return "int8 weights" if "int8" in self.onnx_file else "fp32"


class OrtFp32(OnnxRuntime):
    name = "ort-fp32"
    onnx_file = "model_fused.onnx"


class OrtInt8(OnnxRuntime):
    name = "ort-int8"
    onnx_file = "model_int8.onnx"


class OpenVino(PaddedOnnx):
    """OpenVINO's CPU plugin on the plain ONNX export (OpenVINO fuses the graph itself), one stream of `threads`.

    hint None leaves OpenVINO its default inference precision: bf16 where it judges the CPU fast at it (AMX;
    2026.4 also picks it on AVX512_BF16 CPUs), else f32. What it chose is read back from the compiled model."""

    needs = ("openvino", "tokenizers")
    onnx_file = "model.onnx"
    hint: str | None = None

    def open(self, path, threads):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if self.hint:
            config["INFERENCE_PRECISION_HINT"] = self.hint
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.version = ov.__version__

    def run(self, ids, mask):
        out = self.request.infer({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        return out[self.compiled.output(0)]

    def describe(self):
        asked = f"hint {self.hint}" if self.hint else "its default precision"
        return (f"openvino {self.version.split('-')[0]}, {self.onnx_file}, {asked}: runs {self.precision()}, "
                f"length-sorted batches of {BATCH}")

    def precision(self):
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32"


class OpenVinoF32(OpenVino):
    name = "openvino-f32"
    hint = "f32"


class OpenVinoDefault(OpenVino):
    name = "openvino"


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

    def precision(self):
        return "fp32"

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


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (BgeSmall, BgeSmallBf16, OrtFp32, OrtInt8, OpenVinoF32,
                                                         OpenVinoDefault, SentenceTransformers, FastEmbed)}
