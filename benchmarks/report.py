"""The report: markdown tables (throughput, latency, server CPU per request, perf_analyzer),
issue 12's targets as ratios, and two plots, all from one results.json. Regenerate them
from a saved run with

    python -m benchmarks.report benchmarks/results/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .servers import BASELINES, NAIVE, NULL, NULLS

# Issue 12's targets, each a ratio against a baseline in the same run.
TARGET_CONCURRENCY = 64
TARGET_COMPUTE_SPEEDUP = 6.0  # x naive
TARGET_OVERHEAD_SPEEDUP = 1.5  # x naive
TARGET_OVERHEAD_OF_NULL = 0.9  # x the null server's throughput
TARGET_CPU_OF_NULL = 1.2  # server CPU per request, x the null server's
TARGET_IDLE_P50_EXTRA_MS = 0.1
# A server named "<name>-before" is the same server built from the previous commit: every
# point of "<name>" is compared with it, and one more than this much slower is a miss.
BEFORE_SUFFIX = "-before"
BEFORE_TOLERANCE = 0.05

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"


@dataclass(frozen=True, slots=True)
class Point:
    model: str
    server: str
    concurrency: int
    rows: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    ok: int
    count: int
    errors: dict[str, int]
    tool: str = "ghz"
    cpu_us: float = float("nan")  # server CPU per answered request

    @property
    def rows_per_s(self) -> float:
        return self.req_per_s * self.rows

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        return cls(
            model=data["model"],
            server=data["server"],
            concurrency=int(data["concurrency"]),
            rows=int(data["rows"]),
            req_per_s=float(data["req_per_s"]),
            p50_ms=float(data["p50_ms"]),
            p99_ms=float(data["p99_ms"]),
            ok=int(data["ok"]),
            count=int(data["count"]),
            errors=dict(data.get("errors") or {}),
            tool=str(data.get("tool", "ghz")),
            cpu_us=float(data.get("server_cpu_us_per_request", float("nan"))),
        )


class Results:
    """A loaded results.json, with the look-ups the report needs."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.meta: dict[str, Any] = data["meta"]
        self.models: dict[str, dict[str, Any]] = data["models"]  # name -> {role, features}
        self.ceiling: dict[str, dict[str, float]] = data["ceiling"]  # model -> batch -> rows/s
        every = [Point.from_json(p) for p in data["measurements"]]
        self.points = [p for p in every if p.tool == "ghz"]
        self.pa_points = [p for p in every if p.tool == "perf_analyzer"]
        self.servers = list(dict.fromkeys(p.server for p in self.points))

    def point(
        self, model: str, server: str, concurrency: int, rows: int = 1, tool: str = "ghz"
    ) -> Point | None:
        for p in self.points if tool == "ghz" else self.pa_points:
            if (p.model, p.server, p.concurrency, p.rows) == (model, server, concurrency, rows):
                return p
        return None

    def ceiling_rows_per_s(self, model: str) -> float | None:
        by_batch = self.ceiling.get(model) or {}
        return max(by_batch.values()) if by_batch else None

    def model_with_role(self, role: str) -> str | None:
        for name, info in self.models.items():
            if info.get("role") == role:
                return name
        return None

    @property
    def candidates(self) -> list[str]:
        """The servers judged against the targets: everything but the baselines and the
        builds of the previous commit."""
        return [
            s for s in self.servers if s not in BASELINES and not s.endswith(BEFORE_SUFFIX)
        ]


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.2f}x"


def _percent(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{100 * value:.2g}%"


# ---------------------------------------------------------------- markdown


def header_lines(results: Results) -> list[str]:
    meta = results.meta
    versions = meta.get("versions", {})
    lines = [
        f"- Date: {meta.get('date', '?')}; git commit {meta.get('git', '?')}",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Machine: {meta.get('cpu_model', '?')}, {meta.get('cpus', '?')} CPUs "
        f"({meta.get('cpus_usable', '?')} usable), {meta.get('platform', '?')}",
        f"- Load average before / after: {meta.get('loadavg_before', '?')} / "
        f"{meta.get('loadavg_after', '?')} (a busy machine makes every number noisy)",
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- Load: ghz, {meta.get('load', '?')}; server and ghz share the same cores",
    ]
    if meta.get("smoke"):
        lines.insert(
            0,
            "- **Smoke run**: tiny models and request counts; no figure here means "
            "anything about speed.",
        )
    return lines


def ceiling_table(results: Results) -> list[str]:
    batches = sorted({int(b) for by_batch in results.ceiling.values() for b in by_batch})
    lines = [
        "| model | " + " | ".join(f"batch {b} rows/s" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for model, by_batch in results.ceiling.items():
        cells = [_num(by_batch.get(str(b))) for b in batches]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def measurement_table(results: Results) -> list[str]:
    lines = [
        "| model | server | concurrency | rows/request | req/s | rows/s | p50 ms | p99 ms "
        "| server CPU us/request | errors | x naive | % of ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: index for index, name in enumerate(results.servers)}
    points = sorted(
        results.points,
        key=lambda p: (list(results.models).index(p.model), p.rows, p.concurrency, order[p.server]),
    )
    for p in points:
        naive = results.point(p.model, NAIVE, p.concurrency, p.rows)
        vs_naive = (
            p.req_per_s / naive.req_per_s
            if naive and naive.req_per_s > 0 and p.server != NAIVE
            else None
        )
        ceiling = results.ceiling_rows_per_s(p.model)
        # The null server runs no model: a ratio to the model's ceiling would mean nothing.
        vs_ceiling = p.rows_per_s / ceiling if ceiling and p.server not in NULLS else None
        errors = sum(p.errors.values())
        lines.append(
            f"| {p.model} | {p.server} | {p.concurrency} | {p.rows} | {_num(p.req_per_s)} "
            f"| {_num(p.rows_per_s)} | {_num(p.p50_ms, 2)} | {_num(p.p99_ms, 2)} "
            f"| {_num(p.cpu_us)} | {errors} | {_ratio(vs_naive)} | {_percent(vs_ceiling)} |"
        )
    return lines


@dataclass(frozen=True, slots=True)
class TargetCheck:
    server: str
    target: str
    measured: str
    passed: bool | None  # None: a point the check needs was not measured


def check_targets(results: Results) -> list[TargetCheck]:
    checks: list[TargetCheck] = []
    for server in results.candidates:
        checks += _checks_for(results, server)
    return checks


def _checks_for(results: Results, server: str) -> list[TargetCheck]:
    compute = results.model_with_role("compute-bound")
    overhead = results.model_with_role("overhead-bound")
    c = TARGET_CONCURRENCY
    checks: list[TargetCheck] = []

    def ratio_check(
        target: str, model: str | None, baseline: str, goal: float, tool: str
    ) -> TargetCheck:
        ours = results.point(model, server, c, tool=tool) if model else None
        base = results.point(model, baseline, c, tool=tool) if model else None
        if ours is None or base is None or base.req_per_s <= 0:
            return TargetCheck(server, target, "not measured", None)
        ratio = ours.req_per_s / base.req_per_s
        measured = f"{ratio:.2f}x ({ours.req_per_s:,.0f} vs {base.req_per_s:,.0f} req/s)"
        return TargetCheck(server, target, measured, ratio >= goal)

    for tool in ("ghz", "perf_analyzer"):
        checks.append(ratio_check(
            f"{compute}, c={c}, {tool}: throughput ≥ {TARGET_COMPUTE_SPEEDUP:g}x naive",
            compute, NAIVE, TARGET_COMPUTE_SPEEDUP, tool,
        ))
        for null in (n for n in NULLS if n == NULL or n in results.servers):
            checks.append(ratio_check(
                f"{overhead}, c={c}, {tool}: throughput ≥ {TARGET_OVERHEAD_OF_NULL:g}x {null}",
                overhead, null, TARGET_OVERHEAD_OF_NULL, tool,
            ))
        checks.append(ratio_check(
            f"{overhead}, c={c}, {tool}: throughput ≥ {TARGET_OVERHEAD_SPEEDUP:g}x naive",
            overhead, NAIVE, TARGET_OVERHEAD_SPEEDUP, tool,
        ))

    for model in (m for m in (compute, overhead) if m is not None):
        ours, naive = results.point(model, server, 1), results.point(model, NAIVE, 1)
        target = f"{model}, c=1: p50 ≤ naive p50 + {TARGET_IDLE_P50_EXTRA_MS} ms"
        if ours is None or naive is None:
            checks.append(TargetCheck(server, target, "not measured", None))
            continue
        extra = ours.p50_ms - naive.p50_ms
        measured = f"{extra:+.3f} ms ({ours.p50_ms:.3f} vs {naive.p50_ms:.3f} ms)"
        checks.append(TargetCheck(server, target, measured, extra <= TARGET_IDLE_P50_EXTRA_MS))

    for null_name in (n for n in NULLS if n == NULL or n in results.servers):
        ours = results.point(overhead, server, c) if overhead else None
        null = results.point(overhead, null_name, c) if overhead else None
        target = (
            f"{overhead}, c={c}: server CPU per request ≤ {TARGET_CPU_OF_NULL:g}x {null_name}'s"
        )
        if ours is None or null is None or math.isnan(ours.cpu_us) or math.isnan(null.cpu_us):
            checks.append(TargetCheck(server, target, "not measured", None))
        else:
            ratio = ours.cpu_us / null.cpu_us
            measured = f"{ratio:.2f}x ({ours.cpu_us:,.0f} vs {null.cpu_us:,.0f} us)"
            checks.append(TargetCheck(server, target, measured, ratio <= TARGET_CPU_OF_NULL))

    before = server + BEFORE_SUFFIX
    if before in results.servers:
        slower = []
        compared = 0
        for p in results.points:
            if p.server != server:
                continue
            old = results.point(p.model, before, p.concurrency, p.rows)
            if old is None or old.req_per_s <= 0:
                continue
            compared += 1
            if p.req_per_s < old.req_per_s * (1 - BEFORE_TOLERANCE):
                slower.append(f"{p.model} c={p.concurrency} r={p.rows}: "
                              f"{p.req_per_s / old.req_per_s:.2f}x")
        for entry in results.data.get("streams") or []:
            if entry["server"] != server:
                continue
            old_stream = next(
                (
                    e
                    for e in results.data.get("streams") or []
                    if e["server"] == before and e["model"] == entry["model"]
                ),
                None,
            )
            if old_stream is None or old_stream["messages_per_s"] <= 0:
                continue
            compared += 1
            ratio = entry["messages_per_s"] / old_stream["messages_per_s"]
            if ratio < 1 - BEFORE_TOLERANCE:
                slower.append(f"{entry['model']} stream: {ratio:.2f}x")
        target = (
            f"no point slower than {before} (more than {BEFORE_TOLERANCE:.0%} below it)"
        )
        measured = f"{compared} points compared; slower: " + (", ".join(slower) or "none")
        checks.append(TargetCheck(server, target, measured, not slower if compared else None))
    return checks


def stream_table(results: Results) -> list[str]:
    """The streaming run, against the naive server's unary throughput at the same
    number of requests in flight per client connection pool (concurrency 64)."""
    streams = results.data.get("streams") or []
    if not streams:
        return ["No streaming run (`--stream-messages 0`)."]
    lines = [
        "| model | server | streams | requests per stream | req/s | x naive unary at c=64 "
        "| mean stream time ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in streams:
        naive = results.point(entry["model"], NAIVE, TARGET_CONCURRENCY)
        ratio = (
            entry["messages_per_s"] / naive.req_per_s if naive and naive.req_per_s > 0 else None
        )
        lines.append(
            f"| {entry['model']} | {entry['server']} | {entry['streams']} "
            f"| {entry['messages_per_stream']} | {_num(entry['messages_per_s'])} "
            f"| {_ratio(ratio)} | {_num(entry['mean_stream_ms'], 1)} "
            f"| {sum(entry['errors'].values())} |"
        )
    return lines


def perf_analyzer_table(results: Results) -> list[str]:
    """The points measured with Triton's perf_analyzer too (its last window)."""
    if not results.pa_points:
        return ["Not measured (no perf_analyzer, or `--no-perf-analyzer`)."]
    lines = [
        "| model | server | concurrency | req/s | p50 ms | p99 ms | x naive |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in results.pa_points:
        naive = results.point(p.model, NAIVE, p.concurrency, p.rows, tool="perf_analyzer")
        vs_naive = (
            p.req_per_s / naive.req_per_s
            if naive and naive.req_per_s > 0 and p.server != NAIVE
            else None
        )
        lines.append(
            f"| {p.model} | {p.server} | {p.concurrency} | {_num(p.req_per_s)} "
            f"| {_num(p.p50_ms, 2)} | {_num(p.p99_ms, 2)} | {_ratio(vs_naive)} |"
        )
    return lines


def targets_table(checks: list[TargetCheck]) -> list[str]:
    lines = ["| server | target | measured | result |", "|---|---|---|---|"]
    for check in checks:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[check.passed]
        lines.append(f"| {check.server} | {check.target} | {check.measured} | {verdict} |")
    return lines


def render_markdown(results: Results, plots: dict[str, str]) -> str:
    sections = [
        "## Setup",
        "",
        *header_lines(results),
        "",
        "## In-process ceiling (onnxruntime alone, default session options)",
        "",
        *ceiling_table(results),
        "",
        "## Served throughput and latency",
        "",
        "Batch-1 requests unless `rows/request` says otherwise. `x naive`: throughput over "
        "the naive server's at the same concurrency and rows per request. `% of ceiling`: rows/s "
        "as a share of the in-process ceiling's best (its largest batch).",
        "",
        *measurement_table(results),
        "",
        "## Streaming (ModelStreamInfer, measured separately)",
        "",
        "Each stream sends its batch-1 requests without waiting for answers, so up to "
        "`streams x requests per stream` are in flight; throughput counts the requests of "
        "completed streams.",
        "",
        *stream_table(results),
        "",
        "## perf_analyzer",
        "",
        *perf_analyzer_table(results),
        "",
        "## Targets (issue 12)",
        "",
        *targets_table(check_targets(results)),
        "",
        "## Plots",
        "",
        *(f"![{title}]({name})" for title, name in plots.items()),
        "",
    ]
    return "\n".join(sections)


# ---------------------------------------------------------------- plots


def plot(results: Results, out_dir: Path) -> dict[str, str]:
    """throughput.png and p99.png: one panel per model, one line per server (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"Throughput vs concurrency": "throughput.png", "p99 latency vs concurrency": "p99.png"}
    models = list(results.models)
    for (title, filename), metric in zip(files.items(), ("req_per_s", "p99_ms"), strict=True):
        figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
        for axis, model in zip(axes[0], models, strict=True):
            for server in results.servers:
                points = sorted(
                    (
                        p
                        for p in results.points
                        if p.model == model and p.server == server and p.rows == 1
                    ),
                    key=lambda p: p.concurrency,
                )
                if points:
                    axis.plot(
                        [p.concurrency for p in points],
                        [getattr(p, metric) for p in points],
                        marker="o",
                        label=server,
                    )
            if metric == "req_per_s":
                for batch, rows_per_s in sorted(
                    (results.ceiling.get(model) or {}).items(), key=lambda kv: int(kv[0])
                ):
                    if batch in ("1", "32"):
                        axis.axhline(
                            rows_per_s,
                            linestyle="--",
                            linewidth=0.8,
                            color="grey" if batch == "1" else "black",
                            label=f"onnxruntime alone, batch {batch} (rows/s)",
                        )
                # Log scale: the in-process ceiling can be far above any served rate.
                axis.set_yscale("log")
                axis.set_ylabel("requests/s (batch-1 requests)")
            else:
                axis.set_yscale("log")
                axis.set_ylabel("p99 latency (ms)")
            axis.set_xscale("log", base=2)
            ticks = sorted({p.concurrency for p in results.points if p.rows == 1})
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.set_xlabel("concurrency (requests in flight)")
            role = results.models[model].get("role", "")
            axis.set_title(f"{model} ({role})")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        suffix = " — SMOKE RUN" if results.meta.get("smoke") else ""
        figure.suptitle(title + suffix)
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=110)
        plt.close(figure)
    return files


# ---------------------------------------------------------------- entry points


def write_report(results_path: Path, readme: Path | None = None) -> Path:
    """results.md, throughput.png and p99.png next to results.json; optionally copy the
    markdown into a README between the results markers."""
    results = Results(json.loads(results_path.read_text()))
    out_dir = results_path.parent
    plots = plot(results, out_dir)
    markdown = render_markdown(results, plots)
    md_path = out_dir / "results.md"
    md_path.write_text("# Ferry benchmark results\n\n" + markdown)
    if readme is not None:
        update_readme(readme, markdown, out_dir)
    return md_path


def update_readme(readme: Path, markdown: str, out_dir: Path) -> None:
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} section")
    # Plot links are relative to the results folder; make them relative to the README.
    prefix = Path(os.path.relpath(out_dir.resolve(), readme.parent.resolve())).as_posix()
    for name in ("throughput.png", "p99.png"):
        markdown = markdown.replace(f"]({name})", f"]({prefix}/{name})")
    # The README's "Results" is a level-2 section: the report's sections go one level down.
    markdown = "\n".join(
        "#" + line if line.startswith("## ") else line for line in markdown.splitlines()
    )
    text = text[: begin + len(README_BEGIN)] + "\n" + markdown + "\n" + text[end:]
    readme.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the report of a saved benchmark run.")
    parser.add_argument("results", type=Path, help="a results.json written by benchmarks.run")
    parser.add_argument("--update-readme", type=Path, metavar="README", default=None)
    args = parser.parse_args(argv)
    print(write_report(args.results, args.update_readme).read_text())


if __name__ == "__main__":
    main()
