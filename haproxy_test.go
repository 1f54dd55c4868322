//go:build unix

package defuss

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// freePort returns a loopback port that was free a moment ago, for a
// process (HAProxy) that must be told its port in a file.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Issue 4, point 5: a real HAProxy in front of two defuss instances, with
// send-proxy-v2 and health checks on the health path. The handler sees the
// original client address, and SIGTERM on one instance drains it with no
// failed request at the client.
func TestBehindHAProxy(t *testing.T) {
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("haproxy is not installed; .ci/run installs it")
		}
		t.Skip("haproxy not installed (apt-get install haproxy)")
	}
	opts := envTestPrimaryOpts + "=trusted=127.0.0.1/32;health=/healthz;drain=1s"
	a := startPrimaryProcess(t, 2, nil, opts)
	b := startPrimaryProcess(t, 2, nil, opts)

	front := freePort(t)
	cfg := fmt.Sprintf(`global
    maxconn 2000
defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch
frontend fe
    bind 127.0.0.1:%d
    default_backend be
backend be
    balance roundrobin
    option httpchk GET /healthz
    default-server inter 100ms fall 1 rise 1 check-send-proxy
    server a %s send-proxy-v2 check
    server b %s send-proxy-v2 check
`, front, a.addr, b.addr)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	hp := exec.Command(haproxy, "-db", "-f", cfgPath)
	hp.Stdout, hp.Stderr = io.Discard, os.Stderr
	if err := hp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		hp.Process.Kill()
		hp.Wait()
	})
	frontAddr := fmt.Sprintf("127.0.0.1:%d", front)

	// Both instances serve through HAProxy, and the handler sees the
	// client's own address.
	seen := map[string]bool{}
	waitFor(t, 10*time.Second, "HAProxy to reach both instances", func() bool {
		c, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).Dial("tcp", frontAddr)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
		b, _ := io.ReadAll(c)
		body := string(b)
		if !strings.HasPrefix(body, "HTTP/1.1 200") {
			return false
		}
		_, rest, _ := strings.Cut(body, "\r\n\r\n")
		if got := remoteOf(t, rest); got != c.LocalAddr().String() {
			t.Fatalf("handler behind HAProxy saw %s, want the client's %s", got, c.LocalAddr())
		}
		_, pid, _ := strings.Cut(rest, "pid=")
		pid, _, _ = strings.Cut(pid, " ")
		seen[pid] = true
		return len(seen) == 4
	})

	// Load through HAProxy while instance A is told to stop.
	var sent, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var load sync.WaitGroup
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	for range 4 {
		load.Add(1)
		go func() {
			defer load.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				sent.Add(1)
				resp, err := client.Get("http://" + frontAddr + "/pid")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	waitFor(t, 5*time.Second, "load running", func() bool { return sent.Load() > 100 })
	a.cmd.Process.Signal(syscall.SIGTERM)
	if line, _ := a.readLine(); line != "stopped\n" {
		t.Errorf("instance A said %q, want \"stopped\"", line)
	}
	if err := a.wait(); err != nil {
		t.Errorf("instance A exited with %v", err)
	}
	n := sent.Load()
	waitFor(t, 5*time.Second, "load on instance B alone", func() bool { return sent.Load() > n+100 })
	close(stop)
	load.Wait()
	t.Logf("through HAProxy: %d requests sent during SIGTERM of one instance, %d failed", sent.Load(), failed.Load())
	if failed.Load() != 0 {
		t.Errorf("%d of %d requests failed; first: %v", failed.Load(), sent.Load(), firstErr.Load())
	}
}
