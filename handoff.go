package defuss

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
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
