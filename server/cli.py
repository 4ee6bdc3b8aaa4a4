"""`ferry serve`: the command line, logging set-up and signal handling."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from pathlib import Path

# gRPC's C core logs at INFO unless told otherwise, among it a line for every failed TLS
# handshake: a port scanner or a plain-text client would flood the log. It reads this
# when grpc is first imported (by the imports below); an operator's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import __version__, event_loop, logs
from .app import (
    BATCH_JOIN_TIMEOUT_S,
    DEFAULT_GRPC_LISTENERS,
    MAX_GRPC_LISTENERS,
    FerryServer,
    ServerOptions,
    leave_after_a_stop_during_start_up,
    leave_if_a_batch_still_runs,
    start_unless_stopped,
)
from .device_plan import executor_devices, model_devices
from .event_loop import EVENT_LOOPS, default_event_loop
from .metrics_merge import peer_metrics_address
from .providers import GpuFallback
from .remote import ExecutorLink, OutcomesToExecutor, RemoteModels
from .repository import ModelControl, ModelControlMode, ModelRepository
from .runtime import default_max_run_memory
from .security import (
    DEFAULT_CONNECTION_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PING_STRIKES,
    DEFAULT_MIN_PING_INTERVAL_S,
    ApiGroup,
    RestrictedApi,
    SecurityOptions,
    TlsFiles,
)
from .streams import DEFAULT_MAX_STREAM_PENDING, DEFAULT_MAX_STREAM_PENDING_BYTES, StreamLimits
from .tensors import DEFAULT_MAX_TENSOR_ELEMENTS
from .workers import ABORT_SIGNAL, EXECUTOR, FRONTEND, Supervisor, socket_address

log = logging.getLogger("ferry")

# gRPC takes its message, stream and ping settings as C ints: a larger value fails the
# start with a traceback from deep inside grpc.
MAX_GRPC_INT = 2**31 - 1
# Far above any useful count, far below one that brings the machine down: each worker is
# a process, each session thread a thread that onnxruntime starts at load.
MAX_WORKERS = 256
MAX_SESSION_THREADS = 1024
# Below this, no model's run could fit (onnxruntime's arena takes 1 MiB at a time).
MIN_RUN_MEMORY = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry",
        description="Ferry: a dynamic-batching inference server for ONNX models that speaks "
        "the KServe v2 / Open Inference Protocol over gRPC and REST (HTTP/JSON).",
    )
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model repository or a single .onnx file",
        description="Serve every model of a Triton-style model repository "
        "(<repository>/<model>/<version>/model.onnx, optional <model>/config.pbtxt), or a "
        "single model.onnx as version 1 of a model named after the file.",
    )
    serve.add_argument(
        "model_path",
        metavar="REPOSITORY|MODEL.onnx",
        type=Path,
        nargs="?",
        help="a model repository folder, or one .onnx file to serve as version 1 of the "
        "model named after the file",
    )
    serve.add_argument(
        "--model-repository", "--model-store",
        type=Path,
        action="append",
        metavar="REPOSITORY",
        help="Triton's flag for the REPOSITORY argument, taken in its place (one repository)",
    )
    serve.add_argument(
        "--host", default="0.0.0.0",
        help="address to listen on; 127.0.0.1 keeps Ferry to this machine "
        "(default: 0.0.0.0, every interface)",
    )
    serve.add_argument(
        "--grpc-port", type=int, default=8001,
        help="gRPC port; 0 picks a free port (default: 8001)"
    )
    serve.add_argument(
        "--http-port", type=int, default=8000,
        help="HTTP/REST port of the Open Inference Protocol (Triton's paths, for curl and "
        "tritonclient.http); 0 picks a free port, -1 turns it off (default: 8000)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="HTTP port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns "
        "it off (default: 8002)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long accepted requests may take to finish before "
        "they are answered UNAVAILABLE (default: 30)",
    )
    serve.add_argument(
        "--max-message-size",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="largest gRPC message, or REST body, received or sent (default: 67108864, "
        "64 MiB)",
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
        "the instances, and gives a model one thread where one runs it about as fast "
        "(measured at load) (default: 0)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="frontend processes sharing the gRPC port (SO_REUSEPORT); above 1, one more "
        "process per device of the models' instance_groups (an executor: cpu, gpuN) loads "
        "each model once and batches every frontend's requests together, and the first "
        "serves the one --metrics-port (default: 1: one process does everything)",
    )
    internal = serve.add_argument_group(
        "internal", "set by --workers on the processes it starts; not for direct use"
    )
    internal.add_argument("--process-role", choices=[EXECUTOR, FRONTEND], default=None,
                          help="run as the executor process or as one frontend process")
    internal.add_argument("--executor-socket", default=None, metavar="NAME[,NAME...]",
                          help="the executor's Unix socket (abstract namespace); a "
                          "frontend gets every executor's, in order")
    internal.add_argument("--executor-device", default=None, metavar="DEVICE",
                          help="the executor of one device (cpu, gpuN): only the "
                          "instances on it")
    internal.add_argument("--peer-executors", default="", metavar="NAME[,NAME...]",
                          help="the other executors, whose figures this executor's "
                          "/metrics merges in")
    internal.add_argument("--frontend-index", type=int, default=0, metavar="N",
                          help="which frontend this process is")
    internal.add_argument("--call-counts-fd", type=int, default=None, metavar="FD",
                          help="a frontend's view of the calls in flight in every "
                          "frontend (the supervisor's memfd), for --max-concurrent-rpcs")
    internal.add_argument("--connection-counts-fd", type=int, default=None, metavar="FD",
                          help="a frontend's view of every frontend's REST connections "
                          "(the supervisor's memfd), for --max-connections")
    internal.add_argument("--ready-fd", type=int, default=None, metavar="FD",
                          help="the executor writes 'ready' here once its models are loaded")
    serve.add_argument(
        "--gpu-fallback",
        default="cpu",
        choices=["cpu", "fail"],
        help="a model whose config asks for a GPU (instance_group KIND_GPU) where CUDA "
        "cannot be used: load it on the CPU with a warning, or fail its load (default: cpu)",
    )
    serve.add_argument(
        "--exit-on-error",
        choices=["true", "false"],
        default="true",
        help="exit non-zero when a model of the start-up set fails to load, or there is "
        "no model to serve; false serves what did load (default: true)",
    )
    serve.add_argument(
        "--grpc-listeners",
        type=int,
        default=0,
        metavar="N",
        help="grpc.aio servers sharing the gRPC port in this process; each accepts one "
        "call at a time, so more accept calls on several connections at once; 0 means "
        f"{DEFAULT_GRPC_LISTENERS}; at most {MAX_GRPC_LISTENERS} (default: 0, that is "
        f"{DEFAULT_GRPC_LISTENERS})",
    )
    serve.add_argument(
        "--event-loop",
        choices=list(EVENT_LOOPS),
        default=default_event_loop(),
        help="the asyncio event loop of every Ferry process: uvloop spends less CPU per "
        "request than the standard library's (benchmarks/README.md, 'Event loop') "
        "(default: uvloop where it is installed, else asyncio)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the gRPC port with other processes (SO_REUSEPORT), as the processes "
        "of --workers do; without it a port already in use fails the start",
    )
    _add_security_arguments(serve)
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log messages written to stderr (default: INFO)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=list(logs.LOG_FORMATS),
        help="log lines as plain text, or as one JSON object per line for log shippers "
        "(default: text)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per inference request (model, status code, duration)",
    )
    return parser


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS, model control, restricted APIs and limits."""
    group = parser.add_argument_group("security and limits")
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="server certificate chain; with --tls-key, gRPC uses TLS "
                       "and the REST port speaks HTTPS only (default: plain text)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    group.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                       help="CA that signs client certificates: turns on mutual TLS")
    group.add_argument(
        "--model-control-mode",
        choices=[m.value for m in ModelControlMode],
        default=ModelControlMode.NONE.value,
        help="none: load the repository at start and refuse load/unload RPCs; explicit: "
        "allow them and load only --load-model models at start; poll: as none, for the "
        "repository poller (default: none)",
    )
    group.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="explicit mode: a model to load at start ('*': all); repeatable")
    group.add_argument("--allow-load-overrides", action="store_true",
                       help="accept a 'config' override in RepositoryModelLoad")
    group.add_argument(
        "--restricted-api", action="append", default=[], metavar="GROUP[,GROUP]:HEADER=VALUE",
        help="require metadata HEADER=VALUE on calls of these API groups ("
        + ", ".join(g.value for g in ApiGroup)
        + "); VALUE '@FILE' reads the key from FILE; repeatable (default: every group open)",
    )
    group.add_argument("--max-concurrent-streams", type=int,
                       default=DEFAULT_MAX_CONCURRENT_STREAMS, metavar="N",
                       help="concurrent RPCs per client connection (default: %(default)s)")
    group.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                       metavar="N",
                       help="open connections per port (gRPC, and REST apart); more are "
                       "closed as they arrive (default: %(default)s)")
    group.add_argument("--connection-idle-timeout", type=float,
                       default=DEFAULT_CONNECTION_IDLE_TIMEOUT_S, metavar="SECONDS",
                       help="close a connection that carries no call for this long "
                       "(gRPC: GOAWAY, the client reconnects on its next call) "
                       "(default: %(default)s)")
    group.add_argument("--max-concurrent-rpcs", type=int, default=None, metavar="N",
                       help="concurrent RPCs in the whole server; more get RESOURCE_EXHAUSTED "
                       "(default: no limit)")
    group.add_argument("--min-ping-interval", type=float, default=DEFAULT_MIN_PING_INTERVAL_S,
                       metavar="SECONDS",
                       help="shortest interval between a client's keep-alive pings "
                       "(default: %(default)s)")
    group.add_argument("--max-ping-strikes", type=int, default=DEFAULT_MAX_PING_STRIKES,
                       metavar="N",
                       help="pings too many before the connection is closed; 0: no limit "
                       "(default: %(default)s)")
    group.add_argument("--keepalive-permit-without-calls", action="store_true",
                       help="let clients ping connections that have no call in flight")
    group.add_argument("--max-tensor-elements", type=int, default=DEFAULT_MAX_TENSOR_ELEMENTS,
                       metavar="N", help="most elements in one input tensor "
                       "(default: %(default)s)")
    group.add_argument("--max-tensor-bytes", type=int, default=None, metavar="BYTES",
                       help="most bytes in one input tensor, decoded; a BYTES element "
                       "counts 112 bytes besides its content (default: --max-message-size)")
    group.add_argument("--max-run-memory", type=int, default=None, metavar="BYTES",
                       help="working memory (intermediate and output tensors) the runs of "
                       "every CPU model may hold together; a run that needs more is "
                       "refused RESOURCE_EXHAUSTED; 0: no limit (default: three quarters "
                       "of the machine's memory, or of the cgroup's limit)")
    group.add_argument("--max-stream-pending", type=int, default=DEFAULT_MAX_STREAM_PENDING,
                       metavar="N",
                       help="a ModelStreamInfer stream stops reading requests while this "
                       "many are running or answered but unsent (default: %(default)s)")
    group.add_argument("--max-stream-pending-bytes", type=int,
                       default=DEFAULT_MAX_STREAM_PENDING_BYTES, metavar="BYTES",
                       help="... or while its unsent answers hold this many bytes "
                       "(default: %(default)s, 16 MiB)")


def check_values(args: argparse.Namespace) -> None:
    """What argparse's types let through and the server cannot use: NaN and infinite
    seconds, sizes past gRPC's C ints, counts that would start a process or a thread per
    unit. Raises ValueError naming the flag and what it takes."""

    def within(flag: str, value: int | None, low: int, high: int, unit: str = "") -> None:
        if value is not None and not low <= value <= high:
            raise ValueError(
                f"{flag} must be at least {low} and at most {high}{unit}, got {value}"
            )

    def seconds(flag: str, value: float | None, high: float | None = None) -> None:
        # Only what the server's own checks miss: NaN passes every comparison.
        if value is None or (math.isfinite(value) and (high is None or value <= high)):
            return
        bound = f" of at most {high:g}" if high is not None else ""
        raise ValueError(f"{flag} must be a finite number of seconds{bound}, got {value}")

    if args.process_role is not None and not args.executor_socket:
        raise ValueError(
            f"--process-role {args.process_role} needs --executor-socket (both are set by "
            "--workers for the processes it starts)"
        )
    for flag, port in (("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        if port != -1:
            within(flag, port, 0, 65535, " (or -1: off)")
    within("--grpc-port", args.grpc_port, 0, 65535)
    within("--max-message-size", args.max_message_size, 1024, MAX_GRPC_INT, " bytes")
    within("--session-threads", args.session_threads, 0, MAX_SESSION_THREADS)
    within("--workers", args.workers, 1, MAX_WORKERS)
    within("--max-concurrent-streams", args.max_concurrent_streams, 1, MAX_GRPC_INT)
    within("--max-connections", args.max_connections, 1, MAX_GRPC_INT)
    within("--max-ping-strikes", args.max_ping_strikes, 0, MAX_GRPC_INT)
    within("--max-tensor-elements", args.max_tensor_elements, 1, 2**63 - 1)
    within("--max-tensor-bytes", args.max_tensor_bytes, 1, 2**63 - 1, " bytes")
    if args.max_run_memory != 0:
        within("--max-run-memory", args.max_run_memory, MIN_RUN_MEMORY, 2**63 - 1,
               " bytes (or 0: no limit)")
    within("--max-stream-pending", args.max_stream_pending, 1, 2**63 - 1)
    within("--max-stream-pending-bytes", args.max_stream_pending_bytes, 1, 2**63 - 1, " bytes")
    # The server's own checks would refuse these too, but in its words ("grpc listeners
    # must be within 0..64"): the user typed a flag, so the message names it.
    within("--grpc-listeners", args.grpc_listeners, 0, MAX_GRPC_LISTENERS)
    within("--max-concurrent-rpcs", args.max_concurrent_rpcs, 1, 2**63 - 1)
    seconds("--shutdown-grace", args.shutdown_grace)
    seconds("--poll-repository", args.poll_repository)
    seconds("--min-ping-interval", args.min_ping_interval, high=MAX_GRPC_INT / 1000)
    seconds("--connection-idle-timeout", args.connection_idle_timeout, high=MAX_GRPC_INT / 1000)
    if args.shutdown_grace < 0:
        raise ValueError(
            f"--shutdown-grace must be 0 seconds or more, got {args.shutdown_grace:g}: the "
            "shutdown grace is how long a drain may take"
        )
    if args.poll_repository is not None and not args.poll_repository > 0:
        raise ValueError(
            f"--poll-repository must be more than 0 seconds, got {args.poll_repository:g}"
        )
    if args.min_ping_interval < 0:
        raise ValueError(
            f"--min-ping-interval must be 0 seconds or more, got {args.min_ping_interval:g}"
        )
    if not args.connection_idle_timeout > 0:
        raise ValueError(
            f"--connection-idle-timeout must be more than 0 seconds, got "
            f"{args.connection_idle_timeout}"
        )


def security_options(args: argparse.Namespace) -> SecurityOptions:
    """Validate the security flags; raises ValueError with a message for the user."""
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    mode = ModelControlMode(args.model_control_mode)
    polling = args.poll_repository is not None
    if mode is ModelControlMode.POLL and not polling:
        raise ValueError("--model-control-mode=poll needs --poll-repository SECONDS")
    if mode is ModelControlMode.EXPLICIT and polling:
        raise ValueError(
            "--poll-repository and --model-control-mode=explicit exclude each other: "
            "either the poller or load/unload calls decide what is loaded"
        )
    if polling:
        mode = ModelControlMode.POLL
    return SecurityOptions(
        tls=tls,
        model_control=ModelControl(
            mode,
            tuple(args.load_model),
            args.allow_load_overrides,
        ),
        restricted_apis=tuple(RestrictedApi.parse(text) for text in args.restricted_api),
        max_concurrent_streams=args.max_concurrent_streams,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_connections=args.max_connections,
        connection_idle_timeout_s=args.connection_idle_timeout,
        min_ping_interval_s=args.min_ping_interval,
        max_ping_strikes=args.max_ping_strikes,
        keepalive_permit_without_calls=args.keepalive_permit_without_calls,
        max_tensor_elements=args.max_tensor_elements,
        max_tensor_bytes=args.max_tensor_bytes,
        shared_call_counts=(
            (args.call_counts_fd, args.frontend_index)
            if args.call_counts_fd is not None and args.process_role == FRONTEND
            else None
        ),
        shared_connection_counts=(
            (args.connection_counts_fd, args.frontend_index)
            if args.connection_counts_fd is not None and args.process_role == FRONTEND
            else None
        ),
    )


async def serve(options: ServerOptions, frontend: tuple[str, int] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain. `frontend` (executor socket, index): a
    frontend of --workers N, whose models are served by the executor process."""
    if frontend is None:
        server = FerryServer(options)
    else:
        links = [
            ExecutorLink(socket_address(name), frontend[1]) for name in frontend[0].split(",")
        ]
        outcomes = OutcomesToExecutor(links)
        server = FerryServer(
            options,
            request_observers=(outcomes,),
            models=lambda observers, on_change: RemoteModels(
                links, observers, on_change, outcomes
            ),
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        if signals and frontend is not None:
            # A frontend may get one stop twice (from the supervisor, and from a service
            # manager that signals every process): the supervisor sends ABORT_SIGNAL to
            # stop at once.
            return
        signals += 1
        if signals == 1:
            log.info("%s received: draining (send it again to stop at once)",
                     signal.Signals(signum).name)
            stop.set()
        else:
            abort()

    def abort() -> None:
        nonlocal signals
        signals = 2
        log.warning("second signal: answering queued requests UNAVAILABLE and stopping")
        server.abort("server is stopping")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    if frontend is not None:
        loop.add_signal_handler(ABORT_SIGNAL, abort)
    # A signal during start-up (models loading, a frontend waiting for its executor) ends
    # it there: the start is cancelled and what did start is stopped.
    started = await start_unless_stopped(server.start(), stop)
    if started is None:
        await server.stop(0.0)
        log.info("stopped during start-up")
        leave_after_a_stop_during_start_up()
        return 0
    try:
        started.result()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    await stop.wait()
    await server.stop()
    # After a second signal, no waiting at all for a batch still running.
    leave_if_a_batch_still_runs(server.manager, BATCH_JOIN_TIMEOUT_S if signals < 2 else 0.0)
    log.info("stopped")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with Triton's --model-repository taken as the REPOSITORY."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [*([args.model_path] if args.model_path else []), *(args.model_repository or [])]
    if not given:
        parser.error("the following arguments are required: REPOSITORY|MODEL.onnx "
                     "(or Triton's --model-repository REPOSITORY)")
    if len(given) > 1:
        parser.error("Ferry serves one repository: give it once, as the argument or as "
                     f"--model-repository (got {', '.join(map(str, given))})")
    args.model_path = given[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        check_values(args)
        options = ServerOptions(
            model_path=args.model_path,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=None if args.http_port < 0 else args.http_port,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            shutdown_grace_s=args.shutdown_grace,
            max_message_bytes=args.max_message_size,
            poll_repository_s=args.poll_repository,
            session_threads=args.session_threads,
            max_run_memory=(
                default_max_run_memory() if args.max_run_memory is None else args.max_run_memory
            ),
            access_log=args.access_log,
            gpu_fallback=GpuFallback(args.gpu_fallback),
            security=security_options(args),
            reuse_port=args.reuse_port,
            grpc_listeners=args.grpc_listeners,
            exit_on_error=args.exit_on_error == "true",
            stream_limits=StreamLimits(args.max_stream_pending, args.max_stream_pending_bytes),
        )
        if not args.model_path.exists():
            raise ValueError(f"{args.model_path} does not exist")
        event_loop.loop_factory(args.event_loop)  # uvloop asked for but not installed
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.workers < 1:
        log.error("--workers must be at least 1, got %d", args.workers)
        return 2
    if args.workers > 1 or args.process_role is not None:
        mode = options.security.model_control.mode
        if mode is not ModelControlMode.NONE:
            log.error("--workers above 1 serves the repository as it is at start: "
                      "--model-control-mode %s and --poll-repository are not available "
                      "with it", mode.value)
            return 2
    if args.process_role == EXECUTOR:
        from .executor_process import run_executor

        peers = [
            peer_metrics_address(socket_address(name))
            for name in args.peer_executors.split(",") if name
        ]
        return event_loop.run(
            run_executor(
                options, socket_address(args.executor_socket), args.ready_fd,
                args.executor_device, peers,
            ),
            args.event_loop,
        )
    if args.process_role == FRONTEND:
        return event_loop.run(
            serve(options, (args.executor_socket, args.frontend_index)), args.event_loop
        )
    if args.workers > 1:
        argv = sys.argv[1:] if argv is None else argv
        try:
            repository = ModelRepository(options.model_path)
            devices = executor_devices(model_devices(repository, repository.model_names()))
        except OSError as exc:
            log.error("cannot read the model repository %s: %s", options.model_path, exc)
            return 2
        return Supervisor(
            argv, args.workers, args.host, args.grpc_port, options.metrics_port, devices,
            http_port=options.http_port,
        ).run()
    return event_loop.run(serve(options), args.event_loop)


if __name__ == "__main__":
    sys.exit(main())
