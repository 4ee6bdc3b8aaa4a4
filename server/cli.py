"""`ferry serve`: the command line, logging set-up and signal handling."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__, logs, security
from .app import FerryServer, ServerOptions
from .workers import supervise

log = logging.getLogger("ferry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Ferry: a dynamic-batching inference server for ONNX models that speaks "
        "the KServe v2 / Open Inference Protocol over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model repository or a single .onnx file",
        description="Serve every model of a Triton-style model repository "
        "(<repository>/<model>/<version>/model.onnx, optional <model>/config.pbtxt), or a "
        "single model.onnx as version 1 of a model named after the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "model_path",
        metavar="REPOSITORY|MODEL.onnx",
        type=Path,
        help="a model repository folder, or one .onnx file to serve as version 1 of the "
        "model named after the file",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    serve.add_argument(
        "--grpc-port", type=int, default=8001, help="gRPC port (0 picks a free port)"
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="HTTP port of the Prometheus /metrics endpoint (-1 turns it off)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long accepted requests may take to finish before "
        "they are answered UNAVAILABLE",
    )
    serve.add_argument(
        "--max-message-size",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="largest gRPC message received or sent",
    )
    serve.add_argument(
        "--poll-repository",
        type=float,
        default=None,
        metavar="SECONDS",
        help="check the repository this often and load new, reload changed and unload "
        "removed models (default: read it once at start)",
    )
    serve.add_argument(
        "--session-threads",
        type=int,
        default=0,
        metavar="N",
        help="onnxruntime intra-op threads per model instance; 0 divides the cores among "
        "the server processes and their instances",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing the gRPC port (SO_REUSEPORT); each has its own "
        "batcher and statistics, and serves metrics on --metrics-port + its index",
    )
    serve.add_argument(
        "--gpu-fallback",
        default="cpu",
        choices=["cpu", "fail"],
        help="a model whose config asks for a GPU (instance_group KIND_GPU) where CUDA "
        "cannot be used: load it on the CPU with a warning, or fail its load",
    )
    security.add_arguments(serve)
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log messages written to stderr",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=list(logs.LOG_FORMATS),
        help="log lines as plain text, or as one JSON object per line for log shippers",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per inference request (model, status code, duration)",
    )
    return parser


async def serve(options: ServerOptions) -> int:
    server = FerryServer(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: draining (send it again to stop at once)",
                     signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("second signal: answering queued requests UNAVAILABLE and stopping")
            server.abort("server is stopping")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    await stop.wait()
    await server.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        options = ServerOptions(
            model_path=args.model_path,
            host=args.host,
            grpc_port=args.grpc_port,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            shutdown_grace_s=args.shutdown_grace,
            max_message_bytes=args.max_message_size,
            poll_repository_s=args.poll_repository,
            session_threads=args.session_threads,
            access_log=args.access_log,
            gpu_fallback=args.gpu_fallback,
            security=security.options_from(args),
        )
        if not args.model_path.exists():
            raise ValueError(f"{args.model_path} does not exist")
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.workers < 1:
        log.error("--workers must be at least 1, got %d", args.workers)
        return 2
    if args.workers > 1:
        argv = sys.argv[1:] if argv is None else argv
        return supervise(argv, args.workers, args.host, args.grpc_port, options.metrics_port)
    code = asyncio.run(serve(options))
    _exit_now_if_a_batch_still_runs(code)
    return code


def _exit_now_if_a_batch_still_runs(code: int) -> None:
    """A batch still running when the grace ended (or a second signal came) is inside
    onnxruntime on a daemon worker thread; the interpreter's teardown would destroy its
    session under it and the process would die of SIGABRT instead of exiting `code`.
    Its callers are already answered, so leave without the teardown."""
    workers = [t for t in threading.enumerate() if t.daemon and t.name.startswith("ferry-")]
    for worker in workers:
        worker.join(0.2)  # an idle worker is just taking its stop sentinel
    if any(worker.is_alive() for worker in workers):
        log.warning("a batch is still running: exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
