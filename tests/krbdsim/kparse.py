"""What the kernel makes of the bytes written to /sys/bus/rbd/{add,remove}[_single_major].

Pure functions, no I/O: each mirrors one piece of kernel C code (named in its docstring), so the
simulator accepts and refuses exactly what the kernel would. Errors are `KernelError`, an OSError
whose errno is what write(2) returns; its text is what the kernel would print to dmesg.

Text is handled as latin-1 `str` so one character is one byte, as for the C code.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

PAGE_SIZE = 4096
RBD_SNAP_HEAD_NAME = "-"
# NAME_MAX minus len("snap_"): the longest snapshot name rbd_add_parse_args takes.
RBD_MAX_SNAP_NAME_LEN = 255 - len("snap_")
CEPH_MAX_MON = 31
CEPH_MON_PORT = 6789
CEPH_NOSNAP = 2**64 - 2
CEPH_MAX_KEY_LEN = 16
CEPH_CRYPTO_NONE = 0
CEPH_CRYPTO_AES = 1
CEPH_AUTH_NAME_DEFAULT = "guest"
INT_MAX = 2**31 - 1
SECTOR_SIZE = 512
# The kernel's ENOTSUPP (524) cannot cross FUSE (replies <= -512 are refused), so we use this.
ENOTSUPP_STANDIN = errno.EOPNOTSUPP

# isspace() in the C/POSIX locale; next_token() in rbd.c and the kernel's sscanf use these.
C_SPACE = " \t\n\v\f\r"
# ispunct() in the C locale, used by parse_fsid().
C_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


class KernelError(OSError):
    """An errno the kernel's store() would return, with the message it would log."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def _einval(message: str) -> KernelError:
    return KernelError(errno.EINVAL, message)


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class EntityAddr:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        # %pISpc: IPv6 in brackets, then ":port".
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


def _in4_pton(s: str, pos: int, delim: str) -> tuple[ipaddress.IPv4Address, int] | None:
    """in4_pton(): a.b.c.d, each part decimal <= 255, ended by delim, ':' or the end."""
    end = pos
    while end < len(s) and ((s[end].isascii() and s[end].isdigit()) or s[end] == "."):
        end += 1
    if end < len(s) and s[end] not in (delim, ":"):
        return None
    parts = s[pos:end].split(".")
    if len(parts) != 4 or any(not p or int(p) > 255 for p in parts):
        return None
    return ipaddress.IPv4Address(".".join(str(int(p)) for p in parts)), end


def _in6_pton(s: str, pos: int, delim: str) -> tuple[ipaddress.IPv6Address, int] | None:
    """in6_pton(): hex groups, '::' and a trailing IPv4 allowed, ended by delim or the end."""
    end = pos
    allowed = "0123456789abcdefABCDEF:."
    while end < len(s) and s[end] in allowed:
        end += 1
    if end < len(s) and s[end] != delim:
        return None
    try:
        return ipaddress.IPv6Address(s[pos:end]), end
    except ValueError:
        return None


def parse_ips(s: str, max_count: int, delim: str = ",") -> list[EntityAddr]:
    """ceph_parse_ips(): `ip[:port][,ip[:port]...]`, IPv6 in brackets when a port follows.

    The default port is CEPH_MON_PORT (6789) whatever ms_mode says; port 0 also means the default.
    Host names would need the dns_resolver upcall, which is not simulated: EINVAL.
    """
    addrs: list[EntityAddr] = []
    p = 0
    end = len(s)
    for _ in range(max_count):
        cur_delim = delim
        if p < end and s[p] == "[":
            cur_delim = "]"
            p += 1
        parsed: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None
        parsed = _in4_pton(s, p, cur_delim) or _in6_pton(s, p, cur_delim)
        if parsed is None:
            raise _einval(f"libceph: parse_ips bad ip '{s}'")
        ip, p = parsed
        if cur_delim == "]":
            if p >= end or s[p] != "]":
                raise _einval("libceph: missing matching ']'")
            p += 1
        port = CEPH_MON_PORT
        if p < end and s[p] == ":":
            p += 1
            port = 0
            while p < end and s[p].isascii() and s[p].isdigit():
                port = port * 10 + int(s[p])
                p += 1
            if port == 0:
                port = CEPH_MON_PORT
            elif port > 65535:
                raise _einval(f"libceph: parse_ips bad port in '{s}'")
        addrs.append(EntityAddr(ip, port))
        if p == end:
            break
        if s[p] != delim:
            raise _einval(f"libceph: parse_ips bad ip '{s}'")
        p += 1
    if p != end:
        raise _einval(f"libceph: parse_ips bad ip '{s}' (or more than {max_count})")
    return addrs


# --------------------------------------------------------------------------- numbers, ids, keys


def kstrtouint(s: str) -> int:
    """kstrtouint(s, 0): optional '+', radix from prefix (0x hex, 0 octal), one optional '\\n'."""
    if s.startswith("+"):
        s = s[1:]
    base = 10
    if s.startswith("0"):
        if s[1:2].lower() == "x" and s[2:3] and s[2] in "0123456789abcdefABCDEF":
            base = 16
            s = s[2:]
        else:
            base = 8
    value = 0
    i = 0
    while i < len(s):
        c = s[i].lower()
        if c.isascii() and c.isdigit():
            digit = ord(c) - ord("0")
        elif "a" <= c <= "f":
            digit = ord(c) - ord("a") + 10
        else:
            break
        if digit >= base:
            break
        value = value * base + digit
        i += 1
    if i == 0:
        raise _einval(f"not a number: '{s}'")
    rest = s[i:]
    if rest.startswith("\n"):
        rest = rest[1:]
    if rest or value > 0xFFFFFFFF:
        raise _einval(f"not a u32: '{s}'")
    return value


def parse_fsid(s: str) -> bytes:
    """parse_fsid(): 16 pairs of hex digits, punctuation skipped, anything after ignored."""
    out = bytearray()
    i = 0
    while i < len(s) and len(out) < 16:
        if s[i] in C_PUNCT:
            i += 1
            continue
        pair = s[i : i + 2]
        if len(pair) < 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            break
        out.append(int(pair, 16))
        i += 2
    if len(out) != 16:
        raise _einval(f"libceph: Failed to parse fsid: '{s}'")
    return bytes(out)


@dataclass(frozen=True)
class CryptoKey:
    """struct ceph_crypto_key as decoded from its wire form."""

    type: int
    created: bytes
    secret: bytes

    def same_secret(self, other: CryptoKey) -> bool:
        # Authentication proves knowledge of the secret bytes; `created` plays no part.
        return self.type == other.type and self.secret == other.secret


def _decode_bits(c: str) -> int:
    if "A" <= c <= "Z":
        return ord(c) - ord("A")
    if "a" <= c <= "z":
        return ord(c) - ord("a") + 26
    if "0" <= c <= "9":
        return ord(c) - ord("0") + 52
    return {"+": 62, "/": 63, "=": 0}.get(c, -1)


def ceph_unarmor(text: str) -> bytes:
    """ceph_unarmor(): base64 in whole groups of 4; newlines skipped; '=' ends the data."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\n":
            i += 1
            continue
        if i + 4 > len(text):
            raise _einval("libceph: secret is not whole base64 groups")
        a, b, c, d = (_decode_bits(ch) for ch in text[i : i + 4])
        if min(a, b, c, d) < 0:
            raise _einval("libceph: secret has a non-base64 character")
        out.append(((a << 2) | (b >> 4)) & 0xFF)
        if text[i + 2] == "=":
            return bytes(out)
        out.append((((b & 15) << 4) | (c >> 2)) & 0xFF)
        if text[i + 3] == "=":
            return bytes(out)
        out.append((((c & 3) << 6) | d) & 0xFF)
        i += 4
    return bytes(out)


def decode_crypto_key(blob: bytes) -> CryptoKey:
    """ceph_crypto_key_decode() plus the checks done when the key is put to use.

    Layout: le16 type, 8 bytes `created` (le32 sec, le32 nsec), le16 len, len bytes of secret.
    """
    if len(blob) < 12:
        raise _einval("libceph: failed to decode crypto key")
    ktype, length = struct.unpack_from("<H", blob, 0)[0], struct.unpack_from("<H", blob, 10)[0]
    if len(blob) < 12 + length:
        raise _einval("libceph: failed to decode crypto key")
    if length > CEPH_MAX_KEY_LEN:
        raise _einval(f"libceph: secret too big {length}")
    if ktype == CEPH_CRYPTO_AES:
        if length == 0 or length not in (16, 24, 32):
            raise _einval(f"libceph: bad AES key length {length}")
    elif ktype != CEPH_CRYPTO_NONE:
        raise KernelError(ENOTSUPP_STANDIN, f"libceph: unsupported key type {ktype}")
    return CryptoKey(ktype, blob[2:10], blob[12 : 12 + length])


def unarmor_key(text: str) -> CryptoKey:
    """ceph_crypto_key_unarmor(): what `secret=` goes through."""
    return decode_crypto_key(ceph_unarmor(text))


def parse_crush_location(s: str) -> frozenset[tuple[str, str]]:
    """ceph_parse_crush_location(): `type:name[|type:name...]`; a repeated pair is EEXIST."""
    locs: set[tuple[str, str]] = set()
    for item in s.split("|"):
        type_name, colon, name = item.partition(":")
        if not colon or not type_name or not name:
            raise _einval(f"libceph: Failed to parse CRUSH location '{s}'")
        if (type_name, name) in locs:
            raise KernelError(errno.EEXIST, f"libceph: duplicate CRUSH location '{item}'")
        locs.add((type_name, name))
    return frozenset(locs)


# --------------------------------------------------------------------------- fs_parse tables

# Kinds of fs_parameter_spec: "flag" (fsparam_flag), "u32", "string", or an enum's value tuple.
ParamKind = str | tuple[str, ...]


@dataclass(frozen=True)
class ParamSpec:
    kind: ParamKind
    # fsparam_flag_no: "no<name>" is accepted and sets `negated`.
    neg_with_no: bool = False


# net/ceph/ceph_common.c: ceph_parameters (libceph gets the first look at every option).
CEPH_PARAMETERS: dict[str, ParamSpec] = {
    "abort_on_full": ParamSpec("flag"),
    "cephx_require_signatures": ParamSpec("flag", neg_with_no=True),
    "cephx_sign_messages": ParamSpec("flag", neg_with_no=True),
    "crc": ParamSpec("flag", neg_with_no=True),
    "crush_location": ParamSpec("string"),
    "fsid": ParamSpec("string"),
    "ip": ParamSpec("string"),
    "key": ParamSpec("string"),
    "mount_timeout": ParamSpec("u32"),
    "name": ParamSpec("string"),
    "osd_idle_ttl": ParamSpec("u32"),
    "osd_request_timeout": ParamSpec("u32"),
    "osdkeepalive": ParamSpec("u32"),
    "read_from_replica": ParamSpec(("no", "balance", "localize")),
    "rxbounce": ParamSpec("flag"),
    "ms_mode": ParamSpec(("legacy", "crc", "secure", "prefer-crc", "prefer-secure")),
    "secret": ParamSpec("string"),
    "share": ParamSpec("flag", neg_with_no=True),
    "tcp_nodelay": ParamSpec("flag", neg_with_no=True),
}

# drivers/block/rbd.c: rbd_parameters.
RBD_PARAMETERS: dict[str, ParamSpec] = {
    "alloc_size": ParamSpec("u32"),
    "compression_hint": ParamSpec(("none", "compressible", "incompressible")),
    "exclusive": ParamSpec("flag"),
    "lock_on_read": ParamSpec("flag"),
    "lock_timeout": ParamSpec("u32"),
    "notrim": ParamSpec("flag"),
    "_pool_ns": ParamSpec("string"),
    "queue_depth": ParamSpec("u32"),
    "read_only": ParamSpec("flag"),
    "read_write": ParamSpec("flag"),
    "ro": ParamSpec("flag"),
    "rw": ParamSpec("flag"),
}


@dataclass(frozen=True)
class Parsed:
    name: str
    value: str | int | None
    negated: bool = False


def fs_parse(table: dict[str, ParamSpec], key: str, value: str | None) -> Parsed | None:
    """__fs_parse(): None means -ENOPARAM (not in this table); a bad value raises EINVAL."""
    negated = False
    spec = table.get(key)
    if spec is None and value is None and key.startswith("no") and len(key) > 2:
        base = table.get(key[2:])
        if base is not None and base.neg_with_no:
            spec, key, negated = base, key[2:], True
    if spec is None:
        return None
    if spec.kind == "flag":
        if value is not None:
            raise _einval(f"Unexpected value for '{key}'")
        return Parsed(key, None, negated)
    if value is None:
        raise _einval(f"Bad value for '{key}'")
    if spec.kind == "u32":
        try:
            return Parsed(key, kstrtouint(value))
        except KernelError:
            raise _einval(f"Bad value for '{key}'") from None
    if spec.kind == "string":
        if not value:
            raise _einval(f"Bad value for '{key}'")
        return Parsed(key, value)
    if value not in spec.kind:
        raise _einval(f"Bad value for '{key}'")
    return Parsed(key, value)


# --------------------------------------------------------------------------- the add request


@dataclass
class CephOptions:
    """struct ceph_options after ceph_parse_mon_ips() and ceph_parse_param()."""

    mon_addrs: list[EntityAddr]
    name: str | None = None
    key: CryptoKey | None = None
    fsid: bytes | None = None
    my_addr: EntityAddr | None = None
    noshare: bool = False
    nocrc: bool = False
    nomsgsign: bool = False
    tcp_nodelay: bool = True
    abort_on_full: bool = False
    rxbounce: bool = False
    mount_timeout: int = 60
    osd_idle_ttl: int = 60
    osd_keepalive: int = 5
    osd_request_timeout: int = 0
    read_from_replica: str = "no"
    ms_mode: str = "legacy"
    crush_locs: frozenset[tuple[str, str]] = frozenset()

    @property
    def msgr2(self) -> bool:
        return self.ms_mode != "legacy"

    @property
    def entity_name(self) -> str:
        return self.name if self.name is not None else CEPH_AUTH_NAME_DEFAULT

    def share_key(self) -> tuple[object, ...]:
        """What ceph_compare_options() compares besides the monitors."""
        key = None if self.key is None else (self.key.type, self.key.created, self.key.secret)
        return (
            self.name, key, self.fsid, self.my_addr, self.noshare, self.nocrc, self.nomsgsign,
            self.tcp_nodelay, self.abort_on_full, self.rxbounce, self.mount_timeout,
            self.osd_idle_ttl, self.osd_keepalive, self.osd_request_timeout,
            self.read_from_replica, self.ms_mode, self.crush_locs,
        )  # fmt: skip


@dataclass
class RbdOptions:
    """struct rbd_options with the defaults rbd_add_parse_args() sets."""

    read_only: bool = False
    queue_depth: int = 128
    alloc_size: int = 64 * 1024
    lock_timeout: int = 0
    lock_on_read: bool = False
    exclusive: bool = False
    trim: bool = True
    compression_hint: str = "none"


@dataclass
class AddRequest:
    ceph: CephOptions
    rbd: RbdOptions
    pool: str
    image: str
    snap: str
    pool_ns: str | None
    # rbd_dev->config_info: the written buffer up to its NUL, as is.
    config_info: str

    @property
    def is_snap(self) -> bool:
        return self.snap != RBD_SNAP_HEAD_NAME

    @property
    def read_only(self) -> bool:
        # do_rbd_add: RBD_DEV_FLAG_READONLY for `ro`/`read_only` or any snapshot mapping.
        return self.rbd.read_only or self.is_snap


def _next_token(buf: str, pos: int) -> tuple[int, int]:
    """next_token(): skip C whitespace, return [start, end) of the following run."""
    while pos < len(buf) and buf[pos] in C_SPACE:
        pos += 1
    end = pos
    while end < len(buf) and buf[end] not in C_SPACE:
        end += 1
    return pos, end


KeyringLookup = Callable[[str], str | None]


def _apply_ceph(opts: CephOptions, p: Parsed, keyring: KeyringLookup) -> None:
    """The switch in ceph_parse_param()."""
    v = p.value
    match p.name:
        case "ip":
            assert isinstance(v, str)
            opts.my_addr = parse_ips(v, 1)[0]
        case "fsid":
            assert isinstance(v, str)
            opts.fsid = parse_fsid(v)
        case "name":
            assert isinstance(v, str)
            opts.name = v
        case "secret":
            assert isinstance(v, str)
            opts.key = unarmor_key(v)
        case "key":
            # get_secret(): looked up in the kernel keyring; any failure there is EPERM.
            assert isinstance(v, str)
            armored = keyring(v)
            if armored is None:
                raise KernelError(errno.EPERM, f"libceph: Failed due to key not found: {v}")
            opts.key = unarmor_key(armored)
        case "crush_location":
            assert isinstance(v, str)
            opts.crush_locs = parse_crush_location(v)
        case "read_from_replica":
            assert isinstance(v, str)
            opts.read_from_replica = v
        case "ms_mode":
            assert isinstance(v, str)
            opts.ms_mode = v
        case "osdkeepalive" | "osd_idle_ttl":
            # 0 isn't well defined for these; the kernel refuses it.
            assert isinstance(v, int)
            if not 1 <= v <= INT_MAX // 1000:
                raise _einval(f"libceph: {p.name} out of range")
            if p.name == "osdkeepalive":
                opts.osd_keepalive = v
            else:
                opts.osd_idle_ttl = v
        case "mount_timeout" | "osd_request_timeout":
            # 0 means wait forever.
            assert isinstance(v, int)
            if v > INT_MAX // 1000:
                raise _einval(f"libceph: {p.name} out of range")
            if p.name == "mount_timeout":
                opts.mount_timeout = v
            else:
                opts.osd_request_timeout = v
        case "share":
            opts.noshare = p.negated
        case "crc":
            opts.nocrc = p.negated
        case "cephx_require_signatures":
            pass  # accepted and ignored (deprecated)
        case "cephx_sign_messages":
            opts.nomsgsign = p.negated
        case "tcp_nodelay":
            opts.tcp_nodelay = not p.negated
        case "abort_on_full":
            opts.abort_on_full = True
        case "rxbounce":
            opts.rxbounce = True
        case _:
            raise AssertionError(p.name)


def _apply_rbd(req: AddRequest, p: Parsed) -> None:
    """The switch in rbd_parse_param()."""
    opt = req.rbd
    v = p.value
    match p.name:
        case "queue_depth":
            assert isinstance(v, int)
            if v < 1:
                raise _einval("rbd: queue_depth out of range")
            opt.queue_depth = v
        case "alloc_size":
            assert isinstance(v, int)
            if v < SECTOR_SIZE:
                raise _einval("rbd: alloc_size out of range")
            if v & (v - 1):
                raise _einval("rbd: alloc_size must be a power of 2")
            opt.alloc_size = v
        case "lock_timeout":
            assert isinstance(v, int)
            if v > INT_MAX // 1000:
                raise _einval("rbd: lock_timeout out of range")
            opt.lock_timeout = v
        case "_pool_ns":
            assert isinstance(v, str)
            req.pool_ns = v
        case "compression_hint":
            assert isinstance(v, str)
            opt.compression_hint = v
        case "ro" | "read_only":
            opt.read_only = True
        case "rw" | "read_write":
            opt.read_only = False
        case "lock_on_read":
            opt.lock_on_read = True
        case "exclusive":
            opt.exclusive = True
        case "notrim":
            opt.trim = False
        case _:
            raise AssertionError(p.name)


def parse_add(buf: str, keyring: KeyringLookup = lambda _desc: None) -> AddRequest:
    """rbd_add_parse_args(): `<mon_addrs> <options> <pool> <image> [<snap>]`.

    Order of checks (first failure wins): the tokens, then the monitor list, then each option in
    the order written (libceph's table first, then rbd's).
    """
    s, e = _next_token(buf, 0)
    if s == e:
        raise _einval("rbd: no monitor address(es) provided")
    mon_addrs = buf[s:e]
    s, e = _next_token(buf, e)
    options = buf[s:e]
    if not options:
        raise _einval("rbd: no options provided")
    s, e = _next_token(buf, e)
    pool = buf[s:e]
    if not pool:
        raise _einval("rbd: no pool name provided")
    s, e = _next_token(buf, e)
    image = buf[s:e]
    if not image:
        raise _einval("rbd: no image name provided")
    s, e = _next_token(buf, e)
    snap = buf[s:e] or RBD_SNAP_HEAD_NAME
    if len(snap) > RBD_MAX_SNAP_NAME_LEN:
        raise KernelError(errno.ENAMETOOLONG, "rbd: snapshot name too long")
    # Deliberately stricter than the kernel, which never looks past the snapshot name: a client
    # that sends more tokens has a bug the kernel would hide.
    s, e = _next_token(buf, e)
    if s != e:
        raise _einval(f"krbdsim: unexpected token after the snapshot name: '{buf[s:e]}'")

    req = AddRequest(
        ceph=CephOptions(mon_addrs=parse_ips(mon_addrs, CEPH_MAX_MON)),
        rbd=RbdOptions(),
        pool=pool,
        image=image,
        snap=snap,
        pool_ns=None,
        config_info=buf,
    )
    # rbd_parse_options(): strsep on ',', empty items skipped, "=value" items skipped.
    for item in options.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if eq and not key:
            continue
        val = value if eq else None
        parsed = fs_parse(CEPH_PARAMETERS, key, val)
        if parsed is not None:
            _apply_ceph(req.ceph, parsed, keyring)
            continue
        parsed = fs_parse(RBD_PARAMETERS, key, val)
        if parsed is None:
            raise _einval(f"rbd: Unknown parameter '{key}'")
        _apply_rbd(req, parsed)
    return req


# --------------------------------------------------------------------------- the remove request


def _c_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def parse_remove(buf: str) -> tuple[int, bool]:
    """do_rbd_remove(): `sscanf(buf, "%d %5s", &dev_id, opt_buf)`.

    No number, or a negative one, is EINVAL. The option word is read up to 5 characters and must
    then equal "force", so "forced" counts as force while "fo" or "kill" is EINVAL.
    """
    p = 0
    while p < len(buf) and buf[p] in C_SPACE:
        p += 1
    start = p
    if p < len(buf) and buf[p] == "-":
        p += 1
    digits = p
    while p < len(buf) and buf[p].isascii() and buf[p].isdigit():
        p += 1
    if p == digits:
        raise _einval("rbd: dev_id out of range")
    # simple_strtoll wraps on overflow and the result is stored into an int.
    dev_id = _c_int32(int(buf[start:p]) & (2**64 - 1))
    if dev_id < 0:
        raise _einval("rbd: dev_id out of range")
    while p < len(buf) and buf[p] in C_SPACE:
        p += 1
    word_end = p
    while word_end < len(buf) and buf[word_end] not in C_SPACE and word_end - p < 5:
        word_end += 1
    opt = buf[p:word_end]
    if opt and opt != "force":
        raise _einval(f"rbd: bad remove option at '{opt}'")
    return dev_id, opt == "force"
