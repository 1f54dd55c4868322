package defuss

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
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
		if ok, full := p.track(c); !ok {
			c.Close()
			if full {
				p.tel.refused.Add(bg, 1)
				if ok, n := p.limitLog.allow(); ok {
					p.log.Warn("connection limit reached; closing new connections", "max", p.cfg.maxConns, "suppressed", n)
				}
			}
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
// is stopping, or when the connection limit is reached (full).
func (p *primary) track(c net.Conn) (ok, full bool) {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if p.live == nil {
		return false, false
	}
	if p.cfg.maxConns > 0 && len(p.live) >= p.cfg.maxConns {
		return false, true
	}
	p.live[c] = liveConn{slot: -1}
	p.conns.Add(1)
	p.routing.Add(1)
	return true, false
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

// endConnsOf ends the client-to-worker direction of the connections
// spliced to process pid of slot, which has exited: nothing the client
// sends can reach it any more, and a half-open client side would
// otherwise keep them (and the slot's count) alive. The other direction
// still delivers what the worker wrote before it exited, then the
// connection closes as usual.
func (p *primary) endConnsOf(slot, pid int) {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	now := time.Now()
	for c, l := range p.live {
		if l.slot == slot && l.pid == pid {
			c.SetReadDeadline(now)
		}
	}
}

// endAllConns does endConnsOf for every live connection: at shutdown,
// once every worker has exited.
func (p *primary) endAllConns() {
	p.connMu.Lock()
	defer p.connMu.Unlock()
	now := time.Now()
	for c := range p.live {
		c.SetReadDeadline(now)
	}
}

// bg is the context of metric recordings on the connection path.
var bg = context.Background()

// serveConn sniffs, routes and splices one client connection.
//
// The pooled buffer holds proxyRoom spare bytes, then what was sniffed: an
// optional PROXY header from a trusted load balancer, then the request
// head. The PROXY header for the worker is written right in front of the
// head, so the worker gets header and head in one write.
func (p *primary) serveConn(c net.Conn) {
	r := p.route(c)
	if r == nil {
		p.untrack(c)
		return
	}
	// Relay in a goroutine of its own, whose stack starts small: routing
	// (dialing above all) grew this one's, and an idle connection would
	// keep it for its whole life.
	go r.relay()
}

// relay is a routed connection, spliced to its worker until both
// directions end.
type relay struct {
	p      *primary
	client net.Conn
	worker *net.TCPConn
	s      *slot
	sent   int64 // head bytes already written to the worker
	routed time.Time
}

func (r *relay) relay() {
	p, s := r.p, r.s
	defer p.untrack(r.client)
	up, down := splice(r.client, r.worker, p.cfg.halfOpen)
	s.conns.Add(-1)
	p.tel.active.Add(bg, -1, s.attrs.worker)
	p.tel.duration.Record(bg, time.Since(r.routed).Seconds(), s.attrs.worker)
	p.tel.bytes.Add(bg, r.sent+up, s.attrs.toWorker)
	p.tel.bytes.Add(bg, down, s.attrs.toClient)
}

// route sniffs, parses and routes c, and returns it connected to its
// worker, or nil when it was answered, refused or handed off here.
func (p *primary) route(c net.Conn) *relay {
	routing := true // counted in p.routing until a worker is dialed or the connection refused
	doneRouting := func() {
		if routing {
			routing = false
			p.routing.Add(-1)
		}
	}
	defer doneRouting()
	bp := p.bufs.Get().(*[]byte)
	if tc, ok := c.(*net.TCPConn); ok && p.cfg.handoff {
		p.handoffConn(tc, bp, doneRouting)
		return nil
	}
	buf := (*bp)[proxyRoom:]
	start := time.Now()
	n, hdr, outcome, err := sniff(c, buf, p.cfg.inspectionTimeout, len(p.cfg.trusted) > 0)
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[outcome])
	if err != nil && n == 0 {
		p.bufs.Put(bp)
		return nil // the client left before sending anything
	}
	client := clientAddr(c)
	if hdr != 0 {
		var reason string
		if client, reason = p.proxiedClient(client, buf[:max(hdr, 0)], hdr); reason != "" {
			p.bufs.Put(bp)
			p.tel.proxyRejected.Add(bg, 1, p.tel.rejectReason[reason])
			if ok, dropped := p.proxyLog.allow(); ok {
				p.log.Warn("PROXY header rejected; connection closed", "reason", reason, "peer", clientAddr(c).String(), "suppressed", dropped)
			}
			return nil
		}
		hdr = max(hdr, 0)
	}
	req := p.reqs.Get().(*Request)
	parseRequest(req, buf[hdr:n])
	req.RemoteAddr = client
	if p.isHealthCheck(req) {
		head := req.Method == "HEAD"
		req.reset()
		p.reqs.Put(req)
		p.bufs.Put(bp)
		p.answerHealth(c, head)
		return nil
	}
	w, s, pid := p.connect(req)
	doneRouting()
	isHTTP := req.Protocol == ProtocolHTTP1
	req.reset()
	p.reqs.Put(req)
	if w == nil {
		p.bufs.Put(bp)
		p.refuseUnavailable(c, isHTTP)
		return nil
	}
	p.tel.active.Add(bg, 1, s.attrs.worker)
	r := &relay{p: p, client: c, worker: w, s: s, sent: int64(n - hdr), routed: time.Now()}
	p.routed(c, w, s.index, pid)
	var hb [proxyRoom]byte
	h := appendProxyV2(hb[:0], client, localAddr(c), &p.secret)
	from := proxyRoom + hdr - len(h)
	copy((*bp)[from:], h)
	_, werr := w.Write((*bp)[from : proxyRoom+n])
	p.bufs.Put(bp)
	if werr != nil {
		// The worker is gone already: end the connection as a relay would.
		w.Close()
		r.client.Close()
	}
	return r
}

// refuseUnavailable answers a connection no worker can take: 503 for
// HTTP/1, a plain close otherwise.
func (p *primary) refuseUnavailable(c net.Conn, isHTTP bool) {
	p.tel.unavailable.Add(bg, 1)
	if ok, dropped := p.noWorkerLog.allow(); ok {
		p.log.Warn("no worker available; refusing connection", "http", isHTTP, "suppressed", dropped)
	}
	resp := ""
	if isHTTP {
		resp = response503
	}
	respondAndClose(c, resp) // a non-HTTP client gets a plain close (FIN, not a reset)
}

// sniff reads from c into buf until it holds a complete request head, buf
// is full, the client stops sending (EOF) or timeout passes. With
// detectProxy, a PROXY header at the start is read first and the head is
// looked for after it.
//
// It returns how many bytes it read; the length of the PROXY header at the
// start of buf (0 if none, -1 if one started but is malformed or did not
// arrive in time); why it stopped; and the error that ended reading early,
// if any (a timeout is not an error: whatever arrived is routed).
func sniff(c net.Conn, buf []byte, timeout time.Duration, detectProxy bool) (n, hdr int, outcome string, err error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	if detectProxy {
		hdr = proxyUnknown
	}
	for n < len(buf) {
		m, rerr := c.Read(buf[n:])
		prev := n
		n += m
		if m > 0 && hdr == proxyUnknown {
			hdr = proxyHeaderLen(buf[:n])
			if hdr == proxyMalformed {
				return n, -1, sniffComplete, nil
			}
		}
		if m > 0 && hdr >= 0 && headEnd(buf[hdr:n], max(prev-hdr, 0)) >= 0 {
			return n, hdr, sniffComplete, nil
		}
		if rerr != nil {
			if hdr == proxyUnknown {
				hdr = 0
				if n > 0 {
					hdr = -1 // a PROXY header began but did not finish in time
				}
			}
			if errors.Is(rerr, os.ErrDeadlineExceeded) {
				return n, hdr, sniffTimeout, nil
			}
			if rerr == io.EOF && n > 0 {
				return n, hdr, sniffEOF, nil // forward what there is; the copy sees the EOF again
			}
			return n, hdr, sniffEOF, rerr
		}
	}
	if hdr == proxyUnknown {
		hdr = -1
	}
	return n, hdr, sniffCap, nil
}

// isHealthCheck reports whether req is for the primary's health path.
func (p *primary) isHealthCheck(req *Request) bool {
	if p.cfg.healthPath == "" || req.Protocol != ProtocolHTTP1 || (req.Method != "GET" && req.Method != "HEAD") {
		return false
	}
	path, _, _ := strings.Cut(req.Path, "?")
	return path == p.cfg.healthPath
}

// answerHealth answers a health check: 200 while a worker takes
// connections and the server is not shutting down, 503 otherwise.
func (p *primary) answerHealth(c net.Conn, head bool) {
	status, body := "200 OK", "ok\n"
	switch {
	case p.draining.Load():
		status, body = "503 Service Unavailable", "draining\n"
	case len(p.candidates()) == 0:
		status, body = "503 Service Unavailable", "no worker ready\n"
	}
	resp := "HTTP/1.1 " + status + "\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n" +
		"Connection: close\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
	if !head {
		resp += body
	}
	respondAndClose(c, resp)
}

// connect picks a worker for req and dials it. A worker that refuses the
// dial is skipped for the next one, since no byte has been sent to it. It
// returns nil when no worker takes the connection; otherwise the slot's
// connection count includes this connection.
func (p *primary) connect(req *Request) (*net.TCPConn, *slot, int) {
	e := p.enterDial()
	defer p.exitDial(e)
	cands := p.candidates()
	if len(cands) == 0 {
		return nil, nil, 0
	}
	i := p.pickWorker(req, cands)
	for k := range cands {
		w := &cands[(i+k)%len(cands)]
		s := w.slot
		if k > 0 {
			p.tel.dialRetries.Add(bg, 1, s.attrs.worker)
		}
		s.conns.Add(1)
		c, err := p.dialer.DialContext(bg, "tcp", w.Addr) // p.dialer.Timeout bounds it
		if err == nil {
			if w.proc != nil {
				w.proc.dialed.Add(1)
			}
			return c.(*net.TCPConn), s, w.PID
		}
		s.conns.Add(-1)
		p.tel.dialFailures.Add(bg, 1, s.attrs.worker)
		if ok, n := p.dialLog.allow(); ok {
			p.log.Warn("dial worker failed; trying the next", "worker", w.Index, "addr", w.Addr, "err", err, "suppressed", n)
		}
	}
	return nil, nil, 0
}

// pickWorker asks the balancer for a worker, times it, and counts and
// logs a fallback.
func (p *primary) pickWorker(req *Request, cands []WorkerInfo) int {
	start := time.Now()
	i, res := pick(p.cfg.balancer, p.fallback, req, cands)
	p.tel.balance.Record(bg, time.Since(start).Seconds())
	if res != pickOK {
		p.tel.fallbacks.Add(bg, 1, p.tel.fallback[res])
		if ok, n := p.balancerLog.allow(); ok {
			p.log.Error("balancer failed; used round robin", "failure", res.String(), "suppressed", n)
		}
	}
	return i
}

// enterDial and exitDial bracket the use of a candidate snapshot, from
// loading it to the end of the dial, so that quiesce can wait for every
// connect that may still dial a worker taken out of the snapshot. The two
// counters alternate by epoch, as in read-copy-update.
func (p *primary) enterDial() uint64 {
	for {
		e := p.epoch.Load()
		p.dialing[e&1].Add(1)
		if p.epoch.Load() == e {
			return e
		}
		p.dialing[e&1].Add(-1) // quiesce moved on meanwhile: join the new epoch
	}
}

func (p *primary) exitDial(e uint64) { p.dialing[e&1].Add(-1) }

// quiesce waits until every connect that loaded a candidate snapshot
// published before this call has finished dialing. Bounded by the dial
// timeout.
func (p *primary) quiesce() {
	e := p.epoch.Add(1) - 1
	waitUntil(p.cfg.dialTimeout+100*time.Millisecond, func() bool { return p.dialing[e&1].Load() == 0 })
}

// awaitRoutingIdle waits, once the listener is closed, until every
// accepted connection has been routed (or refused), so that no connection
// is dialed to a worker after it was told to drain. Bounded by the
// inspection and dial timeouts.
func (p *primary) awaitRoutingIdle() {
	limit := p.cfg.inspectionTimeout + p.cfg.dialTimeout + 100*time.Millisecond
	select {
	case <-p.acceptDone:
	case <-time.After(limit):
	}
	waitUntil(limit, func() bool { return p.routing.Load() == 0 })
}

// waitUntil polls cond every millisecond until it holds or limit passes.
// The conditions it waits for last microseconds: a dial in progress, a
// head being sniffed.
func waitUntil(limit time.Duration, cond func() bool) {
	deadline := time.Now().Add(limit)
	for !cond() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

// respondAndClose writes a complete HTTP/1 response and closes the
// connection without resetting it, so the client reads the answer even if
// it sent more than the primary read.
func respondAndClose(c net.Conn, resp string) {
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, resp); err != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		io.Copy(io.Discard, io.LimitReader(c, 64<<10)) // until the client closes, bounded
	}
}

// localAddr is the address the client connected to, or the zero AddrPort
// for non-TCP listeners.
func localAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}

// clientAddr is the client's address, or the zero AddrPort for
// non-TCP listeners.
func clientAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}
