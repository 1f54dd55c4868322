package defuss

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// handoffConn routes one client connection in hand-off mode: it peeks at
// the head (nothing is read from the socket), picks a worker and passes
// the descriptor to it. The worker reads every byte itself.
func (p *primary) handoffConn(c *net.TCPConn, bp *[]byte, doneRouting func()) {
	buf := (*bp)[proxyRoom:]
	start := time.Now()
	n, outcome, err := peekHead(c, buf, p.cfg.inspectionTimeout)
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[outcome])
	if err != nil && n == 0 {
		p.bufs.Put(bp)
		return
	}
	req := p.reqs.Get().(*Request)
	parseRequest(req, buf[:n])
	req.RemoteAddr = clientAddr(c)
	health := p.isHealthCheck(req)
	head := req.Method == "HEAD"
	var s *slot
	if !health {
		s = p.handOff(c, req)
	}
	doneRouting()
	isHTTP := req.Protocol == ProtocolHTTP1
	req.reset()
	p.reqs.Put(req)
	p.bufs.Put(bp)
	switch {
	case health:
		p.answerHealth(c, head)
	case s == nil:
		p.refuseUnavailable(c, isHTTP)
	}
}

// handOff picks a worker for req and passes c's descriptor to it. A worker
// whose socket fails is skipped for the next one: nothing was read from c.
// It returns the slot, whose connection count includes c, or nil.
func (p *primary) handOff(c *net.TCPConn, req *Request) *slot {
	e := p.enterDial()
	defer p.exitDial(e)
	cands := p.candidates()
	if len(cands) == 0 {
		return nil
	}
	i := p.pickWorker(req, cands)
	for k := range cands {
		w := &cands[(i+k)%len(cands)]
		s, pr := w.slot, w.proc
		if pr == nil || pr.handoff == nil {
			continue
		}
		if k > 0 {
			p.tel.dialRetries.Add(bg, 1, s.attrs.worker)
		}
		s.conns.Add(1)
		pr.open.Add(1)
		err := sendConn(pr.handoff, c)
		if err == nil {
			pr.dialed.Add(1)
			p.tel.active.Add(bg, 1, s.attrs.worker)
			return s
		}
		s.conns.Add(-1)
		pr.open.Add(-1)
		p.tel.dialFailures.Add(bg, 1, s.attrs.worker)
		if ok, n := p.dialLog.allow(); ok {
			p.log.Warn("hand-off to worker failed; trying the next", "worker", w.Index, "err", err, "suppressed", n)
		}
	}
	return nil
}

// sendConn passes c's descriptor over uc (SCM_RIGHTS).
func sendConn(uc *net.UnixConn, c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	err = rc.Control(func(fd uintptr) {
		_, _, werr = uc.WriteMsgUnix([]byte{1}, unix.UnixRights(int(fd)), nil)
	})
	return errors.Join(err, werr)
}

// peekHead waits, as sniff does, for a complete head, a full buf, EOF or
// the timeout, but with MSG_PEEK: the bytes stay in the socket for the
// worker. It returns how many bytes it saw and why it stopped.
func peekHead(c *net.TCPConn, buf []byte, timeout time.Duration) (int, string, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, sniffEOF, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	n, outcome := 0, sniffTimeout
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		m, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
			return false
		case err != nil:
			perr = os.NewSyscallError("recvfrom", err)
			return true
		case m == 0:
			outcome = sniffEOF
			return true
		}
		n = m
		switch {
		case headEnd(buf[:m], 0) >= 0:
			outcome = sniffComplete
		case m == len(buf):
			outcome = sniffCap
		default:
			return false // wait for more bytes to arrive
		}
		return true
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return n, sniffTimeout, nil
	}
	if err == nil {
		err = perr
	}
	if err != nil {
		return n, sniffEOF, err
	}
	return n, outcome, nil
}

// handoffPair returns the primary's end of a new hand-off socket pair and
// the worker's end, to pass as fd 5. SOCK_SEQPACKET keeps each descriptor
// in its own message.
func handoffPair() (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "defuss-handoff")
	defer ours.Close() // FileConn made its own descriptor
	c, err := net.FileConn(ours)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "defuss-handoff-worker"), nil
}

// serveHandoff serves the connections the primary hands off.
func (w *worker) serveHandoff() {
	defer w.wg.Done()
	if err := w.srv.Serve(w.handoff); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		w.log.Error("serve handed-off connections", "err", err)
	}
}

// reportCloses tells the primary, in batches, how many handed-off
// connections have closed, so that its connection counts stay exact.
func (w *worker) reportCloses() {
	defer w.wg.Done()
	for {
		select {
		case <-w.kick:
			if n := w.handedClosed.Swap(0); n > 0 {
				if err := w.send(&message{kind: frameClosed, closed: int(n)}); err != nil {
					return
				}
			}
		case <-w.done:
			return
		}
	}
}

// handedConn is a connection that the primary handed off: its close,
// also after a handler hijacked it, is reported to the primary.
type handedConn struct {
	*net.TCPConn
	w    *worker
	once sync.Once
}

var _ net.Conn = (*handedConn)(nil)

func (c *handedConn) Close() error {
	err := c.TCPConn.Close()
	c.once.Do(c.w.handedClose)
	return err
}

// handedClose counts one closed handed-off connection and wakes the
// reporter.
func (w *worker) handedClose() {
	w.handedClosed.Add(1)
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// handoffListener yields the connections whose descriptors arrive on the
// hand-off socket.
type handoffListener struct {
	uc       *net.UnixConn
	addr     net.Addr
	conns    chan net.Conn
	done     chan struct{}
	once     sync.Once
	accepted *atomic.Uint64
	w        *worker // for close reports
}

var _ net.Listener = (*handoffListener)(nil)

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		l.accepted.Add(1)
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept; the socket itself closes when the worker stops.
func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// receive reads descriptors from the hand-off socket until it closes.
func (l *handoffListener) receive(wg *sync.WaitGroup, log *slog.Logger) {
	defer wg.Done()
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		_, oobn, _, _, err := l.uc.ReadMsgUnix(b[:], oob)
		if err != nil {
			return // the primary is gone, or the worker stops
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			log.Error("hand-off message", "err", err)
			continue
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				f := os.NewFile(uintptr(fd), "handed-off")
				c, err := net.FileConn(f)
				f.Close()
				tc, ok := c.(*net.TCPConn)
				if err != nil || !ok {
					log.Error("handed-off connection is not TCP", "err", err)
					if c != nil {
						c.Close()
					}
					continue
				}
				hc := &handedConn{TCPConn: tc, w: l.w}
				select {
				case l.conns <- hc:
				case <-l.done:
					hc.Close()
				}
			}
		}
	}
}

// inheritedSocket returns fd as a Unix socket after checking what it is.
func inheritedSocket(fd int) (*net.UnixConn, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("fd %d is not a socket", fd)
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "defuss-handoff")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("fd %d is not a Unix socket", fd)
	}
	return uc, nil
}
