package defuss

import (
	"context"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Behaviour 1: workers are this binary re-executed with the same
// arguments, one process per slot, each with its share of the CPUs.
func TestWorkersAreReexecutedBinary(t *testing.T) {
	s := startTest(t)
	ws := s.Workers()
	if len(ws) != 2 {
		t.Fatalf("Workers() = %d slots, want 2", len(ws))
	}
	want := map[int]bool{}
	for i, w := range ws {
		if w.Index != i || !w.Ready || !w.Healthy || w.PID == 0 || w.PID == os.Getpid() || w.Addr == "" {
			t.Fatalf("slot %d: %+v", i, w)
		}
		want[w.PID] = true
	}
	seen := map[int]bool{}
	procs := max(1, runtime.GOMAXPROCS(0)/2)
	if v := os.Getenv("GOMAXPROCS"); v != "" {
		procs, _ = strconv.Atoi(v)
	}
	for range 6 {
		code, body := get(t, s.Addr().String(), "/")
		if code != 200 {
			t.Fatalf("status %d: %s", code, body)
		}
		var pid, slot, gmp int
		var remote string
		if _, err := fmtSscanf(body, "pid=%d slot=%d procs=%d remote=%s", &pid, &slot, &gmp, &remote); err != nil {
			t.Fatalf("body %q: %v", body, err)
		}
		if !want[pid] || ws[slot].PID != pid {
			t.Fatalf("answered by pid %d slot %d, workers are %+v", pid, slot, ws)
		}
		if gmp != procs {
			t.Errorf("worker GOMAXPROCS = %d, want %d", gmp, procs)
		}
		seen[pid] = true
	}
	if len(seen) != 2 {
		t.Errorf("round robin reached %d workers, want 2", len(seen))
	}
	_, args := get(t, s.Addr().String(), "/args")
	if args != strings.Join(os.Args, "\x00") {
		t.Errorf("worker args %q, want %q", args, os.Args)
	}
}

// Behaviour 10 (in-process): a request in flight when Shutdown starts
// completes; a new connection after it is refused; Wait returns nil.
func TestShutdownLetsInFlightRequestFinish(t *testing.T) {
	s := startTest(t)
	addr := s.Addr().String()
	c := dialRaw(t, addr)
	start := time.Now()
	if _, err := c.Write([]byte("GET /sleep?d=2s HTTP/1.1\r\nHost: test\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	// The header arrives at once: the request is now in the handler.
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("response %v, %v", resp, err)
	}
	go s.Shutdown(context.Background())
	waitFor(t, 5*time.Second, "listener closed", func() bool {
		conn, err := dialTCP(addr)
		if err == nil {
			conn.Close()
		}
		return err != nil
	})
	body, err := readAllString(resp.Body)
	if err != nil || body != "done" {
		t.Fatalf("in-flight response body %q, %v; want \"done\"", body, err)
	}
	if d := time.Since(start); d < 2*time.Second {
		t.Errorf("response after %v, before the handler's 2s", d)
	}
	if err := s.Wait(); err != nil {
		t.Errorf("Wait = %v, want nil", err)
	}
	for _, w := range s.Workers() {
		if w.PID != 0 || w.State != stateDown {
			t.Errorf("after Wait, slot %d: %+v", w.Index, w)
		}
	}
}
