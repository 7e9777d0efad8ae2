"""`hotexperts serve`: the OpenAI-compatible HTTP server (server/app.py) over one Engine, with uvicorn.

    hotexperts serve --model DIR|FILE.gguf|preset:NAME [model flags] [placement flags] [kernel flags]
        [--host 127.0.0.1] [--port 8080] [--api-key-file FILE | $HOTEXPERTS_API_KEY | --api-key KEY]
        [--max-queue N] [--request-timeout S] [--served-model-name NAME [NAME ...]]
        [--cors-origin ORIGIN ...] [--allowed-hosts HOST,...] [--max-connections N] [--keep-alive-timeout S]
        [-np/--parallel N]

One start-up line on stderr names the model, device, placement and URL. `-np/--parallel N` (llama-server's
slots, 1..16): up to N requests decode together, one batched step for all (continuous batching,
engine/batch.py, server/batch_worker.py); each slot holds --max-context positions, so the KV cache is N
times one request's; more requests wait in the queue (FIFO). N = 1 (default): one request at a time through
the one-request decode path (its CUDA graph). Batched steps run eagerly.

The API key is read from --api-key-file, else $HOTEXPERTS_API_KEY, else --api-key (visible to every user
in the process list: a warning says so). Host names accepted: --allowed-hosts, else the loopback names and
the bound address (with the machine's host name for a wildcard bind).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from hotexperts.cli.flags import (
    add_kernel_arguments,
    add_model_arguments,
    add_placement_arguments,
    load_engine,
)
from hotexperts.engine.engine import check_parallel
from hotexperts.errors import HotExpertsError

log = logging.getLogger("hotexperts.server")
API_KEY_ENV = "HOTEXPERTS_API_KEY"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/"
                                          "completions, /v1/completions, /v1/models) and a chat page at /.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (visible in the process list: prefer "
                        "--api-key-file or $HOTEXPERTS_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOST[,HOST...]",
                   help="Host header names the server answers ('*' = any; default: loopback names and the "
                        "bound address)")
    p.add_argument("--max-connections", type=int, default=256, help="concurrent connections")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait; more get 429")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds per request from arrival (default 600, 0 = none); then finish_reason length")
    p.add_argument("--served-model-name", "--alias", "-a", dest="served_model_name", nargs="+", default=None,
                   metavar="NAME", help="the model id(s) /v1/models lists (default: --model); a request may "
                                        "name any model: it is answered by this one")
    p.add_argument("-np", "--parallel", type=int, default=1, metavar="N",
                   help="requests decoded together in one batched step (1..16; each slot holds "
                        "--max-context positions); more wait in arrival order (--max-queue)")
    p.add_argument("--cors-origin", "--allowed-origin", dest="allowed_origin", action="append", default=[],
                   metavar="ORIGIN", help="CORS: let browser pages on ORIGIN call the API ('*' = any); "
                                          "other cross-origin requests are refused (403)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log detail")
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
    if args.max_connections < 1 or args.keep_alive_timeout <= 0:
        raise HotExpertsError("--max-connections must be >= 1 and --keep-alive-timeout > 0")
    check_parallel(args.parallel)
    names = args.served_model_name or [args.model]
    return ServerSettings(model_name=names[0], aliases=tuple(names[1:]), api_key=api_key(args),
                          max_queue=args.max_queue, request_timeout=args.request_timeout or None,
                          allowed_origins=tuple(args.allowed_origin), allowed_hosts=allowed_hosts(args),
                          max_connections=args.max_connections, keep_alive_s=args.keep_alive_timeout)




def startup_line(settings, engine, host: str, port: int) -> str:
    """'serving MODEL on DEVICE, placement ..., at http://HOST:PORT/v1 (chat page http://HOST:PORT/)'."""
    plan = engine.executor.plan
    where = plan.describe() if plan is not None else "placement: every expert with the dense weights"
    if getattr(engine.device, "type", str(engine.device)) == "cpu":
        where += " (no GPU: 'gpu' places mean this CPU)"
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    return (f"hotexperts serve: model {settings.model_name!r} ({engine.config.num_layers} layers, "
            f"context {engine.max_context}) on {engine.device}; {where}; OpenAI API at {url}/v1, "
            f"chat page at {url}/")


def api_key(args: argparse.Namespace, env=os.environ) -> str | None:
    """--api-key-file, else $HOTEXPERTS_API_KEY, else --api-key (with a warning: argv is public)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise HotExpertsError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise HotExpertsError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if env.get(API_KEY_ENV):
        return env[API_KEY_ENV].strip()
    if args.api_key:
        log.warning("--api-key is visible to every user in the process list; use --api-key-file or $%s",
                    API_KEY_ENV)
    return args.api_key or None


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    from hotexperts.server.guard import LOOPBACK_HOSTS  # fastapi: only when serving

    named = tuple(h.strip() for a in args.allowed_hosts for h in a.split(",") if h.strip())
    if named:
        return named
    bound = args.host.strip("[]").lower()
    if bound in ("0.0.0.0", "::", ""):
        log.warning("binding %s: answering only Host names %s and this machine's name; pass "
                    "--allowed-hosts for the names clients use", args.host, ", ".join(LOOPBACK_HOSTS))
        return (*LOOPBACK_HOSTS, socket.gethostname().lower(), socket.getfqdn().lower())
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, bound)))


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server's own dependency, loaded only to serve

    from hotexperts.server.app import create_app, uvicorn_limits

    settings = settings_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("binding %s without --api-key: anyone who can reach it can use the model", args.host)
    engine = load_engine(args, parallel=args.parallel)
    if args.compile:
        print("compiling the decode step (the first time: up to minutes; then cached on disk)",
              file=sys.stderr, flush=True)
        print(f"decode step compiled in {engine.warm_up():.1f}s", file=sys.stderr, flush=True)
    app = create_app(engine, settings)
    print(startup_line(settings, engine, args.host, args.port), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10,
                **uvicorn_limits(settings))
    return 0
