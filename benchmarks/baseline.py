"""What both baseline servers share: reading the model repository, the metadata RPCs, and
starting a grpc.aio server on a port given on the command line.

The baselines are deliberately plain Python over Ferry's generated stubs: they are what a
user would write without Ferry, not a second Ferry.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import text_format

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.proto import model_config_pb2 as mc
from ferry.server.event_loop import ASYNCIO, EVENT_LOOPS

# onnxruntime's type names -> (protocol datatype, numpy dtype, config enum name)
ORT_TYPES: dict[str, tuple[str, type[np.generic], str]] = {
    "tensor(float)": ("FP32", np.float32, "TYPE_FP32"),
    "tensor(double)": ("FP64", np.float64, "TYPE_FP64"),
    "tensor(int64)": ("INT64", np.int64, "TYPE_INT64"),
    "tensor(int32)": ("INT32", np.int32, "TYPE_INT32"),
}
NUMPY_DTYPES = {datatype: dtype for datatype, dtype, _ in ORT_TYPES.values()}


@dataclass
class BaselineModel:
    name: str
    session: ort.InferenceSession
    config: mc.ModelConfig

    def metadata(self) -> pb.ModelMetadataResponse:
        def tensors(args: list[Any]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=arg.name,
                    datatype=ORT_TYPES[arg.type][0],
                    shape=[d if isinstance(d, int) else -1 for d in arg.shape],
                )
                for arg in args
            ]

        return pb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=tensors(self.session.get_inputs()),
            outputs=tensors(self.session.get_outputs()),
        )


def load_repository(root: Path) -> dict[str, BaselineModel]:
    """Every <root>/<model>/1/model.onnx, with its config.pbtxt when there is one."""
    models = {}
    for onnx_path in sorted(root.glob("*/1/model.onnx")):
        folder = onnx_path.parent.parent
        config = mc.ModelConfig()
        if (folder / "config.pbtxt").exists():
            text_format.Parse((folder / "config.pbtxt").read_text(), config)
        config.name = folder.name
        # The seed article's session: onnxruntime's defaults, nothing tuned.
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        models[folder.name] = BaselineModel(folder.name, session, config)
    if not models:
        raise SystemExit(f"no <model>/1/model.onnx under {root}")
    return models


class MetadataServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Liveness, readiness, metadata and config: enough for ghz, perf_analyzer and the
    harness's readiness check. Subclasses answer ModelInfer."""

    def __init__(self, models: dict[str, BaselineModel]) -> None:
        self.models = models

    async def _model(self, name: str, context: Any) -> BaselineModel:
        model = self.models.get(name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
        assert model is not None
        return model

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=type(self).__name__, version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        return (await self._model(request.name, context)).metadata()

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=(await self._model(request.name, context)).config)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--listeners",
        type=int,
        default=1,
        help="grpc.aio servers sharing the port in this process, as Ferry's --grpc-listeners "
        "(default: 1, what a server written without Ferry has)",
    )
    parser.add_argument(
        "--event-loop",
        choices=list(EVENT_LOOPS),
        default=ASYNCIO,
        help="the asyncio event loop, as Ferry's --event-loop (default: asyncio, the "
        "standard library's, what a server written without Ferry has)",
    )
    return parser.parse_args()


async def serve(
    servicer: pb_grpc.GRPCInferenceServiceServicer, host: str, port: int, listeners: int = 1
) -> None:
    """Serve until SIGTERM or SIGINT, on `listeners` grpc.aio servers sharing the port."""
    limit = 64 * 1024 * 1024
    servers = []
    for _ in range(listeners):
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", int(listeners > 1)),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        if server.add_insecure_port(f"{host}:{port}") == 0:
            raise SystemExit(f"cannot listen on {host}:{port}")
        servers.append(server)
    for server in servers:
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await asyncio.gather(*(server.stop(1.0) for server in servers))
