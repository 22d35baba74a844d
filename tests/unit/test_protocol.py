"""The control protocol: messages, the tagged union, and length-prefixed framing (sans-I/O)."""

from __future__ import annotations

import struct
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvemu import protocol
from hvemu.abi import PAGE_SIZE, Errno, RingKind
from hvemu.protocol import HEADER_SIZE, MAX_FRAME, FrameDecoder, ProtocolError
from hvemu.stats import DomainStats, RingStats, VcpuStats

# Hand-made instances, with optional fields set where that makes a
# difference; a message added later without one here gets a generated sample
# (see _sample), so every member of the unions is always round-tripped.
REQUESTS: list[protocol.Msg] = [
    protocol.ToolHello(client="xenpaging"),
    protocol.GuestHello(domid=3, vcpu=1),
    protocol.GuestHello(domid=3),
    protocol.DomainCreate(max_vcpus=4, gfns=16384, name="guest0"),
    protocol.DomainDestroy(domid=3),
    protocol.DomainList(),
    protocol.MemEventEnable(domid=3, ring=RingKind.paging),
    protocol.MemEventDisable(domid=3, ring=RingKind.access),
    protocol.MemEventResume(domid=3, ring=RingKind.sharing),
    protocol.PagingNominate(domid=3, gfns=[1, 2, 3]),
    protocol.PagingEvict(domid=3, gfns=[1, 2]),
    protocol.PagingPrep(domid=3, gfns=[7]),
    protocol.PagingLoad(domid=3, gfns=[7, 8], pages=[b"\x01" * PAGE_SIZE, b"\x00" * PAGE_SIZE]),
    protocol.AccessSet(domid=3, gfns=[0, 1 << 40], access=5),
    protocol.AccessRequired(domid=3, required=True),
    protocol.MapForeign(domid=3, gfns=[9]),
    protocol.SetTarget(domid=3, pages=100),
    protocol.GetTarget(domid=3),
    protocol.Stats(domid=3),
    protocol.DomainInfo(domid=3),
    protocol.GuestAccess(vcpu=0, gfn=12, access=2, gla=0xFFFF800000001000),
    protocol.GuestBalloonOut(vcpu=1, gfns=[5, 6]),
    protocol.GuestTrap(vcpu=0, reason=3, value=0x1000, old=0x2000, gla=None),
    protocol.SetHvmParam(domid=3, reason=5, mode=3),
]
REPLIES: list[protocol.Msg] = [
    protocol.Ok(),
    protocol.Error(errno=Errno.EBUSY, message="page touched after nominate"),
    protocol.BatchResult(results=[None, Errno.EBUSY, Errno.EINVAL]),
    protocol.Welcome(role="guest", domid=3, max_vcpus=4, gfns=64, fds=["memory", "p2m"]),
    protocol.DomainCreated(domid=5),
    protocol.DomainListReply(domains=[protocol.DomainSummary(domid=1, name="a", max_vcpus=2, gfns=8,
                                                             resident=4, crashed=True)]),
    protocol.MemEventEnabled(domid=3, ring=RingKind.paging, port=7, ring_size=64, max_vcpus=4, gfns=64,
                             reattached=True, fds=["ring", "evtchn"]),
    protocol.ForeignPages(results=[None, Errno.ENOENT], pages=[b"x" * PAGE_SIZE, None]),
    protocol.StatsReply(domid=3, stats=DomainStats(domid=3, faults=3, name="g", crashed=True,
                                                   fault_latency_us={"p50": 1.5},
                                                   vcpus=[VcpuStats(vcpu=0, runnable=True, pauses=0, congested=False,
                                                                    connected=True, in_exit=False)])),
    protocol.TargetReply(domid=3, pages=42),
]


def _members(union: object) -> list[type]:
    return list(typing.get_args(union))


def _value(t: msgspec.inspect.Type) -> object:
    """A non-default value of an inspected type (generated samples)."""
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        return _value(next(x for x in t.types if not isinstance(x, mi.NoneType)))
    if isinstance(t, mi.ListType):
        return [_value(t.item_type)]
    if isinstance(t, mi.DictType):
        return {_value(t.key_type): _value(t.value_type)}
    if isinstance(t, mi.EnumType):
        return list(t.cls)[-1]
    if isinstance(t, mi.LiteralType):
        return t.values[-1]
    if isinstance(t, mi.StructType):
        return t.cls(**{f.name: _value(f.type) for f in t.fields})
    simple: dict[type, object] = {mi.IntType: 3, mi.FloatType: 1.5, mi.StrType: "x", mi.BoolType: True,
                                  mi.BytesType: b"\x01\x02", mi.NoneType: None, mi.AnyType: 1}
    return simple[type(t)]


def _sample(cls: type, hand_made: list[protocol.Msg]) -> protocol.Msg:
    for msg in hand_made:
        if type(msg) is cls:
            return msg
    built = _value(msgspec.inspect.type_info(cls))
    assert isinstance(built, protocol.Msg)
    return built


ALL_REQUESTS = [_sample(cls, REQUESTS) for cls in _members(protocol.Request)]
ALL_REPLIES = [_sample(cls, REPLIES) for cls in _members(protocol.Reply)]


def test_hand_made_samples_are_union_members() -> None:
    assert {type(m) for m in REQUESTS} <= set(_members(protocol.Request))
    assert {type(m) for m in REPLIES} <= set(_members(protocol.Reply))


@pytest.mark.parametrize("msg", ALL_REQUESTS + REQUESTS, ids=lambda m: type(m).__name__)
def test_request_round_trips(msg: protocol.Msg) -> None:
    frame = protocol.encode(msg)
    (length,) = struct.unpack_from("<I", frame)
    assert length == len(frame) - HEADER_SIZE
    [body] = FrameDecoder().feed(frame)
    assert protocol.decode_request(body) == msg


@pytest.mark.parametrize("msg", ALL_REPLIES + REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trips(msg: protocol.Msg) -> None:
    [body] = FrameDecoder().feed(protocol.encode(msg))
    assert protocol.decode_reply(body) == msg


def test_tag_is_the_snake_case_name() -> None:
    body = protocol.encode(protocol.MemEventEnable(domid=1, ring=RingKind.paging))[HEADER_SIZE:]
    raw = msgspec.msgpack.decode(body)
    assert raw == {"op": "mem_event_enable", "domid": 1, "ring": "paging"}
    empty = protocol.encode(protocol.DomainList())[HEADER_SIZE:]
    assert msgspec.msgpack.decode(empty) == {"op": "domain_list"}


def test_tags_are_unique() -> None:
    infos = [msgspec.inspect.type_info(t) for t in _members(protocol.Request) + _members(protocol.Reply)]
    tags = [info.tag for info in infos if isinstance(info, msgspec.inspect.StructType)]
    assert all(isinstance(tag, str) for tag in tags)
    assert len(tags) == len(infos)
    assert len(tags) == len(set(tags))


def _body(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize("body", [
    b"",                                             # empty body
    b"\xc1",                                         # a byte msgpack never uses
    b"\x92\x01\x02",                                 # an array, not a map
    _body({"domid": 1}),                             # no tag
    _body({"op": "no_such_op"}),                     # unknown tag
    _body({"op": "stats"}),                          # missing field
    _body({"op": "stats", "domid": "one"}),          # wrong field type
    _body({"op": "domain_list", "extra": 1}),        # unknown field
    _body({"op": "mem_event_enable", "domid": 1, "ring": "teleport"}),  # bad enum value
    _body({"op": "ok"}),                             # a reply where a request is due
    _body({"op": "stats", "domid": 1})[:-1],        # cut short
], ids=["empty", "reserved-byte", "array", "no-tag", "unknown-tag", "missing-field", "wrong-type",
        "unknown-field", "bad-enum", "reply-as-request", "cut-short"])
def test_malformed_request_is_einval_not_fatal(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(body)
    assert info.value.errno is Errno.EINVAL
    assert not info.value.fatal
    assert "malformed request" in info.value.message


def test_request_is_not_a_reply() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_reply(protocol.encode(protocol.DomainList())[HEADER_SIZE:])
    assert info.value.errno is Errno.EINVAL and not info.value.fatal


def test_error_reply_needs_a_known_errno() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_reply(_body({"op": "error", "errno": "EWHATEVER", "message": ""}))


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


def test_frame_split_byte_by_byte() -> None:
    frame = protocol.encode(REQUESTS[3])
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(frame)):
        out += dec.feed(frame[i:i + 1])
        if i < len(frame) - 1:
            assert out == []
            assert dec.pending == i + 1
    assert [protocol.decode_request(b) for b in out] == [REQUESTS[3]]
    assert dec.pending == 0


def test_merged_frames_in_order() -> None:
    stream = b"".join(protocol.encode(m) for m in REQUESTS)
    bodies = FrameDecoder().feed(stream)
    assert [protocol.decode_request(b) for b in bodies] == REQUESTS


def test_merged_and_split_across_chunks() -> None:
    stream = b"".join(protocol.encode(m) for m in REPLIES)
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(stream), 1000):
        out += dec.feed(stream[i:i + 1000])
    assert [protocol.decode_reply(b) for b in out] == REPLIES
    assert dec.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12), st.lists(st.integers(min_value=0, max_value=4000)))
def test_any_chunking_yields_the_same_bodies(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(struct.pack("<I", len(b)) + b for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in zip(points, points[1:], strict=False):
        out += dec.feed(stream[a:b])
    assert out == bodies
    assert dec.pending == 0


def test_truncated_frame_is_visible_as_pending() -> None:
    frame = protocol.encode(protocol.Stats(domid=1))
    dec = FrameDecoder()
    assert dec.feed(frame[:-3]) == []
    assert dec.pending == len(frame) - 3  # non-zero at EOF: a truncated frame
    assert dec.feed(frame[-3:]) != []
    assert dec.pending == 0
    dec.feed(frame[:2])  # even a partial header counts
    assert dec.pending == 2


def test_zero_length_body_is_a_frame() -> None:
    assert FrameDecoder().feed(b"\0\0\0\0") == [b""]


def test_oversized_length_is_fatal() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(struct.pack("<I", MAX_FRAME + 1))
    assert info.value.fatal and info.value.errno is Errno.EINVAL
    assert "exceeds" in info.value.message


def test_huge_length_prefix_is_fatal_before_any_body() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(b"\xff\xff\xff\xff" + b"junk")
    assert info.value.fatal


def test_max_frame_itself_is_allowed() -> None:
    dec = FrameDecoder(max_frame=10)
    assert dec.feed(struct.pack("<I", 10) + b"0123456789") == [b"0123456789"]
    with pytest.raises(ProtocolError):
        dec.feed(struct.pack("<I", 11))


def test_good_frames_before_an_oversized_one_come_out_first() -> None:
    good = protocol.encode(protocol.DomainList())
    dec = FrameDecoder()
    assert dec.feed(good + good + struct.pack("<I", MAX_FRAME + 1)) == [good[HEADER_SIZE:]] * 2
    with pytest.raises(ProtocolError) as info:
        dec.feed(b"")
    assert info.value.fatal


def test_encode_refuses_oversized_messages() -> None:
    big = protocol.PagingLoad(domid=1, gfns=[0], pages=[b"\0" * (MAX_FRAME + 1)])
    with pytest.raises(ProtocolError) as info:
        protocol.encode(big)
    assert info.value.errno is Errno.EINVAL


def test_socket_path_honours_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(protocol.RUN_DIR_ENV, "/run/x")
    assert protocol.socket_path() == "/run/x/control.sock"
    assert protocol.socket_path("/elsewhere") == "/elsewhere/control.sock"


def test_ring_owned_tells_a_new_daemon_from_the_dead_one() -> None:
    """An enabled ring whose dead owner is not yet noticed is not the new daemon's."""
    on = RingStats(enabled=True)
    assert DomainStats(domid=1, paging=on, ring_owners={"paging": 10}).ring_owned("paging", 10)
    assert not DomainStats(domid=1, paging=on, ring_owners={"paging": 10}).ring_owned("paging", 11)
    assert DomainStats(domid=1, paging=on, ring_owners={"paging": 0}).ring_owned("paging", 11), "pid unknown"
    assert DomainStats(domid=1, paging=on, ring_owners={"paging": 10}).ring_owned("paging")
    assert not DomainStats(domid=1, paging=on, rings_orphaned=["paging"]).ring_owned("paging")
    assert not DomainStats(domid=1).ring_owned("paging")
    assert not DomainStats(domid=1, paging=on).ring_owned("access")
