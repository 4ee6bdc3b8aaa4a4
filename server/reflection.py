"""The descriptor pool that server reflection answers from: Ferry's own pool, able to name
the file that defines a method as well as a service or message.

The reflection protocol lets a client ask for the file containing any fully-qualified
symbol, methods included, and ghz asks for `inference.GRPCInferenceService.ModelInfer`.
protobuf's upb pool resolves services and messages but not their methods, so without this
grpcio-reflection would answer NOT_FOUND and ghz would need the .proto file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool

if TYPE_CHECKING:
    # grpcio-reflection types its pool argument as a DescriptorPool; this stands in for one.
    _PoolLike = DescriptorPool
else:
    _PoolLike = object


class ReflectionPool(_PoolLike):
    """Wraps a DescriptorPool; every lookup but one goes straight through."""

    def __init__(self, pool: DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            file = self._file_defining_method(symbol)
            if file is None:
                raise
            return file

    def _file_defining_method(self, symbol: str) -> FileDescriptor | None:
        service_name, _, method = symbol.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            return None
        if method not in service.methods_by_name:
            return None
        file: FileDescriptor = service.file
        return file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)
