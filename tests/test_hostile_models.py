"""Hostile model folders (issue 14, part 2): every damaged or malicious file is refused with a ModelLoadError
that names the file and the field, before any allocation sized from it, and the refusal stays small.

Each case is a copy of the tiny synthetic checkpoint with one file spoiled. All cases are loaded in one child
process, which resets its peak-RSS counter (/proc/self/clear_refs) before each load and reports the peak
(VmHWM) after it: the figure is the memory the refusal itself took, on top of the imported engine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bgesmall.synthetic import make_checkpoint

PEAK_RSS_LIMIT_MB = 200

CHILD = r"""
import json, resource, sys
import bgesmall

def peak_mb():
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:  # not Linux, or not allowed: the peak then includes the import
        return False

out = []
for folder in json.loads(sys.argv[1]):
    reset = reset_peak()
    try:
        bgesmall.load(folder)
        error = None
    except BaseException as e:  # a crash of any kind is reported, not raised
        error = [type(e).__name__, str(e)]
    out.append({"folder": folder, "error": error, "peak_mb": peak_mb(), "reset": reset})
print(json.dumps(out))
"""


def _header(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(folder: Path, header: dict, data: bytes, *, sparse_size: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path = folder / "model.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
        if sparse_size is not None:  # a file this large on disk costs nothing: no byte of it is written
            fh.truncate(8 + len(blob) + sparse_size)


def edit_header(edit):
    def spoil(folder: Path) -> None:
        header, data = _header(folder)
        edit(header)
        _write(folder, header, data)

    return spoil


def _first(header: dict, suffix: str) -> dict:
    return header[next(k for k in header if k.endswith(suffix))]


def _terabyte_tensor(h):
    _first(h, "word_embeddings.weight").update(shape=[1 << 20, 1 << 20], data_offsets=[0, 4 << 40])


def _past_the_end(h):
    info = _first(h, "layer.1.output.LayerNorm.bias")
    begin, end = info["data_offsets"]
    info["data_offsets"] = [begin + (1 << 30), end + (1 << 30)]


def _overlap(h):
    a, b = _first(h, "layer.0.output.LayerNorm.bias"), _first(h, "layer.1.output.LayerNorm.bias")
    b["data_offsets"] = list(a["data_offsets"])


def _short_range(h):
    info = _first(h, "layer.0.intermediate.dense.bias")
    info["data_offsets"] = [info["data_offsets"][0], info["data_offsets"][1] - 4]


def header_claims_terabytes(folder: Path) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def header_not_json(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64)


def header_is_a_list(folder: Path) -> None:
    _write(folder, [1, 2, 3], b"")  # type: ignore[arg-type]


def config(**fields):
    def spoil(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **fields}))

    return spoil


def write(name: str, content: bytes | str):
    def spoil(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return spoil


def empty_vocabulary(folder: Path) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {}
    tok["added_tokens"] = []
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def config_of_a_128_gib_model_in_a_sparse_file(folder: Path) -> None:
    """Sizes within every config limit, and a model.safetensors that really has their bytes (a sparse file):
    only the machine's memory can refuse this one, before a byte of it is read."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(vocab_size=1 << 22, hidden_size=8192, num_attention_heads=64, intermediate_size=8192,
               num_hidden_layers=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    from bgesmall.config import BertConfig
    from bgesmall.weights import expected_shapes

    header, offset = {}, 0
    for name, shape in expected_shapes(BertConfig.from_dict(cfg)).items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    _write(folder, header, b"", sparse_size=offset)


CASES = {  # name: (spoil the folder, the file named in the message, a regex the message must match)
    "header length of 1 TiB": (header_claims_terabytes, "model.safetensors", r"header claims 1099511627776 bytes"),
    "header not JSON": (header_not_json, "model.safetensors", r"header is not JSON"),
    "header a list": (header_is_a_list, "model.safetensors", r"header is a JSON list"),
    "tensor of 4 TiB": (edit_header(_terabyte_tensor), "model.safetensors",
                        r"'embeddings.word_embeddings.weight': data_offsets \[0, 4398046511104\] run past the end"),
    "offsets past the end": (edit_header(_past_the_end), "model.safetensors",
                             r"layer.1.output.LayerNorm.bias': data_offsets .* run past the end"),
    "offsets overlap": (edit_header(_overlap), "model.safetensors",
                        r"'encoder.layer.0.output.LayerNorm.bias' and 'encoder.layer.1.output.LayerNorm.bias' overlap"),
    "offsets shorter than shape": (edit_header(_short_range), "model.safetensors",
                                   r"intermediate.dense.bias': data_offsets .* hold \d+ bytes, but shape"),
    "unknown dtype": (edit_header(lambda h: _first(h, "LayerNorm.bias").update(dtype="Q7")), "model.safetensors",
                      r"LayerNorm.bias' has dtype 'Q7'"),
    "dtype a list (found by fuzz_load)": (edit_header(lambda h: _first(h, "LayerNorm.bias").update(dtype=["F32"])),
                                          "model.safetensors", r"LayerNorm.bias' has dtype \['F32'\]"),
    "negative dimension": (edit_header(lambda h: _first(h, "LayerNorm.bias").update(shape=[-32])),
                           "model.safetensors", r"LayerNorm.bias' has shape \[-32\]"),
    "integer weights": (edit_header(lambda h: _first(h, "embeddings.LayerNorm.bias").update(dtype="I32")),
                        "model.safetensors", r"'embeddings.LayerNorm.bias' has dtype I32; expected F32"),
    "128 GiB of weights": (config_of_a_128_gib_model_in_a_sparse_file, "model.safetensors",
                           r"need 12\d\.\d GiB of float32 weights, more than this machine's"),
    "hidden 10^9": (config(hidden_size=10**9), "config.json", r"hidden_size=1000000000 is beyond"),
    "10^6 layers": (config(num_hidden_layers=10**6), "config.json", r"num_hidden_layers=1000000 is beyond"),
    "vocabulary 10^12": (config(vocab_size=10**12), "config.json", r"vocab_size=1000000000000 is beyond"),
    "zero heads": (config(num_attention_heads=0), "config.json", r"num_attention_heads=0: each must be"),
    "heads do not divide hidden": (config(num_attention_heads=5), "config.json",
                                   r"hidden_size 32 is not divisible by num_attention_heads 5"),
    "size a string": (config(intermediate_size="128"), "config.json", r"intermediate_size='128'"),
    "size a bool": (config(num_hidden_layers=True), "config.json", r"num_hidden_layers=True"),
    "layer_norm_eps a string": (config(layer_norm_eps="tiny"), "config.json", r"layer_norm_eps='tiny'"),
    "config a list": (write("config.json", "[1, 2]"), "config.json", r"holds a JSON list"),
    "config of 2 MB": (write("config.json", "{" + " " * (2 << 20) + "}"), "config.json",
                       r"far more than a config file holds"),
    "config garbage": (write("config.json", b"\x89PNG\r\n\x1a\n\0\0"), "config.json", r"cannot read it as JSON"),
    "config deeply nested": (write("config.json", "[" * 100_000 + "]" * 100_000), "config.json",
                             r"cannot read it as JSON"),
    "pooling a list": (write("1_Pooling/config.json", "[]"), "1_Pooling/config.json", r"expected a JSON object"),
    "max_seq_length negative": (write("sentence_bert_config.json", '{"max_seq_length": -5}'),
                                "sentence_bert_config.json", r"max_seq_length=-5"),
    "max_seq_length a word": (write("sentence_bert_config.json", '{"max_seq_length": "long"}'),
                              "sentence_bert_config.json", r"max_seq_length='long'"),
    "modules an object": (write("modules.json", "{}"), "modules.json", r"expected a JSON array"),
    "tokenizer garbage": (write("tokenizer.json", os.urandom(4096)), "tokenizer.json", r"cannot read tokenizer"),
    "tokenizer empty vocabulary": (empty_vocabulary, "tokenizer.json", r"tokenizer.json"),
    "tokenizer of another model": (config(vocab_size=1000), "tokenizer.json",
                                   r"token id 30521 .* config.json's vocab_size is 1000"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile")
    good = make_checkpoint(root / "good", preset="tiny", seed=5)
    folders = {}
    for i, (name, (spoil, _, _)) in enumerate(CASES.items()):
        folder = root / f"case{i}"
        shutil.copytree(good, folder)
        if name == "tokenizer of another model":  # weights that match the smaller vocabulary, so only the
            shutil.rmtree(folder)  # tokenizer is wrong
            make_checkpoint(folder, preset="tiny", seed=5, vocab_size=1000)
        else:
            spoil(folder)
        folders[name] = str(folder)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(folders.values()))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    by_folder = {r["folder"]: r for r in json.loads(proc.stdout.splitlines()[-1])}
    results = {name: by_folder[folder] for name, folder in folders.items()}
    for name, r in results.items():  # the figures (pytest -s shows them)
        print(f"{name:28} peak {r['peak_mb']:6.1f} MB  {(r['error'] or ['loaded', ''])[0]}: "
              f"{(r['error'] or ['', ''])[1][:150]}")
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused_clearly_and_cheaply(refusals, name):
    _, file, pattern = CASES[name]
    result = refusals[name]
    assert result["error"] is not None, "loaded without complaint"
    kind, message = result["error"]
    assert kind == "ModelLoadError", f"{kind}: {message}"
    assert file in message
    assert re.search(pattern, message), message
    assert result["peak_mb"] < PEAK_RSS_LIMIT_MB, f"peak RSS {result['peak_mb']:.0f} MB while refusing"
