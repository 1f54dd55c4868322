package defuss

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
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

// proxiedClient checks a PROXY header that a client sent, and returns the
// client address it carries, or why the connection must be refused.
func (p *primary) proxiedClient(peer netip.AddrPort, header []byte, hdr int) (netip.AddrPort, string) {
	if !p.cfg.trusts(peer.Addr()) {
		return peer, "untrusted"
	}
	if hdr < 0 {
		return peer, "malformed"
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(header)))
	if err != nil {
		return peer, "malformed"
	}
	if h.Command.IsLocal() {
		return peer, "" // a health check of the balancer itself: keep the socket address
	}
	if a, ok := h.SourceAddr.(*net.TCPAddr); ok {
		return a.AddrPort(), ""
	}
	return peer, "malformed"
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
	n, err := copyStream(worker, client)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// endConnsOf: the worker has exited. End this direction only, so
		// the other one still delivers the worker's last bytes.
		worker.CloseWrite()
		done <- n
		return
	}
	endCopy(worker, client, err, halfOpen)
	done <- n
}

// copyToClient carries worker bytes to the client.
func copyToClient(client net.Conn, worker *net.TCPConn, halfOpen bool) int64 {
	n, err := copyStream(client, worker)
	endCopy(client, worker, err, halfOpen)
	return n
}

// copyStream copies src to dst until EOF, like io.Copy, without holding
// anything while src is idle: io.Copy between TCP connections keeps a
// splice pipe (two descriptors and its kernel buffer) for as long as the
// source is idle, which would triple the primary's descriptors for idle
// keep-alive connections.
//
// Between two TCP connections it reads what has arrived into a pooled
// buffer, taken only once src is readable, and writes it on: for the
// small messages of most HTTP traffic, two system calls. When a read fills
// the buffer, the rest of what is queued moves with splice(2), in the
// kernel.
func copyStream(dst, src net.Conn) (int64, error) {
	d, ok1 := dst.(*net.TCPConn)
	s, ok2 := src.(*net.TCPConn)
	if !ok1 || !ok2 {
		return io.Copy(dst, src)
	}
	rc, err := s.SyscallConn()
	if err != nil {
		return io.Copy(dst, src)
	}
	var (
		total int64
		n     int
		rerr  error
		bp    *[]byte
		lr    = io.LimitedReader{R: s}
	)
	read := func(fd uintptr) bool {
		bp = copyBufs.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *bp)
		if rerr == unix.EAGAIN {
			copyBufs.Put(bp)
			bp = nil
			return false // wait for data without a buffer
		}
		if rerr != nil {
			n, rerr = 0, os.NewSyscallError("read", rerr)
		}
		return true
	}
	queued := func(fd uintptr) { n, rerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }
	for {
		err := rc.Read(read)
		if err == nil {
			err = rerr
		}
		if err != nil || n == 0 {
			if bp != nil {
				copyBufs.Put(bp)
			}
			return total, err // n == 0: EOF
		}
		full := n == len(*bp)
		w, err := d.Write((*bp)[:n])
		copyBufs.Put(bp)
		bp = nil
		total += int64(w)
		if err != nil {
			return total, err
		}
		if !full {
			continue
		}
		if err := rc.Control(queued); err != nil || rerr != nil || n == 0 {
			continue
		}
		lr.N = int64(n)
		m, err := d.ReadFrom(&lr)
		total += m
		if err != nil {
			return total, err
		}
	}
}

// copyBufs holds copyStream's buffers, in use only while data moves.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

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

// PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt). The
// primary writes a v2 header in front of every connection to a worker:
// it carries the client's address and, in a custom TLV, the per-run secret
// that proves to the worker that the connection comes from its primary.
var proxyV2Sig = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

const (
	proxyRoom      = 128  // room for the outgoing header: 16 + 36 (IPv6) + 3 + secretLen
	tlvSecret      = 0xE0 // PP2_TYPE_MIN_CUSTOM
	proxyV1Max     = 107  // longest v1 line, CRLF included
	proxyUnknown   = -2   // proxyHeaderLen: more bytes needed to tell
	proxyMalformed = -1   // proxyHeaderLen: a PROXY header that cannot be valid
)

// appendProxyV2 appends a v2 header for a TCP connection from src to dst
// (LOCAL, without addresses, when either is not known) with the secret.
func appendProxyV2(b []byte, src, dst netip.AddrPort, secret *[secretLen]byte) []byte {
	const tlvLen = 3 + secretLen
	b = append(b, proxyV2Sig[:]...)
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	switch {
	case !src.IsValid() || !dst.IsValid():
		b = append(b, 0x20, 0x00) // v2 LOCAL, UNSPEC
		b = binary.BigEndian.AppendUint16(b, tlvLen)
	case s.Is4() && d.Is4():
		b = append(b, 0x21, 0x11) // v2 PROXY, TCP over IPv4
		b = binary.BigEndian.AppendUint16(b, 12+tlvLen)
		s4, d4 := s.As4(), d.As4()
		b = append(append(b, s4[:]...), d4[:]...)
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	default:
		b = append(b, 0x21, 0x21) // v2 PROXY, TCP over IPv6
		b = binary.BigEndian.AppendUint16(b, 36+tlvLen)
		s16, d16 := src.Addr().As16(), dst.Addr().As16()
		b = append(append(b, s16[:]...), d16[:]...)
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	}
	b = append(b, tlvSecret, 0, secretLen)
	return append(b, secret[:]...)
}

// proxyHeaderLen looks at the start of what a client sent: the length of
// the PROXY header there, 0 if b does not start with one, proxyUnknown if
// more bytes are needed to tell, or proxyMalformed.
func proxyHeaderLen(b []byte) int {
	const v1 = "PROXY "
	switch {
	case len(b) < len(v1) && bytes.HasPrefix([]byte(v1), b),
		len(b) < 16 && bytes.HasPrefix(proxyV2Sig[:], b[:min(len(b), 12)]):
		return proxyUnknown
	case bytes.HasPrefix(b, []byte(v1)):
		if i := bytes.Index(b[:min(len(b), proxyV1Max)], []byte("\r\n")); i >= 0 {
			return i + 2
		}
		if len(b) >= proxyV1Max {
			return proxyMalformed
		}
		return proxyUnknown
	case bytes.HasPrefix(b, proxyV2Sig[:]):
		if b[12]>>4 != 2 {
			return proxyMalformed
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > 16+512 {
			return proxyMalformed // far more than any address block and TLVs a balancer sends
		}
		if len(b) < n {
			return proxyUnknown
		}
		return n
	}
	return 0
}
