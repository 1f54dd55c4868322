package defuss

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
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
	if handled, err := p.rawAcceptLoop(); handled {
		return err
	}
	var delay time.Duration
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if stop, err := p.acceptFailed(err, &delay); stop {
				return err
			}
			continue
		}
		delay = 0
		p.tel.accepted.Add(bg, 1)
		if ok, full := p.admit(c); !ok {
			p.refused(full)
			c.Close()
			continue
		}
		go p.serveConn(c)
	}
}

// acceptFailed handles an error of accept. After a temporary one, such
// as running out of descriptors, it backs off as net/http does, and the
// loop goes on. Else the loop stops: with no error once the listener is
// closed, with err otherwise. delay is the previous backoff, which it
// updates.
func (p *primary) acceptFailed(err error, delay *time.Duration) (stop bool, _ error) {
	if p.stopping() || errors.Is(err, net.ErrClosed) {
		return true, nil
	}
	if !isTemporary(err) {
		return true, err
	}
	*delay = min(max(2**delay, 5*time.Millisecond), time.Second)
	if ok, n := p.logs.accept.allow(); ok {
		p.log.Error("accept", "err", err, "retry_in", *delay, "suppressed", n)
	}
	t := time.NewTimer(*delay)
	select {
	case <-t.C:
	case <-p.life.drain:
		t.Stop()
	}
	return false, nil
}

// refused records a new connection the primary closes unserved: it is
// stopping, or the connection limit is reached (full). It is counted
// before the close, so that the count is there by the time the client
// sees the connection closed.
func (p *primary) refused(full bool) {
	if !full {
		return
	}
	p.tel.refused.Add(bg, 1)
	if ok, n := p.logs.limit.allow(); ok {
		p.log.Warn("connection limit reached; closing new connections", "max", p.cfg.maxConns, "suppressed", n)
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

// bg is the context of metric recordings on the connection path.
var bg = context.Background()

// admit tracks a new client connection and counts it as being routed, as
// serveConn expects. It reports false when the connection must be closed:
// the primary is stopping, or the connection limit is reached (full).
func (p *primary) admit(c net.Conn) (ok, full bool) {
	if ok, full = p.conns.track(c); ok {
		p.gate.routing.Add(1)
	}
	return ok, full
}

// serveConn routes one client connection and relays it.
//
// The pooled buffer holds proxyRoom spare bytes (for the PROXY header to
// the worker, or the hand-off message), then what was sniffed: an
// optional PROXY header from a trusted load balancer, then the request
// head.
func (p *primary) serveConn(c net.Conn) {
	r, handed := p.route(c)
	switch {
	case handed:
		p.conns.handedOff(c) // a worker holds it now, until it reports it closed
	case r == nil:
		p.conns.untrack(c)
	default:
		// An event loop carries it where there is one. Else it relays in
		// a goroutine of its own, whose stack starts small: routing
		// (dialing above all) grew this one's, and an idle connection
		// would keep it for its whole life.
		if !p.relay().take(r) {
			go r.run()
		}
	}
}

// relay returns splice mode's event loops, started on first use (so that
// a primary that never relays, in tests above all, starts none), or nil
// where there are none and goroutines relay.
func (p *primary) relay() *evRelay {
	p.evrOn.Do(func() { p.evr = newEvRelay(runtime.GOMAXPROCS(0)) })
	return p.evr
}

// stopRelay stops the event loops, once no connection can reach them;
// none start after it.
func (p *primary) stopRelay() {
	p.evrOn.Do(func() {})
	p.evr.stop()
}

// relay is a routed connection, spliced to its worker until both
// directions end.
type relay struct {
	p      *primary
	client net.Conn
	worker upstream
	s      *slot
	sent   int64 // head bytes already written to the worker
	routed time.Time
}

// abort ends a relay whose worker is gone before it began (the head
// could not be written): it closes both sides, and the relay then ends
// at once with nothing copied. A raw socket is closed here once, and
// forgotten.
func (r *relay) abort() {
	r.worker.close()
	r.worker.fd = -1
	r.client.Close()
}

// run relays with two goroutines (this one and copyToWorker's), where no
// event loop carries the connection.
func (r *relay) run() {
	r.finish(splice(r.client, r.worker.conn, r.p.cfg.halfOpen))
}

// finish records the end of a relay that carried up bytes to the worker
// and down to the client, and forgets the connection.
func (r *relay) finish(up, down int64) {
	p, s := r.p, r.s
	defer p.conns.untrack(r.client)
	s.conns.Add(-1)
	p.tel.active.Add(bg, -1, s.attrs.worker.add...)
	p.tel.bytes.Add(bg, r.sent+up, s.attrs.toWorker.add...) // bytes first: a reader that sees the duration sees them
	p.tel.bytes.Add(bg, down, s.attrs.toClient.add...)
	p.tel.duration.Record(bg, time.Since(r.routed).Seconds(), s.attrs.worker.record...)
}

// route inspects c, parses what it has sent and gives it to a worker. In
// splice mode it returns c connected to its worker; in hand-off mode it
// reports handed once a worker serves c itself. It returns neither when c
// was answered here or refused.
func (p *primary) route(c net.Conn) (r *relay, handed bool) {
	routing := true // counted in p.gate.routing until a worker took it or it was refused
	doneRouting := func() {
		if routing {
			routing = false
			p.gate.routing.Add(-1)
		}
	}
	defer doneRouting()
	tc, isTCP := tcpSocket(c)
	handoff := isTCP && p.cfg.handoff
	if p.cfg.handoff && !isTCP {
		p.warnNotTCP.Do(func() {
			p.log.Warn("hand-off mode: connection is not a *net.TCPConn, so it has no descriptor to pass; splicing such connections instead",
				"type", fmt.Sprintf("%T", c))
		})
	}
	bp := p.bufs.Get().(*[]byte)
	buf := (*bp)[proxyRoom:]
	n, hdr, client, ok := p.inspect(c, buf, handoff)
	if !ok {
		p.bufs.Put(bp)
		return nil, false
	}
	req := p.reqs.Get().(*Request)
	parseRequest(req, buf[hdr:n])
	classify(req, buf[hdr:n])
	req.RemoteAddr = client
	health, head, isHTTP := p.isHealthCheck(req), req.Method == "HEAD", req.Protocol == ProtocolHTTP1
	var w *WorkerInfo
	var up upstream
	switch {
	case health:
	case handoff:
		// The worker consumes the trusted PROXY header, if any, itself,
		// and serves the client address it carries. The message goes in
		// the buffer's spare room, which hand-off leaves unused.
		m := handoffFor(clientAddr(c), acceptedWithOpts(c), hdr, client)
		send := func(pr *process, v byte) error {
			return sendConn(pr.handoffSock, tc, appendHandoff((*bp)[:0:proxyRoom], m.upTo(v)))
		}
		w, _ = p.offer(req, send, nil, 0)
	default:
		// An event loop carries TCP clients (where there are loops):
		// the worker's socket is then dialed raw, never in Go's poller.
		var how offerHow
		if isTCP && p.relay() != nil {
			how = offerRaw
		}
		w, _ = p.offer(req, nil, &up, how)
	}
	doneRouting()
	req.reset()
	p.reqs.Put(req)
	if health || w == nil || handoff {
		// Nothing more to send from the buffer: give it back before the
		// answer, which may wait for the client.
		p.bufs.Put(bp)
		switch {
		case health:
			p.answerHealth(c, head)
		case w == nil:
			p.refuseUnavailable(c, isHTTP)
		}
		return nil, w != nil
	}
	r = &relay{p: p, client: c, worker: up, s: w.slot, sent: int64(n - hdr), routed: time.Now()}
	var wconn net.Conn // for closeAll, if it comes before an event loop carries the pair
	if up.conn != nil {
		wconn = up.conn
	}
	p.conns.routed(c, wconn, w.Index, w.PID)
	// The worker gets the PROXY header and the head in one write: the
	// header goes right in front of the head, in the buffer's spare room.
	var hb [proxyRoom]byte
	h := appendProxyV2(hb[:0], client, localAddr(c), &p.secret)
	from := proxyRoom + hdr - len(h)
	copy((*bp)[from:], h)
	err := up.write((*bp)[from:proxyRoom+n], p.cfg.dialTimeout)
	p.bufs.Put(bp)
	if err != nil {
		r.abort()
	}
	return r, false
}

// inspect reads the start of c into buf (splice mode), or peeks at it
// without reading (hand-off mode), until it holds a complete request head,
// buf is full, the client stops sending or the inspection timeout passes.
// It returns how many bytes buf holds, the length of the trusted PROXY
// header at its start, and the client's address. ok is false
// when the connection is to be closed: the client left without sending
// anything, its connection failed, or it sent a PROXY header that is not
// to be trusted.
func (p *primary) inspect(c net.Conn, buf []byte, handoff bool) (n, hdr int, client netip.AddrPort, ok bool) {
	start := time.Now()
	var outcome string
	var err error
	peer := clientAddr(c)
	detect := len(p.cfg.trusted) > 0
	var wait time.Duration // for a trusted peer's first bytes (trustedFirstByteWait)
	if detect && p.cfg.trusts(peer.Addr()) {
		wait = trustedFirstByteWait
	}
	if handoff {
		n, hdr, outcome, err = peekHead(c.(peeker), buf, p.cfg.inspectionTimeout, detect, wait)
	} else {
		n, hdr, outcome, err = sniff(c, buf, p.cfg.inspectionTimeout, detect, wait)
	}
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[outcome].record...)
	if err != nil {
		// The client left (EOF before a byte) or its connection failed,
		// a reset mid-head for one: nobody is there to serve. A timeout,
		// or an EOF after some bytes, is no error: what came is routed.
		return 0, 0, client, false
	}
	if hdr == 0 {
		return n, 0, peer, true
	}
	var reason string
	if client, reason = p.proxiedClient(peer, buf[:max(hdr, 0)], hdr); reason != "" {
		p.tel.proxyRejected.Add(bg, 1, p.tel.rejectReason[reason])
		if ok, dropped := p.logs.proxy.allow(); ok {
			p.log.Warn("PROXY header rejected; connection closed", "reason", reason, "peer", peer.String(), "suppressed", dropped)
		}
		return n, hdr, client, false
	}
	return n, max(hdr, 0), client, true
}

// offer picks a worker for req and gives it the connection. With send
// set (hand-off mode) it hands the connection to the worker's process
// with send (see handTo). Otherwise (splice mode) it dials the worker and
// sets *up, with a raw socket with offerRaw. With offerNowait (the raw
// accept loop's) neither the hand-off nor the dial waits.
//
// A worker that fails is skipped for the next candidate, since it has
// not received a byte, and so is one that cannot take the connection
// without a wait (errWouldWait, not a failure). offer returns the
// worker that took the connection, whose slot's connection count now
// includes it, or nil, and then whether a worker could have taken it
// with a wait (busy).
func (p *primary) offer(req *Request, send func(*process, byte) error, up *upstream, how offerHow) (w *WorkerInfo, busy bool) {
	e := p.gate.enter()
	defer p.gate.exit(e)
	cands := p.pool.candidates()
	if len(cands) == 0 {
		return nil, false
	}
	i := p.pickWorker(req, cands)
	for k := range cands {
		w := &cands[(i+k)%len(cands)]
		s := w.slot
		if send != nil && (w.proc == nil || w.proc.handoffSock == nil) {
			continue // not ready for hand-off (cannot happen for a candidate)
		}
		if k > 0 {
			p.tel.dialRetries.Add(bg, 1, s.attrs.worker.add...)
		}
		s.conns.Add(1)
		var err error
		if send != nil {
			err = handTo(w.proc, send, how&offerNowait != 0)
		} else {
			*up, err = p.dialUpstream(w, how)
		}
		if err == nil {
			if w.proc != nil {
				w.proc.dialed.Add(1)
			}
			p.tel.active.Add(bg, 1, s.attrs.worker.add...)
			return w, false
		}
		s.conns.Add(-1)
		if errors.Is(err, errWouldWait) {
			busy = true
			continue // no failure: the next worker, and the caller waits for room its own way
		}
		p.tel.dialFailures.Add(bg, 1, s.attrs.worker.add...)
		if ok, n := p.logs.dial.allow(); ok {
			if send != nil {
				p.log.Warn("hand-off to worker failed; trying the next", "worker", w.Index, "err", err, "suppressed", n)
			} else {
				p.log.Warn("dial worker failed; trying the next", "worker", w.Index, "addr", w.Addr, "err", err, "suppressed", n)
			}
		}
	}
	return nil, busy
}

// unoffer takes back what offer and handTo counted for a connection they
// handed to process pr of slot s that was not sent after all: the raw
// accept loop's batch whose send failed.
func (p *primary) unoffer(s *slot, pr *process) {
	s.conns.Add(-1)
	pr.dialed.Add(^uint64(0))
	pr.open.Add(-1)
	p.tel.active.Add(bg, -1, s.attrs.worker.add...)
}

// offerHow is how offer gives a connection to a worker.
type offerHow uint8

const (
	offerRaw    offerHow = 1 << iota // splice mode: dial a raw socket, for an event loop
	offerNowait                      // the raw accept loop's: no hand-off or dial that waits
)

// upstream is the primary's connection to a worker in splice mode: a
// raw socket that an event loop will carry (fd >= 0), or a net.TCPConn.
type upstream struct {
	conn *net.TCPConn
	fd   int
}

var (
	// errSocketFull: the worker socket's accept queue is full.
	errSocketFull = errors.New("defuss: worker socket's accept queue is full")
	// errSocketAbsent: nothing listens on the worker socket.
	errSocketAbsent = errors.New("defuss: no worker socket")
	// errSocketImpostor: another process than the worker listens there.
	errSocketImpostor = errors.New("defuss: worker socket held by another process")
)

// sockErrPasses reports whether err, from dialWorkerSocket, may not
// happen on the next dial: the process is short of descriptors or
// memory. Any other failure (nobody listening, another process
// listening, AF_UNIX refused by a sandbox, connect denied by a security
// module) will happen again.
func sockErrPasses(err error) bool {
	return errors.Is(err, errSocketFull) || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// dialUpstream connects to the worker w: with offerRaw, on a socket of
// its own, to its worker socket where it has one (dialWorkerSocket) and
// else to its address where that is an IP address and port
// (dialWorkerRaw); otherwise with p.dial. With offerNowait a connection
// that the worker's accept queue does not take at once is errWouldWait.
func (p *primary) dialUpstream(w *WorkerInfo, how offerHow) (upstream, error) {
	addr := w.Addr
	if how&offerRaw != 0 {
		if pr := w.proc; pr != nil && pr.sock != nil && !pr.sockOff.Load() {
			fd, err := dialWorkerSocket(pr.sock, pr.pid)
			switch {
			case err == nil:
				return upstream{fd: fd}, nil
			case errors.Is(err, errSocketFull) && how&offerNowait != 0:
				return upstream{fd: -1}, errWouldWait
			case !sockErrPasses(err) && pr.sockOff.CompareAndSwap(false, true):
				// The TCP port from now on.
				if errors.Is(err, errSocketAbsent) {
					p.log.Debug("worker socket refused (a worker of an earlier version, or one that is stopping); using the worker's TCP port",
						"worker", w.Index, "worker_pid", pr.pid)
				} else {
					p.log.Warn("cannot use the worker socket; using the worker's TCP port", "worker", w.Index, "worker_pid", pr.pid, "err", err)
				}
			}
			// The TCP port now, whatever failed. A full queue with time
			// to wait: the TCP port's connect waits for room, a Unix
			// socket's does not.
		}
		timeout := p.cfg.dialTimeout
		if how&offerNowait != 0 {
			timeout = 0
		}
		if fd, ok, err := dialWorkerRaw(addr, timeout); ok {
			return upstream{fd: fd}, err
		}
	}
	if how&offerNowait != 0 {
		return upstream{fd: -1}, errWouldWait // net's dial waits
	}
	c, err := p.dial(addr)
	return upstream{conn: c, fd: -1}, err
}

// write writes all of b, within timeout on a raw socket.
func (u upstream) write(b []byte, timeout time.Duration) error {
	if u.conn != nil {
		_, err := u.conn.Write(b)
		return err
	}
	return writeRaw(u.fd, b, timeout)
}

func (u upstream) close() {
	if u.conn != nil {
		u.conn.Close()
		return
	}
	closeRaw(u.fd)
}

// dial connects to a worker; p.dialer.Timeout bounds it.
func (p *primary) dial(addr string) (*net.TCPConn, error) {
	c, err := p.dialer.DialContext(bg, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// refuseUnavailable answers a connection no worker can take: 503 for
// HTTP/1, a plain close otherwise.
func (p *primary) refuseUnavailable(c net.Conn, isHTTP bool) {
	p.tel.unavailable.Add(bg, 1)
	if ok, dropped := p.logs.noWorker.allow(); ok {
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
//
// A connection with no byte when timeout passes waits firstByteWait more
// for its first ones (a trusted proxy's: trustedFirstByteWait; else 0).
func sniff(c net.Conn, buf []byte, timeout time.Duration, detectProxy bool, firstByteWait time.Duration) (n, hdr int, outcome string, err error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	if detectProxy {
		hdr = proxyUnknown
	}
	waited := firstByteWait <= 0
	for n < len(buf) {
		m, rerr := c.Read(buf[n:])
		if m == 0 && n == 0 && !waited && errors.Is(rerr, os.ErrDeadlineExceeded) {
			waited = true
			c.SetReadDeadline(time.Now().Add(firstByteWait))
			continue
		}
		prev := n
		n += m
		if m > 0 && hdr == proxyUnknown {
			hdr = proxyHeaderLen(buf[:n])
			if hdr == proxyMalformed {
				return n, -1, sniffComplete, nil
			}
		}
		if m > 0 && hdr >= 0 && headComplete(buf[hdr:n], max(prev-hdr, 0)) {
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

// trustedFirstByteWait is how long a connection from a trusted proxy may
// have sent nothing, beyond the inspection timeout, before it is routed as
// one without a PROXY header. Whether a header comes first is decided on
// the connection's bytes: taken for none, a header that came late would
// reach the worker's net/http as request bytes (a 400 to the client, seen
// once behind HAProxy). A load balancer sends its header as it connects,
// so the wait is for a peer descheduled, or a routing goroutine that came
// to read after its deadline had passed with the bytes already there. On
// Linux, TCP_DEFER_ACCEPT keeps a silent connection from being accepted
// for about as long.
const trustedFirstByteWait = time.Second

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
	case p.life.draining.Load():
		status, body = "503 Service Unavailable", "draining\n"
	case len(p.pool.candidates()) == 0:
		status, body = "503 Service Unavailable", "no worker ready\n"
	}
	resp := "HTTP/1.1 " + status + "\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n" +
		"Connection: close\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
	if !head {
		resp += body
	}
	respondAndClose(c, resp)
}

// pickWorker asks the balancer for a worker, times it, and counts and
// logs a fallback.
func (p *primary) pickWorker(req *Request, cands []WorkerInfo) int {
	start := time.Now()
	i, res := pick(p.cfg.balancer, p.fallback, req, cands)
	p.tel.balance.Record(bg, time.Since(start).Seconds())
	if res != pickOK {
		p.tel.fallbacks.Add(bg, 1, p.tel.fallback[res].add...)
		if ok, n := p.logs.balancer.allow(); ok {
			p.log.Error("balancer failed; used round robin", "failure", res.String(), "suppressed", n)
		}
	}
	return i
}

// quiesce waits until no offer that loaded a candidate snapshot
// published before this call is still dialing. Bounded by the dial
// timeout.
func (p *primary) quiesce() { p.gate.quiesce(p.cfg.dialTimeout + 100*time.Millisecond) }

// awaitRoutingIdle waits, once the listener is closed, until every
// accepted connection has been routed (or refused), so that no connection
// is dialed to a worker after it was told to drain. Bounded by the
// inspection and dial timeouts, and trustedFirstByteWait with trusted
// proxies.
func (p *primary) awaitRoutingIdle() {
	limit := p.cfg.inspectionTimeout + p.cfg.dialTimeout + 100*time.Millisecond
	if len(p.cfg.trusted) > 0 {
		limit += trustedFirstByteWait
	}
	select {
	case <-p.acceptDone:
	case <-time.After(limit):
	}
	waitUntil(limit, func() bool { return p.gate.routing.Load() == 0 })
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

// tcpSocket returns c as a TCP socket whose descriptor can be handed
// off: a *net.TCPConn, or the raw accept loop's fileConn.
func tcpSocket(c net.Conn) (peeker, bool) {
	switch c := c.(type) {
	case *net.TCPConn:
		return c, true
	case *fileConn:
		return c, true
	}
	return nil, false
}

// acceptedWithOpts reports whether the client socket c has its
// options already, so that a worker it is handed to sets none: a
// *net.TCPConn has TCP_NODELAY and keep-alive as net's Accept set them
// (a WithListener listener's ListenConfig may have said no keep-alive,
// which the worker then keeps); a fileConn from the raw accept loop has
// net's from its listener, unless the loop could not set them there.
func acceptedWithOpts(c net.Conn) bool {
	switch c := c.(type) {
	case *net.TCPConn:
		return true
	case *fileConn:
		return c.optsSet
	}
	return false
}

// clientAddr is the client's address, or the zero AddrPort for
// non-TCP listeners.
func clientAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort()
	}
	return netip.AddrPort{}
}
