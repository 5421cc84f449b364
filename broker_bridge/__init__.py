"""Everything on the wire: topics, envelope, chunking, the update codec, MQTT, brokers.

Where things live:

- ``_errors``: ``WireError`` and its kinds, ``TransportError``, ``BrokerUnavailable``,
  ``BrokerRefused``.
- ``_secagg``: secure aggregation's primitives (PRG, key agreement, Shamir, the
  neighbourhood graph, fixed point, the shared coordinate subset); ``_secagg_msg``: its
  messages; ``_secagg_device``: ``SecAggDevice`` (a device's side of a secure round);
  ``_skellam``: distributed DP's device side (L2 clip, conditional rounding, Skellam
  noise from the OS CSPRNG) and the setup's DP extension.
- ``_layout``: ``Layout`` (named float32 tensors <-> one flat vector, fingerprint).
- ``_codec``: ``encode_update``/``decode_update``, ``encode_model``/``decode_model``,
  ``ErrorFeedback``, ``ModelVersion``, ``BodyHeader`` (the update codec and its body
  format); ``_codec_spec``: ``CodecSpec``, ``TopK``, ``Threshold``, ``Quantize``.
- ``_topics``: ``Topics`` (the per-fleet, per-device topic layout), ``topic_matches``.
- ``_envelope``: ``Message``, ``Kind``, ``EnvelopeLimits``, ``split_message`` (the header).
- ``_chunking``: ``Reassembler``, ``ReassemblyLimits`` (bounded chunk reassembly).
- ``_transport``: ``Transport`` (interface), ``Will``, ``MemoryBroker``/``MemoryTransport``.
- ``_mqtt``: ``MqttTransport``, ``NetworkLoop`` (many clients, one thread), ``BrokerUrl``,
  ``TlsConfig`` (paho-mqtt 2.x); ``_refusal``: when a broker refuses a client for good.
- ``_channel``: ``Channel`` (whole messages over a transport, checked and reassembled),
  presence messages and the aggregator's ``roll_call``.
- ``_protocol``: typed control payloads (``Presence``, ``Hello``, ``Eligibility``,
  ``TaskSpec``, ``UpdateMeta``, ``Ack``, ``Cancel``, ``ErrorReport``, ``Request``), update
  bodies; ``_payload``: their base (types and JSON Schema rules checked on parse),
  ``ProtocolError``; ``_schema``: the JSON Schemas of docs/schemas/, from those classes.
- ``_acks``: ``AckCode``, ``ack_code``, ``may_retry`` (update ack reason codes and what a
  device does after each: the ack state machine of docs/PROTOCOL.md section 5.1).
- ``_model_msg``: ``ModelMeta``, ``model_message``/``read_model_message``,
  ``weights_hash`` (global models named by run and content hash).
- ``_ratelimit``: ``KeyedRateLimit``, ``LogLimiter``, ``printable`` (what one device
  may cost a receiver in requests and log lines).
- ``_bundle``: ``pack_bundle``/``unpack_bundle`` (artifact bundles, bounded), ``BundleError``,
  ``file_sha256``/``content_hash`` (the artifact manifest's hashes).
- ``_bridge_conf``: ``render_edge_bridge`` (an edge site's Mosquitto bridge to its parent).
- ``_brokers``: ``write_broker_config``, ``MosquittoProcess``, ``local_broker``;
  ``_broker_files``: ``TlsFiles``, the generated files made readable by Mosquitto's user;
  ``_embedded``: ``EmbeddedBroker``, ``EMBEDDED_LIMITS`` (and ``_amqtt_fixes``, its
  corrections to amqtt); ``_ports``: ``free_port``.
- ``_credentials``: ``read_password_file`` (credentials.toml or a bare password).
- ``_signing``: ``sign_update``, ``SignedBody``, ``statement`` (the canonical bytes a
  device signs for an update), ``verify_signature``, ``key_text``/``parse_key_text``,
  ``SignatureError`` (signed updates, docs/PROTOCOL.md section 5.2).
- ``_enrolment``: ``Enrolment``, ``EnrolmentError``, ``ENROLMENT_FILE`` (each device's
  public key, as the operator enrolled it).
- ``_files``: ``atomic_write``, ``fsync_dir`` (crash-safe writes, used by every package).
- ``_merkle``: RFC 6962 / 9162 Merkle trees (``leaf_hash``, ``root_hash``,
  ``inclusion_path``, ``verify_inclusion``); ``_ledger_msg``: the training ledger on the
  wire (``TreeHead``, ``InclusionProof``, ``check_inclusion``, ``tree_head_bytes``).
"""

from broker_bridge._acks import IDENTITY, RETRYABLE, AckCode, ack_code, may_retry, reason_text
from broker_bridge._bridge_conf import render_edge_bridge
from broker_bridge._broker_files import TlsFiles
from broker_bridge._brokers import (
    AGGREGATOR_USER,
    BrokerConfigFiles,
    MosquittoProcess,
    hash_password,
    local_broker,
    local_broker_kind,
    render_acl,
    render_mosquitto_conf,
    write_broker_config,
)
from broker_bridge._bundle import (
    BundleError,
    content_hash,
    file_sha256,
    pack_bundle,
    unpack_bundle,
)
from broker_bridge._channel import (
    AGGREGATOR_PRESENCE,
    DEFAULT_MAX_PAYLOAD,
    Channel,
    aggregator_presence,
    aggregator_will,
    presence_message,
    presence_will,
    roll_call,
)
from broker_bridge._chunking import Reassembler, ReassemblyLimits
from broker_bridge._codec import (
    BodyHeader,
    BodyKind,
    EncodedUpdate,
    ErrorFeedback,
    ModelVersion,
    decode_model,
    decode_update,
    decode_update_sparse,
    encode_model,
    encode_update,
    read_header,
)
from broker_bridge._codec_spec import CodecSpec, Quantize, Threshold, TopK
from broker_bridge._credentials import read_password_file
from broker_bridge._embedded import EMBEDDED_LIMITS, EmbeddedBroker
from broker_bridge._enrolment import ENROLMENT_FILE, Enrolment, EnrolmentError
from broker_bridge._envelope import (
    MAX_JSON_BYTES,
    Chunk,
    EnvelopeLimits,
    Kind,
    Message,
    json_message,
    new_transfer_id,
    parse_json,
    split_message,
)
from broker_bridge._errors import (
    BrokerRefused,
    BrokerUnavailable,
    ChunkError,
    CodecError,
    EnvelopeError,
    SecAggRejected,
    TransportError,
    WireError,
)
from broker_bridge._files import atomic_write, fsync_dir
from broker_bridge._layout import Layout
from broker_bridge._ledger_msg import (
    InclusionOutcome,
    InclusionProof,
    TreeHead,
    check_inclusion,
    ed25519_verify,
    tree_head_bytes,
)
from broker_bridge._merkle import (
    CompactTree,
    inclusion_path,
    inclusion_paths,
    leaf_hash,
    root_hash,
    verify_inclusion,
)
from broker_bridge._model_msg import (
    ModelMeta,
    model_message,
    pack_model_body,
    read_model_message,
    unpack_model_body,
    weights_hash,
)
from broker_bridge._mqtt import BrokerUrl, MqttTransport, NetworkLoop, TlsConfig
from broker_bridge._ports import free_port
from broker_bridge._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Eligibility,
    ErrorReport,
    Hello,
    Presence,
    ProtocolError,
    Request,
    TaskSpec,
    UpdateMeta,
    is_sha256_hex,
    pack_update_body,
    unpack_update_body,
    update_message,
)
from broker_bridge._ratelimit import KeyedRateLimit, LogLimiter, printable
from broker_bridge._schema import message_schemas, schema_id
from broker_bridge._signing import (
    SignatureError,
    SignedBody,
    Signer,
    is_signed,
    key_text,
    message_statement,
    parse_key_text,
    sign_update,
    statement,
    update_body,
    verify_signature,
)
from broker_bridge._topics import Topics, check_id, topic_matches
from broker_bridge._transport import MemoryBroker, MemoryTransport, Transport, Will
from device_profiles import ConfigError, FleetlearnError

__all__ = [
    "AGGREGATOR_PRESENCE",
    "InclusionOutcome",
    "InclusionProof",
    "TreeHead",
    "check_inclusion",
    "ed25519_verify",
    "tree_head_bytes",
    "CompactTree",
    "inclusion_path",
    "inclusion_paths",
    "leaf_hash",
    "root_hash",
    "verify_inclusion",
    "AGGREGATOR_USER",
    "DEFAULT_MAX_PAYLOAD",
    "EMBEDDED_LIMITS",
    "ENROLMENT_FILE",
    "MAX_JSON_BYTES",
    "PROTOCOL_VERSION",
    "IDENTITY",
    "RETRYABLE",
    "Ack",
    "AckCode",
    "BodyHeader",
    "BodyKind",
    "BrokerConfigFiles",
    "BrokerRefused",
    "BrokerUnavailable",
    "BrokerUrl",
    "BundleError",
    "Cancel",
    "Channel",
    "Chunk",
    "ChunkError",
    "CodecError",
    "CodecSpec",
    "ConfigError",
    "Eligibility",
    "EmbeddedBroker",
    "EncodedUpdate",
    "Enrolment",
    "EnrolmentError",
    "EnvelopeError",
    "EnvelopeLimits",
    "ErrorFeedback",
    "ErrorReport",
    "FleetlearnError",
    "Hello",
    "KeyedRateLimit",
    "Kind",
    "Layout",
    "LogLimiter",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "ModelMeta",
    "ModelVersion",
    "MosquittoProcess",
    "MqttTransport",
    "NetworkLoop",
    "Presence",
    "ProtocolError",
    "Quantize",
    "Reassembler",
    "ReassemblyLimits",
    "SignatureError",
    "SignedBody",
    "Signer",
    "Request",
    "SecAggRejected",
    "TaskSpec",
    "Threshold",
    "TlsConfig",
    "TlsFiles",
    "TopK",
    "Topics",
    "Transport",
    "TransportError",
    "UpdateMeta",
    "Will",
    "WireError",
    "ack_code",
    "atomic_write",
    "fsync_dir",
    "check_id",
    "content_hash",
    "decode_model",
    "decode_update",
    "decode_update_sparse",
    "encode_model",
    "encode_update",
    "file_sha256",
    "free_port",
    "hash_password",
    "is_sha256_hex",
    "is_signed",
    "key_text",
    "json_message",
    "local_broker",
    "local_broker_kind",
    "message_schemas",
    "message_statement",
    "may_retry",
    "model_message",
    "new_transfer_id",
    "parse_json",
    "parse_key_text",
    "pack_bundle",
    "pack_model_body",
    "pack_update_body",
    "presence_message",
    "presence_will",
    "aggregator_presence",
    "aggregator_will",
    "read_password_file",
    "reason_text",
    "printable",
    "read_header",
    "read_model_message",
    "render_acl",
    "render_edge_bridge",
    "render_mosquitto_conf",
    "roll_call",
    "schema_id",
    "sign_update",
    "split_message",
    "statement",
    "topic_matches",
    "unpack_bundle",
    "unpack_model_body",
    "unpack_update_body",
    "update_body",
    "update_message",
    "verify_signature",
    "weights_hash",
    "write_broker_config",
]
