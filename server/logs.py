"""Logging: the text and JSON line formats, the opt-in access log, and the rate-limited
reports of rejected requests and of malformed HTTP.

Successful requests log nothing by default; a flood of bad requests logs one line per
kind of rejection (model and status code) per interval, not one per request.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .client_text import bounded
from .errors import Status
from .outcomes import RequestOutcome

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

access_log = logging.getLogger("ferry.access")
rejection_log = logging.getLogger("ferry.rejections")

# Outcomes a client brings on itself by leaving; not worth a line.
QUIET_STATUSES = frozenset({Status.OK, Status.CANCELLED})
MAX_MESSAGE_CHARS = 500
# Any record's message, whatever it quotes (a name a load request sent, a path): no
# legitimate line comes near it, and a client's megabytes cannot make one.
MAX_RECORD_CHARS = 16 * 1024


def printable(text: str) -> str:
    """An error message fit for one log line: it may quote what a caller sent (a model
    name, say), so control characters are escaped and the length is bounded (cut in
    its middle: the end of a message says what the server has)."""
    return escaped(bounded(text, MAX_MESSAGE_CHARS))


def escaped(text: str) -> str:
    """Control characters (line breaks, NUL...) as escapes: one record, one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _OneLine(logging.Filter):
    """Every message the handler writes is escaped as `escaped` does, and bounded to
    MAX_RECORD_CHARS: a model name, a path or any other string a client sent cannot
    start a line of its own, nor make one megabytes long. (A traceback, formatted apart
    from the message, keeps its lines.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_RECORD_CHARS:
            record.msg, record.args = escaped(bounded(message, MAX_RECORD_CHARS)), None
        elif not message.isprintable():
            record.msg, record.args = escaped(message), None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", self.converter(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, log_format: str = "text") -> None:
    """Send every log record to stderr in the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = _FerryHandler(sys.stderr)
    handler.addFilter(_OneLine())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Replace only a handler of ours from an earlier call; others (a test harness's) stay.
    for old in [h for h in root.handlers if isinstance(h, _FerryHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _FerryHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler `configure` installs."""


class AccessLog:
    """An OutcomeObserver that logs one line per finished inference request."""

    def request_finished(self, outcome: RequestOutcome) -> None:
        model, code = outcome.model, outcome.status.name
        duration_ms = round(outcome.duration_ns / 1e6, 3)
        message = printable(outcome.message)
        fields = {
            "model": model, "code": code, "duration_ms": duration_ms,
            "protocol": outcome.protocol,
        }
        if message:
            fields["error"] = message
        access_log.info(
            "ModelInfer model=%s code=%s duration_ms=%.3f protocol=%s%s",
            model or "-", code, duration_ms, outcome.protocol,
            f" error={message!r}" if message else "",
            extra={"fields": fields},
        )


@dataclass(slots=True)
class _Class:
    reported_at: float
    suppressed: int = 0


class Throttle:
    """Lets the first report of each kind through, then at most one per `interval_s`,
    counting those it holds back."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._classes: dict[Hashable, _Class] = {}

    def report(self, key: Hashable) -> tuple[int, str] | None:
        """None to hold this one back; else how many were held back since the last
        report of its kind, and a note that says so ("" for the first)."""
        now = self._clock()
        seen = self._classes.get(key)
        if seen is not None and now - seen.reported_at < self._interval_s:
            seen.suppressed += 1
            return None
        self._classes[key] = _Class(reported_at=now)
        if seen is None:
            return 0, ""
        note = f" ({seen.suppressed} more since the last report {now - seen.reported_at:.0f} s ago)"
        return seen.suppressed, note


class RejectionLog:
    """An OutcomeObserver that reports each kind of failed request (model, code) at once,
    then at most once per `interval_s`, with how many it did not report in between."""

    def __init__(
        self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._throttle = Throttle(interval_s, clock)

    def request_finished(self, outcome: RequestOutcome) -> None:
        if outcome.status in QUIET_STATUSES:
            return
        model, code, message = outcome.model, outcome.status.name, outcome.message
        reported = self._throttle.report((model, code))
        if reported is None:
            return
        suppressed, more = reported
        # A request refused before it reached a loaded model (unknown, not loaded, the
        # server stopping) has no model to name here, as in the metrics (label _unknown):
        # the message names the one it asked for.
        whose = f"requests to model '{model}'" if model else "requests that reached no model"
        rejection_log.warning(
            "%s fail with %s%s: %s",
            whose, code, more, printable(message) or "(no detail)",
            extra={"fields": {"model": model, "code": code, "suppressed": suppressed}},
        )


class _ThrottledFilter(logging.Filter):
    """A log filter that lets each kind of record through once per `interval_s`."""

    def __init__(
        self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._throttle = Throttle(interval_s, clock)


class MalformedHttpLog(_ThrottledFilter):
    """For the logger of aiohttp's server: a request that is not valid HTTP (a bad chunk
    size, a request line over the limit) is the client's error, already answered 400.
    aiohttp logs each at ERROR with a traceback, about ten lines a request; this reports
    each kind once per `interval_s` on one line, with how many it did not report. Any
    other record passes unchanged: an error of the server's own keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestPayloadError):  # a body that failed after its answer
            error = error.__cause__
        if not isinstance(error, HttpProcessingError):
            return True
        kind = type(error).__name__
        reported = self._throttle.report(kind)
        if reported is None:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "malformed HTTP request answered %d (%s)%s: %s"
        # The first line names the error; the lines after it quote the request (a header
        # line, which may hold an API key), as may its end ("Got more than 8190 bytes
        # when reading: b'...'", "Invalid HTTP header: b'...'").
        what = _QUOTED.split((error.message or "").split("\n", 1)[0], 1)[0].rstrip(": ")
        record.args = (error.code, kind, reported[1], printable(what))
        record.exc_info = record.exc_text = None
        return True


# Where aiohttp's message starts to quote the request: a repr of bytes or a bytearray,
# or a string after a colon.
_QUOTED = re.compile(r"""\bb['"]|bytearray\(|:\s*['"]""")


class LostAnswerLog(_ThrottledFilter):
    """For gRPC's own logger: an answer that could not be sent because its client had
    gone (it cancelled or closed its channel as the answer was being sent) is logged by
    grpc.aio at ERROR with a traceback, a record any client can cause at will (16 in 3.5
    minutes of clients that vanish, with --workers). This reports it once per method and
    `interval_s` on one WARNING line, with how many it did not report; any other record
    passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # Matched by name: the class is in grpc's Cython core, not in its public API.
        if type(error).__name__ != "ExecuteBatchError":
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        method = str(args[0]) if args else "a call"
        reported = self._throttle.report(method)
        if reported is None:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "an answer on %s was not sent: its client had gone%s"
        record.args = (printable(method), reported[1])
        record.exc_info = record.exc_text = None
        return True


def quiet_lost_answers(logger_name: str = "grpc._cython.cygrpc") -> None:
    """Install LostAnswerLog on grpc.aio's logger, once per process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, LostAnswerLog) for f in logger.filters):
        logger.addFilter(LostAnswerLog())


def quiet_malformed_http(logger_name: str = "aiohttp.server") -> None:
    """Install MalformedHttpLog on aiohttp's server logger, once per process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, MalformedHttpLog) for f in logger.filters):
        logger.addFilter(MalformedHttpLog())
