"""docs/vectors/ against the implementation, both ways (issue 12, item 16).

1. The files are what tests/vectors.py makes from the implementation, byte for byte (a
   zstd frame may differ with the compressor's version: then its content must not).
2. Read back with the implementation's decoders, every vector says what it documents:
   header fields and CRCs, chunk sets in any order, codec bodies to the exact float32
   values, the layout fingerprint, the artifact manifest and its content hash, the task
   nonce and model hash constructions. These checks read only the files, as an agent
   in another language would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from conformance import VECTOR_DIR, differences, vector_files
from schema_validator import Validator

from broker_bridge import (
    Chunk,
    CodecSpec,
    EnvelopeError,
    Kind,
    Layout,
    Message,
    ModelVersion,
    Reassembler,
    Topics,
    content_hash,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    message_schemas,
    read_header,
    read_model_message,
    schema_id,
    unpack_bundle,
    unpack_update_body,
    weights_hash,
)
from broker_bridge._schema import MESSAGES
from broker_bridge._secagg_msg import read_secagg
from cloud_aggregator._startup import task_nonce
from edge_runtime._manifest import check_manifest

VALIDATOR = Validator(message_schemas())


def load(name: str) -> Any:
    return json.loads((VECTOR_DIR / name).read_text())


def raw(name: str) -> bytes:
    return (VECTOR_DIR / name).read_bytes()


def f32(hex_text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_text), dtype="<f4").astype(np.float32)


def vector_layout() -> Layout:
    spec = load("layout.json")
    return Layout(tensors=tuple((t["name"], tuple(t["shape"])) for t in spec["tensors"]))


# -- 1. regenerated ------------------------------------------------------------------------


def _without_zstd_frames(data: Any) -> Any:
    """codec.json with each zstd body cut to its header (its content is payload_hex)."""
    for group in ("updates", "models"):
        for v in data.get(group, []):
            if "zstd" in v["canonical_spec"]:
                v["body_hex"] = v["body_hex"][:2 * v["header"]["header_bytes"]]
    return data


def test_vector_files_are_what_the_implementation_makes() -> None:
    made = vector_files()
    problems = differences(VECTOR_DIR, made)
    if problems == ["codec.json: differs"]:
        # Only zstd frames may differ (another compressor version); their decompressed
        # payloads are in the file and must still be equal.
        ours = _without_zstd_frames(json.loads(made["codec.json"]))
        assert ours == _without_zstd_frames(load("codec.json")), "codec.json is out of date"
        return
    assert not problems, (f"docs/vectors/ is out of date ({problems}); run "
                          "`python tests/conformance.py --write` and review the diff")


# -- 2. decoded ------------------------------------------------------------------------------


def test_crc32_is_the_zlib_variant() -> None:
    v = load("crc32.json")
    assert f"0x{zlib.crc32(v['check_input_ascii'].encode()):08x}" == v["check_value"]
    assert v["check_value"] == "0xcbf43926"
    for case in v["examples"]:
        assert f"0x{zlib.crc32(bytes.fromhex(case['input_hex'])):08x}" == case["crc32"]


def test_layout_and_fingerprint() -> None:
    v = load("layout.json")
    layout = Layout.from_bytes(raw(v["layout_file"]))
    assert layout.to_bytes().hex() == v["layout_hex"]
    assert [{"name": n, "shape": list(s)} for n, s in layout.tensors] == v["tensors"]
    assert layout.size == v["size"]
    entries = bytes.fromhex(v["entries_hex"])
    assert hashlib.sha256(entries).hexdigest() == v["entries_sha256"]
    assert hashlib.sha256(entries).digest()[:8].hex() == v["fingerprint_hex"]
    assert layout.fingerprint.hex() == v["fingerprint_hex"]


def _check_header(payload: bytes, h: dict[str, Any]) -> Chunk:
    c = Chunk.from_bytes(payload)
    assert payload[:2].hex() == h["magic_hex"] == "464c" and payload[2] == h["version"] == 1
    assert (int(c.kind), c.kind.topic_name) == (h["kind"], h["kind_name"])
    assert (c.codec, c.fleet, c.device) == (h["codec"], h["fleet"], h["device"])
    assert (c.round, c.model_version, c.attempt) == (h["round"], h["model_version"],
                                                       h["attempt"])
    assert f"0x{c.transfer_id:016x}" == h["transfer_id"]
    assert (c.chunk_index, c.chunk_count, c.total_length, c.offset, len(c.data)) == (
        h["chunk_index"], h["chunk_count"], h["total_length"], h["offset"], h["chunk_length"])
    assert f"0x{c.body_crc32:08x}" == h["body_crc32"]
    crc_input = bytes.fromhex(h["header_crc_input_hex"])
    assert f"0x{zlib.crc32(crc_input):08x}" == h["header_crc32"]
    assert crc_input[:60] == payload[:60] and payload[60:64] == bytes.fromhex(
        h["header_crc32"][2:])[::-1]
    return c


def test_envelopes_decode_to_what_they_document() -> None:
    v = load("envelopes.json")
    layout = vector_layout()
    kinds = set()
    for m in v["messages"]:
        payload = raw(m["payload_file"])
        if "payload_hex" in m:
            assert payload.hex() == m["payload_hex"]
        c = _check_header(payload, m["header"])
        kinds.add(c.kind)
        body = c.data
        assert len(body) == m["body_length"] and zlib.crc32(body) == c.body_crc32
        owner = Topics(fleet=v["fleet"]).device_of(m["topic"])
        assert c.device == (owner or "")  # a device's topics carry its id, broadcast none
        assert m["topic"].rsplit("/", 1)[1] in (c.kind.topic_name, "request", "control",
                                                "presence")
        if c.codec == "json":
            body_json = json.loads(body)
            assert body_json == m["body_json"] and body.hex() == m["body_hex"]
            name = {Kind.CONTROL: "request", Kind.ERROR: "error", Kind.TASK: "task",
                    Kind.HELLO: "hello", Kind.ACK: "ack", Kind.CANCEL: "cancel",
                    Kind.PRESENCE: "presence", Kind.LEDGER: "tree_head",
                    Kind.PROOF: "inclusion_proof"}[c.kind]
            assert VALIDATOR.errors(body_json, schema_id(name)) == []
            MESSAGES[name].from_dict(body_json)
        elif c.kind == Kind.UPDATE:
            meta, codec_body = unpack_update_body(body)
            assert meta.to_dict() == m["meta_json"] and codec_body.hex() == m["codec_body_hex"]
            assert int.from_bytes(body[:4], "little") == m["meta_length"]
            assert decode_update(codec_body, layout).shape == (layout.size,)
        elif c.kind == Kind.MODEL:
            message = Message(kind=c.kind, fleet=c.fleet, device=c.device,
                              model_version=c.model_version, codec=c.codec, body=body)
            meta, codec_body = read_model_message(message)
            assert meta.to_dict() == m["meta_json"]
            assert weights_hash(decode_model(codec_body, layout)) == meta.model_hash
        elif c.kind == Kind.SECAGG:
            assert c.codec == "secagg" and body.hex() == m["body_hex"]
            parsed = read_secagg(Message(kind=c.kind, fleet=c.fleet, device=c.device,
                                         round=c.round, codec=c.codec, body=body))
            assert parsed.to_bytes() == body and parsed.round == c.round
        else:
            assert c.kind == Kind.ARTIFACTS and c.codec == "zip"
            assert hashlib.sha256(body).hexdigest() == m["body_sha256"]
            assert body == raw(load("artifacts.json")["bundle_file"])
    assert kinds == set(Kind) - {Kind.EVAL}  # every kind but the reserved one


def test_a_chunk_set_reassembles_in_any_order() -> None:
    v = load("chunks.json")
    payloads = [raw(c["file"]) for c in v["chunks"]]
    for c, payload in zip(v["chunks"], payloads, strict=True):
        assert payload.hex() == c["payload_hex"] and len(payload) <= v["max_payload"]
        _check_header(payload, c["header"])
    body = bytes.fromhex(v["body_hex"])
    assert f"0x{zlib.crc32(body):08x}" == v["body_crc32"]
    tiles = sorted((c["header"]["offset"], c["header"]["chunk_length"]) for c in v["chunks"])
    assert tiles[0][0] == 0 and sum(n for _, n in tiles) == len(body)
    rng = random.Random(0)
    for _ in range(5):
        order = payloads + payloads[:1]  # one chunk twice
        rng.shuffle(order)
        reassembler = Reassembler()
        done = [m for p in order if (m := reassembler.feed(Chunk.from_bytes(p))) is not None]
        assert len(done) == 1 and done[0].body == body
    meta, codec_body = unpack_update_body(body)
    assert meta.num_samples == 40 and meta.steps == 2
    layout = Layout(tensors=tuple((t["name"], tuple(t["shape"]))
                                  for t in v["layout"]["tensors"]))
    assert read_header(codec_body).fingerprint.hex() == v["layout"]["fingerprint_hex"]
    np.testing.assert_array_equal(decode_update(codec_body, layout),
                                  (np.arange(600, dtype=np.float32) - 300) / 1000)


def _payload_of(body: bytes, header: dict[str, Any], zstd: bool) -> bytes:
    rest = body[header["header_bytes"]:]
    return zstandard.ZstdDecompressor().decompress(rest) if zstd else rest


def test_codec_bodies_decode_to_their_exact_values() -> None:
    v = load("codec.json")
    layout = vector_layout()
    x = f32(v["update_f32_hex"])
    assert x.tolist() == v["update"]
    specs = set()
    for u in v["updates"]:
        body = bytes.fromhex(u["body_hex"])
        spec = CodecSpec.parse(u["spec"])
        assert str(spec) == u["canonical_spec"]
        h = read_header(body)
        assert (int(h.kind), str(h.spec), h.fingerprint.hex(), h.size, h.count,
                h.index_coding, h.index_bytes) == (
            0, u["header"]["spec"], u["header"]["fingerprint_hex"], u["header"]["n"],
            u["header"]["k"], u["header"]["index_coding"], u["header"]["index_bytes"])
        zstd = spec.zstd_level is not None
        assert _payload_of(body, u["header"], zstd).hex() == u["payload_hex"]
        decoded = decode_update(body, layout)
        assert decoded.astype("<f4").tobytes().hex() == u["decoded_f32_hex"]
        assert decoded.tolist() == u["decoded"]
        # An encoder of a deterministic spec makes the same payload (the zstd frame and
        # the random draws of :sr are the encoder's business).
        if not spec.values.stochastic:
            again = encode_update(x, layout, spec).body
            assert _payload_of(again, u["header"], zstd).hex() == u["payload_hex"]
        specs.add(u["canonical_spec"])
    codings = {u["header"]["index_coding"] for u in v["updates"]}
    assert codings == {0, 1, 2}  # dense, delta-varint and bitmap all appear
    for stage in ("topk", "thresh", "fp16", "q8", "q4", "tern", "q1", ":sr", "block=",
                  "zstd", "ef", "per_tensor"):
        assert any(stage in s for s in specs), stage
    w = f32(v["model_weights_f32_hex"])
    for m in v["models"]:
        body = bytes.fromhex(m["body_hex"])
        base = None
        if m["base"] is not None:
            base = ModelVersion(version=m["base"]["version"],
                                weights=f32(m["base"]["weights_f32_hex"]))
            assert weights_hash(base.weights) == m["base"]["model_hash"]
        h = read_header(body)
        assert int(h.kind) == m["header"]["body_kind"] == (1 if base is None else 2)
        assert h.base_version == m["header"]["base_version"]
        decoded = decode_model(body, layout, base=base)
        assert decoded.astype("<f4").tobytes().hex() == m["decoded_f32_hex"]
        assert hashlib.sha256(decoded.astype("<f4").tobytes()).hexdigest() == m["model_hash"]
        spec = CodecSpec.parse(m["spec"])
        again = encode_model(w, layout, spec, base=base)
        zstd = spec.zstd_level is not None
        assert _payload_of(again, m["header"], zstd).hex() == m["payload_hex"]


def test_artifacts_manifest_and_content_hash() -> None:
    v = load("artifacts.json")
    manifest = json.loads(raw(v["manifest_file"]))
    check_manifest(manifest)  # what a device checks before loading anything
    assert manifest["format"] == "fleetlearn-artifacts/2"
    files = {}
    for name, f in v["files"].items():
        data = raw(f["file"])
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        assert manifest["files"][name] == f["sha256"]
        files[name] = data
    assert set(files) == set(manifest["files"])
    text = "".join(f"{n} {manifest['files'][n]}\n" for n in sorted(manifest["files"]))
    assert text == v["content_hash_input"]
    assert hashlib.sha256(text.encode()).hexdigest() == v["content_hash"]
    assert content_hash(manifest["files"]) == manifest["content_hash"] == v["content_hash"]
    bundle = unpack_bundle(raw(v["bundle_file"]))
    assert bundle == {**files, "artifacts.json": raw(v["manifest_file"])}
    params = f32(v["initial_parameters_f32_hex"])
    shapes = [tuple(p["shape"]) for p in manifest["parameters"]]
    assert params.size == sum(int(np.prod(s)) for s in shapes) == manifest["num_parameters"]
    assert files[manifest["initial"]] == params.astype("<f4").tobytes()
    train = manifest["train"]
    assert [p["in"] for p in train["parameters"]] == [
        f"fl::in/{p['name']}" for p in manifest["parameters"]]


def test_task_nonce_construction() -> None:
    v = load("nonce.json")
    secret = bytes.fromhex(v["run_secret_hex"])
    for case in v["cases"]:
        message = f"task/{case['fleet']}/{case['task_round']}/{case['device']}"
        assert message == case["message"]
        by_hand = hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()[:32]
        assert by_hand == case["nonce"] == task_nonce(
            secret, fleet=case["fleet"], task_round=case["task_round"], device=case["device"])


def test_the_ledger_proof_verifies_from_the_file_alone() -> None:
    """What a device does with ledger.json's proof, with hashlib and the Ed25519 key only."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    v = load("ledger.json")
    p = v["proof"]

    def leaf(data: bytes) -> bytes:
        return hashlib.sha256(b"\x00" + data).digest()

    def climb(h: bytes, index: int, size: int, path: list[str]) -> bytes:
        fn, sn = index, size - 1  # RFC 9162 section 2.1.3.2
        for hexed in path:
            sib = bytes.fromhex(hexed)
            if fn & 1 or fn == sn:
                h = hashlib.sha256(b"\x01" + sib + h).digest()
                while not fn & 1 and fn:
                    fn, sn = fn >> 1, sn >> 1
            else:
                h = hashlib.sha256(b"\x01" + h + sib).digest()
            fn, sn = fn >> 1, sn >> 1
        assert sn == 0
        return h

    entry = json.loads(p["entry"])
    record = json.loads(p["update"])
    assert record["device"] == "pi-01" and record["round"] == p["round"] == 7
    assert climb(leaf(p["update"].encode()), p["update_index"], entry["accepted_count"],
                 p["update_path"]).hex() == entry["accepted_root"]
    root = climb(leaf(p["entry"].encode()), p["index"], p["size"], p["entry_path"])
    assert root.hex() == p["root"] == v["root_hex"]
    fleet = v["fleet"].encode()
    signed = (b"fleetlearn tree head v1\x00" + bytes([len(fleet)]) + fleet
              + p["size"].to_bytes(8, "little") + p["timestamp_ms"].to_bytes(8, "little")
              + root)
    assert signed.hex() == v["signed_bytes_hex"]
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(v["public_key_hex"])).verify(
        bytes.fromhex(p["signature"]), signed)
    assert [leaf(h.encode()).hex() for h in v["entry_headers"]] == v["entry_leaf_hashes"]
    for prev, header in zip(v["entry_leaf_hashes"], v["entry_headers"][1:], strict=False):
        assert json.loads(header)["prev_entry"] == prev  # the hash chain


def test_index_lists_every_file() -> None:
    index = load("index.json")
    on_disk = {p.name for p in Path(VECTOR_DIR).iterdir()} - {"index.json"}
    assert set(index["files"]) == on_disk
    assert index["protocol"] == 2


@pytest.mark.parametrize("name", ["envelope_update.bin", "chunk_1.bin"])
def test_a_corrupt_vector_is_refused(name: str) -> None:
    """The decoders the vectors are checked with do refuse a flipped bit."""
    payload = bytearray(raw(name))
    payload[10] ^= 0x01  # in the header: the header CRC no longer matches
    with pytest.raises(EnvelopeError, match="checksum"):
        Chunk.from_bytes(bytes(payload))


def test_signed_update_statement_and_signature() -> None:
    """signature.json, rebuilt by hand from its fields as another agent would (section 5.2)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    v = load("signature.json")
    env = v["envelope"]
    body = bytes.fromhex(v["update_body_hex"])
    digest = hashlib.sha256(body).digest()
    assert digest.hex() == v["body_sha256_hex"]

    def s8(text: str) -> bytes:
        return bytes([len(text.encode())]) + text.encode()

    by_hand = (s8("fleetlearn/update-signature/1") + s8(env["fleet"]) + s8(env["device"])
               + env["round"].to_bytes(4, "little") + env["model_version"].to_bytes(4, "little")
               + env["attempt"].to_bytes(2, "little") + s8(env["codec"]) + digest)
    assert by_hand.hex() == v["statement_hex"]
    assert b"".join(bytes.fromhex(f["hex"]) for f in v["statement_fields"]) == by_hand
    assert all(f["offset"] == sum(g["size"] for g in v["statement_fields"][:i])
               for i, f in enumerate(v["statement_fields"]))
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["private_seed_hex"]))
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert public.hex() == v["public_key_hex"] and v["public_key_text"] == "ed25519:" + public.hex()
    signature = bytes.fromhex(v["signature_hex"])
    assert key.sign(by_hand) == signature  # deterministic
    Ed25519PublicKey.from_public_bytes(public).verify(signature, by_hand)
    assert len(v["must_not_verify"]) >= 6
    for case in v["must_not_verify"]:
        with pytest.raises(InvalidSignature):
            Ed25519PublicKey.from_public_bytes(public).verify(
                signature, bytes.fromhex(case["statement_hex"]))
    signed = bytes.fromhex(v["signed_body_hex"])
    assert signed == b"FLSG" + bytes([1]) + public + signature + body
    assert int.from_bytes(signed[:4], "little") > 65536  # never read as a meta_len
    chunk = Chunk.from_bytes(bytes.fromhex(v["payload_hex"]))
    assert chunk.data == signed and chunk.kind == Kind.UPDATE
    assert (chunk.fleet, chunk.device, chunk.round, chunk.model_version, chunk.attempt,
            chunk.codec) == (env["fleet"], env["device"], env["round"], env["model_version"],
                             env["attempt"], env["codec"])
    meta, _ = unpack_update_body(signed)  # the signature block is skipped
    assert meta.nonce and meta.num_samples == 40
