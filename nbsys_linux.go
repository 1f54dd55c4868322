package defuss

import (
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// System calls that cannot block, made without telling Go's scheduler:
// the raw accept loop's and the event loops' calls on non-blocking
// sockets and epoll sets (RawSyscall, not Syscall).
//
// A Syscall enters and leaves the scheduler's "in a system call" state,
// so that a call that blocks does not hold its P. On the way in it wakes
// the runtime's monitor thread (sysmon) if it sleeps, which it does
// whenever every P is idle: after every pause of a loop that waits for
// its next connection. Woken from a system call, sysmon polls every 20
// µs for at least a millisecond before it sleeps again. Under a load of
// short connections that is most of the time: perf on a hand-off
// primary under wrk (13 B, Connection: close, 2 workers) put 28% of its
// CPU in sysmon, most of it in its nanosleep's context switches. A
// call that cannot block has nothing to gain from that state; Go's own
// syscall package and x/sys make socket, getsockname and the like the same way.
//
// Each call here is on a non-blocking descriptor, with MSG_DONTWAIT, a
// zero timeout, or, for close, on a socket without SO_LINGER (closeRaw's
// comment), so none can wait. A signal that arrives during one is
// handled when it returns, as with any short call.

// epollWaitNow is epoll_wait(2) with a zero timeout.
func epollWaitNow(epfd int, events []unix.EpollEvent) (int, error) {
	var p unsafe.Pointer
	if len(events) > 0 {
		p = unsafe.Pointer(&events[0])
	}
	// epoll_pwait with no signal mask is epoll_wait, on every
	// architecture (arm64 and riscv64 have no epoll_wait).
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(p), uintptr(len(events)), 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// epollCtlNow is epoll_ctl(2).
func epollCtlNow(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// closeRaw is close(2) of a socket without SO_LINGER, the one option
// that makes closing a socket wait: one of the loops' own, to a worker.
// A client's goes through closeClient.
func closeRaw(fd int) {
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

// closeClient closes the client socket fd: closeRaw, unless the public
// listener had SO_LINGER with a time when the primary started
// (p.lingers), which each socket it accepts takes; then unix.Close,
// which may wait that long without holding a P.
//
// In hand-off mode a handler can set SO_LINGER on a handed-off socket
// itself (handedConn.SetLinger) and close it, and if that happens
// between the primary's sendmsg and its close, the primary's close is
// the last and lingers. A raw close then waits until the runtime's
// preemption signal, which it sends a goroutine that has run for 10 ms,
// interrupts the wait (the socket closes on in the background); through
// the scheduler it would hold up the accept loop for the whole linger
// time. (From Go's and Linux's sources; no test makes that race.)
func (p *primary) closeClient(fd int) {
	if p.lingers {
		unix.Close(fd)
		return
	}
	closeRaw(fd)
}

// readNow is read(2) on a non-blocking descriptor.
func readNow(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	n, _, errno := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(p), uintptr(len(b)))
	if errno != 0 {
		return -1, errno // as x/sys's
	}
	raceRead(b, int(n), nil)
	return int(n), nil
}

// writeNow is write(2) on a non-blocking descriptor.
func writeNow(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	raceBeforeWrite()
	n, _, errno := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(p), uintptr(len(b)))
	if errno != 0 {
		return -1, errno // as x/sys's
	}
	raceWrote(b, int(n))
	return int(n), nil
}

// shutdownNow is shutdown(2). A kernel without the shutdown system call
// (linux/386 before 4.3, where it goes through socketcall) gets x/sys's.
func shutdownNow(fd, how int) {
	if _, _, errno := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), uintptr(how), 0); errno == unix.ENOSYS {
		unix.Shutdown(fd, how)
	}
}

// sendmsgRaw is sendmsg(2) of msg, which must not be empty, and the
// control message oob, with flags that include MSG_DONTWAIT. x/sys's
// Sendmsg is the same call, through Syscall. (A message with descriptors
// may wait, MSG_DONTWAIT or not, while the kernel's collector of
// in-flight Unix-socket descriptors runs: briefly, and only when such
// descriptors pile up, as with Syscall before.) A kernel without the
// sendmsg system call (linux/386 before 4.3, where it goes through
// socketcall) gets x/sys's.
func sendmsgRaw(fd int, msg, oob []byte, flags int) error {
	iov := unix.Iovec{Base: &msg[0]}
	iov.SetLen(len(msg))
	h := unix.Msghdr{Iov: &iov}
	h.SetIovlen(1)
	if len(oob) > 0 {
		h.Control = &oob[0]
		h.SetControllen(len(oob))
	}
	raceBeforeWrite()
	_, _, errno := unix.RawSyscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&h)), uintptr(flags))
	switch errno {
	case 0:
		raceWrote(msg, len(msg))
		return nil
	case unix.ENOSYS:
		return unix.Sendmsg(fd, msg, oob, nil, flags)
	}
	return errno
}

// pipeReader returns a reader of the pipe f that reads with readNow,
// waiting in Go's poller (a rawStream's read side): the worker's status
// pipe, which brings a hand-off worker's close reports every few
// milliseconds. f itself if its descriptor blocks, which no read here
// may do.
func pipeReader(f *os.File) io.Reader {
	rc, err := f.SyscallConn()
	if err != nil {
		return f
	}
	nonblock := false
	rc.Control(func(fd uintptr) {
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		nonblock = err == nil && fl&unix.O_NONBLOCK != 0
	})
	if !nonblock {
		return f
	}
	return newRawStream(rc, readNow)
}

// rawStream reads and writes a connected socket in Go's poller with raw
// calls that do not wait (recvDontWait; sendRaw, which raises no
// SIGPIPE), waiting for it as os.File and net do: a worker's side of a
// connection; or reads a pipe (pipeReader). A read that finds the socket
// empty or a write that finds it full waits in the poller, with the
// descriptor's deadlines. One read and one write at a time each (the
// poller locks each direction too); its operations are made once, so a
// call allocates nothing.
type rawStream struct {
	rc   syscall.RawConn
	r, w rawOp
}

// rawOp is one direction of a rawStream: its buffer and result.
type rawOp struct {
	mu  sync.Mutex
	b   []byte
	n   int
	err error
	do  func(fd uintptr) bool
}

// newRawStream makes a rawStream of the descriptor behind rc that reads
// with read: recvDontWait on a socket, readNow on a pipe.
func newRawStream(rc syscall.RawConn, read func(fd int, b []byte) (int, error)) *rawStream {
	s := &rawStream{rc: rc}
	s.r.do = func(fd uintptr) bool {
		for {
			s.r.n, s.r.err = read(int(fd), s.r.b)
			if s.r.err != unix.EINTR {
				return s.r.err != unix.EAGAIN
			}
		}
	}
	s.w.do = func(fd uintptr) bool {
		for len(s.w.b) > 0 {
			n, err := sendRaw(int(fd), s.w.b)
			switch {
			case n > 0:
				s.w.n += n
				s.w.b = s.w.b[n:]
			case err == unix.EINTR:
			case err == unix.EAGAIN:
				return false
			default:
				s.w.err = err
				return true
			}
		}
		return true
	}
	return s
}

// Read is one recv of up to len(b) bytes once some are there: io.EOF at
// the end of the stream, an errno as it is, or the poller's error (a
// deadline, a closed descriptor). Write has the same shape for the other
// direction.
func (s *rawStream) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	s.r.b, s.r.n, s.r.err = b, 0, nil
	err := s.rc.Read(s.r.do)
	n, rerr := s.r.n, s.r.err
	s.r.b = nil
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of b, waiting for room as it must; on an error, what
// was written before it.
func (s *rawStream) Write(b []byte) (int, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	s.w.b, s.w.n, s.w.err = b, 0, nil
	err := s.rc.Write(s.w.do)
	n, werr := s.w.n, s.w.err
	s.w.b = nil
	if err == nil {
		err = werr
	}
	return n, err
}

// rawStreamOf is a rawStream of c's socket, or nil where c has none.
func rawStreamOf(c syscall.Conn) io.ReadWriter {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	return newRawStream(rc, recvDontWait)
}

// recvDontWait is a rawStream's read of a socket: recv with MSG_DONTWAIT,
// not read, for the socket may have been made blocking since (an
// *os.File from net's File whose Fd was called, in a handler that
// hijacked the connection).
func recvDontWait(fd int, b []byte) (int, error) { return recvNow(fd, b, unix.MSG_DONTWAIT) }
