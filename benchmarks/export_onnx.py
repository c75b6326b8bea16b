"""Export the checkpoint to ONNX once, cached under benchmarks/.cache/onnx/<checkpoint key>/.

    model.onnx        plain export of the BERT encoder (torch.onnx.export), output last_hidden_state
    model_fused.onnx  onnxruntime.transformers.optimizer, model_type="bert": fused attention, LayerNorm, GELU
    model_int8.onnx   onnxruntime.quantization.quantize_dynamic of the fused graph (int8 weights, QInt8)
    fastembed/        a folder fastembed can load with specific_model_path: model.onnx + tokenizer files

Run alone: python benchmarks/export_onnx.py [--model DIR]   (needs torch, transformers, onnx, onnxruntime)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from checkpoint import CACHE_DIR, Checkpoint, find_checkpoint


def onnx_dir(ckpt: Checkpoint) -> Path:
    return CACHE_DIR / "onnx" / ckpt.key


def export_plain(ckpt: Checkpoint, out: Path) -> None:
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(ckpt.path), add_pooling_layer=False, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # positional inputs -> last_hidden_state (forward's signature varies by version)
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # [b, s] x3 -> [b, s, h]
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model = Encoder().eval()
    ids = torch.ones((2, 16), dtype=torch.int64)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    dyn = {0: "batch", 1: "seq"}
    with torch.no_grad():
        # The TorchScript exporter: its graph is the one ORT's BERT fusion patterns are written for.
        torch.onnx.export(
            model,
            args,
            str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn,
                          "last_hidden_state": dyn},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )


def export_fused(ckpt: Checkpoint, plain: Path, out: Path) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(plain), model_type="bert", num_heads=ckpt.num_attention_heads,
                         hidden_size=ckpt.hidden_size, opt_level=None)
    opt.save_model_to_file(str(out))
    return opt.get_fused_operator_statistics()


def export_int8(fused: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Shape inference cannot type the outputs of the fused com.microsoft ops; they are all float32.
    quantize_dynamic(str(fused), str(out), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def fastembed_folder(ckpt: Checkpoint, plain: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plain, out / "model.onnx")
    for f in ("tokenizer.json", "config.json", "special_tokens_map.json"):
        if (ckpt.path / f).is_file():
            shutil.copyfile(ckpt.path / f, out / f)
    tcfg = {}
    if (ckpt.path / "tokenizer_config.json").is_file():
        tcfg = json.loads((ckpt.path / "tokenizer_config.json").read_text())
    # Same truncation as every other engine; fastembed requires the pad token to be named.
    tcfg.update(model_max_length=ckpt.max_tokens, pad_token=tcfg.get("pad_token", "[PAD]"))
    tcfg.pop("max_length", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))


def ensure_onnx(ckpt: Checkpoint, log=print) -> Path:
    """The cache folder, exporting whatever is missing. Raises ImportError when torch/onnx tools are absent."""
    d = onnx_dir(ckpt)
    d.mkdir(parents=True, exist_ok=True)
    plain, fused, int8 = d / "model.onnx", d / "model_fused.onnx", d / "model_int8.onnx"
    t0 = time.perf_counter()
    if not plain.is_file():
        log(f"exporting {ckpt.path} -> {plain}")
        export_plain(ckpt, plain.with_suffix(".tmp.onnx"))
        plain.with_suffix(".tmp.onnx").rename(plain)
    if not fused.is_file():
        stats = export_fused(ckpt, plain, fused.with_suffix(".tmp.onnx"))
        fused.with_suffix(".tmp.onnx").rename(fused)
        (d / "fusion.json").write_text(json.dumps(stats, indent=1))
        log(f"fused graph: {stats}")
    if not int8.is_file():
        export_int8(fused, int8.with_suffix(".tmp.onnx"))
        int8.with_suffix(".tmp.onnx").rename(int8)
    if not (d / "fastembed" / "model.onnx").is_file():
        fastembed_folder(ckpt, plain, d / "fastembed")
    if time.perf_counter() - t0 > 1:
        log(f"ONNX files ready in {time.perf_counter() - t0:.1f} s: {d}")
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: real bge-small, else the synthetic one)")
    args = ap.parse_args(argv)
    d = ensure_onnx(find_checkpoint(args.model))
    for f in sorted(d.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 1e6:8.1f} MB  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
