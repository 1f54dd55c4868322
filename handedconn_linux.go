package defuss

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// handedConn is a connection the primary handed off, served from the
// descriptor that arrived, in Go's poller through an *os.File. What
// net.FileConn would make of it costs about twelve system calls more per
// connection (a copy of the descriptor, with fcntl calls that make it
// blocking and non-blocking again, a second poller registration, two more
// questions to the socket (SO_TYPE, getpeername), the five options net's
// Accept sets, and the original's close): 20.8 against 8.2 per connection
// in a worker under a Connection: close load (strace -c), and
// net.FileConn was 10% of a worker's samples in a perf profile. The
// primary says in its hand-off message (version 3) who the peer is, and
// that the socket has its options already; a message that does not (an
// older primary; a worker that did not announce version 3; a link-local
// IPv6 peer; a WithListener listener accepted raw, or a listener whose
// options could not be set) gets net.FileConn as before.
//
// It has the methods of *net.TCPConn but MultipathTCP, and its errors
// are *net.OpError, as net's, so that net/http tells a timeout or a reset
// from a bad request. ReadFrom sends a regular file with sendfile(2), as
// net's does for http.ServeFile and io.Copy from an *os.File; unlike
// net's, it copies from a TCP or Unix stream socket through user space
// (net splices those; from a pipe both copy), and so does WriteTo.
type handedConn struct {
	f            *os.File   // the descriptor, in Go's poller
	io           *rawStream // Read and Write, with raw calls on f's descriptor
	laddr, raddr *net.TCPAddr
	closed       atomic.Bool // Close was called: errors are net.ErrClosed
}

var _ tcpConn = (*handedConn)(nil)

// handedTCPConn makes the descriptor fd, handed off with message m, a
// connection to serve: a handedConn if m says enough, else with
// net.FileConn. It takes fd, also when it fails.
func handedTCPConn(fd int, m handoffMsg) (tcpConn, error) {
	if !m.optsSet { // only version 3 has the flag
		return fileTCPConn(fd)
	}
	return newHandedConn(fd, m.peer)
}

// newHandedConn makes fd, whose peer is at peer, a handedConn. It asks the
// socket only its local address, which net/http reads for every
// connection. It takes fd, also when it fails.
func newHandedConn(fd int, peer netip.AddrPort) (*handedConn, error) {
	lsa, err := syscall.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("getsockname", err)
	}
	c := &handedConn{
		// The primary's accept made the socket non-blocking (the flag
		// travels with it), so os.NewFile puts it in Go's poller.
		f:     os.NewFile(uintptr(fd), "defuss-handed"),
		laddr: net.TCPAddrFromAddrPort(sockaddrAddrPort(lsa)),
		raddr: net.TCPAddrFromAddrPort(peer),
	}
	if err := c.f.SetDeadline(time.Time{}); err != nil {
		c.f.Close()
		return nil, fmt.Errorf("a blocking socket, which cannot be served with deadlines: %w", err)
	}
	rc, err := c.f.SyscallConn()
	if err != nil {
		c.f.Close()
		return nil, err
	}
	c.io = newRawStream(rc, recvDontWait)
	return c, nil
}

func (c *handedConn) Read(b []byte) (int, error) {
	n, err := c.io.Read(b)
	return n, c.opErr("read", err)
}

func (c *handedConn) Write(b []byte) (int, error) {
	n, err := c.io.Write(b)
	return n, c.opErr("write", err)
}

func (c *handedConn) Close() error {
	c.closed.Store(true)
	return c.opErr("close", c.f.Close())
}

func (c *handedConn) LocalAddr() net.Addr           { return c.laddr }
func (c *handedConn) RemoteAddr() net.Addr          { return c.raddr }
func (c *handedConn) SetDeadline(t time.Time) error { return c.opErr("set", c.f.SetDeadline(t)) }
func (c *handedConn) SetReadDeadline(t time.Time) error {
	return c.opErr("set", c.f.SetReadDeadline(t))
}
func (c *handedConn) SetWriteDeadline(t time.Time) error {
	return c.opErr("set", c.f.SetWriteDeadline(t))
}

func (c *handedConn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }

// opErr makes err, from c's file or c.io, the error net gives for op:
// io.EOF as it is, the rest in a *net.OpError, with net.ErrClosed once c
// is closed (os says "file already closed", or "use of closed file") and
// a system call's name on an errno.
func (c *handedConn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if pe, ok := err.(*os.PathError); ok {
		err = pe.Err
	}
	switch e := err.(type) {
	case syscall.Errno:
		err = os.NewSyscallError(op, e)
	default:
		if err == os.ErrClosed || c.closed.Load() && !errors.Is(err, os.ErrDeadlineExceeded) {
			err = net.ErrClosed
		}
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.laddr, Addr: c.raddr, Err: err}
}

// ReadFrom sends r with sendfile(2) when it is a regular file (or an
// io.LimitedReader of one, as http.ServeContent makes), and copies it
// otherwise.
func (c *handedConn) ReadFrom(r io.Reader) (int64, error) {
	n, handled, err := sendFile(c.io.rc, r)
	if !handled {
		return io.Copy(writerOnly{c}, r)
	}
	return n, c.opErr("readfrom", err)
}

// WriteTo copies what c receives to w.
func (c *handedConn) WriteTo(w io.Writer) (int64, error) { return io.Copy(w, readerOnly{c}) }

// writerOnly and readerOnly hide their field's ReadFrom and WriteTo from
// io.Copy, which would call them back.
type (
	writerOnly struct{ io.Writer }
	readerOnly struct{ io.Reader }
)

// File returns a copy of c's descriptor (F_DUPFD_CLOEXEC), which stays
// non-blocking until its Fd is called.
func (c *handedConn) File() (*os.File, error) {
	var fd int
	err := c.control("file", "fcntl", func(s int) (err error) {
		fd, err = unix.FcntlInt(uintptr(s), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), c.f.Name()), nil
}

func (c *handedConn) CloseRead() error {
	return c.control("close", "shutdown", func(fd int) error { return unix.Shutdown(fd, unix.SHUT_RD) })
}

func (c *handedConn) CloseWrite() error {
	return c.control("close", "shutdown", func(fd int) error { return unix.Shutdown(fd, unix.SHUT_WR) })
}

func (c *handedConn) SetNoDelay(on bool) error {
	return c.setInt(unix.IPPROTO_TCP, unix.TCP_NODELAY, boolInt(on))
}

func (c *handedConn) SetKeepAlive(on bool) error {
	return c.setInt(unix.SOL_SOCKET, unix.SO_KEEPALIVE, boolInt(on))
}

// SetKeepAlivePeriod sets the idle time before the first probe, as
// net's does: 0 means net's default of 15 s; below 0, nothing is set.
func (c *handedConn) SetKeepAlivePeriod(d time.Duration) error {
	return c.setSeconds(unix.TCP_KEEPIDLE, d, 15*time.Second)
}

// SetKeepAliveConfig sets keep-alive as net's does, with its defaults
// for zero fields.
func (c *handedConn) SetKeepAliveConfig(k net.KeepAliveConfig) error {
	if err := c.SetKeepAlive(k.Enable); err != nil {
		return err
	}
	if err := c.setSeconds(unix.TCP_KEEPIDLE, k.Idle, 15*time.Second); err != nil {
		return err
	}
	if err := c.setSeconds(unix.TCP_KEEPINTVL, k.Interval, 15*time.Second); err != nil {
		return err
	}
	switch {
	case k.Count == 0:
		k.Count = 9
	case k.Count < 0:
		return nil
	}
	return c.setInt(unix.IPPROTO_TCP, unix.TCP_KEEPCNT, k.Count)
}

func (c *handedConn) SetLinger(sec int) error {
	l := unix.Linger{}
	if sec >= 0 {
		l = unix.Linger{Onoff: 1, Linger: int32(sec)}
	}
	return c.control("set", "setsockopt", func(fd int) error { return unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &l) })
}

func (c *handedConn) SetReadBuffer(bytes int) error {
	return c.setInt(unix.SOL_SOCKET, unix.SO_RCVBUF, bytes)
}

func (c *handedConn) SetWriteBuffer(bytes int) error {
	return c.setInt(unix.SOL_SOCKET, unix.SO_SNDBUF, bytes)
}

// setSeconds sets the TCP option opt to d in whole seconds, rounded up:
// def for 0, nothing below 0.
func (c *handedConn) setSeconds(opt int, d, def time.Duration) error {
	switch {
	case d == 0:
		d = def
	case d < 0:
		return nil
	}
	return c.setInt(unix.IPPROTO_TCP, opt, int((d+time.Second-1)/time.Second))
}

func (c *handedConn) setInt(level, opt, v int) error {
	return c.control("set", "setsockopt", func(fd int) error { return unix.SetsockoptInt(fd, level, opt, v) })
}

// control runs the system call fn, named name, on c's descriptor, with
// its error as net gives it for op.
func (c *handedConn) control(op, name string, fn func(fd int) error) error {
	rc, err := c.f.SyscallConn()
	if err == nil {
		var ferr error
		if err = rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err == nil && ferr != nil {
			err = os.NewSyscallError(name, ferr)
		}
	}
	if err != nil {
		if c.closed.Load() {
			err = net.ErrClosed
		}
		return &net.OpError{Op: op, Net: "tcp", Source: c.laddr, Addr: c.raddr, Err: err}
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
