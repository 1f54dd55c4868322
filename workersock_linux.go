package defuss

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A worker socket is the way in to a splice-mode worker that the event
// loops take on Linux: a Unix socket in the abstract namespace, beside
// the worker's loopback TCP port. Over loopback TCP every connection to a
// worker costs both processes a handshake, a teardown and the TCP stack
// on every write; over a Unix socket its bytes go from one socket's
// queue to the other's. On 13-byte requests that took about two fifths
// of the primary's CPU a connection on Connection: close, and a sixth on
// keep-alive (README, Performance).
//
// The worker binds it before its ready frame, under a name that both
// sides derive from the run's secret and the worker's pid (workerSockName)
// and that nobody else can guess before it is bound (once bound, it is
// in /proc/net/unix: the primary checks that the process listening there
// is the worker, dialWorkerSocket). The primary dials it for the event
// loops; what else dials the worker (connections that are not TCP, the
// goroutine relay) uses the TCP port, which the worker keeps. A worker
// that did not bind it (an earlier version under a newer primary, or a
// bind that failed) refuses the dial, or another process answers, and
// the primary uses that worker's TCP port from then on. Not with fixed worker ports
// (WithBaseWorkerPort): their processes share the slot's socket, and a
// draining one closes its own (process.drain).
type workerSocket struct {
	name string // with the leading '@'
	sa   unix.RawSockaddrUnix
	n    uint32 // the length of sa that names it
}

// workerSockName is the abstract name of the socket of the worker pid:
// the pid, for whoever reads /proc/net/unix, and a hash that the secret
// goes into, so that no other process can bind it before the worker.
func workerSockName(secret *[secretLen]byte, pid int) string {
	h := sha256.New()
	h.Write([]byte("defuss worker socket\x00"))
	h.Write(secret[:])
	h.Write([]byte(strconv.Itoa(pid)))
	return "@defuss-" + strconv.Itoa(pid) + "-" + hex.EncodeToString(h.Sum(nil)[:12])
}

// newWorkerSocket is the socket of the worker process pid, for the
// primary to dial.
func newWorkerSocket(secret *[secretLen]byte, pid int) *workerSocket {
	s := &workerSocket{name: workerSockName(secret, pid)}
	s.sa.Family = unix.AF_UNIX
	// Abstract: the name's first byte is NUL, not '@', and its length is
	// the address's, with no terminating NUL.
	for i := 1; i < len(s.name); i++ {
		s.sa.Path[i] = int8(s.name[i])
	}
	s.n = uint32(unsafe.Offsetof(s.sa.Path)) + uint32(len(s.name))
	return s
}

// listenWorkerSocket binds and listens on the worker socket of this
// process.
func listenWorkerSocket(secret *[secretLen]byte) (net.Listener, error) {
	return net.Listen("unix", workerSockName(secret, os.Getpid()))
}

// dialWorkerSocket connects to s, the socket of the worker process pid,
// on a raw non-blocking socket of its own, for an event loop to carry. A
// Unix socket connects at once or not at all: errSocketFull when the
// worker's accept queue is full (Linux does not wait for room on a
// non-blocking socket), errSocketAbsent when nothing listens. The peer
// must be pid itself (SO_PEERCRED: the process that listened), or it is
// errSocketImpostor: a process that bound the name after a worker of the
// same pid had gone, and whose own bind then failed, gets no connection.
// It allocates nothing: s's address is made once.
func dialWorkerSocket(s *workerSocket, pid int) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	var e unix.Errno
	for {
		// connect(2) only reads s.sa, which no one writes after
		// newWorkerSocket: the accept loops dial it at once.
		_, _, e = unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&s.sa)), uintptr(s.n))
		if e != unix.EINTR {
			break
		}
	}
	switch e {
	case 0:
		var cred unix.Ucred
		n := uint32(unsafe.Sizeof(cred))
		_, _, e = unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERCRED,
			uintptr(unsafe.Pointer(&cred)), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case e != 0:
			err = os.NewSyscallError("getsockopt", e)
		case int(cred.Pid) != pid:
			err = fmt.Errorf("%w: %s is pid %d's, not the worker's (%d)", errSocketImpostor, s.name, cred.Pid, pid)
		default:
			return fd, nil
		}
	case unix.EAGAIN:
		err = errSocketFull
	case unix.ECONNREFUSED, unix.ENOENT, unix.ENOSYS: // ENOSYS: linux/386 before 4.3, whose connect goes through socketcall
		err = errSocketAbsent
	default:
		err = os.NewSyscallError("connect", e)
	}
	closeRaw(fd)
	return -1, &net.OpError{Op: "dial", Net: "unix", Addr: &net.UnixAddr{Name: s.name, Net: "unix"}, Err: err}
}
