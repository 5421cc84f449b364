"""Byte-exact conformance vectors (docs/vectors/), made by the implementation.

``make_vectors()`` returns every file of docs/vectors/ by name; tests/conformance.py
writes them and tests/broker_bridge/test_vectors.py checks them both ways (regenerated
byte for byte, and decoded by the implementation into the values they document). Everything here is
fixed: ids, transfer ids, seeds, the run secret. Files are JSON with hex strings, plus
raw ``.bin`` payloads (what an MQTT PUBLISH carries) and the tiny model's artifact files,
so an agent in another language can read them with nothing but a JSON parser.

Floats are given as little-endian float32 hex (authoritative) and as decimal numbers
(the exact value of each float32, for reading).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any

import numpy as np
import zstandard
from conformance import dump_json
from secagg_vectors import secagg_vectors

from broker_bridge import (
    PROTOCOL_VERSION,
    Ack,
    BodyHeader,
    Cancel,
    Chunk,
    CodecSpec,
    Eligibility,
    ErrorReport,
    Hello,
    InclusionProof,
    Kind,
    Layout,
    Message,
    ModelMeta,
    ModelVersion,
    Request,
    SignedBody,
    TaskSpec,
    Topics,
    TreeHead,
    UpdateMeta,
    content_hash,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    inclusion_path,
    leaf_hash,
    message_statement,
    model_message,
    pack_bundle,
    presence_message,
    root_hash,
    sign_update,
    split_message,
    tree_head_bytes,
    update_message,
    weights_hash,
)
from broker_bridge._envelope import HEADER_SIZE
from broker_bridge._secagg_msg import Advertise, secagg_message
from broker_bridge._signing import CONTEXT
from device_profiles import get_profile

FLEET = "demo"
DEVICE = "pi-01"
TRANSFER_ID = 0x0123456789ABCDEF
RUN_ID = "5eed5eed5eed5eed"
RUN_SECRET = bytes(range(32))
SEED = 1234
"""The rng seed of every ``:sr`` (stochastic rounding) encoding."""

LAYOUT = Layout(tensors=(("fc.weight", (4, 3)), ("fc.bias", (4,)), ("temperature", ())))
"""17 parameters: a matrix, a vector and a scalar (ndim 0); blocks of 4 leave a short one."""

SPARSIFIERS = ("", "topk:0.25", "topk:3", "topk:0.5:per_tensor", "thresh:0.05")
VALUE_CODINGS = ("fp32", "fp16", "q8", "q8:block=4", "q8:sr", "q4", "q4:block=4:sr", "tern",
                 "tern:sr", "q1", "q1:sr", "q1:block=4")
COMPRESSION = ("", "zstd:3")
ERROR_FEEDBACK = ("ef+topk:0.25+q8", "ef+q1+zstd:1")
MODEL_SPECS = ("fp32", "fp16", "q8:block=4+zstd:3", "topk:0.5+q8")
DELTA_SPECS = ("fp32", "topk:0.25+fp16")


def f32_hex(values: Any) -> str:
    return np.asarray(values, dtype="<f4").tobytes().hex()


def f32_list(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def update_values() -> np.ndarray:
    """The update every codec vector encodes (distinct magnitudes: no top-k ties)."""
    return (np.random.default_rng(0).standard_normal(LAYOUT.size) * 0.1).astype(np.float32)


def model_weights(version: int) -> np.ndarray:
    return (np.random.default_rng(100 + version).standard_normal(LAYOUT.size)
            * 0.5).astype(np.float32)


# -- CRC and layout ---------------------------------------------------------------------------


def crc_vector() -> dict[str, Any]:
    return {
        "description": "CRC-32 as in zlib, PNG and Ethernet (CRC-32/ISO-HDLC): polynomial "
                       "0x04C11DB7 reflected (0xEDB88320), initial value 0xFFFFFFFF, input and "
                       "output reflected, final XOR 0xFFFFFFFF. The check value is the CRC of "
                       "the nine ASCII bytes '123456789'.",
        "check_input_ascii": "123456789",
        "check_value": f"0x{zlib.crc32(b'123456789'):08x}",
        "examples": [
            {"input_hex": data.hex(), "crc32": f"0x{zlib.crc32(data):08x}"}
            for data in (b"", b"\x00", b"FL", bytes(range(64)))
        ],
    }


def layout_vector() -> dict[str, Any]:
    raw = LAYOUT.to_bytes()
    entries = raw[9:]
    return {
        "description": "Layout.to_bytes of the layout every codec vector uses, and its "
                       "fingerprint: the first 8 bytes of SHA-256 over the entries (the bytes "
                       "from offset 9 on).",
        "tensors": [{"name": n, "shape": list(s)} for n, s in LAYOUT.tensors],
        "size": LAYOUT.size,
        "layout_hex": raw.hex(),
        "layout_file": "layout.bin",
        "entries_hex": entries.hex(),
        "entries_sha256": hashlib.sha256(entries).hexdigest(),
        "fingerprint_hex": LAYOUT.fingerprint.hex(),
    }


# -- codec bodies ------------------------------------------------------------------------------


def _header_fields(body: bytes) -> dict[str, Any]:
    h, start = BodyHeader.from_prefix(body)
    return {"body_kind": int(h.kind), "spec": str(h.spec), "fingerprint_hex": h.fingerprint.hex(),
            "n": h.size, "k": h.count, "index_coding": h.index_coding,
            "index_bytes": h.index_bytes, "base_version": h.base_version,
            "header_bytes": start}


def _payload(body: bytes, spec: CodecSpec) -> bytes:
    start = _header_fields(body)["header_bytes"]
    rest = body[start:]
    return zstandard.ZstdDecompressor().decompress(rest) if spec.zstd_level is not None else rest


def codec_vectors() -> dict[str, Any]:
    x = update_values()
    updates = []
    specs = [("+".join(p for p in (s, v, z) if p)) for s in SPARSIFIERS for v in VALUE_CODINGS
             for z in COMPRESSION]
    for text in [*specs, *ERROR_FEEDBACK]:
        spec = CodecSpec.parse(text)
        encoded = encode_update(x, LAYOUT, spec, rng=SEED if spec.values.stochastic else None)
        decoded = decode_update(encoded.body, LAYOUT)
        np.testing.assert_array_equal(decoded, encoded.sent)
        updates.append({
            "spec": text, "canonical_spec": str(spec), "rng_seed": SEED
            if spec.values.stochastic else None,
            "header": _header_fields(encoded.body),
            "payload_hex": _payload(encoded.body, spec).hex(),
            "body_hex": encoded.body.hex(),
            "decoded_f32_hex": f32_hex(decoded),
            "decoded": f32_list(decoded),
        })
    models = []
    w = model_weights(6)
    for text in MODEL_SPECS:
        spec = CodecSpec.parse(text)
        body = encode_model(w, LAYOUT, spec)
        decoded = decode_model(body, LAYOUT)
        models.append({"spec": text, "canonical_spec": str(spec), "base": None,
                       "header": _header_fields(body),
                       "payload_hex": _payload(body, spec).hex(), "body_hex": body.hex(),
                       "decoded_f32_hex": f32_hex(decoded),
                       "model_hash": weights_hash(decoded)})
    base = ModelVersion(version=5, weights=model_weights(5))
    for text in DELTA_SPECS:
        spec = CodecSpec.parse(text)
        body = encode_model(w, LAYOUT, spec, base=base)
        decoded = decode_model(body, LAYOUT, base=base)
        models.append({"spec": text, "canonical_spec": str(spec),
                       "base": {"version": 5, "weights_f32_hex": f32_hex(base.weights),
                                "model_hash": weights_hash(base.weights)},
                       "header": _header_fields(body),
                       "payload_hex": _payload(body, spec).hex(), "body_hex": body.hex(),
                       "decoded_f32_hex": f32_hex(decoded),
                       "model_hash": weights_hash(decoded)})
    return {
        "description": "Codec bodies (PROTOCOL.md section 6) on the layout of layout.json. "
                       "'decoded_f32_hex' is what a decoder must produce, exactly. An encoder "
                       "of a deterministic spec (no ':sr') must produce 'payload_hex' exactly; "
                       "a zstd frame's bytes depend on the compressor (compare its content), "
                       "and ':sr' depends on the random numbers drawn (rng_seed is numpy's "
                       "default_rng). model_hash: sha256 of the decoded float32 little-endian "
                       "bytes.",
        "layout": "layout.json",
        "update_f32_hex": f32_hex(x),
        "update": f32_list(x),
        "updates": updates,
        "model_weights_f32_hex": f32_hex(w),
        "models": models,
    }


# -- messages ----------------------------------------------------------------------------------


TOPICS = Topics(fleet=FLEET)


def _nonce(task_round: int) -> str:
    from cloud_aggregator._startup import task_nonce

    return task_nonce(RUN_SECRET, fleet=FLEET, task_round=task_round, device=DEVICE)


def _messages(artifacts_bundle: bytes, artifacts_hash: str) -> list[tuple[str, str, bool,
                                                                          Message, str]]:
    """(name, topic, retained, message, what it shows) of one message of each kind."""
    x = update_values()
    w = model_weights(6)
    update_spec = CodecSpec.parse("topk:0.25+q8")
    model_spec = CodecSpec.parse("fp16")
    meta = UpdateMeta(num_samples=83, steps=3, nonce=_nonce(7), train_loss=1.71875,
                      duration_s=0.40625)
    task = TaskSpec(round=7, model_version=6, artifacts_hash=artifacts_hash,
                    model_hash=weights_hash(w), nonce=_nonce(7), run=RUN_ID,
                    codec=str(update_spec), epochs=1, batch_size=32, lr=0.05, max_steps=None,
                    deadline_s=60.0, seed=1234, evaluate=False, num_classes=2)
    hello = Hello(agent="fleetlearn/0.1.0", profile=get_profile("pi4").to_dict(),
                  eligibility=Eligibility(eligible=True, reasons=[], free_memory_mb=812.0,
                                          battery_percent=64.0, charging=True, metered=False,
                                          idle=True).to_dict(),
                  num_samples=83, artifacts_hash=artifacts_hash, model_versions=[5, 6],
                  busy_round=None)
    model_body = encode_model(w, LAYOUT, model_spec)
    model_meta = ModelMeta(run=RUN_ID, model_version=6,
                           model_hash=weights_hash(decode_model(model_body, LAYOUT)))
    t = TRANSFER_ID
    d = DEVICE
    return [
        ("presence_online", TOPICS.presence(d), True,
         dataclasses.replace(presence_message(fleet=FLEET, device=d, status="online"),
                             transfer_id=t), "retained, on each connect"),
        ("presence_offline_will", TOPICS.presence(d), True,
         dataclasses.replace(presence_message(fleet=FLEET, device=d, status="offline"),
                             transfer_id=t),
         "retained: the device's last will, or sent on leaving"),
        ("hello", TOPICS.up(d, "hello"), False,
         hello.to_message(fleet=FLEET, device=d, transfer_id=t), "after each connect"),
        ("task", TOPICS.down(d, "task"), False,
         task.to_message(fleet=FLEET, device=d, round=7, model_version=6, transfer_id=t),
         "envelope round and model_version equal the body's"),
        ("task_ack", TOPICS.up(d, "ack"), False,
         Ack(round=7, attempt=0, what="task", status="accepted").to_message(
             fleet=FLEET, device=d, round=7, attempt=0, transfer_id=t), "device accepts"),
        ("request_model", TOPICS.up(d, "request"), False,
         Request(want="model", model_version=6, model_hash=task.model_hash,
                 artifacts_hash=artifacts_hash, have_versions=[5]).to_message(
             fleet=FLEET, device=d, round=7, model_version=6, transfer_id=t),
         "kind control from a device"),
        ("request_artifacts", TOPICS.up(d, "request"), False,
         Request(want="artifacts", artifacts_hash=artifacts_hash).to_message(
             fleet=FLEET, device=d, round=7, transfer_id=t), "kind control from a device"),
        ("artifacts", TOPICS.down(d, "artifacts"), False,
         Message(kind=Kind.ARTIFACTS, fleet=FLEET, device=d, codec="zip",
                 body=artifacts_bundle, model_version=6, transfer_id=t),
         "the bundle of tiny_artifacts.json's files (tiny_artifacts.zip)"),
        ("model_broadcast", TOPICS.broadcast("model"), False,
         dataclasses.replace(model_message(fleet=FLEET, meta=model_meta,
                                           codec=str(model_spec), codec_body=model_body),
                             transfer_id=t),
         "published once per version; device id empty on broadcast topics"),
        ("model_to_device", TOPICS.down(d, "model"), False,
         dataclasses.replace(model_message(fleet=FLEET, meta=model_meta,
                                           codec=str(model_spec), codec_body=model_body,
                                           device=d), transfer_id=t),
         "the same model, asked for by one device"),
        ("update", TOPICS.up(d, "update"), False,
         dataclasses.replace(update_message(
             fleet=FLEET, device=d, round=7, model_version=6, attempt=0,
             codec=str(update_spec), meta=meta,
             codec_body=encode_update(x, LAYOUT, update_spec).body), transfer_id=t),
         "u32 meta_len | UpdateMeta JSON | codec body"),
        ("update_ack_accepted", TOPICS.down(d, "ack"), False,
         Ack(round=7, attempt=0, what="update", status="accepted").to_message(
             fleet=FLEET, device=d, round=7, model_version=6, attempt=0, transfer_id=t),
         "envelope round, model_version and attempt are the update's"),
        ("update_ack_duplicate", TOPICS.down(d, "ack"), False,
         Ack(round=7, attempt=0, what="update", status="duplicate",
             reason="already_counted: attempt 0 counts in round 7").to_message(
             fleet=FLEET, device=d, round=7, model_version=6, attempt=0, transfer_id=t),
         "the same update again, in or after its round"),
        ("update_ack_rejected", TOPICS.down(d, "ack"), False,
         Ack(round=7, attempt=1, what="update", status="rejected",
             reason="norm_above_median: norm 12.5 > 4 x median 0.3").to_message(
             fleet=FLEET, device=d, round=7, model_version=6, attempt=1, transfer_id=t),
         "reason = '<code>: <detail>'"),
        ("cancel", TOPICS.down(d, "cancel"), False,
         Cancel(round=7, reason="round closed: target reached").to_message(
             fleet=FLEET, device=d, round=7, transfer_id=t), "stop working on round 7"),
        ("error", TOPICS.up(d, "error"), False,
         ErrorReport(round=7, code="data", message="class labels range over [0, 11]; "
                     "the model has 2 classes").to_message(
             fleet=FLEET, device=d, round=7, transfer_id=t), "a typed device failure"),
        ("secagg_advertise", TOPICS.up(d, "secagg"), False,
         dataclasses.replace(secagg_message(secagg_advertise(), fleet=FLEET, device=d),
                             transfer_id=t),
         "a secure-aggregation body (section 11): a device's keys for round 7"),
        ("roll_call", TOPICS.broadcast("control"), False,
         Request(want="hello").to_message(fleet=FLEET, transfer_id=t),
         "the aggregator asks who is there"),
        ("ledger_tree_head", TOPICS.broadcast("ledger"), True,
         _LEDGER["head"].to_message(fleet=FLEET, transfer_id=t),
         "the training ledger's signed tree head (ledger.json)"),
        ("inclusion_proof", TOPICS.down(d, "proof"), False,
         _LEDGER["proof"].to_message(fleet=FLEET, device=d, round=7, transfer_id=t),
         "the device's update of round 7 is in ledger entry 1 (ledger.json)"),
    ]


def secagg_advertise() -> Advertise:
    """A key advertisement with fixed keys (secagg.json has a whole round)."""
    return Advertise(round=7, session=bytes(range(16)), share_public=bytes(range(32)),
                     mask_public=bytes(range(32, 64)), seed_commitment=bytes(range(64, 96)))


def _chunk_fields(payload: bytes) -> dict[str, Any]:
    c = Chunk.from_bytes(payload)
    strings_end = HEADER_SIZE + len(c.codec) + len(c.fleet.encode()) + len(c.device.encode())
    return {
        "magic_hex": payload[:2].hex(), "version": payload[2], "kind": int(c.kind),
        "kind_name": c.kind.topic_name, "flags": payload[4], "codec": c.codec,
        "fleet": c.fleet, "device": c.device, "round": c.round,
        "model_version": c.model_version, "attempt": c.attempt,
        "transfer_id": f"0x{c.transfer_id:016x}", "chunk_index": c.chunk_index,
        "chunk_count": c.chunk_count, "total_length": c.total_length, "offset": c.offset,
        "chunk_length": len(c.data), "body_crc32": f"0x{c.body_crc32:08x}",
        "header_crc32": f"0x{int.from_bytes(payload[60:64], 'little'):08x}",
        "header_crc_input_hex": (payload[:60] + payload[64:strings_end]).hex(),
    }


def envelope_vectors(bundle: bytes, artifacts_hash: str) -> tuple[dict[str, Any],
                                                                    dict[str, bytes]]:
    out, files = [], {}
    for name, topic, retained, message, note in _messages(bundle, artifacts_hash):
        (payload,) = split_message(message, max_payload=len(message.body) + 4096)
        body = message.body
        entry: dict[str, Any] = {
            "name": name, "topic": topic, "retained": retained, "note": note,
            "header": _chunk_fields(payload),
            "body_length": len(body),
        }
        if message.codec == "json":
            entry["body_json"] = json.loads(body)
            entry["body_hex"] = body.hex()
        elif message.kind == Kind.SECAGG:
            entry["body_hex"] = body.hex()
        elif message.kind in (Kind.UPDATE, Kind.MODEL):
            (n,) = np.frombuffer(body[:4], dtype="<u4")
            entry["meta_length"] = int(n)
            entry["meta_json"] = json.loads(body[4:4 + int(n)])
            entry["codec_body_hex"] = body[4 + int(n):].hex()
        else:
            entry["body_sha256"] = hashlib.sha256(body).hexdigest()
        entry["payload_file"] = f"envelope_{name}.bin"
        if len(payload) <= 4096:
            entry["payload_hex"] = payload.hex()
        files[entry["payload_file"]] = payload
        out.append(entry)
    return {
        "description": "One message of each kind, each one chunk (PROTOCOL.md sections 3 and "
                       "4). 'payload_file' holds the exact MQTT payload. The header's "
                       "crc32 is the CRC-32 of 'header_crc_input_hex' (header bytes 0-59 "
                       "then the codec, fleet and device strings); body_crc32 is the CRC-32 "
                       "of the whole body. Kind 10 (eval) is reserved and never sent.",
        "fleet": FLEET, "device": DEVICE, "messages": out,
    }, files


def chunk_vectors() -> tuple[dict[str, Any], dict[str, bytes]]:
    layout = Layout(tensors=(("w", (600,)),))
    x = (np.arange(600, dtype=np.float32) - 300) / 1000
    meta = UpdateMeta(num_samples=40, steps=2, nonce=_nonce(8), train_loss=0.5, duration_s=0.25)
    message = update_message(fleet=FLEET, device=DEVICE, round=8, model_version=7, attempt=2,
                             codec="fp32", meta=meta,
                             codec_body=encode_update(x, layout, CodecSpec.parse("fp32")).body)
    message = dataclasses.replace(message, transfer_id=TRANSFER_ID)
    overhead = HEADER_SIZE + len("fp32") + len(FLEET) + len(DEVICE)
    max_payload = overhead + 1024
    payloads = split_message(message, max_payload=max_payload)
    files = {f"chunk_{i}.bin": p for i, p in enumerate(payloads)}
    return {
        "description": "One update split in chunks (PROTOCOL.md section 3, Chunking) with a "
                       "payload limit of max_payload bytes (1024 bytes of body per chunk). The "
                       "chunks share transfer_id, total_length and body_crc32; chunk i carries "
                       "body bytes [offset, offset + chunk_length). A receiver must accept them "
                       "in any order and more than once.",
        "max_payload": max_payload,
        "layout": {"tensors": [{"name": "w", "shape": [600]}],
                   "fingerprint_hex": layout.fingerprint.hex()},
        "body_hex": message.body.hex(),
        "body_crc32": f"0x{zlib.crc32(message.body):08x}",
        "chunks": [{"file": f"chunk_{i}.bin", "header": _chunk_fields(p), "payload_hex": p.hex()}
                   for i, p in enumerate(payloads)],
    }, files


# -- artifacts, nonce ----------------------------------------------------------------------------


def tiny_model() -> Any:
    """A 3-input, 2-class linear model built with onnx.helper (no torch)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((3, 2)) * 0.1).astype(np.float32),
                                     "fc.weight")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "fc.bias")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"],
                                                ["logits"])], "tiny", [x], [y], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def artifact_vectors() -> tuple[dict[str, Any], dict[str, bytes], bytes, str]:
    import tempfile
    from pathlib import Path

    from cloud_aggregator._artifacts import build_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        build_artifacts(tiny_model(), out)
        manifest_bytes = (out / "artifacts.json").read_bytes()
        manifest = json.loads(manifest_bytes)
        data = {name: (out / name).read_bytes() for name in manifest["files"]}
    files = {f"tiny_{name}": blob for name, blob in data.items()}
    files["tiny_artifacts.json"] = manifest_bytes
    bundle = pack_bundle({**data, "artifacts.json": manifest_bytes})
    files["tiny_artifacts.zip"] = bundle
    text = "".join(f"{n} {manifest['files'][n]}\n" for n in sorted(manifest["files"]))
    assert content_hash(manifest["files"]) == manifest["content_hash"]
    vector = {
        "description": "Portable training artifacts of a 3-input, 2-class linear model "
                       "(PROTOCOL.md section 8): the manifest exactly as built "
                       "(tiny_artifacts.json), each listed file as tiny_<name>, and the "
                       "bundle a device receives (tiny_artifacts.zip). content_hash is the "
                       "SHA-256 of content_hash_input (one '<name> <sha256>\\n' line per listed "
                       "file, names in byte order).",
        "manifest_file": "tiny_artifacts.json",
        "bundle_file": "tiny_artifacts.zip",
        "files": {name: {"file": f"tiny_{name}", "sha256": hashlib.sha256(blob).hexdigest(),
                         "bytes": len(blob)} for name, blob in sorted(data.items())},
        "content_hash_input": text,
        "content_hash": manifest["content_hash"],
        "initial_parameters_f32_hex": data["parameters.f32"].hex(),
    }
    return vector, files, bundle, manifest["content_hash"]


def nonce_vector() -> dict[str, Any]:
    return {
        "description": "How the reference aggregator makes a task's nonce (devices only echo "
                       "it; any 8-64 ASCII characters that are hard to guess will do): the "
                       "first 32 hex digits of HMAC-SHA256(run secret, "
                       "'task/<fleet>/<task round>/<device>').",
        "run_secret_hex": RUN_SECRET.hex(),
        "cases": [{"fleet": FLEET, "task_round": r, "device": DEVICE,
                   "message": f"task/{FLEET}/{r}/{DEVICE}", "nonce": _nonce(r)}
                  for r in (1, 7, 4294967295)],
    }


# -- signed updates ------------------------------------------------------------------------------

SIGNING_SEED = bytes(range(32, 64))
"""The RFC 8032 private seed of the vectors' device key (a test key: never use it)."""


def _statement_fields(message: Message, digest: bytes) -> list[dict[str, Any]]:
    """The statement of ``message``, field by field: offset, size, value, bytes."""
    out: list[dict[str, Any]] = []
    at = 0

    def add(name: str, raw: bytes, value: Any) -> None:
        nonlocal at
        out.append({"field": name, "offset": at, "size": len(raw), "value": value,
                    "hex": raw.hex()})
        at += len(raw)

    for name, text in (("context", CONTEXT.decode()), ("fleet", message.fleet),
                       ("device", message.device)):
        raw = text.encode()
        add(f"{name}_len", bytes([len(raw)]), len(raw))
        add(name, raw, text)
    add("round", message.round.to_bytes(4, "little"), message.round)
    add("model_version", message.model_version.to_bytes(4, "little"), message.model_version)
    add("attempt", message.attempt.to_bytes(2, "little"), message.attempt)
    codec = message.codec.encode()
    add("codec_len", bytes([len(codec)]), len(codec))
    add("codec", codec, message.codec)
    add("body_sha256", digest, digest.hex())
    return out


def signature_vector() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    spec = CodecSpec.parse("topk:0.25+q8")
    meta = UpdateMeta(num_samples=40, steps=2, nonce=_nonce(7), train_loss=0.5,
                      duration_s=0.25)
    unsigned = dataclasses.replace(update_message(
        fleet=FLEET, device=DEVICE, round=7, model_version=6, attempt=1, codec=str(spec),
        meta=meta, codec_body=encode_update(update_values(), LAYOUT, spec).body),
        transfer_id=TRANSFER_ID)
    digest = hashlib.sha256(unsigned.body).digest()
    signed = sign_update(unsigned, public_key=public, sign=key.sign)
    state = message_statement(unsigned, digest)
    signed_body = SignedBody.from_bytes(signed.body)
    assert signed_body is not None
    others = [("round + 1", {"round": 8}), ("attempt + 1", {"attempt": 2}),
              ("model_version + 1", {"model_version": 7}), ("another device", {"device": "pi-02"}),
              ("another fleet", {"fleet": "demo2"}), ("another codec", {"codec": "fp32"})]
    (payload,) = split_message(signed, max_payload=1 << 17)
    return {
        "description": "A signed update (PROTOCOL.md section 5.2). The device's Ed25519 key "
                       "is made from private_seed_hex (RFC 8032); the statement is the "
                       "canonical bytes it signs (field by field below: u8 length before each "
                       "string, little-endian integers, then the SHA-256 of the update body "
                       "u32 meta_len | meta | codec body). The signed body is 'FLSG' | u8 "
                       "scheme 1 | public key | signature | update body; payload_hex is the "
                       "whole MQTT payload. Ed25519 signatures are deterministic: yours must "
                       "equal signature_hex. Each of must_not_verify is the statement with one "
                       "field changed: signature_hex must not verify over it.",
        "private_seed_hex": SIGNING_SEED.hex(),
        "public_key_hex": public.hex(),
        "public_key_text": "ed25519:" + public.hex(),
        "envelope": {"fleet": FLEET, "device": DEVICE, "round": 7, "model_version": 6,
                     "attempt": 1, "codec": str(spec)},
        "update_body_hex": unsigned.body.hex(),
        "body_sha256_hex": digest.hex(),
        "statement_fields": _statement_fields(unsigned, digest),
        "statement_hex": state.hex(),
        "signature_hex": signed_body.signature.hex(),
        "signed_body_hex": signed.body.hex(),
        "payload_hex": payload.hex(),
        "must_not_verify": [
            {"changed": why, "statement_hex": message_statement(
                dataclasses.replace(unsigned, **change), digest).hex()}
            for why, change in others],
    }


# -- the training ledger -------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _ledger() -> dict[str, Any]:
    """A three-entry ledger signed with a fixed key; entry 1 counts DEVICE's round-7 update."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ledger vector key").digest())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    records = [_canonical({"attempt": 0, "body_sha256": None, "cut": 1.0, "device": dev,
                           "digest": hashlib.sha256(f"update of {dev}".encode()).hexdigest(),
                           "norm": 0.5 + i, "position": i, "round": 7, "scale": 1.0,
                           "signature": None, "weight": 32.0})
               for i, dev in enumerate(["pi-001", DEVICE, "pi-003"])]
    headers, leaves = [], []
    prev = "0" * 64
    for index in range(3):
        lines = records if index == 1 else []
        header = _canonical({
            "accepted_count": len(lines),
            "accepted_root": root_hash([leaf_hash(r) for r in lines]).hex(),
            "at": 1700000000.0 + index, "details_sha256": hashlib.sha256(b"{}").hexdigest(),
            "fleet": FLEET, "index": index, "model": hashlib.sha256(b"m%d" % (index + 1))
            .hexdigest(), "model_version": index + 1, "outcome": "closed",
            "prev_entry": prev, "prev_model": hashlib.sha256(b"m%d" % index).hexdigest(),
            "round": index + 6, "rule": {"optimizer": {"lr": 1.0, "name": "fedavg"},
                                         "robust": {"byzantine": 0, "clip_norm": None,
                                                    "method": "mean", "multi_krum_m": None,
                                                    "trim_fraction": 0.1},
                                         "strategy": "sync"},
            "v": 1})
        headers.append(header)
        leaves.append(leaf_hash(header))
        prev = leaves[-1].hex()
    root = root_hash(leaves)
    stamp = 1700000003000
    signed = tree_head_bytes(fleet=FLEET, size=3, timestamp_ms=stamp, root=root)
    signature = key.sign(signed)
    head = TreeHead(size=3, timestamp_ms=stamp, root=root.hex(), signature=signature.hex(),
                    key=public.hex())
    proof = InclusionProof(
        round=7, index=1, entry=headers[1].decode(), update=records[1].decode(),
        entry_path=[h.hex() for h in inclusion_path(1, leaves)], update_index=1,
        update_path=[h.hex() for h in inclusion_path(1, [leaf_hash(r) for r in records])],
        size=3, timestamp_ms=stamp, root=root.hex(), signature=signature.hex())
    vector = {
        "description": "The training ledger (docs/PROTOCOL.md section 4, tree_head and "
                       "inclusion_proof): leaf = SHA-256(0x00 || data), node = SHA-256(0x01 "
                       "|| left || right) (RFC 6962); the tree head signature is Ed25519 "
                       "over signed_bytes. The device pi-01 checks proof: its record is "
                       "leaf update_index of the tree of the entry's accepted_count records "
                       "whose root is the entry's accepted_root; the entry is leaf index of "
                       "the ledger's tree of size; signature verifies with public_key.",
        "fleet": FLEET, "public_key_hex": public.hex(),
        "entry_headers": [h.decode() for h in headers],
        "entry_leaf_hashes": [h.hex() for h in leaves],
        "accepted_records_of_entry_1": [r.decode() for r in records],
        "root_hex": root.hex(), "signed_bytes_hex": signed.hex(),
        "signature_hex": signature.hex(), "proof": proof.to_dict(),
    }
    return {"head": head, "proof": proof, "vector": vector}


_LEDGER = _ledger()


# -- all files -----------------------------------------------------------------------------------


def make_vectors() -> dict[str, bytes]:
    artifacts, artifact_files, bundle, artifacts_hash = artifact_vectors()
    envelopes, envelope_files = envelope_vectors(bundle, artifacts_hash)
    chunks, chunk_files = chunk_vectors()
    files: dict[str, bytes] = {
        "crc32.json": dump_json(crc_vector()),
        "layout.json": dump_json(layout_vector()),
        "layout.bin": LAYOUT.to_bytes(),
        "codec.json": dump_json(codec_vectors()),
        "envelopes.json": dump_json(envelopes),
        "chunks.json": dump_json(chunks),
        "artifacts.json": dump_json(artifacts),
        "nonce.json": dump_json(nonce_vector()),
        "ledger.json": dump_json(_LEDGER["vector"]),
        "signature.json": dump_json(signature_vector()),
        "secagg.json": dump_json(secagg_vectors()),
        **envelope_files, **chunk_files, **artifact_files,
    }
    index = {
        "description": "fleetlearn protocol 2 conformance vectors; docs/PROTOCOL.md section 10 "
                       "says how to use them. Made by tests/vectors.py from the reference "
                       "implementation (python tests/conformance.py --write).",
        "protocol": PROTOCOL_VERSION, "envelope_version": 1, "codec_body_version": 1,
        "layout_version": 1,
        "files": sorted(files),
    }
    files["index.json"] = dump_json(index)
    return files
