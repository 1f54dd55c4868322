package defuss

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
)

// response503 is what an HTTP/1 client gets when no worker can take its
// connection.
const response503 = "HTTP/1.1 503 Service Unavailable\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\n" +
	"Retry-After: 1\r\n" +
	"Connection: close\r\n" +
	"Content-Length: 24\r\n" +
	"\r\n" +
	"no worker is available.\n"

// acceptLoop accepts public connections until the listener is closed.
func (p *primary) acceptLoop() error {
	var delay time.Duration
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if p.stopping() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if !isTemporary(err) {
				return err
			}
			// Out of descriptors or similar: back off as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			if ok, n := p.acceptLog.allow(); ok {
				p.log.Error("accept", "err", err, "retry_in", delay, "suppressed", n)
			}
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-p.drain:
				t.Stop()
			}
			continue
		}
		delay = 0
		p.tel.accepted.Add(bg, 1)
		if !p.track(c) {
			c.Close()
			continue
		}
		go p.serveConn(c)
	}
}

func isTemporary(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) ||
		errors.Is(err, syscall.ENOMEM)
}

// liveConn is what the primary knows of a live client connection: once it
// is routed, the worker connection and the worker process behind it.
type liveConn struct {
	worker net.Conn
	slot   int
	pid    int
}

// track registers a live client connection so that shutdown can wait for
// it and, past its deadline, close it. It reports false once the primary
// is stopping.
func (p *primary) track(c net.Conn) bool {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if p.live == nil {
		return false
	}
	p.live[c] = liveConn{slot: -1}
	p.conns.Add(1)
	return true
}

// routed records that c is now spliced to worker, served by process pid in
// slot.
func (p *primary) routed(c, worker net.Conn, slot, pid int) {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if _, ok := p.live[c]; ok {
		p.live[c] = liveConn{worker: worker, slot: slot, pid: pid}
	}
}

func (p *primary) untrack(c net.Conn) {
	c.Close()
	p.connMu.Lock()
	delete(p.live, c)
	p.connMu.Unlock()
	p.conns.Done()
}

// closeLive closes every live client connection and refuses new ones.
func (p *primary) closeLive() {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	for c, l := range p.live {
		c.Close()
		if l.worker != nil {
			l.worker.Close()
		}
	}
	p.live = nil
}

// closeConnsOf closes the connections spliced to process pid of slot,
// which has exited: nothing can flow on them any more, and a half-open
// client side would otherwise keep them (and the slot's count) alive.
func (p *primary) closeConnsOf(slot, pid int) {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	for c, l := range p.live {
		if l.slot == slot && l.pid == pid {
			c.Close()
			l.worker.Close()
		}
	}
}

// bg is the context of metric recordings on the connection path.
var bg = context.Background()

// serveConn sniffs, routes and splices one client connection.
func (p *primary) serveConn(c net.Conn) {
	defer p.untrack(c)
	bp := p.bufs.Get().(*[]byte)
	start := time.Now()
	n, outcome, err := sniff(c, *bp, p.cfg.inspectionTimeout)
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[outcome])
	if err != nil && n == 0 {
		p.bufs.Put(bp)
		return // the client left before sending anything
	}
	req := p.reqs.Get().(*Request)
	parseRequest(req, (*bp)[:n])
	req.RemoteAddr = clientAddr(c)
	w, s, pid := p.connect(req)
	isHTTP := req.Protocol == ProtocolHTTP1
	req.reset()
	p.reqs.Put(req)
	if w == nil {
		p.bufs.Put(bp)
		p.tel.unavailable.Add(bg, 1)
		if ok, dropped := p.noWorkerLog.allow(); ok {
			p.log.Warn("no worker available; refusing connection", "http", isHTTP, "suppressed", dropped)
		}
		if isHTTP {
			refuse(c)
		}
		return
	}
	attrs := p.tel.worker[s.index]
	p.tel.active.Add(bg, 1, attrs)
	routed := time.Now()
	defer func() {
		s.conns.Add(-1)
		p.tel.active.Add(bg, -1, attrs)
		p.tel.duration.Record(bg, time.Since(routed).Seconds(), attrs)
	}()
	p.routed(c, w, s.index, pid)
	_, werr := w.Write((*bp)[:n])
	p.bufs.Put(bp)
	if werr != nil {
		w.Close()
		return
	}
	up, down := splice(c, w, p.cfg.halfOpen)
	p.tel.bytes.Add(bg, int64(n)+up, p.tel.toWorker[s.index])
	p.tel.bytes.Add(bg, down, p.tel.toClient[s.index])
}

// sniff reads from c into buf until it holds a complete request head, buf
// is full, the client stops sending (EOF) or timeout passes. It returns
// how many bytes it read, why it stopped, and the error that ended reading
// early, if any (a timeout is not an error: whatever arrived is routed).
func sniff(c net.Conn, buf []byte, timeout time.Duration) (int, string, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		if m > 0 && headEnd(buf[:n+m], n) >= 0 {
			return n + m, sniffComplete, nil
		}
		n += m
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return n, sniffTimeout, nil
			}
			if err == io.EOF && n > 0 {
				return n, sniffEOF, nil // forward what there is; the copy sees the EOF again
			}
			return n, sniffEOF, err
		}
	}
	return n, sniffCap, nil
}

// connect picks a worker for req and dials it. A worker that refuses the
// dial is skipped for the next one, since no byte has been sent to it. It
// returns nil when no worker takes the connection; otherwise the slot's
// connection count includes this connection.
func (p *primary) connect(req *Request) (*net.TCPConn, *slot, int) {
	cands := p.candidates()
	if len(cands) == 0 {
		return nil, nil, 0
	}
	start := time.Now()
	i, res := pick(p.cfg.balancer, p.fallback, req, cands)
	p.tel.balance.Record(bg, time.Since(start).Seconds())
	if res != pickOK {
		p.tel.fallbacks.Add(bg, 1, p.tel.fallback[res])
		if ok, n := p.balancerLog.allow(); ok {
			p.log.Error("balancer failed; used round robin", "failure", res.String(), "suppressed", n)
		}
	}
	for k := range cands {
		w := &cands[(i+k)%len(cands)]
		s := p.slots[w.Index]
		if k > 0 {
			p.tel.dialRetries.Add(bg, 1, p.tel.worker[w.Index])
		}
		s.conns.Add(1)
		ctx, cancel := context.WithTimeout(bg, p.cfg.dialTimeout)
		c, err := p.dialer.DialContext(ctx, "tcp", w.Addr)
		cancel()
		if err == nil {
			return c.(*net.TCPConn), s, w.PID
		}
		s.conns.Add(-1)
		p.tel.dialFailures.Add(bg, 1, p.tel.worker[w.Index])
		if ok, n := p.dialLog.allow(); ok {
			p.log.Warn("dial worker failed; trying the next", "worker", w.Index, "addr", w.Addr, "err", err, "suppressed", n)
		}
	}
	return nil, nil, 0
}

// refuse answers an HTTP/1 client with 503 and closes the connection
// without resetting it, so the client reads the answer.
func refuse(c net.Conn) {
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, response503); err != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		io.Copy(io.Discard, io.LimitReader(c, 64<<10)) // until the client closes, bounded
	}
}

// splice copies between client and worker in both directions until both
// are done, then closes both, and returns the bytes copied each way. With
// halfOpen, a clean EOF in one direction is passed on as a FIN while the
// other keeps flowing; otherwise, and on any error, the first direction to
// end closes both.
func splice(client net.Conn, worker *net.TCPConn, halfOpen bool) (up, down int64) {
	done := make(chan int64, 1)
	go copyToWorker(worker, client, halfOpen, done)
	down = copyToClient(client, worker, halfOpen)
	up = <-done
	worker.Close()
	client.Close()
	return up, down
}

// copyToWorker carries client bytes to the worker; on Linux, io.Copy
// between two *net.TCPConn uses splice(2).
func copyToWorker(worker *net.TCPConn, client net.Conn, halfOpen bool, done chan<- int64) {
	n, err := io.Copy(worker, client)
	endCopy(worker, client, err, halfOpen)
	done <- n
}

// copyToClient carries worker bytes to the client.
func copyToClient(client net.Conn, worker *net.TCPConn, halfOpen bool) int64 {
	n, err := io.Copy(client, worker)
	endCopy(client, worker, err, halfOpen)
	return n
}

// endCopy ends one direction: src has been read to EOF (err nil) or failed.
func endCopy(dst, src net.Conn, err error, halfOpen bool) {
	if err == nil && halfOpen {
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
			return
		}
	}
	dst.Close()
	src.Close()
}

// clientAddr is the client's address, or the zero AddrPort for
// non-TCP listeners.
func clientAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}
