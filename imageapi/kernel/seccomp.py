"""A seccomp deny-list for confined containers: a classic-BPF program and its installation.

The program, checked in this order:
  1. the syscall's architecture must be the native one (x86_64 or aarch64), else the process
     is killed: a 32-bit (i386, arm) or x32 syscall would reach the kernel under other numbers
     and so pass a list written for the native ones;
  2. clone3 fails with ENOSYS (its flags sit in memory, out of a filter's reach, and libc then
     falls back to clone); clone with CLONE_NEWUSER, every syscall of `DENIED`: EPERM;
  3. everything else is allowed.
EPERM, not a kill: programs that probe for a feature (mount, keyctl, io_uring) see a plain
"not permitted" and go on without it.

Installed with prctl(PR_SET_NO_NEW_PRIVS) then prctl(PR_SET_SECCOMP): no new privileges
means no exec (setuid, file capabilities) can gain what the filter and the bounding set took.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct

from imageapi.kernel.ns import CLONE_NEWUSER

# What a confined container may not call, grouped by what it would give.
DENIED = (
    # mounts, old and new API: a new view of any filesystem, or a remount of a read-only one
    "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "open_tree_attr", "mount_setattr",
    # file handles: open_by_handle_at opens any inode of a filesystem it can name ("shocker")
    "name_to_handle_at", "open_by_handle_at",
    # the kernel itself: modules, kexec, BPF, perf, swap, reboot, accounting, quotas
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "bpf",
    "perf_event_open", "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd",
    "lookup_dcookie", "nfsservctl", "syslog", "iopl", "ioperm", "uselib",
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    # kernel keyrings (not namespaced)
    "keyctl", "add_key", "request_key",
    # namespaces: a new user namespace would give back every capability inside it
    "unshare", "setns",
    # large attack surfaces with few users in a container
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

# Syscall numbers (kernel ABI). aarch64 uses the generic table: it has no iopl, ioperm, uselib.
_X86_64 = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "open_tree_attr": 467,
    "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "swapon": 167, "swapoff": 168,
    "reboot": 169, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "lookup_dcookie": 212,
    "nfsservctl": 180, "syslog": 103, "iopl": 172, "ioperm": 173, "uselib": 134, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "pidfd_getfd": 438, "keyctl": 250, "add_key": 248, "request_key": 249, "unshare": 272,
    "setns": 308, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "clone": 56, "clone3": 435,
}  # fmt: skip
_AARCH64 = {
    "mount": 40, "umount2": 39, "pivot_root": 41, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "open_tree_attr": 467,
    "mount_setattr": 442, "name_to_handle_at": 264, "open_by_handle_at": 265,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
    "kexec_file_load": 294, "bpf": 280, "perf_event_open": 241, "swapon": 224, "swapoff": 225,
    "reboot": 142, "acct": 89, "quotactl": 60, "quotactl_fd": 443, "lookup_dcookie": 18,
    "nfsservctl": 42, "syslog": 116, "ptrace": 117, "process_vm_readv": 270,
    "process_vm_writev": 271, "process_madvise": 440, "pidfd_getfd": 438, "keyctl": 219,
    "add_key": 217, "request_key": 218, "unshare": 97, "setns": 268, "userfaultfd": 282,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone": 220,
    "clone3": 435,
}  # fmt: skip
# machine -> (AUDIT_ARCH_*, syscall numbers, whether x32 numbers share the arch value)
ARCHES = {
    "x86_64": (0xC000003E, _X86_64, True),
    "aarch64": (0xC00000B7, _AARCH64, False),
}
X32_SYSCALL_BIT = 0x40000000

# classic BPF opcodes, seccomp return values, offsets in struct seccomp_data
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # args[0]'s low word: both arches are little-endian
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _PR_SET_NO_NEW_PRIVS = 22, 2, 38

Insn = tuple[int, int | str, int | str, int]


def supported(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in ARCHES


def deny_list(machine: str | None = None) -> bytes:
    """The filter for `machine` (default: this one), as struct sock_filter[]."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise OSError(errno.ENOSYS, f"no seccomp deny-list for the {machine} architecture")
    arch, numbers, x32 = ARCHES[machine]
    prog: list[Insn | str] = [(_LD_ABS_W, 0, 0, _ARCH), (_JEQ, 0, "kill", arch),
                              (_LD_ABS_W, 0, 0, _NR)]
    if x32:
        prog.append((_JGE, "kill", 0, X32_SYSCALL_BIT))
    prog += [(_JEQ, "clone", 0, numbers["clone"]), (_JEQ, "enosys", 0, numbers["clone3"])]
    prog += [(_JEQ, "eperm", 0, numbers[name]) for name in DENIED if name in numbers]
    prog += [(_RET, 0, 0, RET_ALLOW),
             "clone", (_LD_ABS_W, 0, 0, _ARG0_LOW), (_JSET, "eperm", 0, CLONE_NEWUSER),
             (_RET, 0, 0, RET_ALLOW),
             "eperm", (_RET, 0, 0, RET_ERRNO | errno.EPERM),
             "enosys", (_RET, 0, 0, RET_ERRNO | errno.ENOSYS),
             "kill", (_RET, 0, 0, RET_KILL_PROCESS)]
    return _assemble(prog)


def _assemble(prog: list[Insn | str]) -> bytes:
    """Strings are labels; a jump to one becomes its offset from the next instruction."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for here, (code, jt, jf, k) in enumerate(insns):
        jumps = [labels[j] - here - 1 if isinstance(j, str) else j for j in (jt, jf)]
        if not all(0 <= j <= 255 for j in jumps):
            raise ValueError(f"jump out of range at instruction {here}")
        out += struct.pack("=HBBI", code, jumps[0], jumps[1], k)
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _prctl(option: int, arg2: int, arg3: int, what: str) -> None:
    if _libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)


def install(program: bytes) -> None:
    """No new privileges, then the filter, for this thread and whatever it execs."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, "prctl(PR_SET_NO_NEW_PRIVS)")
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog),
           "prctl(PR_SET_SECCOMP)")
