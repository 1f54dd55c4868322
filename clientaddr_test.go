//go:build unix

package defuss

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// dialFrom connects to addr from the local source address ip (any port).
func dialFrom(t *testing.T, ip, addr string) *rawConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, ip, err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

// remoteOf extracts "remote=..." from the test app's answer to "/".
func remoteOf(t *testing.T, body string) string {
	t.Helper()
	_, r, ok := strings.Cut(strings.TrimSpace(body), "remote=")
	if !ok {
		t.Fatalf("answer %q has no remote=", body)
	}
	return r
}

// Issue 4, point 1: r.RemoteAddr in the worker is the address of the
// client that connected to the primary, for every request of a keep-alive
// connection and for pipelined requests.
func TestWorkerSeesClientAddress(t *testing.T) {
	s := startTest(t)
	for _, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		t.Run(ip, func(t *testing.T) {
			c := dialFrom(t, ip, s.Addr().String())
			want := c.LocalAddr().String()
			for i := range 3 {
				if got := remoteOf(t, c.roundTrip(t, "/")); got != want {
					t.Fatalf("keep-alive request %d: worker saw %s, want %s", i, got, want)
				}
			}
			fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
			for i := range 2 {
				resp, err := http.ReadResponse(c.r, nil)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				if got := remoteOf(t, string(body)); got != want {
					t.Fatalf("pipelined request %d: worker saw %s, want %s", i, got, want)
				}
			}
		})
	}
}

// Issue 4, point 2: a local process that connects straight to a worker
// port is not served, with or without a PROXY header, unless the header
// carries the primary's secret; so it cannot claim a client address.
func TestDirectWorkerConnectionIsRefused(t *testing.T) {
	s := startTest(t)
	worker := s.Workers()[0].Addr
	dst := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 3000}
	spoofed := &net.TCPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 4444}
	header := func(tlvs ...proxyproto.TLV) []byte {
		h := proxyproto.HeaderProxyFromAddrs(2, spoofed, dst)
		if err := h.SetTLVs(tlvs); err != nil {
			t.Fatal(err)
		}
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	wrong := bytes.Repeat([]byte{7}, secretLen)
	for _, tc := range []struct {
		name   string
		prefix []byte
	}{
		{"no PROXY header", nil},
		{"PROXY header without secret", header()},
		{"PROXY header with a wrong secret", header(proxyproto.TLV{Type: tlvSecret, Value: wrong})},
		{"PROXY v1 header", []byte("PROXY TCP4 203.0.113.9 127.0.0.1 4444 3000\r\n")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, worker)
			c.Write(append(tc.prefix, "GET / HTTP/1.1\r\nHost: t\r\n\r\n"...))
			got, _ := io.ReadAll(c.r)
			if len(got) != 0 {
				t.Fatalf("direct connection was served: %q", got)
			}
		})
	}
	// Through the primary it works, and the address is the real one.
	c := dialFrom(t, "127.0.0.2", s.Addr().String())
	if got := remoteOf(t, c.roundTrip(t, "/")); got != c.LocalAddr().String() {
		t.Fatalf("through the primary: %s, want %s", got, c.LocalAddr())
	}
}

// Issue 4, point 3: the public listener takes PROXY v1/v2 headers only
// from trusted networks and passes the address on; a header from anyone
// else, a malformed one, or one that does not arrive in time closes the
// connection and is counted. Issue 14: the same in hand-off mode, where
// the primary checks the header from its peek and the worker consumes it.
func TestTrustedProxies(t *testing.T) {
	m, opt := newMetrics(t)
	// An inspection timeout long enough for a header sent in pieces.
	s := startTest(t, opt, WithTrustedProxies("127.0.0.2/32"), WithInspectionTimeout(500*time.Millisecond))
	addr := s.Addr().String()
	dst := s.Addr().(*net.TCPAddr)
	v2 := func(src *net.TCPAddr, tlvs ...proxyproto.TLV) []byte {
		h := proxyproto.HeaderProxyFromAddrs(2, src, dst)
		if err := h.SetTLVs(tlvs); err != nil {
			t.Fatal(err)
		}
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	format := func(h *proxyproto.Header) []byte {
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	// served sends what in pieces, a few milliseconds apart, and checks
	// that two requests on the connection (the first one in what) are
	// served and see the client address want ("" = the connection's own):
	// nothing of the header is left in front of the second.
	served := func(t *testing.T, want string, what ...[]byte) {
		t.Helper()
		c := dialFrom(t, "127.0.0.2", addr)
		if want == "" {
			want = c.LocalAddr().String()
		}
		for i, b := range what {
			if i > 0 {
				time.Sleep(5 * time.Millisecond) // the input under test: a header in pieces
			}
			if _, err := c.Write(b); err != nil {
				t.Fatal(err)
			}
		}
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if got := remoteOf(t, string(body)); got != want {
			t.Fatalf("worker saw %s, want %s", got, want)
		}
		if got := remoteOf(t, c.roundTrip(t, "/")); got != want {
			t.Fatalf("second request: worker saw %s, want %s", got, want)
		}
	}
	head := []byte("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
	withHead := func(h []byte) []byte { return append(bytes.Clone(h), head...) }
	t.Run("v1 from a trusted proxy", func(t *testing.T) {
		c := dialFrom(t, "127.0.0.2", addr)
		c.Write([]byte("PROXY TCP4 203.0.113.7 127.0.0.1 5555 3000\r\n"))
		for i := range 2 { // the address holds for the whole connection
			if got := remoteOf(t, c.roundTrip(t, "/")); got != "203.0.113.7:5555" {
				t.Fatalf("request %d: worker saw %s, want 203.0.113.7:5555", i, got)
			}
		}
	})
	t.Run("v2 IPv6 from a trusted proxy, with the head in the same write", func(t *testing.T) {
		served(t, "[2001:db8::1]:443", withHead(v2(&net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 443})))
	})
	t.Run("v2 with TLVs from a trusted proxy", func(t *testing.T) {
		h := v2(&net.TCPAddr{IP: net.IPv4(198, 51, 100, 20), Port: 40000},
			proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("shop.example.com")},
			proxyproto.TLV{Type: proxyproto.PP2_TYPE_UNIQUE_ID, Value: []byte("0123456789abcdef")},
			proxyproto.TLV{Type: 0xE1, Value: bytes.Repeat([]byte{0xAB}, 200)})
		served(t, "198.51.100.20:40000", withHead(h))
	})
	t.Run("v2 LOCAL from a trusted proxy (its own health check)", func(t *testing.T) {
		served(t, "", withHead(format(&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC})))
	})
	t.Run("v1 UNKNOWN from a trusted proxy", func(t *testing.T) {
		served(t, "", withHead([]byte("PROXY UNKNOWN\r\n")))
	})
	t.Run("v1 in pieces", func(t *testing.T) {
		served(t, "203.0.113.8:6666", []byte("PRO"), []byte("XY TCP4 203.0.113.8 127.0.0.1 6666 3000\r"), withHead([]byte("\n")))
	})
	t.Run("v2 in pieces: the signature, the length, the rest", func(t *testing.T) {
		h := v2(&net.TCPAddr{IP: net.IPv4(198, 51, 100, 21), Port: 40001},
			proxyproto.TLV{Type: proxyproto.PP2_TYPE_AUTHORITY, Value: []byte("shop.example.com")})
		served(t, "198.51.100.21:40001", h[:12], h[12:16], h[16:20], withHead(h[20:]))
	})
	t.Run("no header from a trusted proxy", func(t *testing.T) {
		served(t, "", head)
	})
	rejected := func(t *testing.T, from string, send []byte) {
		t.Helper()
		c := dialFrom(t, from, addr)
		c.Write(send)
		if got, _ := io.ReadAll(c.r); len(got) != 0 {
			t.Fatalf("connection was served: %q", got)
		}
	}
	t.Run("v1 from an untrusted source", func(t *testing.T) {
		rejected(t, "127.0.0.3", []byte("PROXY TCP4 203.0.113.7 127.0.0.1 5555 3000\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"))
	})
	t.Run("v2 from an untrusted source", func(t *testing.T) {
		rejected(t, "127.0.0.3", append(v2(&net.TCPAddr{IP: net.ParseIP("198.51.100.1"), Port: 1}), "GET / HTTP/1.1\r\n\r\n"...))
	})
	t.Run("malformed v1 from a trusted proxy", func(t *testing.T) {
		rejected(t, "127.0.0.2", []byte("PROXY TCP4 not-an-address 127.0.0.1 5555 3000\r\nGET / HTTP/1.1\r\n\r\n"))
	})
	t.Run("v2 over UDP from a trusted proxy", func(t *testing.T) {
		h := format(proxyproto.HeaderProxyFromAddrs(2, &net.UDPAddr{IP: net.IPv4(198, 51, 100, 2), Port: 53}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}))
		rejected(t, "127.0.0.2", withHead(h))
	})
	t.Run("v2 longer than any balancer sends, from a trusted proxy", func(t *testing.T) {
		h := v2(&net.TCPAddr{IP: net.IPv4(198, 51, 100, 3), Port: 1}, proxyproto.TLV{Type: 0xE1, Value: make([]byte, 600)})
		rejected(t, "127.0.0.2", withHead(h))
	})
	t.Run("header cut short, then silence", func(t *testing.T) {
		start := time.Now()
		rejected(t, "127.0.0.2", []byte("PROXY TCP4 203.0.113.7"))
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("closed after %v; the header read must be bounded by the inspection timeout", d)
		}
	})
	got := points(t, m.collect(), "defuss.proxy_header.rejected", "{connection}")
	if got["defuss.reason=untrusted"].value != 2 || got["defuss.reason=malformed"].value != 4 || len(got) != 2 {
		t.Errorf("proxy_header.rejected = %v, want 2 untrusted and 4 malformed", got)
	}
}

// Issue 14: a trusted load balancer's PROXY header and the byte cap. A
// header that fits is used even when the head after it does not fit (the
// worker reads the rest); one longer than the cap is refused as
// malformed, in both modes.
func TestTrustedProxyHeaderAndByteCap(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithTrustedProxies("127.0.0.2/32"), WithMaxHeaderBytes(64))
	addr := s.Addr().String()
	t.Run("header within the cap, head past it", func(t *testing.T) {
		c := dialFrom(t, "127.0.0.2", addr)
		c.Write([]byte("PROXY TCP4 203.0.113.9 127.0.0.1 7777 3000\r\n")) // 45 bytes
		c.Write([]byte("GET / HTTP/1.1\r\nHost: t\r\nX-Padding: " + strings.Repeat("p", 100) + "\r\n\r\n"))
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if got := remoteOf(t, string(body)); got != "203.0.113.9:7777" {
			t.Fatalf("worker saw %s, want 203.0.113.9:7777", got)
		}
	})
	t.Run("header longer than the cap", func(t *testing.T) {
		h := proxyproto.HeaderProxyFromAddrs(2, &net.TCPAddr{IP: net.IPv4(198, 51, 100, 4), Port: 1}, s.Addr())
		h.SetTLVs([]proxyproto.TLV{{Type: 0xE1, Value: make([]byte, 80)}})
		b, err := h.Format()
		if err != nil {
			t.Fatal(err)
		}
		c := dialFrom(t, "127.0.0.2", addr)
		c.Write(append(b, "GET / HTTP/1.1\r\nHost: t\r\n\r\n"...))
		if got, _ := io.ReadAll(c.r); len(got) != 0 {
			t.Fatalf("connection was served: %q", got)
		}
	})
	got := points(t, m.collect(), "defuss.proxy_header.rejected", "{connection}")
	if got["defuss.reason=malformed"].value != 1 || len(got) != 1 {
		t.Errorf("proxy_header.rejected = %v, want 1 malformed", got)
	}
}

// Issue 14: without WithTrustedProxies nobody's PROXY header is looked
// for, trusted or stripped, in either mode: it reaches the worker's
// net/http as the start of the request, which answers 400.
func TestProxyHeaderNotTrustedReachesWorkerAsBytes(t *testing.T) {
	s := startTest(t)
	c := dialFrom(t, "127.0.0.2", s.Addr().String())
	c.Write([]byte("PROXY TCP4 203.0.113.7 127.0.0.1 5555 3000\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"))
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("status %d, want 400 from the worker's net/http", resp.StatusCode)
	}
}

// Issue 4, point 4: the primary answers the health path itself: 200 with
// a worker ready, 503 with none, 503 while draining (when everything else
// is still served during the drain delay).
func TestHealthPath(t *testing.T) {
	s := startTest(t, WithHealthPath("/healthz"), WithDrainDelay(2*time.Second),
		WithHeartbeat(50*time.Millisecond, 300*time.Millisecond))
	addr := s.Addr().String()
	check := func(path string, wantCode int, wantBody string) {
		t.Helper()
		code, body := get(t, addr, path)
		if code != wantCode || body != wantBody {
			t.Fatalf("GET %s = %d %q, want %d %q", path, code, body, wantCode, wantBody)
		}
	}
	check("/healthz", 200, "ok\n")
	check("/healthz?probe=1", 200, "ok\n")
	resp, err := http.Head("http://" + addr + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("HEAD /healthz: %v %v", resp, err)
	}
	if code, body := get(t, addr, "/pid"); code != 200 || body == "" {
		t.Fatalf("other paths go to workers: %d %q", code, body)
	}

	ws := s.Workers()
	for _, w := range ws {
		syscall.Kill(w.PID, syscall.SIGSTOP)
	}
	waitWorkers(t, s, 5*time.Second, "no healthy worker", func(ws []WorkerInfo) bool { return !ws[0].Healthy && !ws[1].Healthy })
	check("/healthz", 503, "no worker ready\n")
	for _, w := range ws {
		syscall.Kill(w.PID, syscall.SIGCONT)
	}
	waitWorkers(t, s, 10*time.Second, "healthy workers", func(ws []WorkerInfo) bool { return ws[0].Healthy && ws[1].Healthy })
	check("/healthz", 200, "ok\n")

	go s.Shutdown(t.Context())
	waitFor(t, 2*time.Second, "health to report draining", func() bool {
		code, _ := get(t, addr, "/healthz")
		return code == 503
	})
	check("/healthz", 503, "draining\n")
	if code, _ := get(t, addr, "/pid"); code != 200 {
		t.Fatalf("during the drain delay, requests are still served; got %d", code)
	}
	waitRefused(t, addr, 10*time.Second, "listener closed after the drain delay")
}

// A worker reads its primary's PROXY header however it arrives: here
// byte by byte, a few milliseconds apart, then a request in the same
// write as the header's last byte, and a second one on the connection. It
// serves both, with the header's client address; the header's secret is
// what lets it in.
func TestWorkerReadsAHeaderInPieces(t *testing.T) {
	s := startTest(t)
	worker := s.Workers()[0].Addr
	client := netip.MustParseAddrPort("203.0.113.9:4444")
	header := appendProxyV2(nil, client, netip.MustParseAddrPort("127.0.0.1:3000"), &s.p.secret)
	c := dialRaw(t, worker)
	for _, b := range header[:len(header)-1] {
		if _, err := c.Write([]byte{b}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // the input under test: a header in pieces
	}
	last := append([]byte{header[len(header)-1]}, "GET / HTTP/1.1\r\nHost: t\r\n\r\n"...)
	if _, err := c.Write(last); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("the worker did not answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if got := remoteOf(t, string(body)); got != client.String() {
		t.Errorf("first request: the worker saw %s; want the header's %s", got, client)
	}
	if got := remoteOf(t, c.roundTrip(t, "/")); got != client.String() {
		t.Errorf("second request: the worker saw %s; want the header's %s", got, client)
	}
	// The header alone in its write, the request a little later.
	c = dialRaw(t, worker)
	if _, err := c.Write(header); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond) // the input under test: nothing after the header yet
	if got := remoteOf(t, c.roundTrip(t, "/")); got != client.String() {
		t.Errorf("after a header alone: the worker saw %s; want the header's %s", got, client)
	}
}
