"""Send the digits model's held-out test split to a running Ferry and print the accuracy.

Start the server first (scripts/serve-example.sh), then:

    .venv/bin/python examples/digits_client.py [--url 127.0.0.1:8001]

The samples come from examples/digits_test_split.npz, written by train_digits.py, so this
script needs only Ferry's runtime install (numpy and ferry.client).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ferry.client import FerryClient, FerryClientError

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="host:port (default: %(default)s)")
    parser.add_argument("--model", default="digits", help="model name (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=24, help="rows per request (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)"
    )
    parser.add_argument(
        "--split",
        type=Path,
        default=HERE / "digits_test_split.npz",
        help="held-out samples (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.batch_size < 1 or args.concurrency < 1:
        parser.error("--batch-size and --concurrency must be at least 1")

    with np.load(args.split) as split:
        pixels = split["pixels"].astype(np.float32)
        labels = split["labels"]

    with FerryClient(args.url) as client:
        try:
            ready = client.is_model_ready(args.model, timeout=args.timeout)
        except FerryClientError as error:
            print(
                f"error: cannot reach Ferry at {args.url} ({error.code.name}: {error.message}).\n"
                "Is it running? Start it with scripts/serve-example.sh",
                file=sys.stderr,
            )
            return 2
        if not ready:
            print(f"error: model '{args.model}' is not ready at {args.url}", file=sys.stderr)
            return 2

        def classify(rows: np.ndarray) -> np.ndarray:
            outputs = client.infer(args.model, {"pixels": rows}, ["label"], timeout=args.timeout)
            return outputs["label"]

        batches = [pixels[i : i + args.batch_size] for i in range(0, len(pixels), args.batch_size)]
        try:
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                predicted = np.concatenate(list(pool.map(classify, batches)))
        except FerryClientError as error:
            print(f"error: inference failed: {error.code.name}: {error.message}", file=sys.stderr)
            return 1

    accuracy = float(np.mean(predicted == labels))
    print(f"accuracy: {accuracy:.4f} (n={len(labels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
