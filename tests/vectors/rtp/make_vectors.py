"""Writes the RTP/RTCP vector files of this directory. Run from the repository root:

    .venv/bin/python tests/vectors/rtp/make_vectors.py

Every constructed vector is laid out field by field from the figures of its RFC with `struct`
only (nothing from media_core), so the tests compare the parser against an independent
encoding. The `sipp_*` vectors are copied byte for byte out of the pcap files that SIPp ships
(Debian sip-tester, /usr/share/sip-tester); they are real captures, not constructions.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIPP = Path("/usr/share/sip-tester")


def rtp_fixed(*, p: int = 0, x: int = 0, cc: int = 0, m: int = 0, pt: int = 0, seq: int = 0,
              ts: int = 0, ssrc: int = 0) -> bytes:
    # RFC 3550 §5.1: V=2 | P | X | CC(4) ; M | PT(7) ; seq(16) ; timestamp(32) ; SSRC(32)
    return struct.pack("!BBHII", (2 << 6) | (p << 5) | (x << 4) | cc, (m << 7) | pt, seq, ts,
                       ssrc)


def rtcp_header(*, p: int = 0, count: int, pt: int, body: bytes) -> bytes:
    # RFC 3550 §6.4.1: V=2 | P | RC(5) ; PT(8) ; length = 32-bit words - 1
    assert len(body) % 4 == 0
    return struct.pack("!BBH", (2 << 6) | (p << 5) | count, pt, len(body) // 4) + body


def report_block(ssrc: int, fraction: int, lost: int, highest: int, jitter: int, lsr: int,
                 dlsr: int) -> bytes:
    # RFC 3550 §6.4.1 report block; cumulative lost is 24-bit two's complement
    return struct.pack("!IIIIII", ssrc, (fraction << 24) | (lost & 0xFFFFFF), highest, jitter,
                       lsr, dlsr)


def sdes_chunk(ssrc: int, items: list[tuple[int, bytes]]) -> bytes:
    # RFC 3550 §6.5: SSRC, items (type, length, text), a null item, zero pad to 32 bits
    out = struct.pack("!I", ssrc) + b"".join(bytes([t, len(v)]) + v for t, v in items) + b"\0"
    return out + bytes(-len(out) % 4)


def pcap_rtp(name: str) -> list[tuple[float, bytes]]:
    """(time, UDP payload) of each packet of a classic little-endian pcap (Ethernet/IPv4)."""
    data = (SIPP / name).read_bytes()
    magic, _vmaj, _vmin, _tz, _sig, _snap, linktype = struct.unpack_from("<IHHiIII", data, 0)
    assert magic == 0xA1B2C3D4 and linktype == 1, (hex(magic), linktype)
    out = []
    pos = 24
    while pos < len(data):
        sec, usec, incl, _orig = struct.unpack_from("<IIII", data, pos)
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        out.append((sec + usec / 1e6, bytes(ip[ihl + 8 :])))
    return out


def main() -> int:
    files: dict[str, bytes] = {}
    ulaw_silence = b"\xff" * 160

    # RFC 3550 §5.1: fixed header only, PCMU (RFC 3551 PT 0), 20 ms payload
    files["rtp_pcmu.bin"] = rtp_fixed(pt=0, seq=0x1234, ts=0x89ABCDEF, ssrc=0xDEADBEEF) \
        + ulaw_silence
    # RFC 3550 §5.1/§5.3.1 + RFC 8285 §4.2: M=1, two CSRCs, one-byte header extension
    # (id 1 len 1 "audio level", id 3 len 3, two padding bytes), 4 bytes of padding
    ext = bytes([0x10, 0x85, 0x32, 0xAA, 0xBB, 0xCC, 0x00, 0x00])
    files["rtp_csrc_ext_pad.bin"] = (
        rtp_fixed(p=1, x=1, cc=2, m=1, pt=96, seq=65535, ts=0xFFFFFF60, ssrc=0x01020304)
        + struct.pack("!II", 0x11111111, 0x22222222)
        + struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext
        + b"\x01\x02\x03\x04\x05"
        + b"\x00\x00\x00\x04"
    )
    # RFC 8285 §4.3: two-byte form (profile 0x100 | appbits 0), id 7 len 0, id 200 len 5
    ext2 = bytes([7, 0, 200, 5]) + b"hello" + b"\x00\x00\x00"
    files["rtp_two_byte_ext.bin"] = (
        rtp_fixed(x=1, pt=8, seq=1, ts=160, ssrc=7)
        + struct.pack("!HH", 0x1000, len(ext2) // 4) + ext2
        + b"\xd5" * 160
    )
    # RFC 4733 §2.3: event 5, E=1, volume 10, duration 800, PT 101
    files["rtp_telephone_event_end.bin"] = rtp_fixed(pt=101, seq=42, ts=8000, ssrc=99) \
        + bytes([5, 0x80 | 10]) + struct.pack("!H", 800)

    # RFC 3550 §6.4.1 SR with one report block, then §6.5 SDES CNAME (a minimal compound)
    sr_body = struct.pack("!IIIIII", 0xDEADBEEF, 0xE9A2C3D4, 0x80000000, 0x89ABCDEF, 1500,
                          240000)
    sr_body += report_block(0x0BADCAFE, 0x19, 37, 0x0001FFFF, 120, 0xC3D48000, 0x00018000)
    files["rtcp_sr_sdes.bin"] = (
        rtcp_header(count=1, pt=200, body=sr_body)
        + rtcp_header(count=1, pt=202, body=sdes_chunk(0xDEADBEEF, [(1, b"agent@edgecc")]))
    )
    # RFC 3550 §6.4.2 RR with two blocks (one with negative cumulative loss: duplicates),
    # §6.5 SDES with CNAME, NAME, PRIV, and §6.6 BYE with two sources and a reason
    rr_body = struct.pack("!I", 0x01020304)
    rr_body += report_block(0xAAAA0001, 0, -3, 70000, 8, 0, 0)
    rr_body += report_block(0xAAAA0002, 255, 0x7FFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 1, 65536)
    sdes = sdes_chunk(0x01020304, [(1, b"u@h"), (2, b"Queue Sales"), (8, b"\x03abcXYZ")])
    sdes += sdes_chunk(0x05060708, [(1, b"x")])
    bye = struct.pack("!II", 0x01020304, 0x05060708) + bytes([11]) + b"call closed"
    files["rtcp_rr_sdes_bye.bin"] = (
        rtcp_header(count=2, pt=201, body=rr_body)
        + rtcp_header(count=2, pt=202, body=sdes)
        + rtcp_header(count=2, pt=203, body=bye)
    )
    # RFC 3550 §6.7 APP (subtype 5, name "EDGE"), padded by 8 (§6.4.1 P bit, last packet)
    app = struct.pack("!I", 0x01020304) + b"EDGE" + b"\x00\x01\x02\x03"
    files["rtcp_rr_app_padded.bin"] = (
        rtcp_header(count=0, pt=201, body=struct.pack("!I", 0x01020304))
        + rtcp_header(p=1, count=5, pt=204, body=app + bytes(7) + b"\x08")
    )
    # RFC 3611 §4.7 VoIP metrics block (BT=7, length 8) and §4.4 receiver reference time
    # (BT=4, length 2) in one XR (PT 207) after an RR
    voip = struct.pack(
        "!BBHIBBBBHHHHbbBBBBBBBBHHH",
        7, 0, 8, 0x0BADCAFE,
        13, 3, 64, 2,           # loss 13/256, discard 3/256, burst density 64, gap density 2
        120, 4800,              # burst duration ms, gap duration ms
        45, 85,                 # round trip delay ms, end system delay ms
        -20, -62, 127, 16,      # signal dBm0, noise dBm0, RERL unavailable, Gmin 16
        88, 127, 41, 40,        # R, ext R unavailable, MOS-LQ 4.1, MOS-CQ 4.0
        0xF0 | 4, 0,            # RX config: PLC standard (3), JBA adaptive (3), rate 4
        60, 200, 1000,          # JB nominal, maximum, absolute maximum (ms)
    )
    rrt = struct.pack("!BBHII", 4, 0, 2, 0xE9A2C3D4, 0x80000000)
    files["rtcp_rr_xr_voip.bin"] = (
        rtcp_header(count=0, pt=201, body=struct.pack("!I", 0x01020304))
        + struct.pack("!BBH", 2 << 6, 207, (4 + len(voip) + len(rrt)) // 4)
        + struct.pack("!I", 0x01020304) + voip + rrt
    )
    # RFC 4585 §6.2.1 generic NACK (PT 205, FMT 1): not decoded here, carried as bytes
    files["rtcp_rr_nack.bin"] = (
        rtcp_header(count=0, pt=201, body=struct.pack("!I", 0x01020304))
        + rtcp_header(count=1, pt=205, body=struct.pack("!IIHH", 0x01020304, 0x0BADCAFE, 100,
                                                        0x0005))
    )

    # Real captures shipped with SIPp: first G.711 A-law packet and a whole RFC 2833 digit.
    files["sipp_g711a_first.bin"] = pcap_rtp("g711a.pcap")[0][1]
    dtmf = pcap_rtp("dtmf_2833_1.pcap")
    files["sipp_dtmf_start.bin"] = dtmf[0][1]
    files["sipp_dtmf_end.bin"] = dtmf[-1][1]
    # every packet of the digit as records: u32 microseconds since the first, u16 length, bytes
    t0 = dtmf[0][0]
    files["sipp_dtmf_2833_1.records"] = b"".join(
        struct.pack("!IH", round((t - t0) * 1e6), len(p)) + p for t, p in dtmf
    )

    # Malformed input (each must raise RtpParseError; see bad/README.md)
    good = files["rtp_pcmu.bin"]
    bad = {
        "rtp_short.bin": good[:11],
        "rtp_version1.bin": bytes([0x40]) + good[1:],
        "rtp_csrc_beyond.bin": bytes([0x8F]) + good[1:20],
        "rtp_ext_beyond.bin": rtp_fixed(x=1, pt=0) + struct.pack("!HH", 0xBEDE, 10) + b"\0" * 8,
        "rtp_ext_header_cut.bin": rtp_fixed(x=1, pt=0) + b"\xbe\xde",
        "rtp_padding_too_big.bin": rtp_fixed(p=1, pt=0) + b"\x01\x02\x03\x10",
        "rtp_padding_zero.bin": rtp_fixed(p=1, pt=0) + b"\x01\x02\x03\x00",
        "rtp_padding_no_room.bin": rtp_fixed(p=1, pt=0),
        "rtcp_length_beyond.bin": files["rtcp_sr_sdes.bin"][:-4],
        "rtcp_length_short.bin": files["rtcp_sr_sdes.bin"] + b"\x81",
        "rtcp_version1.bin": bytes([0x41]) + files["rtcp_sr_sdes.bin"][1:],
        "rtcp_padding_not_last.bin": bytes([0xA2]) + files["rtcp_rr_sdes_bye.bin"][1:],
        "rtcp_padding_too_big.bin": files["rtcp_rr_app_padded.bin"][:-1] + b"\x40",
        "rtcp_sr_blocks_beyond.bin": bytes([0x83]) + files["rtcp_sr_sdes.bin"][1:],
        "rtcp_sdes_unterminated.bin": rtcp_header(count=1, pt=202, body=struct.pack("!I", 1)
                                                  + b"\x01\x02ab"),
        "rtcp_xr_voip_bad_length.bin": struct.pack("!BBHI", 0x80, 207, 3, 1)
        + struct.pack("!BBHI", 7, 0, 1, 2),
        "rtcp_bye_reason_beyond.bin": rtcp_header(count=1, pt=203, body=struct.pack("!I", 1)
                                                  + b"\x09abc"),
        "rtcp_not_rtcp_type.bin": rtcp_header(count=0, pt=72, body=struct.pack("!I", 1)),
    }
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    for name, data in bad.items():
        (HERE / "bad" / name).write_bytes(data)
    print(f"wrote {len(files)} vectors and {len(bad)} malformed ones to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
