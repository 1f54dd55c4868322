//go:build unix && !linux

package defuss

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// handoffSocketpair makes the hand-off socket pair on Unix systems other
// than Linux. SOCK_SEQPACKET where the system has it for Unix sockets
// (FreeBSD, OpenBSD, NetBSD), SOCK_DGRAM where it does not (macOS):
// datagrams keep each descriptor in a message of its own as well, but a
// send to a full receive buffer fails (ENOBUFS) instead of waiting, and the
// primary then offers the connection to the next worker. Both ends are made
// close-on-exec under syscall.ForkLock, since SOCK_CLOEXEC is not
// everywhere, so that no process spawned meanwhile inherits them.
func handoffSocketpair() ([2]int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err == unix.EPROTONOSUPPORT || err == unix.EPROTOTYPE || err == unix.ESOCKTNOSUPPORT {
		fds, err = unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	}
	if err != nil {
		return fds, os.NewSyscallError("socketpair", err)
	}
	unix.CloseOnExec(fds[0])
	unix.CloseOnExec(fds[1])
	return fds, nil
}

// handedTCPConn makes the descriptor fd, handed off with message m, a
// connection to serve, with net.FileConn: handedConn, which skips its
// work, is Linux's alone. It takes fd, also when it fails.
func handedTCPConn(fd int, _ handoffMsg) (tcpConn, error) { return fileTCPConn(fd) }
