"""Which filesystems an attach mount may mount, and which options each may be given.

An rbd or loopback mount mounts the attachment's block device. mount(2) ignores the source of
a filesystem that lives on no device, so `fs_type: overlay` with a `lowerdir=/` and an
`upperdir=` on the host, or `proc`, `sysfs`, `devtmpfs`, `debugfs`, `bpf`, `cgroup2` or `tmpfs`,
would hand the host to the client. Only filesystems that live on a block device are allowed:
those of `BLOCK_FILESYSTEMS` plus whatever the kernel lists without `nodev` in
/proc/filesystems (a module not yet loaded is listed only after its first mount, hence the
table), minus those that need a daemon of their own (`NEEDS_DAEMON`).

Options are an allow-list too, per filesystem: an option that names a path or a device (ext4
`journal_path`, `journal_dev`, xfs `logdev`, `rtdev`, btrfs `device`, erofs `device`, quota
files, ...), that shares caches across mounts or reaches a daemon (erofs `fsid`, `domain_id`),
that injects errors or that panics the host on a corrupt image (`errors=panic`) is in no table.
Every value must match its option's pattern, and no pattern admits `/`. The generic mount(8)
flags (`ro`, `nosuid`, `noatime`, ...) are allowed everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from imageapi.kernel import mount as kmount

PROC_FILESYSTEMS = Path("/proc/filesystems")


@dataclass(frozen=True)
class Option:
    """One filesystem option: a bare word (`bare`), `key=value` (`value`), or either."""

    bare: bool = False
    value: str | None = None  # a regular expression the whole value must match
    hint: str = ""  # what the value is, for an error message

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return None if self.value is None else _compiled(self.value)


@cache
def _compiled(value: str) -> re.Pattern[str]:
    return re.compile(value)


FLAG = Option(bare=True)
NUMBER = Option(value=r"[0-9]{1,19}", hint="a number")
SIGNED = Option(value=r"-?[0-9]{1,19}", hint="a number")
SIZE = Option(value=r"[0-9]{1,19}[kKmMgGtT]?", hint="a size (a number, optionally k, m, g or t)")
MODE = Option(value=r"[0-7]{1,4}", hint="an octal mode")
# Loads the nls module of that name: letters, digits, '-' and '_' only.
CHARSET = Option(value=r"[A-Za-z0-9_-]{1,32}", hint="a character set name (e.g. utf8)")


def one_of(*words: str, bare: bool = False) -> Option:
    hint = "one of " + ", ".join(words)
    return Option(bare=bare, value="|".join(map(re.escape, words)), hint=hint)


def flags(*names: str) -> dict[str, Option]:
    return dict.fromkeys(names, FLAG)


def _ids() -> dict[str, Option]:
    """Owner and permission options of filesystems without Unix ownership (fat, exfat, ntfs3)."""
    return {"uid": NUMBER, "gid": NUMBER, "umask": MODE, "dmask": MODE, "fmask": MODE,
            "allow_utime": MODE, "iocharset": CHARSET}  # fmt: skip


# Not `panic`: a crafted image must not be able to stop the host.
_ERRORS = one_of("continue", "remount-ro")
_GROUPS = flags("grpid", "bsdgroups", "nogrpid", "sysvgroups")
_DAX = one_of("always", "never", "inode", bare=True)

_EXT4: dict[str, Option] = {
    **flags(
        "noload", "norecovery", "journal_checksum", "nojournal_checksum", "journal_async_commit",
        "barrier", "nobarrier", "delalloc", "nodelalloc", "noauto_da_alloc", "noinit_itable",
        "discard", "nodiscard", "nouid32", "block_validity", "noblock_validity", "dioread_lock",
        "dioread_nolock", "prefetch_block_bitmaps", "no_prefetch_block_bitmaps", "nombcache",
        "no_mbcache", "inlinecrypt", "acl", "noacl", "user_xattr", "quota", "noquota",
        "usrquota", "grpquota", "prjquota", "bsddf", "minixdf",
    ),
    **_GROUPS,
    "errors": _ERRORS,
    "data": one_of("journal", "ordered", "writeback"),
    "data_err": one_of("ignore", "abort"),
    "commit": NUMBER, "sb": NUMBER, "resuid": NUMBER, "resgid": NUMBER, "stripe": NUMBER,
    "inode_readahead_blks": NUMBER, "max_batch_time": NUMBER, "min_batch_time": NUMBER,
    "journal_ioprio": Option(value=r"[0-7]", hint="a priority 0-7"),
    "barrier": Option(bare=True, value=r"[01]", hint="0 or 1"),
    "auto_da_alloc": Option(bare=True, value=r"[01]", hint="0 or 1"),
    "init_itable": Option(bare=True, value=r"[0-9]{1,19}", hint="a number"),
    "mb_optimize_scan": Option(value=r"[01]", hint="0 or 1"),
    "dax": _DAX,
}  # fmt: skip

_EXT2: dict[str, Option] = {
    **flags(
        "bsddf", "minixdf", "nouid32", "nocheck", "oldalloc", "orlov", "user_xattr",
        "nouser_xattr", "acl", "noacl", "nobh", "quota", "noquota", "usrquota", "grpquota",
        "dax", "reservation", "noreservation",
    ),
    **_GROUPS,
    "errors": _ERRORS,
    "check": one_of("none"),
    "sb": NUMBER, "resuid": NUMBER, "resgid": NUMBER,
}  # fmt: skip

_XFS: dict[str, Option] = {
    **flags(
        "discard", "nodiscard", "filestreams", "inode32", "inode64", "largeio", "nolargeio",
        "noalign", "norecovery", "nouuid", "noquota", "uquota", "usrquota", "quota",
        "uqnoenforce", "qnoenforce", "gquota", "grpquota", "gqnoenforce", "pquota", "prjquota",
        "pqnoenforce", "swalloc", "wsync", "lifetime", "nolifetime",
    ),
    **_GROUPS,
    "allocsize": SIZE, "logbsize": SIZE, "logbufs": NUMBER, "sunit": NUMBER, "swidth": NUMBER,
    "max_atomic_write": SIZE, "max_open_zones": NUMBER,
    "dax": _DAX,
}  # fmt: skip

_BTRFS_RESCUE = (
    "usebackuproot", "nologreplay", "ignorebadroots", "ibadroots", "ignoredatacsums",
    "idatacsums", "ignoremetacsums", "ignoresupercsums", "all",
)  # fmt: skip
_BTRFS_COMPRESS = Option(
    bare=True, value=r"(zlib|lzo|zstd|no)(:-?[0-9]{1,2})?",
    hint="zlib, lzo, zstd or no, optionally :level",
)  # fmt: skip

_BTRFS: dict[str, Option] = {
    **flags(
        "acl", "noacl", "autodefrag", "noautodefrag", "barrier", "nobarrier", "clear_cache",
        "datacow", "nodatacow", "datasum", "nodatasum", "degraded", "flushoncommit",
        "noflushoncommit", "nologreplay", "norecovery", "nodiscard", "rescan_uuid_tree",
        "skip_balance", "nospace_cache", "ssd", "ssd_spread", "nossd", "nossd_spread", "treelog",
        "notreelog", "usebackuproot", "user_subvol_rm_allowed",
    ),
    "compress": _BTRFS_COMPRESS,
    "compress-force": _BTRFS_COMPRESS,
    "discard": one_of("sync", "async", bare=True),
    "space_cache": one_of("v1", "v2", bare=True),
    "rescue": Option(
        value="({0})(:({0}))*".format("|".join(_BTRFS_RESCUE)),
        hint="':'-separated " + ", ".join(_BTRFS_RESCUE),
    ),
    "commit": NUMBER, "max_inline": SIZE, "metadata_ratio": NUMBER, "subvolid": NUMBER,
    "thread_pool": NUMBER,
}  # fmt: skip

_FAT: dict[str, Option] = {
    **_ids(),
    **flags(
        "quiet", "rodir", "showexec", "sys_immutable", "flush", "usefree", "dots", "nodots",
        "discard", "dos1xfloppy", "utf8", "uni_xlate", "nonumtail",
    ),
    "check": one_of("relaxed", "normal", "strict", "r", "n", "s"),
    "codepage": NUMBER,
    "shortname": one_of("lower", "win95", "winnt", "mixed"),
    "tz": one_of("UTC"),
    "time_offset": SIGNED,
    "dotsOK": one_of("yes", "no"),
    "errors": _ERRORS,
    "nfs": one_of("stale_rw", "nostale_ro", bare=True),
}  # fmt: skip

_EXFAT: dict[str, Option] = {
    **_ids(),
    **flags("discard", "keep_last_dots", "sys_tz", "zero_size_dir"),
    "errors": _ERRORS,
    "time_offset": SIGNED,
}

_ISO9660: dict[str, Option] = {
    **flags("norock", "nojoliet", "unhide", "hide", "cruft", "utf8", "overriderockperm",
            "showassoc", "nocompress"),
    "check": one_of("relaxed", "strict", "r", "s"),
    "map": one_of("normal", "off", "acorn", "n", "o", "a"),
    "uid": NUMBER, "gid": NUMBER, "mode": MODE, "dmode": MODE, "session": NUMBER,
    "sbsector": NUMBER, "iocharset": CHARSET, "block": one_of("512", "1024", "2048"),
}  # fmt: skip

_UDF_ID = Option(value=r"[0-9]{1,10}|forget|ignore", hint="a number, forget or ignore")
_UDF: dict[str, Option] = {
    **flags("unhide", "undelete", "adinicb", "noadinicb", "shortad", "longad", "nostrict",
            "utf8", "novrs"),
    "uid": _UDF_ID, "gid": _UDF_ID, "umask": MODE, "mode": MODE, "dmode": MODE, "bs": NUMBER,
    "iocharset": CHARSET, "session": NUMBER, "anchor": NUMBER, "lastblock": NUMBER,
    "partition": NUMBER, "fileset": NUMBER, "rootdir": NUMBER,
}  # fmt: skip

_NTFS3: dict[str, Option] = {
    **_ids(),
    **flags("discard", "sparse", "showmeta", "nohidden", "hide_dot_files", "windows_names",
            "sys_immutable", "prealloc", "acl", "noacsrules", "nocase", "force"),
}  # fmt: skip

# Filesystems that live on a block device, known whether or not their module is loaded yet:
# fs_type -> its options (beyond the generic mount flags).
BLOCK_FILESYSTEMS: dict[str, dict[str, Option]] = {
    "squashfs": {
        "errors": one_of("continue"),
        "threads": Option(value=r"single|multi|percpu|[0-9]{1,4}",
                          hint="single, multi, percpu or a number"),
    },
    "erofs": {
        **flags("user_xattr", "nouser_xattr", "acl", "noacl", "directio", "nodirectio"),
        "cache_strategy": one_of("disabled", "readahead", "readaround"),
        "dax": one_of("always", "never", bare=True),
        "fsoffset": NUMBER,
    },
    "ext4": _EXT4,
    "ext3": _EXT4,  # handled by the ext4 driver
    "ext2": _EXT2,
    "xfs": _XFS,
    "btrfs": _BTRFS,
    "vfat": _FAT,
    "msdos": _FAT,
    "exfat": _EXFAT,
    "ntfs3": _NTFS3,
    "iso9660": _ISO9660,
    "udf": _UDF,
    "cramfs": {},
    "romfs": {},
}

# Block filesystems the kernel may list that need a daemon besides the kernel: a FUSE server,
# a cluster's lock manager.
NEEDS_DAEMON = frozenset({"fuseblk", "ocfs2", "gfs2", "gfs2meta"})

# mount(8) words that the kernel layer turns into mount(2) flags (never filesystem data).
GENERIC_FLAGS = frozenset(
    word for word in (
        "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
        "dirsync", "noatime", "atime", "nodiratime", "diratime", "relatime", "norelatime",
        "strictatime", "nostrictatime", "lazytime", "nolazytime", "nosymfollow", "silent", "loud",
    )
    if not kmount.parse_options([word]).data
)  # fmt: skip


def kernel_block_filesystems(listing: Path = PROC_FILESYSTEMS) -> frozenset[str]:
    """The filesystems the kernel lists without `nodev`: those that mount a block device."""
    try:
        text = listing.read_text()
    except OSError:
        return frozenset()
    names = set()
    for line in text.splitlines():
        flag, _, name = line.rpartition("\t")
        if name and not flag.strip():
            names.add(name.strip())
    return frozenset(names)


def allowed_filesystems(listing: Path = PROC_FILESYSTEMS) -> frozenset[str]:
    # Read each time: a module loaded since (by anybody's first mount) adds its filesystem.
    return (frozenset(BLOCK_FILESYSTEMS) | kernel_block_filesystems(listing)) - NEEDS_DAEMON


def options_of(fs_type: str) -> dict[str, Option]:
    """The filesystem-specific options of `fs_type` (none for one the table does not know)."""
    return BLOCK_FILESYSTEMS.get(fs_type, {})


def describe_allowed(fs_type: str) -> str:
    """The options allowed for `fs_type`, for an error message."""
    own = []
    for name, option in sorted(options_of(fs_type).items()):
        if option.value is None:
            own.append(name)
        elif option.bare:
            own.append(f"{name}[=...]")
        else:
            own.append(f"{name}=...")
    generic = ", ".join(sorted(GENERIC_FLAGS))
    if not own:
        return f"only the mount flags {generic}"
    return f"{', '.join(own)}, and the mount flags {generic}"


def check_option(word: str, fs_type: str) -> str | None:
    """None if `word` is allowed for `fs_type`, else why not."""
    if word in GENERIC_FLAGS:
        return None
    name, eq, value = word.partition("=")
    if name in GENERIC_FLAGS:
        return f"the mount flag {name} takes no value"
    option = options_of(fs_type).get(name)
    if option is None:
        return f"not an option allowed for {fs_type}; allowed: {describe_allowed(fs_type)}"
    if not eq:
        if option.bare:
            return None
        return f"{name} needs a value: {option.hint}"
    pattern = option.pattern
    if pattern is None:
        return f"{name} takes no value"
    # No pattern admits '/', but a value that names a path is refused whatever the table says.
    if "/" in value or not pattern.fullmatch(value):
        return f"{name}= takes {option.hint}"
    return None
