"""Server reflection's pool names the file of a method too, as ghz asks for it."""

from __future__ import annotations

import pytest

from ferry.proto._pool import POOL
from ferry.server.reflection import ReflectionPool


def test_method_symbols_resolve_to_their_service_file() -> None:
    pool = ReflectionPool(POOL)
    file = pool.FindFileContainingSymbol("inference.GRPCInferenceService.ModelInfer")
    assert file.name == "grpc_service.proto"
    assert pool.FindFileContainingSymbol("inference.ModelInferRequest").name == file.name


@pytest.mark.parametrize(
    "symbol",
    ["inference.GRPCInferenceService.NoSuchMethod", "inference.NoSuchService.ModelInfer", ""],
)
def test_unknown_symbols_still_raise_key_error(symbol: str) -> None:
    with pytest.raises(KeyError):
        ReflectionPool(POOL).FindFileContainingSymbol(symbol)


def test_other_lookups_pass_through() -> None:
    pool = ReflectionPool(POOL)
    assert pool.FindFileByName("model_config.proto") is POOL.FindFileByName("model_config.proto")
