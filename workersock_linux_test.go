package defuss

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"go.opentelemetry.io/otel/metric/noop"
	"golang.org/x/sys/unix"
)

// The worker socket's name: the same on both sides, one per process and
// run, and sized for an abstract address.
func TestWorkerSockName(t *testing.T) {
	var a, b [secretLen]byte
	rand.Read(a[:])
	rand.Read(b[:])
	n := workerSockName(&a, 4242)
	if n != workerSockName(&a, 4242) {
		t.Fatal("the name is not the same twice")
	}
	if !strings.HasPrefix(n, "@defuss-4242-") {
		t.Fatalf("name %q does not start with @defuss-4242-", n)
	}
	if n == workerSockName(&a, 4243) || n == workerSockName(&b, 4242) {
		t.Fatal("two processes, or two runs, get the same name")
	}
	s := newWorkerSocket(&a, 4242)
	if s.name != n || s.sa.Family != unix.AF_UNIX || s.sa.Path[0] != 0 {
		t.Fatalf("address %+v for %q: want AF_UNIX, abstract", s.sa, n)
	}
	for i := 1; i < len(n); i++ {
		if byte(s.sa.Path[i]) != n[i] {
			t.Fatalf("address byte %d is %q, want %q", i, byte(s.sa.Path[i]), n[i])
		}
	}
	if s.n != uint32(2+len(n)) || len(n) > len(s.sa.Path) {
		t.Fatalf("address length %d for a name of %d bytes", s.n, len(n))
	}
}

// testWorkerSocket is the worker socket of this process under a secret
// of its own: the test's listeners are the worker's.
func testWorkerSocket(t *testing.T) *workerSocket {
	var secret [secretLen]byte
	rand.Read(secret[:])
	return newWorkerSocket(&secret, os.Getpid())
}

// listenBacklog listens on s with backlog n, and accepts nothing.
func listenBacklog(t *testing.T, s *workerSocket, n int) (close func()) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: s.name}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.Listen(fd, n); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	closed := false
	close = func() {
		if !closed {
			closed = true
			unix.Close(fd)
		}
	}
	t.Cleanup(close)
	return close
}

// fillBacklog dials s until its accept queue is full, and returns what
// it dialed.
func fillBacklog(t *testing.T, s *workerSocket) []int {
	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	for range 64 {
		fd, err := dialWorkerSocket(s, os.Getpid())
		if errors.Is(err, errSocketFull) {
			if len(fds) == 0 {
				t.Fatal("full before the first connection")
			}
			return fds
		}
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	t.Fatalf("%d connections and the accept queue is not full", len(fds))
	return nil
}

// dialWorkerSocket connects at once, non-blocking and close-on-exec, or
// tells a full accept queue from a socket nobody listens on.
func TestDialWorkerSocket(t *testing.T) {
	s := testWorkerSocket(t)
	if _, err := dialWorkerSocket(s, os.Getpid()); !errors.Is(err, errSocketAbsent) {
		t.Fatalf("nothing bound: %v, want errSocketAbsent", err)
	}

	ln, err := net.Listen("unix", s.name)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fd, err := dialWorkerSocket(s, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "dialed")
	defer f.Close()
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Errorf("not non-blocking: flags %#x (%v)", fl, err)
	}
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("not close-on-exec: flags %#x (%v)", fl, err)
	}
	ln.(*net.UnixListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := unix.Write(fd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("read %q (%v)", got, err)
	}
	fds := make([]int, 0, 32) // within the listener's backlog, unaccepted
	if n := testing.AllocsPerRun(20, func() {
		fd, err := dialWorkerSocket(s, os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}); n != 0 {
		t.Errorf("%.1f allocations a dial", n)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	// Another process's socket under the name: no connection.
	if _, err := dialWorkerSocket(s, os.Getpid()+1); !errors.Is(err, errSocketImpostor) {
		t.Fatalf("a listener of another pid: %v, want errSocketImpostor", err)
	}
	ln.Close()
	if _, err := dialWorkerSocket(s, os.Getpid()); !errors.Is(err, errSocketAbsent) {
		t.Fatalf("listener closed: %v, want errSocketAbsent", err)
	}

	s = testWorkerSocket(t)
	listenBacklog(t, s, 1)
	fillBacklog(t, s)
}

// The primary dials a worker's socket, and its TCP port when that
// socket's queue is full and it may wait, or when the worker does not
// listen there: then for good. Without a wait, a full queue is busy.
func TestDialUpstreamFallsBackToTheTCPPort(t *testing.T) {
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tln.Close()
	p := newTestPrimary(t, nil, WithMeterProvider(noop.NewMeterProvider()), tln.Addr().String())
	pr := &process{pid: os.Getpid(), sock: newWorkerSocket(&p.secret, os.Getpid())}
	w := p.pool.view.Load().cands[0]
	w.proc = pr
	accept := func(ln net.Listener) net.Conn {
		t.Helper()
		ln.(interface{ SetDeadline(time.Time) error }).SetDeadline(time.Now().Add(5 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatalf("accept on %s: %v", ln.Addr(), err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial := func(how offerHow) (net.Conn, error) {
		t.Helper()
		up, err := p.dialUpstream(&w, how)
		if err != nil {
			return nil, err
		}
		if up.fd < 0 {
			t.Fatal("not a raw socket")
		}
		f := os.NewFile(uintptr(up.fd), "up")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, nil
	}
	domain := func(c net.Conn) string { return c.LocalAddr().Network() }

	// Listening: the worker socket.
	uln, err := net.Listen("unix", pr.sock.name)
	if err != nil {
		t.Fatal(err)
	}
	c, err := dial(offerRaw | offerNowait)
	if err != nil || domain(c) != "unix" {
		t.Fatalf("dialed %v (%v), want the worker socket", c, err)
	}
	accept(uln)
	uln.Close()

	// Full: busy without a wait, the TCP port with one.
	closeFull := listenBacklog(t, pr.sock, 1)
	fillBacklog(t, pr.sock)
	if _, err := dial(offerRaw | offerNowait); !errors.Is(err, errWouldWait) {
		t.Fatalf("full queue, no wait: %v, want errWouldWait", err)
	}
	if c, err := dial(offerRaw); err != nil || domain(c) != "tcp" {
		t.Fatalf("full queue with a wait: %v (%v), want the TCP port", c, err)
	}
	accept(tln)
	if pr.sockOff.Load() {
		t.Fatal("a full queue turned the worker socket off")
	}

	// Nobody listening: the TCP port, from then on.
	closeFull()
	if c, err := dial(offerRaw); err != nil || domain(c) != "tcp" {
		t.Fatalf("no worker socket: %v (%v), want the TCP port", c, err)
	}
	accept(tln)
	if !pr.sockOff.Load() {
		t.Fatal("the worker socket was refused and is still used")
	}
	uln, err = net.Listen("unix", pr.sock.name)
	if err != nil {
		t.Fatal(err)
	}
	defer uln.Close()
	if c, err := dial(offerRaw); err != nil || domain(c) != "tcp" {
		t.Fatalf("after a refusal: %v (%v), want the TCP port", c, err)
	}
	accept(tln)

	// Another process listening under the worker's name (it bound the
	// name once a worker of the same pid had gone): no connection to it,
	// and the TCP port from then on.
	pr = &process{pid: os.Getpid() + 1, sock: newWorkerSocket(&p.secret, os.Getpid()+1)}
	w.proc = pr
	squat, err := net.Listen("unix", pr.sock.name)
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	if c, err := dial(offerRaw); err != nil || domain(c) != "tcp" {
		t.Fatalf("impostor: %v (%v), want the TCP port", c, err)
	}
	accept(tln)
	if !pr.sockOff.Load() {
		t.Fatal("the impostor's socket is still used")
	}
	c = accept(squat) // the connection the check made: it sends nothing
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); len(got) != 0 || err != nil {
		t.Fatalf("the impostor read %q (%v), want nothing and EOF", got, err)
	}
}

// unixRelayPair is relayPair with the worker on a worker socket.
func unixRelayPair(t *testing.T, opts ...Option) (p *primary, r *relay, client, worker net.Conn) {
	t.Helper()
	p, ln := unixRelayPrimary(t, opts...)
	r, client, worker = addRelay(t, p, ln)
	if worker.LocalAddr().Network() != "unix" {
		t.Fatal("the worker connection is not on the worker socket")
	}
	return p, r, client, worker
}

// unixRelayPrimary is a primary with event loops whose only worker (this
// process) listens on ln, its worker socket. Its TCP port refuses.
func unixRelayPrimary(t *testing.T, opts ...Option) (*primary, net.Listener) {
	t.Helper()
	always0 := func(_ *Request, c []WorkerInfo) *WorkerInfo { return &c[0] }
	p := newTestPrimary(t, always0, WithMeterProvider(noop.NewMeterProvider()), "127.0.0.1:1")
	for _, o := range opts {
		o.apply(p.cfg)
	}
	if p.relay() == nil {
		t.Fatal("no event loops")
	}
	t.Cleanup(p.stopRelay)
	pr := &process{pid: os.Getpid(), sock: newWorkerSocket(&p.secret, os.Getpid())}
	ln, err := net.Listen("unix", pr.sock.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	p.pool.view.Load().cands[0].proc = pr // before any dial
	return p, ln
}

// The relay tests whose worker closes while its answer waits for a slow
// client, over a worker socket: a Unix socket reports EPOLLHUP as soon
// as its peer closes, with all it sent already queued on it.
func TestEvRelayOverWorkerSocketSlowReaderGetsWholeResponse(t *testing.T) {
	for _, tc := range []struct {
		name     string
		halfOpen bool
	}{{"half-close", true}, {"end of the worker", false}} {
		t.Run(tc.name, func(t *testing.T) {
			p, r, cc, wc := unixRelayPair(t, WithHalfOpen(tc.halfOpen))
			cc.(*net.TCPConn).SetReadBuffer(16 << 10)
			r.client.(*net.TCPConn).SetWriteBuffer(16 << 10)
			// 300 KiB fits in the worker's send buffer, as in slowClient
			// (where the system allows 1 MiB; else the write times out).
			wc.(*net.UnixConn).SetWriteBuffer(1 << 20)
			wc.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if !p.relay().take(r) {
				t.Fatal("not taken")
			}
			var exited func()
			if tc.halfOpen {
				cc.(*net.TCPConn).CloseWrite()
				if _, err := io.ReadAll(wc); err != nil { // the client's FIN reached the worker
					t.Fatal(err)
				}
			} else {
				exited = func() { p.conns.endOf(r.s.index, 0) }
			}
			answerAndExit(t, cc, wc, -1, exited)
		})
	}
}

// The worker answers 300 KiB and closes while its answer waits for a
// slow client, which sends more, before or after the close, once or
// several times (pipelined requests): the client still gets the whole
// answer, and then the end of the connection, in both half-open
// settings.
//   - after: a Unix socket refuses the write to the worker at once
//     (EPIPE). (Found in review: the failed write ended the
//     connection, and the answer's tail was lost.)
//   - again: the bytes that come after the refused write are read and
//     dropped. (Found in the second review: left unread, they made the
//     close a reset, which dropped what the primary had not sent yet.)
//   - before: the worker closes with the request unread, which resets
//     the primary's socket (EPOLLERR) with the answer still queued on
//     it. (Found in the second review: the loop ended the pair on that
//     error.)
func TestEvRelayOverWorkerSocketClientSendsAroundWorkerClose(t *testing.T) {
	req := []byte("GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
	for _, tc := range []struct {
		name          string
		before, after int // client writes before and after the worker's close
	}{{"after", 0, 1}, {"again", 0, 3}, {"before", 1, 0}, {"before and after", 1, 2}} {
		for _, halfOpen := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/halfOpen=%v", tc.name, halfOpen), func(t *testing.T) {
				p, r, cc, wc := unixRelayPair(t, WithHalfOpen(halfOpen))
				cc.(*net.TCPConn).SetReadBuffer(16 << 10)
				r.client.(*net.TCPConn).SetWriteBuffer(16 << 10)
				wc.(*net.UnixConn).SetWriteBuffer(1 << 20)
				wc.SetDeadline(time.Now().Add(10 * time.Second))
				if !p.relay().take(r) {
					t.Fatal("not taken")
				}
				for range tc.before {
					if _, err := cc.Write(req); err != nil {
						t.Fatal(err)
					}
				}
				if tc.before > 0 { // it reached the worker, which leaves it unread
					waitFor(t, 5*time.Second, "the request at the worker", func() bool {
						n, err := unix.IoctlGetInt(int(fdOf(t, wc)), unix.SIOCINQ)
						return err == nil && n >= len(req)
					})
				}
				resp := bytes.Repeat([]byte("x"), 300<<10)
				if _, err := wc.Write(resp); err != nil {
					t.Fatal(err)
				}
				wc.Close()
				awaitWorkerFIN(t, -1)
				for range tc.after {
					if _, err := cc.Write(req); err != nil {
						t.Fatal(err)
					}
					time.Sleep(20 * time.Millisecond) // the loop takes it before the next
				}
				cc.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(cc)
				if len(got) != len(resp) || err != nil {
					t.Fatalf("client got %d of %d bytes (%v)", len(got), len(resp), err)
				}
			})
		}
	}
}

// fdOf is c's descriptor, for a look at its socket.
func fdOf(t *testing.T, c net.Conn) uintptr {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd uintptr
	rc.Control(func(f uintptr) { fd = f })
	return fd
}

// Bulk transfers and a small exchange over worker sockets, as
// TestEvRelayBulkTransfersAndSmallExchange over TCP.
func TestEvRelayOverWorkerSocketBulkAndSmall(t *testing.T) {
	p, ln := unixRelayPrimary(t)
	const bulk, size = 4, 3 << 20
	body := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	bulkAndSmall(t, p, ln, bulk, body)
}

// listedUnixSockets returns the abstract names in /proc/net/unix.
func listedUnixSockets(t *testing.T) map[string]bool {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 8 && strings.HasPrefix(f[7], "@") {
			names[f[7]] = true
		}
	}
	return names
}

// connType asks a worker, through the primary on a new connection, what
// it serves that connection on (handedconn_linux_test.go's /conn).
func connType(t *testing.T, addr string) string {
	t.Helper()
	_, body := get(t, addr, "/conn")
	typ, _, _ := strings.Cut(body, " ")
	return typ
}

// In splice mode the primary reaches its workers on their worker
// sockets, which serve nobody without the run's secret; in hand-off mode
// the workers bind none.
func TestSpliceReachesWorkersOnTheirSockets(t *testing.T) {
	s := startTest(t)
	listed := listedUnixSockets(t)
	for _, w := range s.Workers() {
		name := workerSockName(&s.p.secret, w.PID)
		if listed[name] == handoffMode {
			t.Fatalf("worker %d's socket %s listed: %v (hand-off mode: %v)", w.PID, name, listed[name], handoffMode)
		}
	}
	for range 4 { // round robin: each worker twice
		if typ := connType(t, s.Addr().String()); (typ == "defuss.unixConn") == handoffMode {
			t.Fatalf("a worker serves on a %s (hand-off mode: %v)", typ, handoffMode)
		}
	}
	if handoffMode {
		return
	}
	// A PROXY v2 header with a wrong secret, as the primary's but for it.
	h := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 4444},
		&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 3000})
	if err := h.SetTLVs([]proxyproto.TLV{{Type: tlvSecret, Value: bytes.Repeat([]byte{7}, secretLen)}}); err != nil {
		t.Fatal(err)
	}
	wrong, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range s.Workers() {
		for _, prefix := range [][]byte{nil, []byte("PROXY TCP4 203.0.113.9 127.0.0.1 4444 3000\r\n"), wrong} {
			c, err := net.DialTimeout("unix", workerSockName(&s.p.secret, w.PID), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write(append(prefix, "GET / HTTP/1.1\r\nHost: t\r\n\r\n"...))
			got, err := io.ReadAll(c) // the worker closes it
			c.Close()
			if len(got) != 0 || err != nil {
				t.Fatalf("a connection to worker %d's socket without the secret: read %q (%v), want nothing and EOF", w.PID, got, err)
			}
		}
	}
}

// A worker that binds no worker socket, as an earlier version's, is
// reached on its TCP port: every request is served.
func TestWorkerWithoutSocketIsReachedOnItsPort(t *testing.T) {
	if handoffMode {
		t.Skip("hand-off mode binds no worker socket")
	}
	s := startTest(t, WithWorkerEnv(envTestApp+"=no-worker-socket"))
	listed := listedUnixSockets(t)
	for _, w := range s.Workers() {
		if listed[workerSockName(&s.p.secret, w.PID)] {
			t.Fatalf("worker %d bound its socket", w.PID)
		}
	}
	for range 8 {
		if typ := connType(t, s.Addr().String()); typ != "*net.TCPConn" {
			t.Fatalf("served on a %s, want *net.TCPConn", typ)
		}
	}
	for _, w := range s.Workers() {
		if !w.proc.sockOff.Load() {
			t.Errorf("worker %d: the primary still dials its socket", w.PID)
		}
	}
}
