"""Ferry's Python client: numpy in, numpy out, over the Open Inference Protocol (gRPC).

    with FerryClient("127.0.0.1:8001") as client:
        outputs = client.infer("digits", {"pixels": batch})

AsyncFerryClient has the same methods for asyncio. Depends on ferry.proto only.
"""

from .aio import AsyncFerryClient
from .errors import FerryClientError
from .metadata import ModelMetadata, ServerMetadata, TensorMetadata
from .sync import FerryClient

__all__ = [
    "AsyncFerryClient",
    "FerryClient",
    "FerryClientError",
    "ModelMetadata",
    "ServerMetadata",
    "TensorMetadata",
]
