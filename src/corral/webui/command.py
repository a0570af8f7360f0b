"""`corral webui`: train, chat, evaluate and export from the browser.

    corral webui                              # http://127.0.0.1:7860, this machine only
    corral webui --port 8080 --runs-dir saves
    corral webui --host 0.0.0.0 --auth me:secret   # reachable from other machines

Runs started on the page are `corral train` subprocesses recorded in RUNS_DIR/.webui; they go
on when the browser (or the server) closes, and the page finds them again.
"""

from __future__ import annotations

import argparse
import os
import socket

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags."""
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    parser.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help="Ask for this user name and password (default: $CORRAL_WEBUI_AUTH, else none).",
    )
    parser.add_argument(
        "--runs-dir",
        default="saves",
        help="Folder whose .webui/ records the runs started on the page (default saves).",
    )
    parser.add_argument(
        "--lang", choices=("en", "zh"), default="en", help="The page's language (default en)."
    )


def run(args: argparse.Namespace) -> int:
    """Check the address, build the page and serve it until Ctrl-C."""
    from corral.utils.deps import require
    from corral.utils.log import get_logger

    auth = parse_auth(args.auth or os.environ.get("CORRAL_WEBUI_AUTH"))
    if args.host not in LOOPBACK and auth is None:
        get_logger().warning(
            f"the web UI on {args.host} is reachable from other machines without a password; "
            "anyone who can reach it can run commands on this machine. Use --auth USER:PASSWORD."
        )
    check_port_free(args.host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require("gradio")
    from corral.webui.app import build_app

    app = build_app(args.runs_dir, lang=args.lang)
    get_logger().info(f"corral webui on http://{args.host}:{args.port}")
    app.queue().launch(
        server_name=args.host, server_port=args.port, auth=auth, share=False, quiet=True
    )
    return 0


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password)."""
    from corral.utils.errors import CorralError

    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise CorralError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


def check_port_free(host: str, port: int) -> None:
    """Fail with one line, as the CLI does, when the address cannot be bound."""
    from corral.utils.errors import CorralError

    if not 0 <= port <= 65535:
        raise CorralError(f"--port {port}: give a port from 0 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CorralError(
                f"cannot listen on {host}:{port} ({exc.strerror}); is another server using "
                "it? Choose another with --port"
            ) from None
