"""The hypervisor's xenstore, sans I/O: the tree, the watches and xenstored's wire protocol."""

from __future__ import annotations

import struct

import pytest

from hvemu.xenstore import XenStore, XsDecoder, XsError, XsMsg, XsType, watch_event

A, B = 1, 2  # two connections


def events(out: list[tuple[int, XsMsg]]) -> list[tuple[int, str, str]]:
    res = []
    for conn, msg in out:
        assert msg.type == XsType.WATCH_EVENT
        path, token, _ = msg.payload.split(b"\0")
        res.append((conn, path.decode(), token.decode()))
    return res


def test_read_write_directory_rm() -> None:
    xs = XenStore()
    xs.write("/local/domain/1/memory/target", b"2048")
    assert xs.read("/local/domain/1/memory/target") == b"2048"
    assert xs.read("/local/domain/1/memory") == b""  # parents are made, empty
    assert xs.directory("/local/domain/1") == ["memory"]
    assert xs.directory("/local/domain") == ["1"]
    xs.write("device-model/1/command", b"flush-cache")  # relative: under /local/domain/0
    assert xs.read("/local/domain/0/device-model/1/command") == b"flush-cache"
    assert xs.device_model_commands == [(1, "flush-cache")]
    xs.rm("/local/domain/1")
    with pytest.raises(XsError) as exc:
        xs.read("/local/domain/1/memory/target")
    assert exc.value.errno == "ENOENT"
    for bad in ("/a//b", "/a/", "@nope"):
        with pytest.raises(XsError):
            xs.read(bad)


def test_watches_fire_at_once_and_on_writes_at_or_below() -> None:
    xs = XenStore()
    assert events(xs.watch(A, "/local/domain/1/memory", "tok")) == [(A, "/local/domain/1/memory", "tok")]
    assert events(xs.watch(B, "/local/domain/1/memory/target-tot_pages", "")) == [
        (B, "/local/domain/1/memory/target-tot_pages", "")]
    assert events(xs.write("/local/domain/1/memory/target-tot_pages", b"1024")) == [
        (A, "/local/domain/1/memory/target-tot_pages", "tok"), (B, "/local/domain/1/memory/target-tot_pages", "")]
    assert xs.write("/local/domain/1/name", b"g") == []  # beside, not below: no event
    assert xs.write("/local/domain/1", b"x") == []  # above a watch: a write does not fire it
    assert {e[0] for e in events(xs.rm("/local/domain/1"))} == {A, B}  # a removal fires the watches below
    xs.unwatch(A, "/local/domain/1/memory", "tok")
    with pytest.raises(XsError):
        xs.unwatch(A, "/local/domain/1/memory", "tok")
    xs.disconnect(B)
    assert xs.write("/local/domain/1/memory/target-tot_pages", b"1") == []


def test_domains_introduced_and_released() -> None:
    xs = XenStore()
    xs.watch(A, "@introduceDomain", "i")
    xs.watch(A, "@releaseDomain", "r")
    xs.watch(B, "/local/domain/3/memory/target-tot_pages", "")
    assert (A, "@introduceDomain", "i") in events(xs.introduce_domain(3, "guest3", 4096, 4096))
    assert xs.read("/local/domain/3/name") == b"guest3"
    assert xs.read("/local/domain/3/memory/target") == b"4096"
    assert events(xs.set_target(3, 2048)) == [(B, "/local/domain/3/memory/target-tot_pages", "")]
    assert xs.read("/local/domain/3/memory/target") == b"2048"
    assert (A, "@releaseDomain", "r") in events(xs.release_domain(3))
    with pytest.raises(XsError):
        xs.read("/local/domain/3/name")


def wire(kind: XsType, *args: bytes, req: int = 9) -> XsMsg:
    payload = b"".join(a + b"\0" for a in args)
    return XsMsg(kind, req, 0, payload)


def test_the_wire_protocol() -> None:
    xs = XenStore()
    xs.introduce_domain(1, "g", 4, 4)
    raw = wire(XsType.READ, b"/local/domain/1/name").encode()
    assert raw[:16] == struct.pack("<IIII", XsType.READ, 9, 0, len(b"/local/domain/1/name\0"))
    dec = XsDecoder()
    assert dec.feed(raw[:5]) == [] and dec.feed(raw[5:]) == [wire(XsType.READ, b"/local/domain/1/name")]
    [(conn, reply)] = xs.handle(A, wire(XsType.READ, b"/local/domain/1/name"))
    assert (conn, reply.type, reply.req_id, reply.payload) == (A, XsType.READ, 9, b"g")
    [(_, reply)] = xs.handle(A, wire(XsType.READ, b"/nope"))
    assert (reply.type, reply.payload) == (XsType.ERROR, b"ENOENT\0")
    out = xs.handle(A, XsMsg(XsType.WRITE, 3, 0, b"/local/domain/1/memory/target-tot_pages\x002048"))
    assert out[0][1].payload == b"OK\0"
    assert xs.read("/local/domain/1/memory/target-tot_pages") == b"2048"
    out = xs.handle(A, wire(XsType.WATCH, b"@releaseDomain", b"1"))
    assert [m.type for _, m in out] == [XsType.WATCH, XsType.WATCH_EVENT]
    assert out[1][1] == watch_event("@releaseDomain", "1")
    assert xs.handle(A, wire(XsType.GET_DOMAIN_PATH, b"1"))[0][1].payload == b"/local/domain/1\0"
    assert xs.handle(A, wire(XsType.IS_DOMAIN_INTRODUCED, b"1"))[0][1].payload == b"T\0"
    assert xs.handle(A, wire(XsType.IS_DOMAIN_INTRODUCED, b"2"))[0][1].payload == b"F\0"
    assert xs.handle(A, wire(XsType.DIRECTORY, b"/local/domain/1"))[0][1].payload == b"domid\0memory\0name\0"
    assert xs.handle(A, XsMsg(XsType.READ, 1, 5, b"/a\0"))[0][1].payload == b"ENOSYS\0"  # transactions
    assert xs.handle(A, wire(XsType.TRANSACTION_START))[0][1].type == XsType.ERROR
    with pytest.raises(XsError):
        XsDecoder().feed(struct.pack("<IIII", XsType.READ, 1, 0, 1 << 20))
