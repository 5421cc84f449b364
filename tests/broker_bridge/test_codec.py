"""The update codec: layouts, spec parsing, every stage's round trip with its error bound,
stochastic rounding, error feedback, the downlink, and hostile bodies."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker_bridge import (
    BodyHeader,
    BodyKind,
    CodecError,
    CodecSpec,
    ConfigError,
    ErrorFeedback,
    Layout,
    ModelVersion,
    decode_model,
    decode_update,
    decode_update_sparse,
    encode_model,
    encode_update,
    read_header,
)

LAYOUT = Layout(tensors=(("w1", (8, 40)), ("b1", (40,)), ("w2", (40, 10)), ("b2", (10,))))
N = LAYOUT.size


def _update(seed: int = 0, size: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Distinct magnitudes, so "the largest k" is unambiguous.
    return (rng.standard_normal(size) * rng.uniform(0.5, 2.0, size)).astype(np.float32)


def _spec(text: str) -> CodecSpec:
    return CodecSpec.parse(text)


def _segments(layout: Layout) -> list[slice]:
    return [slice(a, b) for a, b in zip(layout.offsets[:-1], layout.offsets[1:], strict=True)]


# ----------------------------------------------------------------------------- layout


def test_layout_bytes_round_trip_and_fingerprint() -> None:
    again = Layout.from_bytes(LAYOUT.to_bytes())
    assert again == LAYOUT and again.fingerprint == LAYOUT.fingerprint
    assert len(LAYOUT.fingerprint) == 8 and N == 8 * 40 + 40 + 400 + 10
    other_shape = Layout(tensors=(("w1", (40, 8)), *LAYOUT.tensors[1:]))
    other_order = Layout(tensors=(LAYOUT.tensors[1], LAYOUT.tensors[0], *LAYOUT.tensors[2:]))
    other_name = Layout(tensors=(("w0", (8, 40)), *LAYOUT.tensors[1:]))
    prints = {lay.fingerprint for lay in (LAYOUT, other_shape, other_order, other_name)}
    assert len(prints) == 4


def test_layout_flatten_unflatten() -> None:
    rng = np.random.default_rng(1)
    arrays = {name: rng.standard_normal(shape) for name, shape in LAYOUT.tensors}
    flat = LAYOUT.flatten(arrays)
    assert flat.dtype == np.float32 and flat.shape == (N,)
    back = LAYOUT.unflatten(flat)
    assert list(back) == list(LAYOUT.names)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name].astype(np.float32))
    assert Layout.of(arrays) == LAYOUT
    with pytest.raises(CodecError, match="missing"):
        LAYOUT.flatten({k: v for k, v in arrays.items() if k != "b2"})
    with pytest.raises(CodecError, match="shape"):
        LAYOUT.flatten({**arrays, "b2": np.zeros(11)})
    with pytest.raises(CodecError):
        LAYOUT.unflatten(np.zeros(N + 1))


@pytest.mark.parametrize(
    "tensors",
    [(), (("a", (2,)), ("a", (3,))), (("", (2,)),), (("a", (0,)),), (("a", (1,) * 9),)],
)
def test_layout_rejects_bad_tensors(tensors: tuple) -> None:
    with pytest.raises(CodecError):
        Layout(tensors=tensors)


def test_layout_from_bytes_is_bounded() -> None:
    data = LAYOUT.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            Layout.from_bytes(data[:cut])
    with pytest.raises(CodecError, match="trailing"):
        Layout.from_bytes(data + b"\0")
    huge_count = data[:5] + struct.pack("<I", 2**32 - 1) + data[9:]
    with pytest.raises(CodecError, match="impossible"):
        Layout.from_bytes(huge_count)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_layout_from_random_bytes_only_codec_errors(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        Layout.from_bytes(b"FLLO\x01" + data)


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fp32", "fp32"),
        ("fp16", "fp16"),
        ("q8", "q8"),
        ("q8+zstd", "q8+zstd:3"),
        ("zstd", "zstd:3"),
        ("topk:0.01+q8+zstd:3", "topk:0.01+q8+zstd:3"),
        ("topk:1e-2+fp32", "topk:0.01"),
        ("topk:5000", "topk:5000"),
        ("topk:0.01:per_tensor+q4", "topk:0.01:per_tensor+q4"),
        ("ef+topk:0.010+q8:sr:block=256+zstd:19", "ef+topk:0.01+q8:block=256:sr+zstd:19"),
        ("thresh:0.001+tern", "thresh:0.001+tern"),
        ("q1:sr", "q1:sr"),
        ("ef+fp16", "ef+fp16"),
        (" tern + zstd:1 ", "tern+zstd:1"),
    ],
)
def test_spec_canonical(text: str, canonical: str) -> None:
    spec = _spec(text)
    assert str(spec) == canonical
    assert _spec(canonical) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lz4",
        "q8+topk:0.01",  # out of order
        "q8+q4",
        "topk",
        "topk:0",
        "topk:1.5",
        "topk:-0.1",
        "topk:nan",
        "topk:0.1:global",
        "thresh:0",
        "thresh:inf",
        "q8:block=0",
        "q8:block=x",
        "q8:bogus",
        "q8:sr:sr",
        "fp16:sr",
        "zstd:0",
        "zstd:23",
        "zstd:1:2",
        "ef",
        "ef+fp32",
        "ef:1+q8",
        "q8+zstd+ef",
        "\u00e9",
    ],
)
def test_spec_errors_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        _spec(text)


# ----------------------------------------------------------------------------- round trips

ALL_SPECS = [
    "fp32",
    "fp16",
    "q8",
    "q4",
    "tern",
    "q1",
    "q8:block=7",
    "q4:block=64:sr",
    "tern:sr",
    "q1:sr:block=33",
    "zstd:1",
    "q8+zstd",
    "topk:0.01",
    "topk:0.1+q8+zstd",
    "topk:0.1:per_tensor+q4",
    "topk:37+tern:block=5",
    "topk:0.6+q1",  # dense enough for a bitmap
    "thresh:1.0+fp16+zstd",
    "thresh:100.0+q8",  # nothing kept
    "topk:1.0+q8:block=16+zstd:9",
    "ef+topk:0.05+q8+zstd",
]


@pytest.mark.parametrize("text", ALL_SPECS)
def test_round_trip_decodes_what_encoder_sent(text: str) -> None:
    spec = _spec(text)
    x = _update(3)
    enc = encode_update(x, LAYOUT, spec, rng=np.random.default_rng(0))
    out = decode_update(enc.body, LAYOUT)
    assert out.dtype == np.float32 and out.shape == (N,)
    np.testing.assert_array_equal(out, enc.sent)
    header = read_header(enc.body)
    assert header.spec == spec and header.kind == BodyKind.UPDATE
    assert header.fingerprint == LAYOUT.fingerprint and header.size == N
    indices, values = decode_update_sparse(enc.body, LAYOUT)
    dense = np.zeros(N, np.float32)
    if indices is None:
        dense = values
    else:
        dense[indices] = values
    np.testing.assert_array_equal(dense, out)


def test_fp32_is_exact_and_fp16_within_half_ulp() -> None:
    x = _update(4)
    np.testing.assert_array_equal(
        decode_update(encode_update(x, LAYOUT, _spec("fp32")).body, LAYOUT), x
    )
    half = decode_update(encode_update(x, LAYOUT, _spec("fp16+zstd")).body, LAYOUT)
    assert np.all(np.abs(half - x) <= np.abs(x) * 2.0**-11 + 2.0**-25)


@pytest.mark.parametrize(("kind", "levels"), [("q8", 127), ("q4", 7)])
@pytest.mark.parametrize("block", [None, 50])
def test_quantizer_error_at_most_half_a_scale(kind: str, levels: int, block: int | None) -> None:
    x = _update(5)
    text = kind if block is None else f"{kind}:block={block}"
    out = decode_update(encode_update(x, LAYOUT, _spec(text)).body, LAYOUT)
    groups = (
        _segments(LAYOUT) if block is None else [slice(a, a + block) for a in range(0, N, block)]
    )
    for group in groups:
        scale = np.abs(x[group]).max() / levels
        assert np.all(np.abs(out[group] - x[group]) <= scale / 2 * (1 + 1e-5))


def test_sign_and_ternary_keep_signs_and_scale() -> None:
    x = _update(6)
    q1 = decode_update(encode_update(x, LAYOUT, _spec("q1")).body, LAYOUT)
    for group in _segments(LAYOUT):
        assert np.all(np.sign(q1[group]) == np.where(x[group] >= 0, 1, -1))
        assert np.allclose(np.abs(q1[group]), np.abs(x[group]).mean(), rtol=1e-5)
    tern = decode_update(encode_update(x, LAYOUT, _spec("tern")).body, LAYOUT)
    for group in _segments(LAYOUT):
        assert len(np.unique(np.abs(tern[group]))) <= 2
        kept = tern[group] != 0
        assert np.all(np.sign(tern[group][kept]) == np.sign(x[group][kept]))
        assert np.all(np.abs(x[group][kept]) >= np.abs(x[group][~kept]).max(initial=0))
    # Ternary beats sign alone here, and both beat sending nothing.
    err = [np.linalg.norm(v - x) / np.linalg.norm(x) for v in (q1, tern)]
    assert err[1] < err[0] < 1.0


@pytest.mark.parametrize(
    "text", ["topk:0.05", "topk:33", "topk:0.05:per_tensor", "topk:3:per_tensor"]
)
def test_topk_keeps_exactly_the_largest(text: str) -> None:
    x = _update(7)
    spec = _spec(text)
    indices, values = decode_update_sparse(encode_update(x, LAYOUT, spec).body, LAYOUT)
    assert indices is not None
    assert np.all(np.diff(indices) > 0)
    np.testing.assert_array_equal(values, x[indices])
    topk = spec.sparsify
    groups = _segments(LAYOUT) if "per_tensor" in text else [slice(0, N)]
    expected: list[int] = []
    for group in groups:
        size = group.stop - group.start
        k = topk.kept(size)  # type: ignore[union-attr]
        order = np.argsort(-np.abs(x[group]), kind="stable")[:k] + group.start
        expected += sorted(order.tolist())
    assert sorted(expected) == indices.tolist()
    if text == "topk:0.05":
        assert indices.size == int(np.ceil(0.05 * N))


def test_threshold_keeps_large_values() -> None:
    x = _update(8)
    out = decode_update(encode_update(x, LAYOUT, _spec("thresh:1.5")).body, LAYOUT)
    keep = np.abs(x) >= 1.5
    np.testing.assert_array_equal(out[keep], x[keep])
    assert not out[~keep].any()


def test_index_coding_picks_the_smaller() -> None:
    x = _update(9)
    sparse = encode_update(x, LAYOUT, _spec("topk:0.02")).body
    dense = encode_update(x, LAYOUT, _spec("topk:0.7")).body
    assert read_header(sparse).index_coding == 1  # delta-varint
    assert read_header(dense).index_coding == 2  # bitmap
    assert read_header(dense).index_bytes == (N + 7) // 8
    for body in (sparse, dense):
        indices, _ = decode_update_sparse(body, LAYOUT)
        assert indices is not None and np.all(np.diff(indices) > 0)


def test_large_gaps_use_multi_byte_varints() -> None:
    layout = Layout(tensors=(("w", (300_000,)),))
    x = np.zeros(layout.size, np.float32)
    spots = np.array([0, 127, 128, 16_511, 16_512, 299_999])
    x[spots] = np.arange(1, spots.size + 1)
    enc = encode_update(x, layout, _spec("topk:6"))
    indices, values = decode_update_sparse(enc.body, layout)
    assert indices is not None
    np.testing.assert_array_equal(indices, spots)
    np.testing.assert_array_equal(values, x[spots])


# ----------------------------------------------------------------------------- stochastic


@pytest.mark.parametrize("text", ["q4:sr", "tern:sr", "q1:sr", "q8:sr:block=8"])
def test_stochastic_rounding_is_unbiased(text: str) -> None:
    layout = Layout(tensors=(("w", (64,)),))
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32) ** 3
    spec = _spec(text)
    rng = np.random.default_rng(1234)
    trials = 1500
    total = np.zeros(64)
    for _ in range(trials):
        total += decode_update(encode_update(x, layout, spec, rng=rng).body, layout)
    mean = total / trials
    levels = spec.values.levels
    blocks = spec.values.block or 64
    scale = np.repeat(
        [np.abs(x[a : a + blocks]).max() / levels for a in range(0, 64, blocks)], blocks
    )
    # One draw errs by at most one step (q1: 2 * scale), so 6 standard errors of the mean:
    step = scale * (2 if spec.values.kind == "q1" else 1)
    assert np.all(np.abs(mean - x) <= 6 * step / 2 / np.sqrt(trials) + 1e-7)
    # Deterministic rounding of the same values is biased by much more somewhere.
    det = decode_update(encode_update(x, layout, _spec(text.replace(":sr", ""))).body, layout)
    assert np.abs(det - x).max() > 3 * np.abs(mean - x).max()


def test_stochastic_rounding_needs_and_follows_the_seed() -> None:
    x = _update(10)
    with pytest.raises(CodecError, match="rng"):
        encode_update(x, LAYOUT, _spec("q4:sr"))
    a = encode_update(x, LAYOUT, _spec("q4:sr"), rng=7).body
    b = encode_update(x, LAYOUT, _spec("q4:sr"), rng=np.random.default_rng(7)).body
    c = encode_update(x, LAYOUT, _spec("q4:sr"), rng=8).body
    assert a == b != c


# ----------------------------------------------------------------------------- error feedback


def test_error_feedback_tracks_the_sum_of_true_updates() -> None:
    spec = _spec("ef+topk:0.1+q4+zstd")
    plain = _spec("topk:0.1+q4+zstd")
    state: ErrorFeedback | None = None
    true_sum = np.zeros(N, np.float64)
    sent_sum = np.zeros(N, np.float64)
    plain_sum = np.zeros(N, np.float64)
    rng = np.random.default_rng(11)
    drift = rng.standard_normal(N).astype(np.float32) * 0.1
    norms = []
    for step in range(60):
        update = drift + rng.standard_normal(N).astype(np.float32) * 0.05
        enc = encode_update(update, LAYOUT, spec, feedback=state)
        state = enc.feedback
        assert state is not None and state.rounds == step + 1
        np.testing.assert_array_equal(decode_update(enc.body, LAYOUT), enc.sent)
        true_sum += update
        sent_sum += enc.sent
        plain_sum += encode_update(update, LAYOUT, plain).sent
        # The gap between what was meant and what was sent is exactly the residual.
        np.testing.assert_allclose(true_sum - sent_sum, state.residual, atol=1e-3)
        norms.append(float(np.linalg.norm(state.residual)))
    update_norm = float(np.linalg.norm(drift))
    assert max(norms) < 10 * update_norm  # bounded, not growing with the rounds
    assert max(norms[30:]) < 1.5 * max(norms[:30])
    # Without feedback the gap grows with every round.
    assert np.linalg.norm(true_sum - plain_sum) > 5 * norms[-1]


def test_error_feedback_state_checks() -> None:
    x = _update(12)
    with pytest.raises(CodecError, match="no ef"):
        encode_update(x, LAYOUT, _spec("q8"), feedback=ErrorFeedback.zeros(LAYOUT))
    other = Layout(tensors=(("w", (5,)),))
    with pytest.raises(CodecError, match="another layout"):
        encode_update(x, LAYOUT, _spec("ef+q8"), feedback=ErrorFeedback.zeros(other))


def test_residual_survives_save_and_load(tmp_path: Path) -> None:
    spec = _spec("ef+topk:0.05+q8")
    enc = encode_update(_update(13), LAYOUT, spec)
    assert enc.feedback is not None
    path = tmp_path / "residual.bin"
    enc.feedback.save(path)
    enc.feedback.save(path)  # overwriting is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["residual.bin"]
    loaded = ErrorFeedback.load(path, LAYOUT)
    np.testing.assert_array_equal(loaded.residual, enc.feedback.residual)
    assert loaded.rounds == 1
    # A restarted device continues exactly as one that never stopped.
    again = _update(14)
    a = encode_update(again, LAYOUT, spec, feedback=enc.feedback)
    b = encode_update(again, LAYOUT, spec, feedback=loaded)
    assert a.body == b.body
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    with pytest.raises(CodecError, match="crc"):
        ErrorFeedback.from_bytes(bytes(data), LAYOUT)
    with pytest.raises(CodecError, match="another layout"):
        ErrorFeedback.load(path, Layout(tensors=(("w", (N,)),)))
    with pytest.raises(CodecError):
        ErrorFeedback.from_bytes(path.read_bytes()[:-4], LAYOUT)


# ----------------------------------------------------------------------------- downlink


def test_downlink_full_fp16_model() -> None:
    weights = _update(15)
    body = encode_model(weights, LAYOUT, _spec("fp16+zstd"))
    assert read_header(body).kind == BodyKind.MODEL
    out = decode_model(body, LAYOUT)
    assert np.all(np.abs(out - weights) <= np.abs(weights) * 2.0**-11 + 2.0**-25)
    with pytest.raises(CodecError, match="expected update"):
        decode_update(body, LAYOUT)


def test_downlink_delta_against_a_base_version() -> None:
    base = ModelVersion(version=41, weights=_update(16))
    new = base.weights + _update(17) * 0.01
    body = encode_model(new, LAYOUT, _spec("topk:0.2+q8+zstd"), base=base)
    header = read_header(body)
    assert header.kind == BodyKind.MODEL_DELTA and header.base_version == 41
    out = decode_model(body, LAYOUT, base=base)
    delta = new - base.weights
    k = int(np.ceil(0.2 * N))
    top = np.argsort(-np.abs(delta))[:k]
    assert np.abs(out[top] - new[top]).max() <= np.abs(delta).max() / 127 + 1e-6
    rest = np.setdiff1d(np.arange(N), top)
    np.testing.assert_array_equal(out[rest], base.weights[rest])
    exact = encode_model(new, LAYOUT, _spec("fp32+zstd"), base=base)
    np.testing.assert_allclose(decode_model(exact, LAYOUT, base=base), new, atol=1e-6)
    with pytest.raises(CodecError, match="no base"):
        decode_model(body, LAYOUT)
    with pytest.raises(CodecError, match="version 41, base is 40"):
        decode_model(body, LAYOUT, base=ModelVersion(version=40, weights=base.weights))
    with pytest.raises(CodecError, match="ef"):
        encode_model(new, LAYOUT, _spec("ef+q8"))


# ----------------------------------------------------------------------------- hostile bodies


def _body(spec_text: str, payload: bytes, **fields: int) -> bytes:
    header = BodyHeader(
        kind=BodyKind(fields.pop("kind", 0)),
        spec=_spec(spec_text),
        fingerprint=LAYOUT.fingerprint,
        size=fields.pop("size", N),
        count=fields.pop("count", N),
        index_coding=fields.pop("index_coding", 0),
        index_bytes=fields.pop("index_bytes", 0),
    )
    return header.to_bytes() + payload


def test_bad_bodies_are_codec_errors() -> None:
    good = encode_update(_update(18), LAYOUT, _spec("topk:0.05+q8")).body
    decode_update(good, LAYOUT)
    cases = {
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "magic": b"XXXX" + good[4:],
        "version": good[:4] + b"\x02" + good[5:],
        "kind": good[:5] + b"\x07" + good[6:],
        "empty": b"",
    }
    for name, body in cases.items():
        with pytest.raises(CodecError):
            decode_update(body, LAYOUT)
        assert name
    with pytest.raises(CodecError, match="fingerprint"):
        decode_update(good, Layout(tensors=(("w", (N,)),)))
    nan = np.full(N, np.nan, np.float32).tobytes()
    with pytest.raises(CodecError, match="NaN"):
        decode_update(_body("fp32", nan), LAYOUT)
    with pytest.raises(CodecError, match="NaN"):
        decode_update(_body("fp16", np.full(N, np.inf, np.float16).tobytes()), LAYOUT)
    with pytest.raises(CodecError, match="parameters"):
        decode_update(_body("fp32", b"", size=N + 1), LAYOUT)


def test_bad_spec_in_body() -> None:
    good = encode_update(_update(19), LAYOUT, _spec("q8+zstd:3")).body
    for fake in (b"q9+zstd:3", b"q8+zstd:0", b"q8+zstd  "):
        assert len(fake) == 9
        with pytest.raises(CodecError):
            decode_update(good[:7] + fake + good[16:], LAYOUT)
    noncanonical = good[:6] + bytes([7]) + b"q8+zstd" + good[16:]
    with pytest.raises(CodecError, match="canonical"):
        decode_update(noncanonical, LAYOUT)


def _varint(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def test_bad_indices_are_rejected() -> None:
    def sparse(gaps: list[int], coding: int = 1, index: bytes | None = None) -> bytes:
        index = _varint(gaps) if index is None else index
        values = np.ones(len(gaps), np.float32).tobytes()
        return _body(
            "thresh:0.5",
            index + values,
            count=len(gaps),
            index_coding=coding,
            index_bytes=len(index),
        )

    np.testing.assert_array_equal(
        np.flatnonzero(decode_update(sparse([2, 0, 5]), LAYOUT)), [2, 3, 9]
    )
    with pytest.raises(CodecError, match="out of range"):
        decode_update(sparse([N - 2, 5]), LAYOUT)
    with pytest.raises(CodecError, match="gap"):
        decode_update(sparse([N + 5]), LAYOUT)
    with pytest.raises(CodecError, match="truncated"):
        decode_update(sparse([3], index=b"\x83\x80"), LAYOUT)
    with pytest.raises(CodecError, match="longer than 5"):
        decode_update(sparse([3, 1], index=b"\x80" * 6 + b"\x01\x01"), LAYOUT)
    bitmap = bytearray((N + 7) // 8)
    bitmap[-1] = 0x80  # a padding bit past the last parameter
    with pytest.raises(CodecError):
        decode_update(sparse([0], coding=2, index=bytes(bitmap)), LAYOUT)
    with pytest.raises(CodecError):
        decode_update(sparse([0], coding=3, index=b"\x00"), LAYOUT)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**35 - 1), min_size=1, max_size=60))
def test_varint_indices_match_a_byte_by_byte_reading(gaps: list[int]) -> None:
    """The vectorised reading of delta-varint indices against the plain definition
    (gaps of one to five bytes, mixed)."""
    from broker_bridge._codec_pack import INDEX_VARINT, decode_indices

    data = _varint(gaps)
    expected = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
    size = 2**40  # past every index here: only the coding is under test
    np.testing.assert_array_equal(decode_indices(INDEX_VARINT, data, len(gaps), size),
                                  expected)
    with pytest.raises(CodecError, match="gap"):
        decode_indices(INDEX_VARINT, data, len(gaps), max(gaps))


def test_bad_quantized_payloads() -> None:
    scales = np.ones(len(LAYOUT.tensors), np.float32)
    codes = np.zeros(N, np.int8)
    assert decode_update(_body("q8", scales.tobytes() + codes.tobytes()), LAYOUT).any() == 0
    codes[3] = -128
    with pytest.raises(CodecError, match="-128"):
        decode_update(_body("q8", scales.tobytes() + codes.tobytes()), LAYOUT)
    scales[1] = -1
    with pytest.raises(CodecError, match="scales"):
        decode_update(_body("q8", scales.tobytes() + np.zeros(N, np.int8).tobytes()), LAYOUT)
    scales[1] = np.nan
    with pytest.raises(CodecError, match="scales"):
        decode_update(_body("q8", scales.tobytes() + np.zeros(N, np.int8).tobytes()), LAYOUT)
    good_scales = np.ones(len(LAYOUT.tensors), np.float32).tobytes()
    with pytest.raises(CodecError, match="forbidden"):
        decode_update(_body("tern", good_scales + b"\xff" * (N // 4) + b"\x00"), LAYOUT)
    with pytest.raises(CodecError, match="forbidden"):
        decode_update(_body("q4", good_scales + b"\xff" * -(-N // 2)), LAYOUT)


def test_huge_declared_sizes_fail_before_allocating() -> None:
    tracemalloc.start()
    try:
        for fields in (
            {"count": 2**32 - 1, "index_coding": 1, "index_bytes": 2**32 - 1},
            {"count": N, "index_coding": 1, "index_bytes": 2**32 - 1},
            {"count": 5, "index_coding": 2, "index_bytes": 2**31},
            {"size": 2**32 - 1, "count": 2**32 - 1},
        ):
            with pytest.raises(CodecError):
                decode_update(_body("thresh:0.5+q8+zstd", b"\0" * 64, **fields), LAYOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_topk_count_must_match_its_spec() -> None:
    enc = encode_update(_update(20), LAYOUT, _spec("topk:0.05+fp32")).body
    header = read_header(enc)
    assert header.count == int(np.ceil(0.05 * N))
    lying = BodyHeader(
        kind=header.kind,
        spec=header.spec,
        fingerprint=header.fingerprint,
        size=header.size,
        count=header.count + 1,
        index_coding=header.index_coding,
        index_bytes=header.index_bytes,
    )
    with pytest.raises(CodecError, match="keeps another count"):
        decode_update(lying.to_bytes() + enc[len(header.to_bytes()) :], LAYOUT)


# ----------------------------------------------------------------------------- zstd bombs


def _rle_blocks(count: int, size: int = 128 * 1024) -> bytes:
    block = struct.pack("<I", 0b010 | (size << 3))[:3] + b"\0"  # RLE block of `size` zeros
    last = struct.pack("<I", 0b011 | (size << 3))[:3] + b"\0"
    return block * (count - 1) + last


def _frame(content_size: int | None, blocks: bytes) -> bytes:
    magic = struct.pack("<I", 0xFD2FB528)
    if content_size is None:  # no content size; window descriptor 2**(10+7) = 128 KiB
        return magic + b"\x00" + bytes([7 << 3]) + blocks
    return magic + b"\xe0" + struct.pack("<Q", content_size) + blocks  # 8-byte size, 1 segment


def test_zstd_bombs_fail_fast_without_allocating() -> None:
    head = encode_update(_update(21), LAYOUT, _spec("q8+zstd")).body
    header = read_header(head)
    prefix = header.to_bytes()
    expected = 4 * len(LAYOUT.tensors) + N
    bombs = {
        # A few bytes that declare 4 GiB.
        "declares 4 GiB": _frame(4 << 30, _rle_blocks(1)),
        # 32 KiB that would expand to 1 GiB, with no declared size.
        "undeclared 1 GiB": _frame(None, _rle_blocks(8192)),
        # Declares the right size, then keeps going for 1 GiB.
        "lies about its size": _frame(expected, _rle_blocks(8192)),
    }
    tracemalloc.start()
    try:
        for name, frame in bombs.items():
            assert len(frame) < 40_000, name
            with pytest.raises(CodecError):
                decode_update(prefix + frame, LAYOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_zstd_trailing_data_after_the_frame() -> None:
    body = encode_update(_update(22), LAYOUT, _spec("q8+zstd")).body
    with pytest.raises(CodecError):
        decode_update(body + b"\x00\x01", LAYOUT)


# ----------------------------------------------------------------------------- fuzzing

_VALID = [
    encode_update(_update(30 + i), LAYOUT, _spec(text), rng=i).body
    for i, text in enumerate(
        [
            "fp32",
            "fp16+zstd",
            "q8:block=16",
            "topk:0.05+q8+zstd",
            "topk:0.6+q4",
            "thresh:1.0+tern+zstd:1",
            "topk:0.1:per_tensor+q1:sr",
            "topk:9+tern:sr:block=4",
        ]
    )
]
_VALID.append(
    encode_model(
        _update(40), LAYOUT, _spec("topk:0.1+q8"), base=ModelVersion(version=3, weights=_update(41))
    )
)


def _decode_all(body: bytes) -> None:
    for decode in (
        lambda: decode_update(body, LAYOUT),
        lambda: decode_model(body, LAYOUT, base=ModelVersion(version=3, weights=_update(41))),
    ):
        try:
            out = decode()
        except CodecError:
            continue
        assert out.shape == (N,) and np.isfinite(out).all()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_all(data)
    _decode_all(b"FLCB\x01\x00" + data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(_VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    tail=st.binary(max_size=3),
)
def test_fuzz_mutated_valid_bodies(
    which: int, edits: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    body = bytearray(_VALID[which])
    header_len = len(read_header(bytes(body)).to_bytes())
    for position, value in edits:
        # Half the edits land in the header, where the lengths and counts live.
        spot = position % header_len if position % 2 else position % len(body)
        body[spot] = value
    if cut is not None:
        body = body[: cut % (len(body) + 1)]
    _decode_all(bytes(body) + tail)
