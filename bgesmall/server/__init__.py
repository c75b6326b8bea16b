"""`bgesmall serve`: an OpenAI-compatible embeddings server with dynamic batching (optional extra).

This module imports neither FastAPI nor uvicorn: the CLI calls `add_arguments(parser)` to build the
`serve` sub-command and `run(args)` to start it; the app itself lives in `bgesmall.server.app`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

INSTALL_HINT = 'the server needs FastAPI and uvicorn: pip install "bgesmall[server]"'
API_KEY_ENV = "BGESMALL_API_KEY"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve options to `parser` (a sub-command parser or a fresh one)."""
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model folder (default: the one bgesmall finds, see `bgesmall download`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    parser.add_argument("--model-name", metavar="NAME", default="BAAI/bge-small-en-v1.5",
                        help="model name clients send and /v1/models lists (default BAAI/bge-small-en-v1.5)")
    parser.add_argument("--precision", default=None, metavar="TIER",
                        help="numeric tier: fp32, the exact engine, or bf16 (linear layers in bfloat16; needs a CPU "
                             "with AVX512_BF16, elsewhere fp32 runs, with a warning); default $BGESMALL_PRECISION, "
                             "else fp32. /health and /v1/models say the tier that runs")
    batching = parser.add_argument_group("dynamic batching")
    batching.add_argument("--no-batching", action="store_true",
                          help="run every request as its own forward pass")
    batching.add_argument("--max-batch-tokens", type=_positive_int, default=2048, metavar="N",
                          help="token budget of one forward pass, [CLS]/[SEP] included; larger requests are "
                               "split into turns of this size (default 2048)")
    batching.add_argument("--max-batch-size", type=_positive_int, default=256, metavar="N",
                          help="most inputs in one forward pass (default 256)")
    batching.add_argument("--max-wait-ms", type=_non_negative_float, default=2.0, metavar="MS",
                          help="how long a request waits for others to share its forward pass (default 2)")
    batching.add_argument("--max-queued-requests", type=_positive_int, default=256, metavar="N",
                          help="requests waiting or running at once; more get 503 with Retry-After (default 256)")
    parser.add_argument("--max-request-bytes", type=_positive_int, default=16 * 1024 * 1024, metavar="N",
                        help="larger request bodies get 413 (default 16 MiB)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up forward pass (numba compilation) before listening")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default info)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGINT/SIGTERM (in-flight requests are finished first).

    -> 2 (refusing to start) for a precision that is not a tier, 1 when the model cannot be loaded."""
    from ..precision import requested

    try:
        precision = requested(args.precision)  # canonical ("BF16" -> "bf16"); $BGESMALL_PRECISION if not given
    except ValueError as exc:
        print(f"bgesmall serve: {exc}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"bgesmall serve: {INSTALL_HINT}", file=sys.stderr)
        return 1
    import bgesmall

    from .app import create_app

    try:
        with warnings.catch_warnings(record=True) as said:  # bf16 on a CPU without AVX512_BF16: said in one line
            model = bgesmall.load(args.model, precision=precision)
    except (FileNotFoundError, ValueError) as exc:  # ModelLoadError is a ValueError
        print(f"bgesmall serve: {exc}", file=sys.stderr)
        return 1
    for w in said:
        print(f"bgesmall serve: {str(w.message).removeprefix('bgesmall: ')}", file=sys.stderr)
    if not args.no_warmup:
        print(f"bgesmall serve: warming up {model.path} ...", file=sys.stderr, flush=True)
        model.embed(["warm up the kernels", "and a second, slightly longer sentence to warm up"])
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(model, model_name=args.model_name, api_key=api_key, batching=not args.no_batching,
                     max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                     max_wait_ms=args.max_wait_ms, max_queued_requests=args.max_queued_requests,
                     max_request_bytes=args.max_request_bytes)
    print(f"bgesmall serve: '{args.model_name}' ({model.dim} dims, {model.precision}) on "
          f"http://{args.host}:{args.port}/v1 "
          f"(batching {'off' if args.no_batching else 'on'}, API key {'required' if api_key else 'not required'})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
