package defuss

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// envSlot marks a process as a worker and names its slot. It is a
// convenience for IsWorker, not a security boundary: the inherited pipes
// are what bind a worker to its primary.
const envSlot = "DEFUSS_WORKER_SLOT"

// Inherited descriptors in a worker: fd 3 carries frames to the primary,
// fd 4 carries commands from it.
const (
	fdStatus  = 3
	fdControl = 4
	fdHandoff = 5 // hand-off mode, and fixed worker ports: the slot's listening socket comes first
)

// worker is the worker role: it serves the handler on its loopback port
// and reports to the primary.
type worker struct {
	slot     int
	log      *slog.Logger
	srv      *http.Server
	ln       net.Listener
	sock     net.Listener // splice mode on Linux: the worker socket (workersock_linux.go), or nil
	noSock   bool         // tests: bind none, as an earlier version
	status   *os.File
	control  *os.File
	conns    atomic.Int64             // open connections, hijacked ones included
	openMu   sync.Mutex               // guards open
	open     map[*workerConn]struct{} // the connections counted in conns
	requests atomic.Uint64
	stats    *sampler

	heartbeat       time.Duration
	shutdownTimeout time.Duration
	secret          [secretLen]byte
	hdrBufs         sync.Pool // *[]byte of workerHeaderBuf: a PROXY header's read (workerConn.header)

	writeMu  sync.Mutex       // serialises frames on status
	stop     chan stopRequest // the first stop request wins
	force    chan struct{}    // closed: cut the drain short
	forceOne sync.Once
	accepted atomic.Uint64 // connections accepted on the listener, all told
	draining atomic.Bool   // the listener was closed on purpose

	handed      *handoffListener // hand-off mode: the connections the primary hands over
	closes      closeLog         // handed-off connections closed, not yet reported
	kick        chan struct{}    // wakes reportCloses
	closeGap    atomic.Int64     // the primary's gap between close reports (frameReportGap); 0 until it says
	done        chan struct{}    // closed when the server has stopped; ends the loops
	finished    chan struct{}    // closed when everything is released; err is set
	stopSignals func()
	user        *http.Server // WithServer's: its RegisterOnShutdown hooks run when the drain begins
	tls         *tls.Config  // serve HTTPS with this; nil: plain HTTP
	err         error
	errOnce     sync.Once // sets err from serve
	wg          sync.WaitGroup
}

// errNotWorker says the process looks like a worker but lacks its pipes.
var errNotWorker = errors.New("defuss: " + envSlot + " is set but this process was not started by a defuss primary")

// startWorker is Start in a worker process.
func startWorker(h http.Handler, c *config) (*Server, error) {
	slot, err := strconv.Atoi(os.Getenv(envSlot))
	if err != nil || slot < 0 {
		return nil, fmt.Errorf("%w: %s=%q", errNotWorker, envSlot, os.Getenv(envSlot))
	}
	status, err1 := inheritedPipe(fdStatus, "defuss-status")
	control, err2 := inheritedPipe(fdControl, "defuss-control")
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("%w: %w", errNotWorker, err)
	}
	w := &worker{
		slot:     slot,
		log:      c.logger.With("component", "defuss", "role", "worker", "worker", slot, "pid", os.Getpid()),
		status:   status,
		control:  control,
		stop:     make(chan stopRequest, 1),
		force:    make(chan struct{}),
		open:     make(map[*workerConn]struct{}),
		done:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	w.stats = newSampler(&w.conns, &w.requests)
	w.noSock = c.noWorkerSocket
	w.hdrBufs.New = func() any { b := make([]byte, workerHeaderBuf); return &b }
	// Signals are caught before the worker reports ready: a SIGTERM to
	// the whole group right after start-up must not kill it.
	sigs := w.notifySignals(c.signals)
	if err := w.start(h, c.server); err != nil {
		w.fail(err)
		w.release()
		return nil, err
	}
	w.wg.Add(2)
	go w.heartbeats()
	go w.commands()
	go w.run(sigs)
	return &Server{w: w}, nil
}

// start reads the configuration, binds the port, starts serving (with
// user's settings, if WithServer gave a server) and reports ready.
func (w *worker) start(h http.Handler, user *http.Server) error {
	w.control.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, maxFramePayload)
	typ, payload, err := readFrame(w.control, buf)
	if err != nil {
		return fmt.Errorf("defuss: worker %d: read configuration: %w", w.slot, err)
	}
	w.control.SetReadDeadline(time.Time{})
	cfg, err := decodeCommand(typ, payload)
	if err == nil && (cfg.kind != frameConfig || cfg.slot != w.slot) {
		err = fmt.Errorf("%w: want configuration for slot %d", errFrame, w.slot)
	}
	if err != nil {
		return fmt.Errorf("defuss: worker %d: %w", w.slot, err)
	}
	w.heartbeat, w.shutdownTimeout = cfg.heartbeat, cfg.shutdownTimeout
	var uc *net.UnixConn // fd 5
	if cfg.handoff || cfg.listener {
		if uc, err = inheritedSocket(fdHandoff); err != nil {
			return fmt.Errorf("defuss: worker %d: hand-off socket: %w", w.slot, err)
		}
	}
	var ln net.Listener
	if cfg.listener {
		ln, err = receiveListener(uc, 10*time.Second)
		if !cfg.handoff {
			uc.Close() // it carried the listener only
		}
	} else {
		// Only the primary connects here, over loopback: no TCP
		// keep-alive (four system calls per connection); the primary
		// learns that a worker is gone from its exit.
		lc := net.ListenConfig{KeepAlive: -1}
		ln, err = lc.Listen(context.Background(), "tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.port)))
	}
	if err != nil {
		if cfg.handoff {
			uc.Close()
		}
		return fmt.Errorf("defuss: worker %d: %w", w.slot, err)
	}
	w.ln = ln
	w.secret = cfg.secret
	if !cfg.handoff && !cfg.listener && !w.noSock {
		// Bound before the ready frame: the primary dials it from then on.
		if w.sock, err = listenWorkerSocket(&w.secret); err != nil {
			w.sock = nil
			w.log.Warn("worker socket not bound; the primary connects to the TCP port", "err", err)
		}
	}
	w.user = user
	w.srv = serverFor(user, w.counting(h), w.connState, slog.NewLogLogger(w.log.Handler(), slog.LevelWarn))
	w.tls = w.srv.TLSConfig
	w.wg.Add(1)
	go w.serve(w.ln)
	if w.sock != nil {
		w.wg.Add(1)
		go w.serve(w.sock)
	}
	if cfg.handoff {
		if err := announceHandoff(uc); err != nil {
			// The primary then sends version 2, which needs no more.
			w.log.Warn("hand-off version not announced", "err", err)
		}
		w.handed = &handoffListener{uc: uc, addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{}),
			accepted: &w.accepted, w: w}
		w.kick = make(chan struct{}, 1)
		w.wg.Add(3)
		go w.serveHandoff()
		go w.handed.receive(&w.wg, w.log)
		go w.reportCloses()
	}
	return w.send(&message{kind: frameReady, port: ln.Addr().(*net.TCPAddr).Port, stats: w.stats.sample()})
}

func (w *worker) serve(l net.Listener) {
	defer w.wg.Done()
	// Every connection must start with the primary's PROXY header: it
	// carries the client's address, and the secret proves where it comes
	// from, so a local process that dials the worker port directly is not
	// served and cannot claim any client address (workerConn.header).
	ln := trackingListener{l, w}
	if err := w.srv.Serve(w.withTLS(ln)); err != nil && !errors.Is(err, http.ErrServerClosed) && !w.draining.Load() {
		w.log.Error("serve", "err", err, "addr", l.Addr())
		// Both listeners' Serve may fail at once (an HTTP/2 set-up error
		// comes from each): the first error is the worker's.
		w.errOnce.Do(func() { w.err = fmt.Errorf("defuss: worker %d: serve: %w", w.slot, err) }) // read after wg.Wait
		w.requestStop(0, 0)
	}
}

// drain stops the server gracefully within timeout, after accepting the
// conns connections the primary made to this worker.
//
// It does not use http.Server.Shutdown, which drops a request read after
// it began, even the first request of a connection accepted just before:
// the primary dials a draining worker only until it has been replaced, so
// such a request is a client's, and must be served. Nor does it turn
// keep-alives off, which closes idle connections at once, racing each
// client's next request. Instead: accept what the primary sent, stop
// accepting, answer every further request with Connection: close, close
// a connection that stays idle for drainIdleGrace with nothing unread,
// and wait for the rest (hijacked ones included) to close.
func (w *worker) drain(timeout time.Duration, conns uint64) {
	deadline := time.Now().Add(timeout)
	if conns > 0 {
		waitUntil(min(timeout, 2*time.Second), func() bool { return w.accepted.Load() >= conns || w.forced() })
	}
	w.draining.Store(true)
	w.ln.Close()
	if w.sock != nil {
		w.sock.Close()
	}
	if w.handed != nil {
		w.handed.Close()
	}
	began := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for w.conns.Load() > 0 && time.Now().Before(deadline) {
		w.closeIdle(began)
		select {
		case <-tick.C:
		case <-w.force:
			return
		}
	}
	if n := w.conns.Load(); n > 0 {
		w.log.Warn("connections still open at the shutdown timeout; closing them", "connections", n, "timeout", timeout)
	}
}

// drainIdleGrace is how long a draining worker leaves a keep-alive
// connection idle (counted from the drain's start at the earliest) before
// it closes it: long enough that a request the client sent before it saw
// the close has arrived.
const drainIdleGrace = 500 * time.Millisecond

// closeIdle closes the connections that have been idle since before
// drainIdleGrace ago (and since the drain began) and have nothing unread.
func (w *worker) closeIdle(began time.Time) {
	cutoff := time.Now().Add(-drainIdleGrace)
	if began.After(cutoff) {
		return
	}
	var idle []*workerConn
	w.openMu.Lock()
	for c := range w.open {
		if since := c.idleSince.Load(); since != 0 && since <= cutoff.UnixNano() {
			idle = append(idle, c)
		}
	}
	w.openMu.Unlock()
	for _, c := range idle {
		if !hasUnread(c.tcpConn) {
			c.Close()
		}
	}
}

// withTLS returns ln, serving TLS when the server has a TLSConfig (w.tls,
// taken before the first Serve: net/http's Serve sets a TLSConfig of its
// own when there is none): the handshake runs in the worker, after the
// PROXY header in splice mode.
func (w *worker) withTLS(ln net.Listener) net.Listener {
	if w.tls == nil {
		return ln
	}
	return tls.NewListener(ln, w.tls)
}

// tlsConfigFor returns srv's TLSConfig as the workers serve it: as
// net/http's ServeTLS does, it offers HTTP/2 by ALPN (which is also what
// makes Serve set HTTP/2 up) unless srv turns HTTP/2 off.
func tlsConfigFor(srv *http.Server) *tls.Config {
	cfg := srv.TLSConfig.Clone()
	if len(cfg.NextProtos) == 0 {
		h2 := srv.TLSNextProto == nil || srv.TLSNextProto["h2"] != nil
		if p := srv.Protocols; p != nil && !p.HTTP2() {
			h2 = false
		}
		if h2 {
			cfg.NextProtos = append(cfg.NextProtos, "h2")
		}
		cfg.NextProtos = append(cfg.NextProtos, "http/1.1")
	}
	return cfg
}

// connState keeps each connection's idle time, for closeIdle.
func (w *worker) connState(c net.Conn, st http.ConnState) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	wc, ok := c.(*workerConn)
	if !ok {
		return
	}
	switch st {
	case http.StateIdle:
		wc.idleSince.Store(time.Now().UnixNano())
	case http.StateActive:
		wc.idleSince.Store(0)
	}
}

// serverFor returns the server a worker serves h with: user's settings
// (WithServer), the default timeouts where user leaves them to net/http's
// "none", and defuss's ConnState hook before user's. user may be nil.
func serverFor(user *http.Server, h http.Handler, connState func(net.Conn, http.ConnState), errorLog *log.Logger) *http.Server {
	srv := &http.Server{Handler: h, ConnState: connState, ErrorLog: errorLog}
	if u := user; u != nil {
		srv.ReadTimeout, srv.ReadHeaderTimeout = u.ReadTimeout, u.ReadHeaderTimeout
		srv.WriteTimeout, srv.IdleTimeout = u.WriteTimeout, u.IdleTimeout
		srv.MaxHeaderBytes = u.MaxHeaderBytes
		srv.BaseContext, srv.ConnContext = u.BaseContext, u.ConnContext
		srv.HTTP2, srv.Protocols = u.HTTP2, u.Protocols
		srv.DisableGeneralOptionsHandler = u.DisableGeneralOptionsHandler
		srv.TLSNextProto = u.TLSNextProto
		if u.TLSConfig != nil {
			srv.TLSConfig = tlsConfigFor(u)
		}
		if u.ErrorLog != nil {
			srv.ErrorLog = u.ErrorLog
		}
		if userState := u.ConnState; userState != nil {
			srv.ConnState = func(c net.Conn, st http.ConnState) {
				connState(c, st)
				userState(c, st)
			}
		}
	}
	if srv.ReadHeaderTimeout == 0 && srv.ReadTimeout == 0 {
		srv.ReadHeaderTimeout = DefaultReadHeaderTimeout
	}
	if srv.IdleTimeout == 0 && srv.ReadTimeout == 0 {
		srv.IdleTimeout = DefaultIdleTimeout
	}
	return srv
}

// trackingListener counts the connections it accepts and tracks them
// until they close.
type trackingListener struct {
	net.Listener
	w *worker
}

func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.w.accepted.Add(1)
	var tc tcpConn
	switch c := c.(type) {
	case *net.TCPConn:
		tc = c
	case *net.UnixConn:
		tc = newUnixConn(c) // the worker socket
	default:
		c.Close()                                                                         // cannot happen: a TCP or Unix listener
		return nil, fmt.Errorf("listener accepted a %T, not a TCP or Unix connection", c) // Serve's error wraps it
	}
	return l.w.trackConn(&workerConn{tcpConn: tc, w: l.w, proxied: true}), nil
}

// workerConn is a connection the worker serves. It counts as open (in
// w.conns) from accept to Close, also after a handler hijacked it (a
// WebSocket, a tunnel, h2c): a drain waits for it until the shutdown
// timeout. The close of a connection the primary handed off is reported
// to the primary, for its connection counts.
type workerConn struct {
	tcpConn
	w         *worker
	handed    bool
	remote    net.Addr // the client a PROXY header names: the primary's, or (handed off) a trusted load balancer's
	once      sync.Once
	idleSince atomic.Int64 // UnixNano since the connection is idle; 0 = busy

	// Spliced by the primary: its PROXY header comes first (header).
	proxied bool
	hdrOnce sync.Once
	hdrErr  error
	local   net.Addr // the public address the client connected to, from the header
	rest    []byte   // read with the header, not yet returned by Read: in *restBuf
	restBuf *[]byte  // from w.hdrBufs, given back once rest is read

	// Handed off by a primary that records connections' durations and
	// bytes (stats): when, and the bytes read (in) and written (out).
	stats   bool
	since   time.Time
	in, out atomic.Int64
}

var _ net.Conn = (*workerConn)(nil)

// tcpConn is a TCP connection a worker serves: a *net.TCPConn, or (on
// Linux, handed off in a version 3 message that says its options are
// set) a handedConn. A handler that hijacks a plain TCP connection gets a
// *workerConn, with these methods, in both modes; over TLS in the
// workers, the *tls.Conn.
type tcpConn interface {
	net.Conn
	syscall.Conn
	io.ReaderFrom
	io.WriterTo
	CloseRead() error
	CloseWrite() error
	File() (*os.File, error)
	SetKeepAlive(bool) error
	SetKeepAlivePeriod(time.Duration) error
	SetKeepAliveConfig(net.KeepAliveConfig) error
	SetLinger(sec int) error
	SetNoDelay(bool) error
	SetReadBuffer(bytes int) error
	SetWriteBuffer(bytes int) error
}

var _ tcpConn = (*net.TCPConn)(nil)

// unixConn is a connection from the primary on the worker socket: a
// tcpConn whose TCP options do nothing (the primary's socket to the
// client has them). On Linux it reads and writes with raw calls
// (rawStream), as handedConn does.
type unixConn struct {
	*net.UnixConn
	raw io.ReadWriter // nil: the UnixConn's own Read and Write
}

var _ tcpConn = unixConn{}

// newUnixConn makes c a unixConn.
func newUnixConn(c *net.UnixConn) unixConn { return unixConn{c, rawStreamOf(c)} }

func (c unixConn) Read(b []byte) (int, error) {
	if c.raw == nil {
		return c.UnixConn.Read(b)
	}
	n, err := c.raw.Read(b)
	return n, c.opErr("read", err)
}

func (c unixConn) Write(b []byte) (int, error) {
	if c.raw == nil {
		return c.UnixConn.Write(b)
	}
	n, err := c.raw.Write(b)
	return n, c.opErr("write", err)
}

// opErr makes err, from c.raw, the error the UnixConn's own method gives:
// io.EOF as it is, the rest in a *net.OpError, with a system call's name
// on an errno. net's RawConn wraps the poller's errors in a
// *net.OpError of its own ("raw-read"), which this one replaces.
func (c unixConn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if oe, ok := err.(*net.OpError); ok {
		err = oe.Err
	}
	if e, ok := err.(syscall.Errno); ok {
		err = os.NewSyscallError(op, e)
	}
	return &net.OpError{Op: op, Net: "unix", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

func (unixConn) SetKeepAlive(bool) error                      { return nil }
func (unixConn) SetKeepAlivePeriod(time.Duration) error       { return nil }
func (unixConn) SetKeepAliveConfig(net.KeepAliveConfig) error { return nil }
func (unixConn) SetLinger(int) error                          { return nil }
func (unixConn) SetNoDelay(bool) error                        { return nil }

// ReadFrom sends a regular file, whole or a part of it, with sendfile(2)
// on Linux (rawSendFile), as handedConn's does: net's copy to a Unix
// socket would send a part through user space, and http.ServeFile sends a
// part (an io.LimitedReader). Anything else, and every source elsewhere,
// goes through io.Copy, which finds the system's copies where there are
// some (an *os.File's WriteTo). WriteTo is io.Copy's, where a
// *net.TCPConn's ReadFrom splices from a Unix socket. (A *net.UnixConn's
// methods of those names are a datagram socket's.)
func (c unixConn) ReadFrom(r io.Reader) (int64, error) {
	if n, handled, err := rawSendFile(c.raw, r); handled {
		return n, c.opErr("readfrom", err)
	}
	return io.Copy(c.UnixConn, r)
}

func (c unixConn) WriteTo(w io.Writer) (int64, error) { return io.Copy(w, c.UnixConn) }

// track counts c as open until it is closed.
func (w *worker) track(c tcpConn, handed bool) *workerConn {
	return w.trackConn(&workerConn{tcpConn: c, w: w, handed: handed})
}

// trackConn counts wc as open until it is closed.
func (w *worker) trackConn(wc *workerConn) *workerConn {
	w.conns.Add(1)
	w.openMu.Lock()
	w.open[wc] = struct{}{}
	w.openMu.Unlock()
	return wc
}

// Read clears the idle mark as soon as a byte arrives: net/http reads the
// next request's head before it reports the connection active, and
// closeIdle must not close it meanwhile.
func (c *workerConn) Read(b []byte) (int, error) {
	if c.proxied {
		if err := c.header(); err != nil {
			return 0, err
		}
		if len(c.rest) > 0 {
			c.idleSince.Store(0)
			return c.readRest(b), nil
		}
	}
	n, err := c.tcpConn.Read(b)
	if n > 0 {
		c.idleSince.Store(0)
		if c.stats {
			c.in.Add(int64(n))
		}
	}
	return n, err
}

func (c *workerConn) Write(b []byte) (int, error) {
	if c.proxied {
		if err := c.header(); err != nil {
			return 0, err // nothing goes to a peer that is not the primary
		}
	}
	n, err := c.tcpConn.Write(b)
	if c.stats {
		c.out.Add(int64(n))
	}
	return n, err
}

// ReadFrom and WriteTo count what moves without Write or Read: net/http
// sends files with ReadFrom, and io.Copy on a hijacked connection uses
// either.
func (c *workerConn) ReadFrom(r io.Reader) (int64, error) {
	if c.proxied {
		if err := c.header(); err != nil {
			return 0, err
		}
	}
	n, err := c.tcpConn.ReadFrom(r)
	if c.stats {
		c.out.Add(n)
	}
	return n, err
}

func (c *workerConn) WriteTo(w io.Writer) (int64, error) {
	var n0 int64
	if c.proxied {
		if err := c.header(); err != nil {
			return 0, err
		}
		if len(c.rest) > 0 {
			k, err := w.Write(c.rest)
			c.rest = c.rest[k:]
			n0 = int64(k)
			if err == nil && len(c.rest) > 0 {
				err = io.ErrShortWrite
			}
			if err != nil {
				return n0, err
			}
			c.readRest(nil) // gives the buffer back
		}
	}
	n, err := c.tcpConn.WriteTo(w)
	if c.stats {
		c.in.Add(n)
	}
	return n0 + n, err
}

// RemoteAddr is the client's address: the one the primary's PROXY header
// gives in splice mode (read first, if it has not been), or a trusted load
// balancer's, for a connection handed off behind one.
func (c *workerConn) RemoteAddr() net.Addr {
	if c.proxied {
		c.header()
	}
	if c.remote != nil {
		return c.remote
	}
	return c.tcpConn.RemoteAddr()
}

// LocalAddr is the public address the client connected to, in splice
// mode (from the primary's PROXY header); the socket's own otherwise.
func (c *workerConn) LocalAddr() net.Addr {
	if c.proxied {
		c.header()
	}
	if c.local != nil {
		return c.local
	}
	return c.tcpConn.LocalAddr()
}

// SetDeadline and SetReadDeadline read the header first, in splice mode:
// its read sets a deadline of its own, then clears it, and must not clear
// one set after. (net/http asks a new connection its RemoteAddr before it
// sets any deadline, which reads the header; a ConnState or ConnContext
// hook of the user's may not.)
func (c *workerConn) SetDeadline(t time.Time) error {
	if c.proxied {
		c.header()
	}
	return c.tcpConn.SetDeadline(t)
}

func (c *workerConn) SetReadDeadline(t time.Time) error {
	if c.proxied {
		c.header()
	}
	return c.tcpConn.SetReadDeadline(t)
}

// header reads the primary's PROXY header, once, within
// workerHeaderTimeout, with what a read brings after it, which Read and
// WriteTo return first. A connection without a valid header fails every
// Read and Write; net/http then closes it unanswered.
func (c *workerConn) header() error {
	c.hdrOnce.Do(func() { c.hdrErr = c.readHeader() })
	return c.hdrErr
}

func (c *workerConn) readHeader() error {
	bp := c.w.hdrBufs.Get().(*[]byte)
	buf := *bp
	// The primary writes the header with the client's first bytes as soon
	// as it has connected, so they are usually there already: a read that
	// does not wait takes them, with no deadline to set and clear. Only
	// for the rest does the loop wait, within the timeout.
	have, err := readAvailable(c.tcpConn, buf)
	deadline := false
	for {
		h, n, derr := decodeWorkerHeader(buf[:have], &c.w.secret)
		switch {
		case derr != nil:
			c.w.hdrBufs.Put(bp)
			return derr
		case n > 0:
			if h.src.IsValid() {
				c.remote, c.local = net.TCPAddrFromAddrPort(h.src), net.TCPAddrFromAddrPort(h.dst)
			}
			if have > n {
				c.rest, c.restBuf = buf[n:have], bp
				c.idleSince.Store(0)
			} else {
				c.w.hdrBufs.Put(bp)
			}
			return nil
		case err != nil:
			c.w.hdrBufs.Put(bp)
			return fmt.Errorf("%w: reading its PROXY header: %w", errNotFromPrimary, err)
		}
		if !deadline {
			deadline = true
			c.tcpConn.SetReadDeadline(time.Now().Add(workerHeaderTimeout))
			defer c.tcpConn.SetReadDeadline(time.Time{})
		}
		var k int
		k, err = c.tcpConn.Read(buf[have:])
		have += k
	}
}

// readRest copies what is left of the bytes read with the header into b,
// and gives their buffer back once they are all read. Like the rest of a
// connection's reads, it is not called concurrently (net/http and
// crypto/tls read a connection from one goroutine at a time).
func (c *workerConn) readRest(b []byte) int {
	n := copy(b, c.rest)
	c.rest = c.rest[n:]
	if len(c.rest) == 0 && c.restBuf != nil {
		c.rest = nil
		c.w.hdrBufs.Put(c.restBuf)
		c.restBuf = nil
	}
	return n
}

// workerHeaderTimeout bounds the wait for the primary's PROXY header,
// which the primary writes with the connection's first bytes.
const workerHeaderTimeout = 5 * time.Second

// workerHeaderBuf is how much the header's read takes at once: net/http's
// read buffer, so the head that follows the header comes with it.
const workerHeaderBuf = 4 << 10

func (c *workerConn) Close() error {
	err := c.tcpConn.Close()
	c.once.Do(c.closed)
	return err
}

func (c *workerConn) closed() {
	c.w.openMu.Lock()
	delete(c.w.open, c)
	c.w.openMu.Unlock()
	c.w.conns.Add(-1)
	if c.handed {
		c.w.handedClose(c)
	}
}

// counting counts the requests h serves, for WithMaxRequests, and asks
// the client to close the connection after a response once the worker
// drains.
func (w *worker) counting(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.requests.Add(1)
		if w.draining.Load() {
			rw.Header().Set("Connection", "close")
		}
		h.ServeHTTP(rw, r)
	})
}

// send writes one frame to the primary.
func (w *worker) send(m *message) error {
	m.slot, m.pid = w.slot, os.Getpid()
	b := appendMessage(make([]byte, 0, 128), m)
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	_, err := w.status.Write(b)
	return err
}

// fail tells the primary why this worker cannot start.
func (w *worker) fail(err error) {
	w.send(&message{kind: frameFailed, err: err.Error()})
}

// heartbeats sends a stats frame every interval until the worker stops.
func (w *worker) heartbeats() {
	defer w.wg.Done()
	t := time.NewTicker(w.heartbeat)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if err := w.send(&message{kind: frameStats, stats: w.stats.sample()}); err != nil {
				w.log.Warn("heartbeat", "err", err)
				w.requestStop(0, 0) // the primary is gone
				w.forceStop()
				return
			}
		case <-w.done:
			return
		}
	}
}

// commands reads the control pipe. A drain command stops gracefully, a
// report gap sets the gap between close reports; EOF means the primary is
// gone, so the worker stops at once.
func (w *worker) commands() {
	defer w.wg.Done()
	buf := make([]byte, maxFramePayload)
	for {
		typ, payload, err := readFrame(w.control, buf)
		if err != nil {
			select {
			case <-w.done: // we closed the pipe ourselves
			default:
				w.log.Warn("primary gone, stopping now", "err", err)
				w.requestStop(0, 0)
				w.forceStop() // also when a drain is under way
			}
			return
		}
		c, err := decodeCommand(typ, payload)
		switch {
		case err == nil && c.kind == frameDrain:
			w.requestStop(c.shutdownTimeout, c.conns)
		case err == nil && c.kind == frameReportGap:
			w.closeGap.Store(int64(c.reportGap))
		default:
			w.log.Error("bad command from primary", "err", err, "type", typ)
		}
	}
}

// stopRequest asks the worker to stop: gracefully within timeout (0: at
// once), after accepting conns connections in all (the primary's count of
// the connections it made to this worker, so none is left unaccepted in
// the listen queue when the listener closes).
type stopRequest struct {
	timeout time.Duration
	conns   uint64
}

// forceStop cuts a drain in progress (or to come) short: the worker
// stops at once.
func (w *worker) forceStop() { w.forceOne.Do(func() { close(w.force) }) }

func (w *worker) forced() bool {
	select {
	case <-w.force:
		return true
	default:
		return false
	}
}

// requestStop asks run to stop. The first request wins.
func (w *worker) requestStop(timeout time.Duration, conns uint64) {
	select {
	case w.stop <- stopRequest{timeout, conns}:
	default:
	}
}

// run waits for a stop request or a signal, then shuts the server down.
func (w *worker) run(sigs <-chan os.Signal) {
	var req stopRequest
	for waiting := true; waiting; {
		select {
		case req = <-w.stop:
			waiting = false
		case sig := <-sigs:
			// The primary drains this worker: a signal from outside while
			// it lives (systemd and docker signal the whole group) is left
			// to it. When it dies, the control pipe's EOF stops the worker.
			w.log.Info("signal received; the primary drains this worker", "signal", sig.String())
		}
	}
	timeout := req.timeout
	w.log.Debug("stopping", "timeout", timeout)
	w.send(&message{kind: frameStopping})
	if w.user != nil {
		// The user's server never served: Shutdown only runs the functions
		// registered with RegisterOnShutdown (each in a goroutine of its
		// own) and returns.
		w.user.Shutdown(context.Background())
	}
	if timeout > 0 {
		w.drain(timeout, req.conns)
	}
	w.release()
	w.log.Debug("worker stopped")
	close(w.finished)
}

// notifySignals catches SIGINT and SIGTERM (see run) and SIGPIPE, when
// signal handling is on; release stops it.
func (w *worker) notifySignals(on bool) <-chan os.Signal {
	if !on {
		return nil
	}
	ch := make(chan os.Signal, 1)
	notifySignals(ch, syscall.SIGINT, syscall.SIGTERM)
	pipe := catchSIGPIPE()
	w.stopSignals = func() { stopSignals(ch); stopSignals(pipe) }
	return ch
}

// release stops the server, ends the worker's goroutines and closes its
// pipes and sockets.
func (w *worker) release() {
	if w.srv != nil {
		w.srv.Close()
	}
	// Close leaves hijacked connections alone; the drain is over.
	w.openMu.Lock()
	left := make([]*workerConn, 0, len(w.open))
	for c := range w.open {
		left = append(left, c)
	}
	w.openMu.Unlock()
	for _, c := range left {
		c.Close()
	}
	close(w.done)
	w.control.Close()
	if w.handed != nil {
		w.handed.Close()
		w.handed.uc.Close()
	}
	w.wg.Wait()
	w.status.Close()
	if w.stopSignals != nil {
		w.stopSignals()
	}
}
