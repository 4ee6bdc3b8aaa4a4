"""A sampling profile of a server under ghz load, and where its samples go by stage.

    .venv/bin/python -m benchmarks.profile --server ferry --model mlp_small \\
        --concurrency 64 --seconds 10 --out benchmarks/profiles/ferry-mlp_small-c64

Starts the server (as benchmarks.run does), loads it with ghz, records every thread with
`py-spy record --native` into OUT.txt (collapsed stacks), and writes OUT.md: the share of
all samples whose stack passes through each stage of Ferry's request path, and the
functions with the most samples of their own.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .load import LoadSpec, find_ghz, ghz_command, write_request
from .make_models import MODELS, write_repository
from .servers import RunningServer, ServerVariant

HERE = Path(__file__).resolve().parent

# A stage is the first of its patterns found in a stack (frames are "function (file:line)").
STAGES: dict[str, tuple[str, ...]] = {
    "decode (protobuf -> arrays, validation)": ("decode_request (",),
    "queue (submit, batching core)": ("submit (", "take_batch (", "expire ("),
    "dispatch (scheduler, hand-off)": ("_dispatch (", "_deferred_dispatch (", "_start ("),
    "run (gather, session.run, scatter)": ("execute (",),
    "finish (settle futures, batch observers)": ("_finish (",),
    "encode (arrays -> protobuf)": ("encode_response (",),
    "outcome observers (metrics, statistics, logs)": ("request_finished (",),
    # epoll_pwait: uvloop's (libuv's) wait for events.
    "waiting (epoll, condition, queue get)": ("epoll_wait", "epoll_pwait", "pthread_cond_wait",
                                              "sem_wait", "futex_wait", "_serve (",
                                              "do_futex_wait"),
}


def stage_of(stack: str) -> str:
    for stage, patterns in STAGES.items():
        if any(p in stack for p in patterns):
            return stage
    return "other (grpc.aio, asyncio, interpreter)"


def summarize(collapsed: Path, title: str) -> str:
    """Per thread (the event loop first): the share of its samples in each stage."""
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        thread, _, frames = stack.partition(";")
        name = thread.partition(": ")[2] or thread
        by_thread[name][stage_of(frames)] += count
        if not any(p in frames for p in STAGES["waiting (epoll, condition, queue get)"]):
            own[frames.split(";")[-1]] += count
    lines = [f"# {title}", ""]
    names = sorted(by_thread, key=lambda n: (n != "MainThread", n))
    for name in names:
        counts = by_thread[name]
        total = sum(counts.values())
        label = "the event loop" if name == "MainThread" else name
        lines += [f"## {label} ({total} samples)", "", "| stage | share |", "|---|---:|"]
        for stage, count in counts.most_common():
            lines.append(f"| {stage} | {100 * count / total:.1f}% |")
        lines.append("")
    busy = sum(own.values())
    lines += ["## Functions with the most samples of their own, waiting excluded", "",
              f"{busy} busy samples over every thread.", "", "| function | share |", "|---|---:|"]
    for frame, count in own.most_common(30):
        lines.append(f"| `{frame[:110]}` | {100 * count / max(1, busy):.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument(
        "--server", default="ferry", help="NAME or NAME=COMMAND (as benchmarks.run)"
    )
    parser.add_argument("--model", default="mlp_small", choices=[m.name for m in MODELS])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=97, help="samples per second per thread")
    parser.add_argument(
        "--busy-only",
        action="store_true",
        help="leave out samples of idle threads (py-spy's own judgement), so the shares "
        "are of CPU time rather than of wall time",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="path prefix of OUT.txt and OUT.md"
    )
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    args = parser.parse_args(argv)

    variant = ServerVariant.parse(args.server)
    model = next(m for m in MODELS if m.name == args.model)
    repo = write_repository(args.work / f"profile-{model.name}", (model,))
    request = write_request(args.work / "requests" / f"{model.name}_1.bin", model.name,
                            model.features, 1)
    py_spy = Path(sys.executable).with_name("py-spy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    collapsed = args.out.with_suffix(".txt")
    with RunningServer(variant, repo, [model.name], args.work / "logs" / "profile.log") as server:
        spec = LoadSpec(args.concurrency, 1, duration_s=args.seconds + 4)
        load = subprocess.Popen(ghz_command(find_ghz(), server.target, request, spec),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)  # past connection set-up and the first batches
        idle = [] if args.busy_only else ["--idle"]
        command = [str(py_spy), "record", "--native", "--threads", *idle, "-r", str(args.rate),
                   "-d", str(round(args.seconds)), "-f", "raw", "-o", str(collapsed),
                   "-p", str(server.pid)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
        load.wait()
    title = (f"{variant.name} on {model.name}, ghz concurrency {args.concurrency}, "
             f"{args.seconds:g} s at {args.rate} Hz")
    text = summarize(collapsed, title)
    text += f"\nMade with: `python -m benchmarks.profile {shlex.join(argv or sys.argv[1:])}`\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
