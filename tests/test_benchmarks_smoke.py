"""The benchmark harness in its smoke mode, and its target checks on made-up numbers.

Benchmarks are not tests: nothing here depends on how fast anything ran. The smoke run
checks that one command starts every server, drives it with ghz, and writes the table and
both plots; the target checks run on synthetic results.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load import find_ghz
from benchmarks.report import Point, Results, check_targets, render_markdown, update_readme
from tests.external_tools import missing

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_smoke_run_writes_table_and_plots_for_every_server(tmp_path: Path) -> None:
    try:
        find_ghz()
    except FileNotFoundError:
        missing("ghz is not installed (scripts/install-test-tools.sh installs it)")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    measured = {(m["server"], m["model"], m["rows"]) for m in results["measurements"]}
    assert {server for server, _, _ in measured} == {"ferry", "naive", "null"}
    for server in ("ferry", "naive"):
        for model in ("mlp_small", "mlp_large"):
            assert (server, model, 1) in measured
            assert (server, model, 8) in measured  # the multi-row run
    assert all(m["ok"] > 0 for m in results["measurements"]), results["measurements"]
    assert set(results["ceiling"]) == {"mlp_small", "mlp_large"}

    table = (out / "results.md").read_text()
    assert "Smoke run" in table
    for server in ("ferry", "naive", "null"):
        assert f"| {server} |" in table
    assert "## Targets (issue 12)" in table
    assert "server CPU us/request" in table
    for name in ("throughput.png", "p99.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def _point(
    model: str,
    server: str,
    concurrency: int,
    req_per_s: float,
    p50: float,
    p99: float,
    cpu_us: float = float("nan"),
    tool: str = "ghz",
) -> dict[str, Any]:
    return {
        "tool": tool,
        "server_cpu_us_per_request": cpu_us,
        "model": model,
        "server": server,
        "concurrency": concurrency,
        "rows": 1,
        "req_per_s": req_per_s,
        "p50_ms": p50,
        "p99_ms": p99,
        "ok": 100,
        "count": 100,
        "errors": {},
    }


def _results(ferry_large_64: float, ferry_small_64: float) -> Results:
    points = [
        _point("small", "naive", 1, 1000, 0.50, 1.0),
        _point("small", "ferry", 1, 1000, 0.55, 1.0),
        _point("small", "naive", 64, 1000, 50, 90, cpu_us=600),
        _point("small", "ferry", 64, ferry_small_64, 20, 40, cpu_us=300),
        _point("large", "naive", 1, 100, 5.0, 9.0),
        _point("large", "ferry", 1, 100, 5.3, 9.0),
        _point("large", "naive", 64, 100, 600, 900),
        _point("large", "ferry", 64, ferry_large_64, 100, 200),
        _point("small", "null", 64, 2000, 10, 20, cpu_us=280),
        # The same point from perf_analyzer: judged on its own, never mixed with ghz's.
        _point("large", "naive", 64, 100, 600, 900, tool="perf_analyzer"),
        _point("large", "ferry", 64, 500, 100, 200, tool="perf_analyzer"),
    ]
    return Results(
        {
            "meta": {"smoke": False},
            "models": {"small": {"role": "overhead-bound"}, "large": {"role": "compute-bound"}},
            "ceiling": {"small": {"1": 5e4, "32": 1e6}, "large": {"1": 200, "32": 1000}},
            "measurements": points,
        }
    )


def test_targets_pass_and_miss_as_ratios_to_the_baselines() -> None:
    checks = check_targets(_results(ferry_large_64=700, ferry_small_64=1900))
    assert all(check.server == "ferry" for check in checks)  # baselines are not judged
    assert [(check.target, check.passed) for check in checks] == [
        ("large, c=64, ghz: throughput ≥ 6x naive", True),  # 7x
        ("small, c=64, ghz: throughput ≥ 0.9x null", True),  # 0.95x
        ("small, c=64, ghz: throughput ≥ 1.5x naive", True),  # 1.9x
        ("large, c=64, perf_analyzer: throughput ≥ 6x naive", False),  # 5x
        ("small, c=64, perf_analyzer: throughput ≥ 0.9x null", None),  # not measured
        ("small, c=64, perf_analyzer: throughput ≥ 1.5x naive", None),
        ("large, c=1: p50 ≤ naive p50 + 0.1 ms", False),  # +0.3 ms
        ("small, c=1: p50 ≤ naive p50 + 0.1 ms", True),  # +0.05 ms
        ("small, c=64: server CPU per request ≤ 1.2x null's", True),  # 300 / 280
    ]
    slower = check_targets(_results(ferry_large_64=460, ferry_small_64=1700))
    assert [c.passed for c in slower[:3]] == [False, False, True]  # 4.6x, 0.85x, 1.7x


def test_a_before_build_is_compared_point_by_point() -> None:
    results = _results(ferry_large_64=700, ferry_small_64=1900)
    before = [
        Point.from_json({**_point(p.model, "ferry-before", p.concurrency, p.req_per_s, 1, 1)})
        for p in results.points
        if p.server == "ferry"
    ]
    before[0] = Point.from_json(_point(before[0].model, "ferry-before", 1, 2000, 1, 1))
    results.points += before
    results.servers.append("ferry-before")
    (check,) = [c for c in check_targets(results) if "ferry-before" in c.target]
    assert check.passed is False
    assert "4 points compared; slower: small c=1 r=1: 0.50x" in check.measured
    assert all(c.server == "ferry" for c in check_targets(results))  # never judged itself


def test_report_marks_unmeasured_targets_and_lists_every_server() -> None:
    results = _results(ferry_large_64=100, ferry_small_64=100)
    results.points = [p for p in results.points if p.concurrency != 1]
    markdown = render_markdown(results, {"Throughput": "throughput.png"})
    assert "| ferry | large, c=1: p50 ≤ naive p50 + 0.1 ms | not measured | n/a |" in markdown
    assert "MISS" in markdown
    for server in ("ferry", "naive", "null"):
        assert f"| {server} |" in markdown


def test_update_readme_replaces_only_the_results_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Bench\n\n## Results\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\n## After\n"
    )
    update_readme(readme, "## Setup\n\n![Throughput](throughput.png)", tmp_path / "results")
    text = readme.read_text()
    assert "old" not in text
    assert "### Setup" in text  # one level below the README's own sections
    assert "](results/throughput.png)" in text  # plot links relative to the README
    assert text.startswith("# Bench\n") and text.endswith("## After\n")


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception),
                                            ("", pytest.skip.Exception)])
def test_missing_ghz_fails_the_smoke_run_in_ci_and_skips_it_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    def no_ghz(explicit: str | None = None) -> Path:
        raise FileNotFoundError("ghz not found")

    monkeypatch.setattr(sys.modules[__name__], "find_ghz", no_ghz)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="ghz is not installed"):
        test_smoke_run_writes_table_and_plots_for_every_server(tmp_path)


def test_the_hand_off_benchmark_runs_against_a_real_executor(tmp_path: Path) -> None:
    """`python -m benchmarks.handoff`, briefly: it starts a real executor process, serves
    every point both ways and prints the table (it broke once, silently, when the
    frontend's model lookup came to take several executors)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.handoff", "--seconds", "0.2",
         "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6, done.stdout  # header, rule, 3 sizes x 2 concurrencies


def test_the_in_process_benchmark_measures_each_concurrency() -> None:
    """`python -m benchmarks.inprocess`, briefly: a FerryServer called in-process from 1
    and 8 tasks, one line per concurrency with the loop's CPU per request."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.inprocess", "--rounds", "1", "--requests", "200",
         "--concurrency", "1", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = re.findall(r"mlp_small c=(\d+): ([\d.]+) us/request", done.stdout)
    assert [c for c, _ in figures] == ["1", "8"], done.stdout
    assert all(float(us) > 0 for _, us in figures)


def test_the_padding_benchmark_runs_every_server_and_the_listed_buckets(tmp_path: Path) -> None:
    """`python -m benchmarks.padding_bench`, briefly, with listed length buckets: four
    servers answer every request, and the in-process ceiling is measured both ways."""
    out = tmp_path / "padding.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.padding_bench", "--duration", "0.5",
         "--warmup", "0.2", "--concurrency", "4", "--pool", "16", "--min-length", "2",
         "--max-length", "32", "--width", "16", "--layers", "1", "--max-batch-size", "8",
         "--length-buckets", "8,16,24,32", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    results = {r["server"]: r for r in document["results"]}
    assert set(results) == {"ferry-padding", "ferry-padding-listed", "ferry-no-padding", "naive"}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in results.values()), results
    assert all(r["server_cpu_us"] > 0 for r in results.values()), results
    assert results["ferry-padding-listed"]["padded_per_real"] >= 1
    assert set(document["in_process"]) == {
        "alone_rows_per_s", "padded_batches_rows_per_s", "listed_buckets_rows_per_s"
    }


def test_large_inputs_benchmark_times_every_case() -> None:
    """benchmarks.large_inputs in seconds: one row per case and size, each a time."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.large_inputs", "--rows", "1", "3",
         "--repeats", "1", "--budget-mb", "0.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()[2:]]
    assert [(case.strip(), count.strip()) for case, count, _, _ in rows] == [
        (case, count)
        for case in ("grpc request", "rest binary request", "rest json request",
                     "rest binary answer")
        for count in ("1", "3")
    ]
    assert all(float(spent.replace(",", "")) > 0 for *_, spent in rows)
