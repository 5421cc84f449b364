"""Global models on the wire, named by content.

A model message (kind ``model``) carries ``u32 meta_len | ModelMeta JSON | codec
body`` (a full model, or a delta against a base of the same run). ``ModelMeta`` says
which aggregator run made it (``run``), its version number in that run, and
``model_hash``: the sha256 of the weights it decodes to, as little-endian float32.
Tasks name the model to train from by that hash. A version number alone is not an
identity: an aggregator started afresh counts from 0 again, and a device must never
train from another run's (or another model's) weights that happen to share a number.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker_bridge._envelope import Kind, Message
from broker_bridge._payload import ASCII, SHA256_HEX, U32, ProtocolError, _Payload, rule
from broker_bridge._protocol import pack_prefixed, unpack_prefixed


def weights_hash(weights: npt.ArrayLike) -> str:
    """sha256 (hex) of a flat weight vector as little-endian float32: a model's identity."""
    vec = np.ascontiguousarray(np.asarray(weights, dtype="<f4").ravel())
    return hashlib.sha256(vec.data.cast("B")).hexdigest()  # no copy of the bytes


@dataclass(frozen=True, kw_only=True)
class ModelMeta(_Payload):
    """What a model body is: which run, which version of it, which weights."""

    KIND: typing.ClassVar[Kind] = Kind.MODEL
    run: str = rule(minLength=1, maxLength=64, pattern=f"^[{ASCII}]*$",
                    description="the aggregator run that made this model")
    model_version: int = rule(minimum=0, maximum=U32,
                              description="its version in that run; the envelope's")
    model_hash: str = rule(pattern=SHA256_HEX, description=(
        "sha256 of the weights the codec body decodes to, as little-endian float32"))


def pack_model_body(meta: ModelMeta, codec_body: bytes) -> bytes:
    return pack_prefixed(meta, codec_body)


def unpack_model_body(body: bytes) -> tuple[ModelMeta, bytes]:
    """Split a model body; ProtocolError when its prefix is malformed."""
    return unpack_prefixed(body, ModelMeta)


def model_message(
    *, fleet: str, meta: ModelMeta, codec: str, codec_body: bytes, device: str = ""
) -> Message:
    """The ``model`` message of ``meta`` (envelope ``model_version`` = the meta's)."""
    return Message(kind=Kind.MODEL, fleet=fleet, device=device,
                   model_version=meta.model_version, codec=codec,
                   body=pack_model_body(meta, codec_body))


def read_model_message(message: Message) -> tuple[ModelMeta, bytes]:
    """Meta and codec body of a ``model`` message, checked against its envelope."""
    if message.kind != Kind.MODEL:
        raise ProtocolError(f"expected a model message, got {message.kind.topic_name}")
    meta, codec_body = unpack_model_body(message.body)
    if meta.model_version != message.model_version:
        raise ProtocolError(
            f"model message envelope says version {message.model_version}, "
            f"its metadata {meta.model_version}"
        )
    return meta, codec_body
