"""Running containers: the daemon's side (lifecycle, cgroups, logs, the helper client) and the
helper itself (`zygote`, `init`, `rootfs`).

The helper modules import only the standard library, python-prctl and the kernel wrappers —
never the web stack — so the pre-started helper is small and forks fast.
"""
