"""The naive baseline: a grpc.aio server that calls `session.run` once per request.

What the seed article (`/work/shared/seed/`) leads a user to write: decode the request,
run the session right there in the handler, encode the answer. No batching, no worker
thread, onnxruntime's default session options.

    python -m benchmarks.naive_server REPOSITORY --port 8001
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from ferry.proto import grpc_service_pb2 as pb
from ferry.server import event_loop

from .baseline import (
    NUMPY_DTYPES,
    ORT_TYPES,
    MetadataServicer,
    load_repository,
    parse_args,
    serve,
)


class NaiveServicer(MetadataServicer):
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        model = await self._model(request.model_name, context)
        feed = {}
        for index, tensor in enumerate(request.inputs):
            dtype = NUMPY_DTYPES.get(tensor.datatype)
            if dtype is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unsupported datatype {tensor.datatype}"
                )
            if index < len(request.raw_input_contents):
                array = np.frombuffer(request.raw_input_contents[index], dtype=dtype)
            else:
                array = np.array(tensor.contents.fp32_contents, dtype=dtype)
            try:
                feed[tensor.name] = array.reshape(tuple(tensor.shape))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            results = model.session.run(None, feed)
        except Exception as exc:  # onnxruntime's errors are all bad input here
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        for spec, result in zip(model.session.get_outputs(), results, strict=True):
            response.outputs.add(
                name=spec.name, datatype=ORT_TYPES[spec.type][0], shape=result.shape
            )
            response.raw_output_contents.append(result.tobytes())
        return response


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    servicer = NaiveServicer(load_repository(args.repository))
    event_loop.run(serve(servicer, args.host, args.port), args.event_loop)


if __name__ == "__main__":
    main()
