"""`hotexperts serve`: the OpenAI-compatible HTTP server (server/app.py) over one Engine, with uvicorn.

    hotexperts serve --model DIR|FILE.gguf|preset:NAME [model flags] [placement flags] [kernel flags]
        [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-queue N] [--request-timeout S]
        [--served-model-name NAME] [--allowed-origin ORIGIN ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from hotexperts.cli.flags import (
    add_kernel_arguments,
    add_model_arguments,
    add_placement_arguments,
    load_engine,
)
from hotexperts.errors import HotExpertsError

log = logging.getLogger("hotexperts.server")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait (32); more: 429")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds per request from arrival (default 600, 0 = none); then finish_reason length")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="CORS: let browser pages on ORIGIN call the API ('*' = any)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_placement_arguments(p)
    add_kernel_arguments(p)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:  # noqa: F821
    from hotexperts.server.app import ServerSettings  # the server stack (fastapi) only when serving

    if args.max_queue < 0:
        raise HotExpertsError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.request_timeout < 0:
        raise HotExpertsError(f"--request-timeout must be >= 0, got {args.request_timeout}")
    if not 0 <= args.port <= 65535:
        raise HotExpertsError(f"--port must be in [0, 65535], got {args.port}")
    return ServerSettings(model_name=args.served_model_name or args.model, api_key=args.api_key or None,
                          max_queue=args.max_queue, request_timeout=args.request_timeout or None,
                          allowed_origins=tuple(args.allowed_origin))


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server's own dependency, loaded only to serve

    from hotexperts.server.app import create_app

    settings = settings_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("binding %s without --api-key: anyone who can reach it can use the model", args.host)
    engine = load_engine(args)
    if args.compile:
        print("compiling the decode step (the first time: up to minutes; then cached on disk)",
              file=sys.stderr, flush=True)
        print(f"decode step compiled in {engine.warm_up():.1f}s", file=sys.stderr, flush=True)
    app = create_app(engine, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
