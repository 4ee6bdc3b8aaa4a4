"""A null server whose handler suspends once: it awaits a future that the event loop
settles on its next turn, as a batching server's handler awaits its batch.

Compared with benchmarks.null_server in the same run, it shows what one suspension of the
handler costs in grpc.aio, with no decoding, inference or encoding either way.

    python -m benchmarks.null_await_server REPOSITORY --port 8001
"""

from __future__ import annotations

import asyncio
from typing import Any

from ferry.proto import grpc_service_pb2 as pb
from ferry.server import event_loop

from .baseline import load_repository, parse_args, serve
from .null_server import NullServicer


class NullAwaitServicer(NullServicer):
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        response = self.responses.get(request.model_name)
        if response is None:
            await self._model(request.model_name, context)  # aborts NOT_FOUND
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future
        return response


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    servicer = NullAwaitServicer(load_repository(args.repository))
    event_loop.run(serve(servicer, args.host, args.port), args.event_loop)


if __name__ == "__main__":
    main()
