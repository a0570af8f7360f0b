"""`corral serve`: an OpenAI-compatible HTTP API for a model.

    corral serve                                   # the default model on 127.0.0.1:8000
    corral serve --adapter saves/quickstart        # a tuned adapter with its base and template
    corral serve --backend llamacpp --model model.gguf --port 8080 --api-key secret
    corral serve --kb notes                        # chat answers from a knowledge base

Then point any OpenAI client at http://127.0.0.1:8000/v1. The key may also come from
`CORRAL_API_KEY`. SIGTERM or Ctrl-C stops accepting requests, lets running ones finish for a
few seconds, cancels the rest and exits 0.

Every option, the address included, is checked before the model loads: the port is bound
first, so a port in use is a one-line error in a second, not after a minute of loading.
Under load, `--max-queue` caps the requests in flight (more get 429 with Retry-After) and
`--request-timeout` ends a request that takes longer (504, or an error event mid-stream).
With `--kb NAME` a chat completion answers its last user message as `corral kb ask` does, and
the response carries the passages used in an extra `sources` field (streaming: on the chunk
that ends each choice); see `corral.serve.knowledge`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket

from corral.config.cli_args import add_config_args, config_from_args
from corral.kb.command import ANSWER as KB_FLAGS
from corral.kb.command import add_answer_arguments

# flag -> config key; help comes from the config field so it is written once.
FLAGS = {
    "--model": "model_name_or_path",
    "--adapter": "adapter_name_or_path",
    "--template": "template",
    "--system": "default_system",
}
GRACE_SECONDS = 5
LOOPBACK = ("localhost", "ip6-localhost")


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
    parser.add_argument(
        "--max-queue",
        type=int,
        default=128,
        help="Most requests waiting or generating (each of n choices counts); more get 429 "
        "with Retry-After (default 128).",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="Seconds one request may wait and generate before it is ended with a 504, or an "
        "error event when streaming (default 600).",
    )
    add_answer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the backend and serve until SIGTERM/Ctrl-C."""
    from corral.utils.deps import require
    from corral.utils.log import get_logger

    _check_numbers(args)
    keys = [*FLAGS.values(), *KB_FLAGS.values()]
    config = config_from_args(args, {key: getattr(args, key) for key in keys})
    require("fastapi")
    uvicorn = require("uvicorn")
    from corral.infer.preflight import check_inputs
    from corral.serve.app import create_app
    from corral.serve.backends import load_backend
    from corral.utils.log import quiet_libraries

    quiet_libraries()
    for note in config.notes:
        get_logger().warning(note)
    api_key = args.api_key or os.environ.get("CORRAL_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        get_logger().warning(
            f"--host {args.host} without an API key: anyone who can reach this machine can use "
            "the model; set --api-key or CORRAL_API_KEY"
        )
    kb = _open_kb(args.kb, config.kb) if args.kb else None  # before the slow model load
    if args.backend == "hf":  # llamacpp and vllm check their own model argument
        check_inputs(config.model)
    listener = _bind(args.host, args.port)  # before the slow load: a busy port fails now
    backend = load_backend(args.backend, config.model, args.max_concurrency)
    if args.max_model_len:
        backend.context_len = min(backend.context_len or args.max_model_len, args.max_model_len)
    name = args.served_model_name or _model_name(config.model)
    app = create_app(
        backend,
        served_model_name=name,
        api_key=api_key,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        kb=kb,
    )
    get_logger().info(f"serving '{name}' ({args.backend}) on http://{args.host}:{args.port}/v1")
    # uvicorn shuts down gracefully on SIGTERM, then re-sends it to the previous handler; this
    # one makes that a normal exit (status 0) rather than death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    )
    server.run(sockets=[listener])
    return 0


def _open_kb(name: str, settings):
    from corral.serve.knowledge import ServedKb

    return ServedKb(name, settings)


def _check_numbers(args: argparse.Namespace) -> None:
    """The server's own numeric options, each named as typed, before anything is imported."""
    from corral.utils.errors import ConfigError

    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535; got {args.port}")
    for flag, value in (
        ("--max-concurrency", args.max_concurrency),
        ("--max-queue", args.max_queue),
        ("--max-model-len", args.max_model_len),
    ):
        if value is not None and value < 1:
            problems.append(f"{flag} must be at least 1; got {value}")
    if not 0 < args.request_timeout < float("inf"):  # also refuses nan
        problems.append(
            f"--request-timeout must be a positive number of seconds; got {args.request_timeout}"
        )
    if problems:
        raise ConfigError(problems)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds it, or a CorralError saying why not."""
    from corral.utils.errors import CorralError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except (OSError, OverflowError, UnicodeError) as exc:
        listener.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CorralError(f"cannot listen on --host {host} --port {port}: {why}") from exc
    return listener


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK


def _model_name(model_config) -> str:
    """The adapter's folder name when serving an adapter, else the model's name."""
    from pathlib import Path

    adapters = model_config.adapter_name_or_path or []
    chosen = adapters[-1] if adapters else model_config.model_name_or_path
    return Path(str(chosen).rstrip("/")).name or str(chosen)
