//go:build linux

package defuss

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// rawBatch bounds the connections accepted in one pass. A pass holds a
// reference on the listener, which the listener's Close waits for.
const rawBatch = 64

// rawAcceptLoop is acceptLoop for hand-off mode on a TCP listener: the
// raw accept loop. It accepts with accept4 and, when a connection's head
// has already arrived (as it has for most, since a client sends it right
// after the handshake), peeks at it, routes it and passes the descriptor
// to its worker there and then: accept4, recv(MSG_PEEK), sendmsg and
// close, with no goroutine, poller registration or timer. Any other
// connection goes to route as a fileConn in a goroutine of its own, as
// acceptLoop's do: a head still on its way, a health check, a PROXY
// header from a trusted proxy, a worker whose hand-off queue is full,
// no worker at all.
//
// It reports handled=false, having done nothing, where it does not apply
// (splice mode, another kind of listener); acceptLoop then serves.
func (p *primary) rawAcceptLoop() (handled bool, err error) {
	tl, ok := p.ln.(*net.TCPListener)
	if !p.cfg.handoff || !ok {
		return false, nil
	}
	// A listener's RawConn has Control only. The loop waits for it on a
	// duplicate of its descriptor in Go's poller, and accepts on the
	// listener's own under Control, which fails once it is closed. The
	// duplicate keeps the listening socket open: it closes as soon as the
	// drain begins (beginShutdown closes the listener first), or when the
	// loop ends.
	lrc, err := tl.SyscallConn()
	if err != nil {
		return false, nil
	}
	dfd := -1
	lrc.Control(func(fd uintptr) { dfd, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if dfd < 0 {
		return false, nil
	}
	wait := os.NewFile(uintptr(dfd), "defuss-listener")
	wrc, err := wait.SyscallConn()
	if err != nil {
		wait.Close()
		return false, nil
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-p.life.drain:
		case <-done:
		}
		wait.Close()
	}()
	defer wg.Wait()
	defer close(done)

	a := &rawAccepter{p: p, wait: wait, buf: make([]byte, proxyRoom+p.cfg.maxHeaderBytes), oob: unix.UnixRights(0)}
	defer a.retry(time.Time{}) // what still waits goes to route
	var delay time.Duration
	for {
		var aerr error
		closed := false
		err := wrc.Read(func(uintptr) bool {
			more := true
			if cerr := lrc.Control(func(lfd uintptr) {
				for range rawBatch {
					// syscall's, not x/sys's: that asks each IPv4 socket for its
					// protocol, to tell L2TP.
					fd, sa, err := syscall.Accept4(int(lfd), syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
					switch err {
					case nil:
						delay = 0
						a.conn(fd, sa)
					case syscall.EINTR, syscall.ECONNABORTED:
					case syscall.EAGAIN:
						more = false // wait until the listener is readable
						return
					default:
						aerr = os.NewSyscallError("accept4", err)
						return
					}
				}
				// A full batch: return, so that Close can get in, and
				// come back at once.
			}); cerr != nil {
				closed = true
			}
			a.retry(time.Now())
			return more || closed
		})
		switch {
		case closed:
			return true, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			a.retry(time.Now()) // and wait on
			continue
		case err == nil:
			err = aerr
		}
		if err == nil {
			continue
		}
		if stop, err := p.acceptFailed(err, &delay); stop {
			return true, err
		}
	}
}

// rawPendingMax bounds the connections the loop keeps so; more go to
// route at once.
const rawPendingMax = 256

// rawAccepter is the raw accept loop's state, which only its goroutine
// touches.
type rawAccepter struct {
	p        *primary
	wait     *os.File     // the listener's duplicate: its read deadline wakes the loop for pending
	buf      []byte       // proxyRoom for the hand-off message, then the peek
	oob      []byte       // SCM_RIGHTS for one descriptor, set for each send
	pending  []rawPending // accepted, with no complete head yet, oldest first
	deadline time.Time    // wait's read deadline: when the oldest pending is due
}

// rawPending is an accepted connection whose head has not arrived.
type rawPending struct {
	fd  int
	sa  syscall.Sockaddr
	due time.Time // when it goes to route
}

// conn serves one accepted connection, fd, from the client at sa.
func (a *rawAccepter) conn(fd int, sa syscall.Sockaddr) {
	p := a.p
	p.tel.accepted.Add(bg, 1)
	if ok, full := p.conns.reserve(); !ok {
		p.refused(full)
		unix.Close(fd)
		return
	}
	handed, wait := a.handOff(fd, sa)
	switch {
	case handed:
	case wait && len(a.pending) < rawPendingMax:
		a.pending = append(a.pending, rawPending{fd: fd, sa: sa, due: time.Now().Add(p.rawGrace)})
	default:
		a.route(fd, sa)
	}
}

// retry looks again at the pending connections: it hands off those
// whose heads are complete now, and gives route those that are due by
// now (every one, for the zero time) or that are anything but late. It
// then sets the loop's deadline for the next that will be due.
func (a *rawAccepter) retry(now time.Time) {
	kept := a.pending[:0]
	for _, e := range a.pending {
		handed, wait := a.handOff(e.fd, e.sa)
		switch {
		case handed:
		case wait && !now.IsZero() && now.Before(e.due):
			kept = append(kept, e)
		default:
			a.route(e.fd, e.sa)
		}
	}
	clear(a.pending[len(kept):])
	a.pending = kept
	var next time.Time
	if len(kept) > 0 {
		next = kept[0].due
	}
	if !next.Equal(a.deadline) {
		a.wait.SetReadDeadline(next)
		a.deadline = next
	}
}

// route gives the connection fd, from the client at sa, to route, in a
// goroutine of its own, as a fileConn.
func (a *rawAccepter) route(fd int, sa syscall.Sockaddr) {
	p := a.p
	c, err := newFileConn(fd, sa)
	if err != nil {
		// The connection failed already (getsockname): nobody to serve.
		unix.Close(fd)
		p.conns.closedHanded(1)
		return
	}
	if !p.conns.claim(c) {
		c.Close()
		return
	}
	p.gate.routing.Add(1)
	go p.serveConn(c)
}

// handOff hands fd, from the client at sa, to a worker if its head is
// complete already and nothing needs route's path, and closes it then.
// It reports whether a worker took it; and if not, whether the head is
// still on its way (no bytes yet, or part of a head), so that waiting a
// little may let the loop hand it off after all.
func (a *rawAccepter) handOff(fd int, sa syscall.Sockaddr) (handed, wait bool) {
	p := a.p
	if len(p.cfg.trusted) > 0 {
		return false, false // a PROXY header may come first: route parses it
	}
	start := time.Now()
	head := a.buf[proxyRoom:]
	n, _, err := unix.Recvfrom(fd, head, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN:
		return false, true
	case err != nil || n == 0:
		return false, false // an error, or EOF: route sees it
	case !headComplete(head[:n], 0):
		return false, n < len(head)
	}
	head = head[:n]
	req := p.reqs.Get().(*Request)
	defer func() {
		req.reset()
		p.reqs.Put(req)
	}()
	parseRequest(req, head)
	classify(req, head)
	req.RemoteAddr = sockaddrAddrPort(sa)
	if p.isHealthCheck(req) {
		return false, false
	}
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[sniffComplete])
	msg := appendHandoff(a.buf[:0:proxyRoom], handoffMsg{version: handoffV2})
	binary.NativeEndian.PutUint32(a.oob[unix.CmsgLen(0):], uint32(fd))
	p.gate.routing.Add(1)
	p.rawHanded.Add(1) // before the worker can see it
	w := p.offer(req, func(uc *net.UnixConn) error { return sendNow(uc, msg, a.oob) }, nil, false)
	p.gate.routing.Add(-1)
	if w == nil {
		p.rawHanded.Add(^uint64(0))
		return false, false
	}
	unix.Close(fd) // the worker has its own descriptor
	return true, false
}

// sendNow writes the hand-off message msg with the descriptor in oob to
// uc without waiting: a full queue is errHandoffBusy.
func sendNow(uc *net.UnixConn, msg, oob []byte) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		for {
			if serr = unix.Sendmsg(int(fd), msg, oob, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL); serr != unix.EINTR {
				return
			}
		}
	})
	switch {
	case err != nil:
		return err
	case serr == unix.EAGAIN:
		return errHandoffBusy
	case serr != nil:
		return os.NewSyscallError("sendmsg", serr)
	}
	return nil
}

// newFileConn makes fd, from the client at sa, a fileConn.
func newFileConn(fd int, sa syscall.Sockaddr) (*fileConn, error) {
	lsa, err := syscall.Getsockname(fd)
	if err != nil {
		return nil, os.NewSyscallError("getsockname", err)
	}
	return &fileConn{
		File:  os.NewFile(uintptr(fd), "defuss-client"),
		laddr: net.TCPAddrFromAddrPort(sockaddrAddrPort(lsa)),
		raddr: net.TCPAddrFromAddrPort(sockaddrAddrPort(sa)),
	}, nil
}

// CloseWrite shuts down the sending side, as *net.TCPConn's does.
func (c *fileConn) CloseWrite() error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return err
	}
	return os.NewSyscallError("shutdown", serr)
}

// sockaddrAddrPort is sa's address and port; the zero AddrPort for a
// socket address that is not IP.
func sockaddrAddrPort(sa syscall.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}
