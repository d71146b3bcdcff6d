"""Thin ctypes bindings of ``ioctl(2)``, ``mmap(2)``, ``munmap(2)`` and ``madvise(2)``.

``fcntl.ioctl`` keeps the GIL for buffer arguments and cannot pass a raw
pointer; calling libc through :mod:`ctypes` releases the GIL for the length of
the call, so several vCPU threads can sit in ``KVM_RUN`` at once
(``Documentation/virt/kvm/api.rst``: "vcpu ioctls should be issued from the
same thread that was used to create the vcpu", which the harness honours by
giving each vCPU one thread for its whole life). Guest RAM is anonymous memory
from libc ``mmap`` so its address can be handed to
``KVM_SET_USER_MEMORY_REGION`` directly.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]

_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MADV_NOHUGEPAGE, MADV_HUGEPAGE = 15, 14
MAP_FAILED = ctypes.c_void_p(-1).value


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | None = None, *, retry_eintr: bool = True) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is an int or a ctypes struct (passed by pointer).

    Retries on EINTR unless ``retry_eintr`` is false; raises :class:`OSError`
    with the errno otherwise.
    """
    if isinstance(arg, ctypes.Structure):
        ptr: int | None = ctypes.addressof(arg)
    else:
        ptr = arg
    while True:
        ret = _ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        if ctypes.get_errno() != _errno.EINTR or not retry_eintr:
            _raise(f"ioctl {request:#x}")


def mmap(length: int, prot: int = PROT_READ | PROT_WRITE,
         flags: int = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, fd: int = -1, offset: int = 0) -> int:
    """``mmap(NULL, length, ...)``: the address, or OSError."""
    addr = _mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        _raise("mmap")
    return int(addr)


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        _raise("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    if _madvise(addr, length, advice) != 0:
        _raise("madvise")


def write(addr: int, data: bytes) -> None:
    """Copy ``data`` to the raw address ``addr``."""
    ctypes.memmove(addr, data, len(data))


def read(addr: int, length: int) -> bytes:
    return ctypes.string_at(addr, length)
