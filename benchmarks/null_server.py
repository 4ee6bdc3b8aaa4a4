"""The null baseline: a grpc.aio server that answers ModelInfer with a prebuilt response.

No decoding, no inference, no encoding: the most requests one Python event loop with
grpc.aio can answer on this machine, whatever the model. Each model's response (one row of
zeros per output) is built once at start.

    python -m benchmarks.null_server REPOSITORY --port 8001
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferry.proto import grpc_service_pb2 as pb
from ferry.server import event_loop

from .baseline import (
    ORT_TYPES,
    BaselineModel,
    MetadataServicer,
    load_repository,
    parse_args,
    serve,
)


def prebuilt_response(model: BaselineModel) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version="1")
    for spec in model.session.get_outputs():
        datatype, dtype, _ = ORT_TYPES[spec.type]
        shape = [1, *(d if isinstance(d, int) else 1 for d in spec.shape[1:])]
        response.outputs.add(name=spec.name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(np.zeros(shape, dtype=dtype).tobytes())
    return response


class NullServicer(MetadataServicer):
    def __init__(self, models: dict[str, BaselineModel]) -> None:
        super().__init__(models)
        self.responses = {name: prebuilt_response(model) for name, model in models.items()}

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        response = self.responses.get(request.model_name)
        if response is None:
            await self._model(request.model_name, context)  # aborts NOT_FOUND
        return response


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    servicer = NullServicer(load_repository(args.repository))
    event_loop.run(serve(servicer, args.host, args.port, args.listeners), args.event_loop)


if __name__ == "__main__":
    main()
