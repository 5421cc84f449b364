"""``fleetlearn data mnist1d``: trial data for a deployment, as the agent reads it.

Generates MNIST-1D locally (no download), splits its training part over the devices
named and writes one ``<device>.npz`` per device (arrays ``x``: float32 features,
``y``: integer labels, the format ``fleetlearn agent --data`` reads) and ``test.npz``
(the held-out part, for ``fleetlearn aggregator --eval-data``).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "data",
        help="write trial data files (MNIST-1D split over devices) in the agent's format",
        description=(
            "Writes OUT/<device>.npz for each device (arrays x: features, y: integer "
            "labels) and OUT/test.npz (held out), from MNIST-1D generated locally."
        ),
    )
    p.add_argument("dataset", choices=["mnist1d"])
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--devices", required=True, help="comma-separated device ids")
    p.add_argument("--samples", type=int, default=10_000, help="samples in all (80%% train)")
    p.add_argument("--partition", default="dirichlet:0.5",
                   help="iid, dirichlet:ALPHA or shards:N (label skew across devices)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_write)


def _write(args: argparse.Namespace) -> int:
    import numpy as np

    from broker_bridge import atomic_write, check_id
    from device_profiles import ConfigError
    from edge_runtime._datasets import load_mnist1d
    from edge_runtime._fleet import partition

    ids = [check_id(d.strip(), what="device id") for d in args.devices.split(",") if d.strip()]
    if not ids:
        raise ConfigError("--devices names no device")
    data = load_mnist1d(num_samples=args.samples)
    parts = partition(data.y_train, len(ids), args.partition, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(name: str, x: Any, y: Any) -> None:
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y)
        atomic_write(args.out / f"{name}.npz", buf.getvalue())
        print(f"wrote {args.out / name}.npz: {len(y)} samples")

    for device, idx in zip(ids, parts, strict=True):
        save(device, data.x_train[idx], data.y_train[idx])
    save("test", data.x_test, data.y_test)
    return 0
