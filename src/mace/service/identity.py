"""Who is calling `mace serve`: the peer of a connection and its network namespace.

Security critical: a client may enable, disable and read only the namespace this finds, so
it never trusts the request, and holds the peer by a pidfd so that a recycled PID cannot
stand in for it.  SO_PEERPIDFD (Linux 6.5) gives the pidfd of the process that connected;
before that, pidfd_open(SO_PEERCRED's PID).  PIDFD_GET_NET_NAMESPACE (Linux 6.11) gives
the namespace through the pidfd; before that, /proc/PID/ns/net, checked against the pidfd
afterwards (the process still alive means the PID was still its own).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct

from mace.service import protocol as P

SO_PEERPIDFD = 77                   # Linux 6.5
PIDFD_GET_NET_NAMESPACE = 0xFF04    # _IO(PIDFS_IOCTL_MAGIC, 4), Linux 6.11


class Peer:
    """The process at the other end of a connection, held by a pidfd so that its PID cannot
    be recycled under us."""

    def __init__(self, sock: socket.socket):
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, _ = struct.unpack("3i", cred)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
            self.pidfd = struct.unpack("i", raw)[0]
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                # the peer is gone (its PID may already name another process)
                raise P.ProtocolError(P.IDENTITY, "the connecting process has already exited",
                                      hint="keep the process alive while it talks to the service") from None
            # kernels before 6.5: the PID may have been reused between connect() and here
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except OSError:
                raise P.ProtocolError(P.IDENTITY, "the connecting process has already exited",
                                      hint="keep the process alive while it talks to the service") from None

    def netns(self) -> int:
        """An fd of the peer's network namespace as of now (the caller closes it)."""
        try:
            return fcntl.ioctl(self.pidfd, PIDFD_GET_NET_NAMESPACE)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise P.ProtocolError(P.IDENTITY, "the connecting process has exited",
                                      hint="keep the process alive while it talks to the service") from None
            if e.errno not in (errno.ENOTTY, errno.EINVAL):
                raise P.ProtocolError(P.IDENTITY, f"cannot find the caller's namespace: {e.strerror}",
                                      hint="the service must run as root on the host (with CAP_SYS_PTRACE in a container)") from None
        # kernels before 6.11: through /proc, then make sure the PID is still that process
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if select.select([self.pidfd], [], [], 0)[0]:
            os.close(fd)
            raise P.ProtocolError(P.IDENTITY, "the connecting process has exited",
                                  hint="keep the process alive while it talks to the service")
        return fd

    def close(self) -> None:
        os.close(self.pidfd)


def netns_inode(peer: Peer) -> int:
    """The inode of the peer's network namespace as of now: its identity."""
    fd = peer.netns()
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)
