"""`ferry serve` opens the REST port: --http-port 0 picks a free one, reported in the log;
curl-style plain HTTP reaches it; SIGTERM drains and closes it; -1 turns it off."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from pathlib import Path

from ferry.server.cli import build_parser
from ferry.server.workers import free_port
from tests.models import mlp_model
from tests.test_cli import SERVING, FerryProcess

REST = re.compile(r"REST binding on http://(\S+):(\d+)")


def test_the_rest_port_is_on_by_default_at_8000_and_minus_one_turns_it_off() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "m.onnx"]).http_port == 8000
    assert parser.parse_args(["serve", "m.onnx", "--http-port", "-1"]).http_port == -1


def test_ferry_serve_answers_rest_and_drains_on_sigterm(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "classifier.onnx")
    process = FerryProcess(str(model), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", "0", "--metrics-port", "-1")
    try:
        port = int(process.wait_for(REST).group(2))
        process.wait_for(SERVING)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                       "data": [0.5] * 16}]}).encode()
        request = urllib.request.Request(f"{base}/v2/models/classifier/infer", data=body)
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        assert {o["name"] for o in answer["outputs"]} == {"logits", "probs"}
        process.process.send_signal(signal.SIGTERM)
        assert process.finish() == 0
    finally:
        process.close()


def test_ferry_serve_without_the_rest_port(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "classifier.onnx")
    process = FerryProcess(str(model), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", "-1", "--metrics-port", "-1")
    try:
        process.wait_for(SERVING)
        process.process.send_signal(signal.SIGTERM)
        assert process.finish() == 0
        assert "REST binding" not in process.stderr
    finally:
        process.close()


def test_workers_share_the_rest_port(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "classifier.onnx")
    port = free_port("127.0.0.1")
    process = FerryProcess(str(model), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", str(port), "--metrics-port", "-1", "--workers", "2")
    try:
        for _ in range(2):  # each worker logs its REST port, then that it serves
            process.wait_for(SERVING)
        ports = [int(match.group(2)) for match in REST.finditer(process.stderr)]
        assert ports == [port, port]  # both workers listen on it (SO_REUSEPORT)
        for _ in range(8):  # a new connection each time: either worker may answer
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                        timeout=10) as response:
                assert response.status == 200
        process.process.send_signal(signal.SIGTERM)
        assert process.finish() == 0
    finally:
        if process.process.poll() is None:  # the supervisor forwards it to the workers
            process.process.send_signal(signal.SIGTERM)
            process.finish()
        process.close()
