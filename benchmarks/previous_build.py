"""Ferry built from an earlier commit, to measure against in the same run.

`python -m benchmarks.run --before COMMIT` checks COMMIT out (a detached git worktree
under benchmarks/.work/) and serves it as the server `ferry-before`: the same command
line as `ferry`, with PYTHONPATH pointing at a folder where `ferry.server`, `ferry.client`
and `ferry.proto` are that checkout's folders. The installed packages (onnxruntime, grpcio
and the rest) are this environment's, so only Ferry's own code differs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .servers import FERRY, ServerVariant

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "ferry-before"


def previous_build(commit: str, work: Path) -> ServerVariant:
    """The server variant that runs Ferry as of `commit`."""
    resolved = subprocess.run(
        ["git", "rev-parse", "--verify", f"{commit}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    checkout = work / "before" / resolved[:12]
    if not (checkout / "server").is_dir():
        checkout.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--force", "--detach", str(checkout), resolved],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
    package = checkout.parent / f"{resolved[:12]}-path" / "ferry"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client", "proto"):
        link = package / name
        if not link.is_symlink():
            link.symlink_to(checkout / name)
    return ServerVariant(BEFORE, f"env PYTHONPATH={package.parent} {FERRY}")
