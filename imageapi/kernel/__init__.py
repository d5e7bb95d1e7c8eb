"""Thin, typed wrappers over the syscalls and sysfs files imageapi drives.

Every failure is an `OSError` carrying the errno and the path it concerns, so callers above can
tell the kernel's reasons apart without parsing text.
"""
