//go:build unix

package defuss

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Issue 12: HTTPS in the workers. With WithServer given a TLSConfig, the
// workers serve TLS and negotiate HTTP/2 by ALPN, as net/http does; the
// primary never terminates TLS, r.TLS is set and r.RemoteAddr is the real
// client, in both modes.

// tlsGet asks /tlsinfo over TLS on a connection from dial, with HTTP/2
// offered or not, and returns the answer and the client's address.
func tlsGet(t *testing.T, addr string, h2 bool, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (string, string) {
	t.Helper()
	var local string
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: h2,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if dial == nil {
				dial = (&net.Dialer{}).DialContext
			}
			c, err := dial(ctx, network, addr)
			if err == nil {
				local = c.LocalAddr().String()
			}
			return c, err
		},
	}
	if !h2 {
		tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := client.Get("https://" + addr + "/tlsinfo")
	if err != nil {
		t.Fatalf("GET over TLS: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b), local
}

func TestHTTPSInWorkers(t *testing.T) {
	s := startTest(t, WithWorkerEnv(envTestServer+"=tls"))
	addr := s.Addr().String()
	for _, tc := range []struct {
		name      string
		h2        bool
		wantProto string
		dial      func(ctx context.Context, network, addr string) (net.Conn, error)
	}{
		{"HTTP/2 by ALPN", true, "HTTP/2.0", nil},
		{"HTTP/1.1", false, "HTTP/1.1", nil},
		// The ClientHello comes after the primary's inspection timeout
		// (10ms): the primary routes what it has, and the handshake
		// goes on with the worker.
		{"ClientHello after 60ms", true, "HTTP/2.0", func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err == nil {
				time.Sleep(60 * time.Millisecond)
			}
			return c, err
		}},
		// The ClientHello split over several writes, 5ms apart.
		{"ClientHello in pieces", true, "HTTP/2.0", func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &choppyConn{Conn: c, pieces: 4}, nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, local := tlsGet(t, addr, tc.h2, tc.dial)
			if want := "true " + tc.wantProto + " " + local; got != want {
				t.Fatalf("/tlsinfo answered %q, want %q", got, want)
			}
		})
	}
	t.Run("curl --http2", func(t *testing.T) {
		if _, err := exec.LookPath("curl"); err != nil {
			t.Skip("no curl here (.ci/run installs it)")
		}
		out, err := exec.Command("curl", "-sSk", "--max-time", "10", "--http2", "-w", " %{http_version}", "https://"+addr+"/tlsinfo").CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "true HTTP/2.0 ") || !strings.HasSuffix(string(out), " 2") {
			t.Fatalf("curl --http2: %q, %v", out, err)
		}
	})
	t.Run("plain HTTP to the HTTPS server", func(t *testing.T) {
		c := dialRaw(t, addr)
		fmt.Fprint(c, "GET /tlsinfo HTTP/1.1\r\nHost: test\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "HTTPS") {
			t.Fatalf("plain HTTP got %d %q, want net/http's 400 about HTTPS", resp.StatusCode, body)
		}
	})
}

// choppyConn splits its first write (the ClientHello) into pieces, 5ms
// apart.
type choppyConn struct {
	net.Conn
	pieces int
	done   bool
}

func (c *choppyConn) Write(b []byte) (int, error) {
	if c.done || len(b) < c.pieces {
		return c.Conn.Write(b)
	}
	c.done = true
	n, step := 0, (len(b)+c.pieces-1)/c.pieces
	for len(b) > 0 {
		k := min(step, len(b))
		m, err := c.Conn.Write(b[:k])
		n += m
		if err != nil {
			return n, err
		}
		b = b[k:]
		time.Sleep(5 * time.Millisecond)
	}
	return n, nil
}

// Issue 12: a Balancer routes TLS connections by server name (SNI), read
// from the ClientHello by the primary, which does not terminate TLS.
func TestSNIRouting(t *testing.T) {
	byName := func(r *Request, c []WorkerInfo) *WorkerInfo {
		if r.Protocol == ProtocolTLS && r.Host == "b.test" && len(c) > 1 {
			return &c[1]
		}
		return &c[0]
	}
	s := startTest(t, WithWorkerEnv(envTestServer+"=tls"), WithBalancer(byName))
	ws := s.Workers()
	for _, tc := range []struct {
		name string
		want int // pid
	}{{"a.test", ws[0].PID}, {"b.test", ws[1].PID}, {"b.test", ws[1].PID}, {"a.test", ws[0].PID}} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, ServerName: tc.name}, ForceAttemptHTTP2: true}
		client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		resp, err := client.Get("https://" + s.Addr().String() + "/pid")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		tr.CloseIdleConnections()
		if got := string(b); got != strconv.Itoa(tc.want) {
			t.Errorf("server name %s served by pid %s, want %d", tc.name, got, tc.want)
		}
	}
}

// Issue 12: HTTP/2 with prior knowledge (h2c), with srv.Protocols allowing
// it: the primary recognises the preface ("h2c") and forwards it, and the
// worker serves HTTP/2, to Go's client and to curl, in both modes.
func TestH2CThroughPrimary(t *testing.T) {
	var protos []string
	var mu sync.Mutex
	record := func(r *Request, c []WorkerInfo) *WorkerInfo {
		mu.Lock()
		protos = append(protos, r.Protocol)
		mu.Unlock()
		return &c[0]
	}
	s := startTest(t, WithWorkerEnv(envTestServer+"=h2c"), WithBalancer(record))
	addr := s.Addr().String()
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p}
	defer tr.CloseIdleConnections()
	var local string
	tr.DialContext = func(ctx context.Context, network, a string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, a)
		if err == nil {
			local = c.LocalAddr().String()
		}
		return c, err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + addr + "/tlsinfo")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := "false HTTP/2.0 " + local; string(b) != want {
		t.Fatalf("/tlsinfo over h2c answered %q, want %q", b, want)
	}
	mu.Lock()
	if len(protos) != 1 || protos[0] != ProtocolH2C {
		t.Errorf("the balancer saw %q, want one h2c connection", protos)
	}
	mu.Unlock()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Log("no curl here; the Go client alone was used")
		return
	}
	out, err := exec.Command("curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-w", " %{http_version}", "http://"+addr+"/tlsinfo").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "false HTTP/2.0 ") || !strings.HasSuffix(string(out), " 2") {
		t.Fatalf("curl --http2-prior-knowledge: %q, %v", out, err)
	}
}

// Issue 12: a real gRPC client (google.golang.org/grpc) calls the standard
// health service that the test app mounts beside its HTTP handlers, over
// h2c through the primary, in both modes.
func TestGRPCThroughPrimary(t *testing.T) {
	s := startTest(t, WithWorkerEnv(envTestServer+"=h2c"))
	conn, err := grpc.NewClient("passthrough:///"+s.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 3 {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatalf("health check %d: %v", i, err)
		}
		if resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health check %d: %v, want SERVING", i, resp.Status)
		}
	}
}
