"""Serving a daemon's Prometheus metrics on a loopback HTTP port, from one or many processes.

One process serves its own registry from a thread (`serve_in_thread`). A daemon with several
processes (policyd's workers, milterd's listeners) uses prometheus_client's multiprocess
mode: its supervisor chooses the directory (`multiprocess_directory`) before any process
imports prometheus_client (the library picks its value store at import time), every child
writes its samples there, and one server (`multiprocess_server`) answers with their sum.
A reaped child is `mark_process_dead`.

prometheus_client is imported inside functions on purpose: importing it before the
multiprocess directory is chosen would silently give per-process numbers.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from postwarden.syntax.endpoints import parse_ip_port

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def parse_metrics_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9641` or `[::1]:9641` as (host, port); the config validator checks loopback.

    The same parser `*.metrics_listen` is validated with, so a checked value binds.
    """
    return parse_ip_port(value)


@contextmanager
def multiprocess_directory() -> Iterator[str]:
    """A fresh multiprocess directory in the environment (children inherit it); removed after."""
    with tempfile.TemporaryDirectory(prefix="postwarden-metrics-") as directory:
        os.environ[MULTIPROC_ENV] = directory
        try:
            yield directory
        finally:
            os.environ.pop(MULTIPROC_ENV, None)


def serve_in_thread(listen: str) -> None:
    """Serve this process's registry on `listen` from a daemon thread (one-process mode)."""
    from prometheus_client import start_http_server

    host, port = parse_metrics_listen(listen)
    start_http_server(port, addr=host)


def multiprocess_server(listen: str) -> WSGIServer:
    """An HTTP server bound to `listen` answering with the sum over every process's files.

    Bound here (an address in use raises OSError at once), serving once `serve_forever` runs.
    """
    from wsgiref.simple_server import make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.exposition import (
        ThreadingWSGIServer,
        _SilentHandler,
    )
    from prometheus_client.multiprocess import MultiProcessCollector

    class V6Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    host, port = parse_metrics_listen(listen)
    server_class = V6Server if ":" in host else ThreadingWSGIServer
    return make_server(host, port, make_wsgi_app(registry), server_class, _SilentHandler)


def serve_multiprocess_forever(listen: str) -> None:
    """Serve the multiprocess sum on `listen`; blocks (run in a process of its own)."""
    multiprocess_server(listen).serve_forever()


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live-only files (in multiprocess mode; otherwise nothing)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream
