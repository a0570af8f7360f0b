"""`corral serve`: an OpenAI-compatible HTTP API for a model.

    corral serve                                   # the default model on 127.0.0.1:8000
    corral serve --adapter saves/quickstart        # a tuned adapter with its base and template
    corral serve --backend llamacpp --model model.gguf --port 8080 --api-key secret

Then point any OpenAI client at http://127.0.0.1:8000/v1. The key may also come from
`CORRAL_API_KEY`. SIGTERM or Ctrl-C stops accepting requests, lets running ones finish for a
few seconds, cancels the rest and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal

from corral.config.cli_args import add_config_args, config_from_args

# flag -> config key; help comes from the config field so it is written once.
FLAGS = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--system": "default_system",
}
GRACE_SECONDS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Serve flags: the model (config keys) and the server's own options."""
    from corral.config.fields import all_fields

    table = all_fields()
    add_config_args(parser)
    for flag, key in FLAGS.items():
        kwargs = {"nargs": "+"} if key == "adapter_name_or_path" else {}
        parser.add_argument(
            flag, dest=key, default=None, help=table[key][1].metadata["help"], **kwargs
        )
    parser.add_argument(
        "--backend",
        choices=("hf", "llamacpp", "vllm"),
        default="hf",
        help="hf: transformers, batched (default); llamacpp: a .gguf file on CPU via "
        "llama-cpp-python; vllm: GPU only.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    parser.add_argument(
        "--api-key",
        default=None,
        help="Require 'Authorization: Bearer KEY' on /v1 routes (default: $CORRAL_API_KEY).",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="Model id clients use (default: the model)."
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="Cap the context (prompt + reply tokens) below the model's own (default: the model's).",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=8,
        help="Most requests generated together in one batch (default 8).",
    )


def run(args: argparse.Namespace) -> int:
    """Load the backend and serve until SIGTERM/Ctrl-C."""
    from corral.utils.deps import require

    require("fastapi")
    uvicorn = require("uvicorn")
    from corral.serve.app import create_app
    from corral.serve.backends import load_backend
    from corral.utils.errors import CorralError
    from corral.utils.log import get_logger, quiet_libraries

    if args.max_concurrency < 1:
        raise CorralError(f"--max-concurrency must be at least 1; got {args.max_concurrency}")
    quiet_libraries()
    config = config_from_args(args, {key: getattr(args, key) for key in FLAGS.values()})
    for note in config.notes:
        get_logger().warning(note)
    backend = load_backend(args.backend, config.model, args.max_concurrency)
    if args.max_model_len:
        backend.context_len = min(backend.context_len or args.max_model_len, args.max_model_len)
    name = args.served_model_name or _model_name(config.model)
    api_key = args.api_key or os.environ.get("CORRAL_API_KEY") or None
    app = create_app(backend, served_model_name=name, api_key=api_key)
    get_logger().info(f"serving '{name}' ({args.backend}) on http://{args.host}:{args.port}/v1")
    # uvicorn shuts down gracefully on SIGTERM, then re-sends it to the previous handler; this
    # one makes that a normal exit (status 0) rather than death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    return 0


def _model_name(model_config) -> str:
    """The adapter's folder name when serving an adapter, else the model's name."""
    from pathlib import Path

    adapters = model_config.adapter_name_or_path or []
    chosen = adapters[-1] if adapters else model_config.model_name_or_path
    return Path(str(chosen).rstrip("/")).name or str(chosen)
