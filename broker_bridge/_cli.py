"""``fleetlearn broker`` (run a local broker) and ``fleetlearn broker config``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker",
        help="run a local MQTT broker, or write a production Mosquitto configuration",
        description="Without a subcommand: run a broker on this machine until Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0: every interface)")
    p.add_argument("--kind", choices=["auto", "embedded", "mosquitto"], default="auto",
                   help="mosquitto: a child process; embedded: a pure-Python broker in this "
                        "process (a trial broker: no passwords, ACL, TLS or persistence); "
                        "auto (default): mosquitto when installed, else embedded")
    p.set_defaults(handler=_run_broker)
    bsub = p.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    c = bsub.add_parser(
        "config",
        help="write mosquitto.conf, a password file, an ACL, device credentials and the "
             "enrolment file",
        description=(
            "Writes a production Mosquitto configuration for one fleet: a listener (TLS "
            "optional), one credential per device, an ACL confining each device to its own "
            "topics, persistence, and queue limits sized for QoS 1 bursts."
        ),
    )
    c.add_argument("--out", type=Path, required=True, help="directory to write into")
    c.add_argument("--fleet", required=True, help="fleet id (topic prefix fl/<fleet>/)")
    c.add_argument("--devices", default="", help="comma-separated device ids")
    c.add_argument("--devices-file", type=Path, help="file with one device id per line")
    c.add_argument("--port", type=int, default=None, help="default 1883, or 8883 with TLS")
    c.add_argument("--bind", default="0.0.0.0")
    c.add_argument("--tls-cert", help="server certificate (PEM): enables TLS")
    c.add_argument("--tls-key", help="server private key (PEM)")
    c.add_argument("--tls-ca", help="CA bundle to verify client certificates")
    c.add_argument("--require-certificate", action="store_true",
                   help="devices must present a client certificate signed by --tls-ca")
    c.add_argument("--run-as", default=None, metavar="USER",
                   help="the user a root-started mosquitto becomes (default: mosquitto, "
                        "when that account exists); run as root, this gives it the files")
    c.set_defaults(handler=_write_config)


def _run_broker(args: argparse.Namespace) -> int:
    from broker_bridge._brokers import MosquittoProcess, local_broker_kind
    from broker_bridge._embedded import EMBEDDED_LIMITS, EmbeddedBroker

    broker: EmbeddedBroker | MosquittoProcess
    kind = local_broker_kind("mosquitto") if args.kind == "auto" else args.kind
    if kind == "mosquitto":
        broker = MosquittoProcess(host=args.host, port=args.port).start()
    else:
        print(f"fleetlearn: warning: {EMBEDDED_LIMITS}", flush=True)
        broker = EmbeddedBroker(host=args.host, port=args.port).start()
    print(f"fleetlearn broker ({kind}) listening on {broker.url}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def _write_config(args: argparse.Namespace) -> int:
    from broker_bridge._broker_files import TlsFiles, default_run_as
    from broker_bridge._brokers import write_broker_config
    from device_profiles import ConfigError

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.devices_file is not None:
        try:
            text = args.devices_file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read --devices-file: {exc}") from exc
        devices += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not devices:
        raise ConfigError("no devices given: use --devices a,b,c or --devices-file")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if args.require_certificate and not args.tls_ca:
            raise ConfigError("--require-certificate needs --tls-ca")
        tls = TlsFiles(certfile=args.tls_cert, keyfile=args.tls_key, cafile=args.tls_ca,
                       require_certificate=args.require_certificate)
    port = args.port or (8883 if tls else 1883)
    run_as = args.run_as or default_run_as()
    files = write_broker_config(args.out, fleet=args.fleet, devices=devices, port=port,
                                bind_address=args.bind, tls=tls, run_as_user=run_as)
    print(f"wrote {files.conf}\n      {files.passwd}\n      {files.acl}\n"
          f"      {files.credentials} (secret: one password per device and the aggregator;"
          " existing ones are kept)")
    print(f"      {files.enrolment} (each device's public key: fleetlearn devices enroll; "
          "give it to the aggregator with --enrolment)")
    if tls is not None:
        print(f"      {files.conf.parent / 'tls'}/ (copies of the certificate and key)")
    for note in files.notes:
        print(f"note: {note}")
    print(f"run: mosquitto -c {files.conf}")
    return 0
