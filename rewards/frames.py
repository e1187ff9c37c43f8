"""Length-prefixed messages over a socket, read without ever blocking on the sender.

The pool and a worker, and a worker and its call process, talk through socket pairs (never
through stdout, which belongs to the verifier). The reading side is the trusted one: it reads
what is there, never waits for the rest of a message, and refuses a frame over `limit` bytes, so
a peer that stops mid-message, floods the socket or writes garbage cannot hang or bloat it.
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 2**20


class FrameError(Exception):
    """The peer broke the framing (a frame over the limit)."""


def send_frame(sock: socket.socket, payload: bytes, timeout: float | None = None) -> None:
    """Blocking send (raises TimeoutError after `timeout` seconds, OSError if the peer is gone)."""
    sock.settimeout(timeout)
    sock.sendall(HEADER.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    """Blocking receive of one frame, for the untrusted side; EOFError when the peer is gone."""
    sock.settimeout(None)
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if size > limit:
        raise FrameError(f"frame of {size} bytes is over the {limit} byte limit")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the socket")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class FrameReader:
    """Non-blocking reads of frames from one socket."""

    def __init__(self, sock: socket.socket, limit: int = MAX_FRAME) -> None:
        self.sock = sock
        self.limit = limit
        self.buffer = bytearray()
        self.eof = False

    def read(self) -> list[bytes]:
        """The complete frames available now (`eof` turns True when the peer has closed)."""
        self.sock.settimeout(0.0)
        budget = self.limit + HEADER.size
        while budget > 0 and not self.eof:
            try:
                chunk = self.sock.recv(min(budget, 1 << 20))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
            self.buffer += chunk
            budget -= len(chunk)
        frames = []
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if size > self.limit:
                raise FrameError(f"frame of {size} bytes is over the {self.limit} byte limit")
            if len(self.buffer) < HEADER.size + size:
                break
            frames.append(bytes(self.buffer[HEADER.size : HEADER.size + size]))
            del self.buffer[: HEADER.size + size]
        return frames
