//go:build unix

package defuss

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// upgradeHead asks the test app to switch to a raw byte echo.
const upgradeHead = "GET /upgrade HTTP/1.1\r\nHost: test\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"

// upgrade sends head (the rest of an upgrade request) and reads the 101.
func upgrade(t *testing.T, c *rawConn, head []byte) {
	t.Helper()
	if _, err := c.Write(head); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade response %v, %v", resp, err)
	}
}

// echoThrough checks that payload comes back unchanged and in order over
// an upgraded connection, written in chunks while reading.
func echoThrough(t *testing.T, c *rawConn, payload []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		for b := payload; len(b) > 0; {
			n := min(len(b), 32<<10)
			if _, err := c.Write(b[:n]); err != nil {
				errc <- err
				return
			}
			b = b[n:]
		}
		errc <- nil
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c.r, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("echoed bytes differ from the bytes sent")
	}
}

// Behaviours 3 and 5: every byte the client sends reaches the worker,
// unchanged and in order: the sniffed head, bytes that arrived with it,
// and the rest of the stream, through an upgraded (WebSocket-like)
// connection, whether the head arrived whole, in pieces after the
// inspection timeout, or after a slow start.
func TestSniffForwardsEveryByte(t *testing.T) {
	s := startTest(t)
	addr := s.Addr().String()
	payload := make([]byte, 4<<20)
	rand.Read(payload)

	t.Run("head and data in one write", func(t *testing.T) {
		c := dialRaw(t, addr)
		// The echo starts with the bytes that arrived together with the head.
		upgrade(t, c, append([]byte(upgradeHead), payload[:1000]...))
		got := make([]byte, 1000)
		if _, err := io.ReadFull(c.r, got); err != nil || !bytes.Equal(got, payload[:1000]) {
			t.Fatalf("bytes sent with the head came back as %q..., %v", got[:16], err)
		}
		echoThrough(t, c, payload)
	})
	t.Run("head split past the inspection timeout", func(t *testing.T) {
		c := dialRaw(t, addr)
		if _, err := c.Write([]byte(upgradeHead[:20])); err != nil {
			t.Fatal(err)
		}
		// Let the 10ms inspection timeout pass so the primary routes the
		// partial head blindly; the rest must follow it unchanged.
		time.Sleep(50 * time.Millisecond)
		upgrade(t, c, []byte(upgradeHead[20:]))
		echoThrough(t, c, payload)
	})
	t.Run("head larger than the byte cap", func(t *testing.T) {
		c := dialRaw(t, addr)
		big := strings.Replace(upgradeHead, "Host: test\r\n", "Host: test\r\nX-Pad: "+strings.Repeat("p", DefaultMaxHeaderBytes)+"\r\n", 1)
		upgrade(t, c, []byte(big))
		echoThrough(t, c, payload[:1<<20])
	})
	t.Run("pipelined requests", func(t *testing.T) {
		c := dialRaw(t, addr)
		var reqs bytes.Buffer
		for i := range 5 {
			fmt.Fprintf(&reqs, "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s", 3+i, strings.Repeat("x", 3+i))
		}
		if _, err := c.Write(reqs.Bytes()); err != nil {
			t.Fatal(err)
		}
		for i := range 5 {
			resp, err := http.ReadResponse(c.r, nil)
			if err != nil {
				t.Fatalf("response %d: %v", i, err)
			}
			body, _ := io.ReadAll(resp.Body)
			if n, _, _ := strings.Cut(string(body), " "); n != strconv.Itoa(3+i) {
				t.Fatalf("response %d: %q, want a body of %d bytes counted", i, body, 3+i)
			}
		}
	})
}

// Behaviour 3: bytes that are not HTTP/1 (a real TLS ClientHello, the
// HTTP/2 preface, random binary, a bare-LF head) are routed as "unknown"
// and forwarded unchanged, ahead of the rest of the stream. The worker here
// is a raw TCP echo server on a real socket, so every byte is checked.
func TestNonHTTPBytesAreForwardedUnchanged(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	var echoes sync.WaitGroup
	defer echoes.Wait()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			echoes.Add(1)
			go func() {
				defer echoes.Done()
				defer c.Close()
				// The primary's PROXY header comes first; the echo is of
				// what follows it.
				pc := proxyproto.NewConn(c, proxyproto.WithPolicy(proxyproto.REQUIRE))
				io.Copy(c, pc)
			}()
		}
	}()
	var seen []string
	var mu sync.Mutex
	p := newTestPrimary(t, func(r *Request, c []WorkerInfo) *WorkerInfo {
		mu.Lock()
		seen = append(seen, r.Protocol)
		mu.Unlock()
		return &c[0]
	}, nil, echo.Addr().String())
	random := make([]byte, 100<<10)
	rand.Read(random)
	for _, tc := range []struct {
		name  string
		first []byte
	}{
		{"tls client hello", clientHello(t)},
		{"http2 preface", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")},
		{"random binary", random[:3000]},
		{"bare LF head", []byte("GET / HTTP/1.1\nHost: test\n\n")},
		{"NUL bytes", []byte("GET /\x00 HTTP/1.1\r\n\r\n")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			done := make(chan struct{})
			go func() {
				defer close(done)
				p.admit(server)
				p.serveConn(server)
			}()
			want := append(append([]byte{}, tc.first...), random...)
			go func() {
				client.Write(tc.first)
				client.Write(random)
				client.(*net.TCPConn).CloseWrite()
			}()
			got, err := io.ReadAll(client)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("echoed %d bytes (%v), want the %d bytes sent", len(got), err, len(want))
			}
			client.Close()
			<-done
		})
	}
	// Issue 12: TLS and the HTTP/2 preface are recognised (and still
	// forwarded byte for byte); the rest is "unknown".
	want := []string{ProtocolTLS, ProtocolH2C, ProtocolUnknown, ProtocolUnknown, ProtocolUnknown}
	if !slices.Equal(seen, want) {
		t.Errorf("connections were routed as %q, want %q", seen, want)
	}
}

// newTestPrimary builds a primary whose only worker is at addr, for tests
// of the connection path on real sockets without worker processes.
func newTestPrimary(t testing.TB, b Balancer, opt Option, addrs ...string) *primary {
	c, err := newConfig(func(string) string { return "" }, WithWorkers(len(addrs)), WithLogger(testLogger(t)), WithBalancer(b), opt)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPrimary(c, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	p.dialer.Timeout = time.Second
	v := &poolView{}
	for i, a := range addrs {
		s := p.pool.slots[i]
		v.cands = append(v.cands, WorkerInfo{Index: i, Addr: a, conns: &s.conns, slot: s})
	}
	p.pool.view.Store(v)
	return p
}

// tcpPair returns both ends of a real loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if server, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// Behaviour 5: server-sent events arrive as they are flushed, and a
// chunked upload of unknown length arrives whole.
func TestStreamingThroughPrimary(t *testing.T) {
	s := startTest(t)
	addr := s.Addr().String()
	t.Run("server-sent events", func(t *testing.T) {
		resp, err := http.Get("http://" + addr + "/sse")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		r := bufio.NewReader(resp.Body)
		for i := range 5 {
			line, err := r.ReadString('\n')
			if err != nil || line != fmt.Sprintf("data: %d\n", i) {
				t.Fatalf("event %d: %q, %v", i, line, err)
			}
			r.ReadString('\n')
		}
	})
	t.Run("chunked upload", func(t *testing.T) {
		pr, pw := io.Pipe()
		h := sha256.New()
		const size = 8 << 20
		go func() {
			buf := make([]byte, 1<<16)
			for sent := 0; sent < size; sent += len(buf) {
				rand.Read(buf)
				h.Write(buf)
				if _, err := pw.Write(buf); err != nil {
					return
				}
			}
			pw.Close()
		}()
		req, _ := http.NewRequest("POST", "http://"+addr+"/upload", pr)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		want := fmt.Sprintf("%d %s chunked", size, hex.EncodeToString(h.Sum(nil)))
		if string(body) != want {
			t.Fatalf("worker got %q, want %q", body, want)
		}
	})
}

// Behaviour 7: with no worker available (both stopped, so their heartbeats
// go stale) an HTTP client gets 503 with Retry-After, a non-HTTP client a
// closed connection, and the primary keeps serving once workers return.
func TestNoWorkerAvailable(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, WithHeartbeat(50*time.Millisecond, 300*time.Millisecond), opt)
	addr := s.Addr().String()
	ws := s.Workers()
	for _, w := range ws {
		syscall.Kill(w.PID, syscall.SIGSTOP)
	}
	t.Cleanup(func() {
		for _, w := range ws {
			syscall.Kill(w.PID, syscall.SIGCONT)
		}
	})
	waitWorkers(t, s, 5*time.Second, "no healthy worker", func(ws []WorkerInfo) bool {
		for _, w := range ws {
			if w.Healthy {
				return false
			}
		}
		return true
	})
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("request with no worker: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("got %d %q (Retry-After %q), want 503 with Retry-After", resp.StatusCode, body, resp.Header.Get("Retry-After"))
	}
	c := dialRaw(t, addr)
	c.Write(clientHello(t))
	if got, err := io.ReadAll(c.r); len(got) != 0 || err != nil {
		t.Fatalf("non-HTTP client got %q, %v; want a closed connection", got, err)
	}
	if got := points(t, m.collect(), "defuss.connections.unavailable", "{connection}"); total(got) != 2 {
		t.Errorf("connections.unavailable = %v, want 2", got)
	}
	for _, w := range ws {
		syscall.Kill(w.PID, syscall.SIGCONT)
	}
	// Stale workers are killed after 2×staleAfter and respawned; either way
	// the pool comes back and serves.
	waitWorkers(t, s, 10*time.Second, "a healthy worker again", func(ws []WorkerInfo) bool {
		for _, w := range ws {
			if w.Healthy {
				return true
			}
		}
		return false
	})
	if code, body := get(t, addr, "/pid"); code != 200 {
		t.Fatalf("after recovery: %d %q", code, body)
	}
}

// Behaviour 7: a worker that refuses the dial is skipped and the
// connection goes to the next one, since no byte was sent yet.
func TestDialRefusedTriesNextWorker(t *testing.T) {
	refusing, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := refusing.Addr().String()
	refusing.Close() // nothing listens there now: connect is refused
	live, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	go func() {
		for {
			c, err := live.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	// raw: the socket an event loop carries (Linux); otherwise net.Dialer.
	for _, raw := range []bool{false, true} {
		t.Run(fmt.Sprintf("raw=%v", raw), func(t *testing.T) {
			always0 := func(_ *Request, c []WorkerInfo) *WorkerInfo { return &c[0] }
			m, opt := newMetrics(t)
			p := newTestPrimary(t, always0, opt, deadAddr, live.Addr().String())
			var up upstream
			var how offerHow
			if raw {
				how = offerRaw
			}
			w, _ := p.offer(&Request{}, nil, &up, how)
			if w == nil {
				t.Fatal("connect gave up although worker 1 accepts")
			}
			up.close()
			if w.slot.index != 1 {
				t.Fatalf("connected to worker %d, want 1", w.slot.index)
			}
			if n0, n1 := p.pool.slots[0].conns.Load(), p.pool.slots[1].conns.Load(); n0 != 0 || n1 != 1 {
				t.Fatalf("connection counts %d/%d, want 0/1", n0, n1)
			}
			ms := m.collect()
			if got := points(t, ms, "defuss.dial.failures", "{dial}"); got["defuss.worker.index=0"].value != 1 || len(got) != 1 {
				t.Errorf("dial.failures = %v, want 1 for worker 0", got)
			}
			if got := points(t, ms, "defuss.dial.retries", "{dial}"); got["defuss.worker.index=1"].value != 1 || len(got) != 1 {
				t.Errorf("dial.retries = %v, want 1 onto worker 1", got)
			}
		})
	}
}

// A balancer that panics does not hurt the primary: connections go to
// workers in round-robin order instead.
func TestPanickingBalancerFallsBack(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithBalancer(func(*Request, []WorkerInfo) *WorkerInfo { panic("balancer bug") }))
	seen := map[string]bool{}
	for range 4 {
		code, pid := get(t, s.Addr().String(), "/pid")
		if code != 200 {
			t.Fatalf("status %d", code)
		}
		seen[pid] = true
	}
	if len(seen) != 2 {
		t.Errorf("fallback reached %d workers, want 2", len(seen))
	}
	if got := points(t, m.collect(), "defuss.balancer.fallbacks", "{decision}"); got["defuss.reason=panic"].value != 4 || len(got) != 1 {
		t.Errorf("balancer.fallbacks = %v, want 4 panics", got)
	}
}

// WithMaxConnections: connections over the cap are closed on accept and
// counted; once one closes, a new one is served. Issue 14: in hand-off
// mode too, where the workers hold the connections: the primary used to
// forget a connection once it had handed it off, and served any number.
func TestMaxConnections(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithMaxConnections(3))
	addr := s.Addr().String()
	held := make([]*rawConn, 3)
	for i := range held {
		held[i] = dialRaw(t, addr)
		held[i].roundTrip(t, "/pid")
	}
	over := dialRaw(t, addr)
	over.Write([]byte("GET /pid HTTP/1.1\r\nHost: t\r\n\r\n"))
	if got, _ := io.ReadAll(over.r); len(got) != 0 {
		t.Fatalf("connection over the cap was served: %q", got)
	}
	if got := points(t, m.collect(), "defuss.connections.refused", "{connection}"); total(got) != 1 {
		t.Errorf("connections.refused = %v, want 1", got)
	}
	held[0].Close()
	waitFor(t, 5*time.Second, "a slot under the cap", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
		b, _ := io.ReadAll(c)
		return strings.HasPrefix(string(b), "HTTP/1.1 200")
	})
}

// Hand-off mode end to end: the worker reads every byte itself and sees
// the client's address, connection counts follow the worker's close
// reports, and draining works.
func TestHandoffMode(t *testing.T) {
	s := startTest(t, WithHandoff(true))
	addr := s.Addr().String()
	c := dialFrom(t, "127.0.0.2", addr)
	for i := range 3 {
		if got := remoteOf(t, c.roundTrip(t, "/")); got != c.LocalAddr().String() {
			t.Fatalf("request %d: worker saw %s, want %s", i, got, c.LocalAddr())
		}
	}
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	u := dialRaw(t, addr)
	upgrade(t, u, append([]byte(upgradeHead), payload[:100]...))
	got := make([]byte, 100)
	if _, err := io.ReadFull(u.r, got); err != nil || !bytes.Equal(got, payload[:100]) {
		t.Fatalf("bytes sent with the head: %v", err)
	}
	echoThrough(t, u, payload)
	total := func() int64 {
		ws := s.Workers()
		return ws[0].ActiveConnections() + ws[1].ActiveConnections()
	}
	if n := total(); n != 2 {
		t.Fatalf("%d connections counted, want 2", n)
	}
	c.Close()
	u.Close()
	waitFor(t, 5*time.Second, "close reports", func() bool { return total() == 0 })
}

// Issue 11, point 15: a client that resets its connection in the middle
// of the head is gone; the primary used to dial a worker for it anyway.
func TestResetMidHeadDialsNoWorker(t *testing.T) {
	worker, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer worker.Close()
	p := newTestPrimary(t, nil, WithInspectionTimeout(5*time.Second), worker.Addr().String())
	client, server := tcpPair(t)
	p.admit(server)
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.serveConn(server)
	}()
	client.Write([]byte("GET / HTTP/1.1\r\nHost: te"))
	client.(*net.TCPConn).SetLinger(0) // close with RST
	client.Close()
	<-done
	worker.(*net.TCPListener).SetDeadline(time.Now().Add(200 * time.Millisecond))
	if c, err := worker.Accept(); err == nil {
		c.Close()
		t.Fatal("the primary dialed a worker for a client that had reset its connection")
	}
}

// wrappedListener yields connections that are not *net.TCPConn, as a TLS
// listener or netutil.LimitListener does.
type wrappedListener struct{ net.Listener }

type wrappedConn struct{ net.Conn }

func (l wrappedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return wrappedConn{c}, nil
}

// Issue 11, point 14: hand-off needs the connection's descriptor; a
// listener whose connections are not *net.TCPConn made the primary splice
// them without a word. It still does (the client is served), and says so
// in the log, once.
func TestHandoffWithWrappedListenerWarns(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	s := startTest(t, WithListener(wrappedListener{ln}), WithHandoff(true), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	for range 3 {
		if code, body := get(t, s.Addr().String(), "/"); code != 200 {
			t.Fatalf("status %d %q", code, body)
		}
	}
	if n := strings.Count(logs.String(), "hand-off mode: connection is not a *net.TCPConn"); n != 1 {
		t.Fatalf("warned %d times, want once; log:\n%s", n, logs)
	}
}

// Both directions of a relayed connection stall and resume: the client
// writes 16 MiB into an echo at once and reads the echo back slowly, so
// that the client's socket, then the worker's, fill up, and the relay must
// hold what it read until the receiver takes more (evrelay_linux.go:
// pending) without dropping, reordering or spinning. Every byte comes back
// in order, and the connection still ends cleanly.
func TestRelayBackpressureKeepsEveryByte(t *testing.T) {
	s := startTest(t)
	c := dialRaw(t, s.Addr().String())
	c.SetDeadline(time.Now().Add(60 * time.Second))
	upgrade(t, c, []byte(upgradeHead))
	payload := make([]byte, 16<<20)
	rand.Read(payload)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload) // blocks until the slow reader below has taken most of it
		errc <- err
	}()
	got := make([]byte, 0, len(payload))
	buf := make([]byte, 4<<10)
	for len(got) < len(payload) {
		n, err := c.r.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("read after %d of %d bytes: %v", len(got), len(payload), err)
		}
		if len(got)%(1<<20) < n {
			time.Sleep(20 * time.Millisecond) // a slow reader: pace, not synchronization
		}
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		i := 0
		for i < len(got) && got[i] == payload[i] {
			i++
		}
		t.Fatalf("echo differs from what was sent at byte %d of %d", i, len(payload))
	}
	c.Conn.(*net.TCPConn).CloseWrite()
	if n, err := c.r.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("after the client's FIN: read %d bytes, %v; want EOF", n, err)
	}
}
