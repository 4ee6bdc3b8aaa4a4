"""Run the whole benchmark: models, in-process ceiling, every server under ghz, the report.

    .venv/bin/python -m benchmarks.run                 # the full run, about 7 minutes
    .venv/bin/python -m benchmarks.run --smoke         # seconds: checks the harness works
    .venv/bin/python -m benchmarks.run --server ferry --server naive --server null \\
        --server 'ferry-w2={python} -m ferry.server.cli serve {repo} --grpc-port {port} \\
                  --metrics-port -1 --workers 2'

Writes results.json, results.md, throughput.png and p99.png into --out
(benchmarks/results/ by default; benchmarks/.work/smoke/ for --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import ceiling
from .load import LoadSpec, Measurement, find_ghz, ghz_version, run_ghz, write_request
from .make_models import MODELS, OVERHEAD_BOUND, BenchModel, write_repository
from .perf_analyzer_load import find_perf_analyzer, run_perf_analyzer
from .previous_build import previous_build
from .report import write_report
from .servers import BASELINES, RunningServer, ServerVariant
from .stream import StreamMeasurement, run_stream, write_stream_data

HERE = Path(__file__).resolve().parent
DEFAULT_CONCURRENCY = (1, 8, 32, 64, 128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Ferry against its baselines under ghz; see benchmarks/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, not minutes: narrow models, one concurrency, a few requests per point",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the report goes")
    parser.add_argument("--work", type=Path, default=HERE / ".work", help="models, logs, raw ghz")
    parser.add_argument(
        "--server",
        action="append",
        default=None,
        metavar="NAME[=COMMAND]",
        help="a server under test (repeatable; default: ferry, naive, null). COMMAND may "
        "use {python}, {repo} and {port}",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(DEFAULT_CONCURRENCY),
        help="batch-1 sweep",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured load per server and model"
    )
    parser.add_argument("--multi-row", type=int, default=8, help="rows per multi-row request")
    parser.add_argument(
        "--multi-row-concurrency", type=int, default=16, help="concurrency of the multi-row run"
    )
    parser.add_argument(
        "--stream-messages",
        type=int,
        default=100,
        help="requests per ModelStreamInfer stream in the streaming run (0: no streaming run)",
    )
    parser.add_argument(
        "--stream-concurrency", type=int, default=64, help="concurrent streams in that run"
    )
    parser.add_argument("--connections", type=int, default=4, help="ghz connections, at most")
    parser.add_argument(
        "--null-all-models",
        action="store_true",
        help="measure the null server on every model (its answer does not depend on the model, "
        "so by default only on the overhead-bound one)",
    )
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--ghz", default=None, help="path of the ghz binary")
    parser.add_argument(
        "--ghz-cpus", type=int, default=None, help="cores ghz may use (default: all of them)"
    )
    parser.add_argument(
        "--perf-analyzer-concurrency",
        type=int,
        nargs="*",
        default=[1, 64],
        help="batch-1 points also measured with Triton's perf_analyzer",
    )
    parser.add_argument(
        "--perf-analyzer-window", type=float, default=4.0, help="seconds per perf_analyzer window"
    )
    parser.add_argument(
        "--no-perf-analyzer", action="store_true", help="ghz only, even when perf_analyzer is here"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        choices=[m.name for m in MODELS],
        help="measure only these models (repeatable; default: all)",
    )
    parser.add_argument(
        "--before",
        metavar="COMMIT",
        default=None,
        help="also measure Ferry as of this commit, as the server ferry-before (every point "
        "of ferry is compared with it)",
    )
    parser.add_argument(
        "--update-readme", action="store_true", help="copy the report into benchmarks/README.md"
    )
    return parser


def machine_info(ghz: Path) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"Python": platform.python_version()}
    for package in ("onnxruntime", "grpcio", "protobuf", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["ghz"] = ghz_version(ghz)
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=HERE
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git.stdout.strip() or "unknown",
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_before": _loadavg(),
    }


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def plan(
    args: argparse.Namespace, variants: list[ServerVariant], models: tuple[BenchModel, ...]
) -> list[tuple[ServerVariant, BenchModel, LoadSpec]]:
    """Every point to measure, in the order they run (one server process at a time)."""
    points = []
    for variant in variants:
        for model in models:
            if (
                variant.is_null
                and not args.null_all_models
                and model.name != (OVERHEAD_BOUND.name)
            ):
                continue
            for concurrency in args.concurrency:
                points.append((variant, model, _spec(args, concurrency, 1)))
            if args.multi_row > 1 and not variant.is_null:
                points.append(
                    (variant, model, _spec(args, args.multi_row_concurrency, args.multi_row))
                )
    return points


def _spec(args: argparse.Namespace, concurrency: int, rows: int) -> LoadSpec:
    if args.smoke:
        # A fixed, small request count: the smoke run checks the harness, not the speed.
        return LoadSpec(
            concurrency,
            rows,
            duration_s=None,
            total=max(20, 2 * concurrency),
            connections=args.connections,
            ghz_cpus=args.ghz_cpus,
        )
    return LoadSpec(
        concurrency,
        rows,
        duration_s=args.duration,
        connections=args.connections,
        ghz_cpus=args.ghz_cpus,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.concurrency = [8]
        args.multi_row_concurrency = 4
        args.stream_concurrency = 4
        args.stream_messages = min(args.stream_messages, 5)
        args.perf_analyzer_concurrency = list(args.concurrency)
        args.ceiling_seconds = 0.05
    out: Path = args.out or (args.work / "smoke" if args.smoke else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    work: Path = args.work
    variants = [ServerVariant.parse(spec) for spec in args.server or ["ferry", "naive", "null"]]
    if args.before:
        variants.insert(1, previous_build(args.before, work))
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("two servers have the same name")
    ghz = find_ghz(args.ghz)
    perf_analyzer = None if args.no_perf_analyzer else find_perf_analyzer()

    chosen = tuple(m for m in MODELS if args.model is None or m.name in args.model)
    models = tuple(m.scaled(16) for m in chosen) if args.smoke else chosen
    repo = write_repository(work / ("models-smoke" if args.smoke else "models"), models)
    points = plan(args, variants, models)
    warmups = len({(v.name, m.name) for v, m, _ in points})
    if not args.smoke:
        estimate = (
            len(points) * (args.duration + 0.5)
            + warmups * args.warmup
            + len(models) * len(ceiling.BATCH_SIZES) * args.ceiling_seconds
            + len(variants) * 5
        )
        print(f"{len(points)} points, about {estimate / 60:.1f} minutes", flush=True)

    meta = machine_info(ghz)
    meta["command"] = shlex.join(
        [
            Path(sys.executable).name,
            "-m",
            "benchmarks.run",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    meta["smoke"] = args.smoke
    meta["load"] = (
        f"{max(20, 2 * args.concurrency[0])} requests per point"
        if args.smoke
        else f"{args.duration:g} s per point after {args.warmup:g} s of warm-up"
    ) + f", at most {args.connections} connections"
    meta["servers"] = {v.name: v.command for v in variants}

    print("in-process ceiling (rows/s):", flush=True)
    ceilings: dict[str, dict[str, float]] = {}
    for model in models:
        rates = ceiling.measure(
            repo / model.name / "1" / "model.onnx", seconds=args.ceiling_seconds
        )
        ceilings[model.name] = {str(batch): rate for batch, rate in rates.items()}
        print(
            f"  {model.name}: " + ", ".join(f"batch {b} {r:,.0f}" for b, r in rates.items()),
            flush=True,
        )

    measurements: list[Measurement] = []
    streams: list[StreamMeasurement] = []
    for variant in variants:
        mine = [(m, s) for v, m, s in points if v is variant]
        if not mine:
            continue
        needed = list(dict.fromkeys(m.name for m, _ in mine))
        log_path = work / "logs" / f"{variant.name}.log"
        print(f"{variant.name}: {variant.command}", flush=True)
        with RunningServer(variant, repo, needed, log_path) as server:
            warmed: set[str] = set()
            for model, spec in mine:
                request = write_request(
                    work / "requests" / f"{model.name}_{spec.rows}.bin",
                    model.name,
                    model.features,
                    spec.rows,
                )
                if model.name not in warmed:
                    warm = LoadSpec(
                        8,
                        1,
                        duration_s=None if args.smoke else args.warmup,
                        total=20 if args.smoke else None,
                        connections=args.connections,
                        ghz_cpus=args.ghz_cpus,
                    )
                    run_ghz(ghz, server.target, request, warm, model.name, variant.name)
                    warmed.add(model.name)
                raw = (
                    work
                    / "raw"
                    / f"{variant.name}_{model.name}_c{spec.concurrency}_r{spec.rows}.json"
                )
                cpu_before = server.cpu_seconds()
                result = run_ghz(ghz, server.target, request, spec, model.name, variant.name, raw)
                cpu_s = server.cpu_seconds() - cpu_before
                server.check_alive()
                if result.ok:
                    result = dataclasses.replace(
                        result, server_cpu_us_per_request=cpu_s * 1e6 / result.ok
                    )
                measurements.append(result)
                errors = f", errors {result.errors}" if result.errors else ""
                print(
                    f"  {model.name} c={spec.concurrency:<3} rows={spec.rows}: "
                    f"{result.req_per_s:9,.0f} req/s  p50 {result.p50_ms:7.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms  "
                    f"cpu {result.server_cpu_us_per_request:6.0f} us/req{errors}",
                    flush=True,
                )
                if (
                    perf_analyzer is not None
                    and spec.rows == 1
                    and spec.concurrency in args.perf_analyzer_concurrency
                ):
                    pa = run_perf_analyzer(
                        perf_analyzer, server.target, spec, model.name, variant.name,
                        window_s=0.5 if args.smoke else args.perf_analyzer_window,
                    )
                    server.check_alive()
                    measurements.append(pa)
                    print(
                        f"  {model.name} c={spec.concurrency:<3} perf_analyzer: "
                        f"{pa.req_per_s:9,.0f} req/s  p50 {pa.p50_ms:7.2f} ms  "
                        f"p99 {pa.p99_ms:7.2f} ms",
                        flush=True,
                    )
            if args.stream_messages and variant.name not in BASELINES:
                for model in dict.fromkeys(m for m, _ in mine):
                    data = write_stream_data(
                        work / "requests" / f"{model.name}_stream.json", model.name, model.features
                    )
                    streamed = run_stream(
                        ghz, server.target, data, model.name, variant.name,
                        streams=args.stream_concurrency, messages=args.stream_messages,
                        duration_s=None if args.smoke else args.duration,
                        total=args.stream_concurrency if args.smoke else None,
                        connections=args.connections,
                    )
                    server.check_alive()
                    streams.append(streamed)
                    print(
                        f"  {model.name} ModelStreamInfer {args.stream_concurrency} streams x "
                        f"{args.stream_messages}: {streamed.messages_per_s:9,.0f} req/s",
                        flush=True,
                    )

    meta["loadavg_after"] = _loadavg()
    results = {
        "meta": meta,
        "models": {
            m.name: {"role": m.role, "features": m.features, "hidden": list(m.hidden)}
            for m in models
        },
        "ceiling": ceilings,
        "measurements": [m.to_json() for m in measurements],
        "streams": [s.to_json() for s in streams],
    }
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results, indent=1))
    readme = HERE / "README.md" if args.update_readme else None
    md_path = write_report(results_path, readme)
    print(md_path.read_text())
    print(f"wrote {md_path}, {out / 'throughput.png'}, {out / 'p99.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
