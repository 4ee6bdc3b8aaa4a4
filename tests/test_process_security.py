"""The security flags of `ferry serve`, on a real process reached with tritonclient: TLS
(`--tls-cert`, `--tls-key`), mutual TLS (`--tls-client-ca`), API keys
(`--restricted-api`, with `@FILE`), model control, and the README's production start."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.certificates import Identity, Pki
from tests.models import mlp_model, write_config
from tests.process import FerryProcess, serve_command

StartProcess = Callable[..., FerryProcess]
KEY = "k3y-from-a-file"
ADMIN_KEY = "adm1n-on-the-command-line"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 8\n")
    return repo


def client(
    server: FerryProcess, root: Path | None = None, identity: Identity | None = None
) -> triton.InferenceServerClient:
    if root is None:
        return triton.InferenceServerClient(server.address)
    return triton.InferenceServerClient(
        server.address,
        ssl=True,
        root_certificates=str(root),
        private_key=str(identity.key) if identity else None,
        certificate_chain=str(identity.cert) if identity else None,
    )


def code_of(call: Callable[[], object]) -> str:
    try:
        call()
    except InferenceServerException as error:
        return str(error.status()).removeprefix("StatusCode.")
    return "OK"


def infer(c: triton.InferenceServerClient, headers: dict[str, str] | None = None) -> object:
    tensor = triton.InferInput("x", [2, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 16), np.float32))
    result = c.infer("m", [tensor], headers=headers, client_timeout=30)
    assert result.as_numpy("probs").shape == (2, 4)
    return result


def tls_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]


def test_tls_flags_serve_tls_and_refuse_plain_text(
    repo: Path, ferry_process: StartProcess, pki: Pki
) -> None:
    server = ferry_process(repo, *tls_flags(pki))
    with client(server, pki.ca.cert_path) as trusting:
        assert trusting.is_server_ready()
        infer(trusting)
    with client(server) as plain:
        assert code_of(plain.is_server_live) == "UNAVAILABLE"
    with client(server, pki.other_ca.cert_path) as suspicious:  # trusts another CA
        assert code_of(suspicious.is_server_live) == "UNAVAILABLE"
    assert server.stop() == 0
    assert "plain text" not in server.log
    # gRPC's core logs each failed handshake at INFO, a line per connection: a port
    # scanner would flood the log. Ferry sets GRPC_VERBOSITY=ERROR unless it is set.
    assert "Handshake failed" not in server.log


def test_tls_client_ca_flag_asks_for_a_client_certificate_from_that_ca(
    repo: Path, ferry_process: StartProcess, pki: Pki
) -> None:
    server = ferry_process(repo, *tls_flags(pki), "--tls-client-ca", str(pki.ca.cert_path))
    with client(server, pki.ca.cert_path) as anonymous:
        assert code_of(anonymous.is_server_live) == "UNAVAILABLE"
    with client(server, pki.ca.cert_path, pki.stranger) as stranger:
        assert code_of(stranger.is_server_live) == "UNAVAILABLE"
    with client(server, pki.ca.cert_path, pki.client) as member:
        assert member.is_server_ready()
        infer(member)
    assert server.stop() == 0


def test_restricted_api_flags_need_their_keys_and_never_show_them(
    repo: Path, tmp_path: Path, ferry_process: StartProcess
) -> None:
    key_file = tmp_path / "inference.key"
    key_file.write_text(KEY + "\n")
    server = ferry_process(
        repo,
        "--restricted-api", f"inference,metadata:x-api-key=@{key_file}",
        "--restricted-api", f"model-repository,statistics:x-admin-key={ADMIN_KEY}",
        "--log-level", "DEBUG", "--access-log",
    )
    with client(server) as c:
        assert c.is_server_ready()  # health is not named: open for probes
        assert c.is_model_ready("m")
        assert code_of(lambda: infer(c)) == "UNAUTHENTICATED"
        assert code_of(lambda: infer(c, {"x-api-key": "wrong"})) == "UNAUTHENTICATED"
        assert code_of(lambda: infer(c, {"x-admin-key": ADMIN_KEY})) == "UNAUTHENTICATED"
        infer(c, {"x-api-key": KEY})
        assert code_of(lambda: c.get_model_metadata("m")) == "UNAUTHENTICATED"
        assert c.get_model_metadata("m", headers={"x-api-key": KEY}).name == "m"
        assert code_of(c.get_model_repository_index) == "UNAUTHENTICATED"
        assert code_of(c.get_inference_statistics) == "UNAUTHENTICATED"
        admin = {"x-admin-key": ADMIN_KEY}
        assert c.get_inference_statistics(headers=admin).model_stats
        # the key lets the call through; model control (none) still refuses the load
        assert code_of(lambda: c.load_model("m", headers=admin)) == "PERMISSION_DENIED"
    # @FILE keeps the key out of the process list; neither key reaches the log
    assert KEY not in Path(f"/proc/{server.pid}/cmdline").read_text()
    assert server.stop() == 0
    assert KEY not in server.log and ADMIN_KEY not in server.log


def test_the_readme_production_start(
    repo: Path, tmp_path: Path, ferry_process: StartProcess, pki: Pki
) -> None:
    """The README's production command line, with the paths of this test."""
    (tmp_path / "inference").write_text(KEY)
    (tmp_path / "admin").write_text(ADMIN_KEY)
    server = ferry_process(
        repo, *tls_flags(pki), "--tls-client-ca", str(pki.ca.cert_path),
        "--model-control-mode", "none",
        "--restricted-api", f"inference,metadata,model-config:ferry-key=@{tmp_path}/inference",
        "--restricted-api", f"model-repository,statistics:ferry-admin-key=@{tmp_path}/admin",
        "--max-message-size", "16777216", "--max-concurrent-rpcs", "4096",
    )
    with client(server, pki.ca.cert_path, pki.client) as member:
        assert member.is_server_ready()
        assert code_of(lambda: infer(member)) == "UNAUTHENTICATED"
        infer(member, {"ferry-key": KEY})
        admin = {"ferry-admin-key": ADMIN_KEY}
        assert code_of(lambda: member.unload_model("m", headers=admin)) == "PERMISSION_DENIED"
    with client(server, pki.ca.cert_path) as anonymous:
        assert code_of(anonymous.is_server_live) == "UNAVAILABLE"
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--restricted-api", "inference"], "'inference' is not GROUP[,GROUP...]:HEADER=VALUE"),
    ],
    ids=["cert-without-key", "client-ca-without-tls", "restricted-api-without-key"],
)
def test_bad_security_flags_exit_2_with_the_reason(
    repo: Path, pki: Pki, flags: list[str], message: str
) -> None:
    args = [f.format(cert=pki.server.cert, ca=pki.ca.cert_path) for f in flags]
    done = subprocess.run(serve_command(repo, *args), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
