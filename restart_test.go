//go:build unix

package defuss

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/sys/unix"
)

// loadResult counts a background load's requests.
type loadResult struct {
	sent, failed atomic.Int64
	mu           sync.Mutex
	firstErr     error
	versions     map[string]int64 // answer → count, for /version loads
}

// record counts one request of a load: its answer's body, or err.
func (res *loadResult) record(body []byte, err error) {
	res.mu.Lock()
	defer res.mu.Unlock()
	if err != nil {
		res.failed.Add(1)
		if res.firstErr == nil {
			res.firstErr = err
		}
		return
	}
	res.versions[string(body)]++
}

// runLoad sends GET path from 4 goroutines until stop is closed: two use
// new connections per request, two keep connections alive. It returns
// when all have stopped.
func runLoad(addr, path string, stop <-chan struct{}, res *loadResult) func() {
	var wg sync.WaitGroup
	res.versions = map[string]int64{}
	for i := range 4 {
		tr := &http.Transport{DisableKeepAlives: i%2 == 0}
		client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer tr.CloseIdleConnections()
			for {
				select {
				case <-stop:
					return
				default:
				}
				res.sent.Add(1)
				resp, err := client.Get("http://" + addr + path)
				var body []byte
				if err == nil {
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = errors.New("status " + resp.Status)
					}
				}
				if err != nil {
					err = fmt.Errorf("keep-alive %v: %w", !tr.DisableKeepAlives, err)
				}
				res.record(body, err)
			}
		}()
	}
	return wg.Wait
}

// copyBinary copies this test binary to dir/app, with extra bytes appended
// (which the ELF loader ignores): a different binary file that answers
// /version with its own size.
func copyBinary(t *testing.T, dst string, extra string) int64 {
	t.Helper()
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, extra...)
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	// Replace by rename: a running binary cannot be written over in place.
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
	return int64(len(b))
}

// Issue 5, points 1 and 2: a rolling restart under load picks up a new
// binary copied over the old one, with no failed request; afterwards every
// answer comes from the new binary.
func TestRollingRestartSwapsBinaryUnderLoad(t *testing.T) {
	app := filepath.Join(t.TempDir(), "app")
	v1 := copyBinary(t, app, "")
	s := startTest(t, optionFunc(func(c *config) { c.executable = app }))
	addr := s.Addr().String()
	if _, v := get(t, addr, "/version"); v != strconv.FormatInt(v1, 10) {
		t.Fatalf("version %s, want %d", v, v1)
	}
	before := s.Workers()

	var res loadResult
	stop := make(chan struct{})
	wait := runLoad(addr, "/version", stop, &res)
	waitFor(t, 5*time.Second, "load running", func() bool { return res.sent.Load() > 100 })
	v2 := copyBinary(t, app, "defuss rolling restart v2")
	if err := s.Restart(context.Background()); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	// Every new connection now reaches the new binary.
	for range 10 {
		if _, v := get(t, addr, "/version"); v != strconv.FormatInt(v2, 10) {
			t.Fatalf("after Restart, version %s, want %d", v, v2)
		}
	}
	res.mu.Lock()
	clear(res.versions)
	res.mu.Unlock()
	n := res.sent.Load()
	waitFor(t, 5*time.Second, "load after the restart", func() bool { return res.sent.Load() > n+100 })
	close(stop)
	wait()
	t.Logf("rolling restart under load: %d requests sent, %d failed; answers after it: %v", res.sent.Load(), res.failed.Load(), res.versions)
	if res.failed.Load() != 0 {
		t.Errorf("%d requests failed; first: %v", res.failed.Load(), res.firstErr)
	}
	if len(res.versions) != 1 || res.versions[strconv.FormatInt(v2, 10)] == 0 {
		t.Errorf("answers after the restart came from %v, want only %d", res.versions, v2)
	}
	for i, w := range s.Workers() {
		if w.Restarts != 1 || w.PID == before[i].PID || !w.Healthy {
			t.Errorf("slot %d after Restart: %+v (before pid %d)", i, w, before[i].PID)
		}
	}
}

// Issue 5, point 1: if a new worker fails to become ready, the restart
// stops, the old workers keep serving, and Restart returns the error.
func TestRestartWithBrokenBinaryKeepsOldWorkers(t *testing.T) {
	app := filepath.Join(t.TempDir(), "app")
	copyBinary(t, app, "")
	s := startTest(t, optionFunc(func(c *config) { c.executable = app }))
	before := s.Workers()
	broken := app + ".tmp"
	if err := os.WriteFile(broken, []byte("#!/bin/sh\necho broken build >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(broken, app); err != nil {
		t.Fatal(err)
	}
	err := s.Restart(context.Background())
	if !errors.Is(err, ErrWorkerStart) || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("Restart = %v, want ErrWorkerStart with the exit status", err)
	}
	for i, w := range s.Workers() {
		if w.PID != before[i].PID || !w.Healthy {
			t.Errorf("slot %d changed by a failed restart: %+v", i, w)
		}
	}
	for range 4 {
		if code, _ := get(t, s.Addr().String(), "/pid"); code != 200 {
			t.Fatalf("old workers stopped serving: %d", code)
		}
	}
}

// Issue 5, point 1: SIGHUP to a primary process runs a rolling restart.
func TestSIGHUPRestarts(t *testing.T) {
	p := startPrimaryProcess(t, 2, nil)
	old := map[string]bool{}
	for _, pid := range p.pids {
		old[strconv.Itoa(pid)] = true
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	fresh := map[string]bool{}
	waitFor(t, 20*time.Second, "answers from two new workers", func() bool {
		if _, pid := get(t, p.addr, "/pid"); !old[pid] {
			fresh[pid] = true
		}
		return len(fresh) == 2
	})
	for range 6 {
		if _, pid := get(t, p.addr, "/pid"); old[pid] {
			t.Fatalf("an old worker (%s) still answers after the restart", pid)
		}
	}
}

// processCount samples how many child processes this test process has,
// and keeps the maximum, until stop.
func maxChildren(stop <-chan struct{}) func() int {
	var most atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if n := int64(len(children())); n > most.Load() {
					most.Store(n)
				}
			}
		}
	}()
	return func() int { <-done; return int(most.Load()) }
}

// recycleUnderLoad runs a load until each of the two workers has been
// recycled twice, and checks that no request failed and that never more
// than one worker was being replaced at a time (2 slots + 1 processes).
func recycleUnderLoad(t *testing.T, s *Server, what string) {
	t.Helper()
	stopCount := make(chan struct{})
	most := maxChildren(stopCount)
	var res loadResult
	stop := make(chan struct{})
	wait := runLoad(s.Addr().String(), "/pid", stop, &res)
	waitWorkers(t, s, 30*time.Second, "each worker recycled twice", func(ws []WorkerInfo) bool {
		return ws[0].Restarts >= 2 && ws[1].Restarts >= 2
	})
	close(stop)
	wait()
	close(stopCount)
	t.Logf("recycling by %s: %d requests sent, %d failed; at most %d worker processes at once", what, res.sent.Load(), res.failed.Load(), most())
	if res.failed.Load() != 0 {
		t.Errorf("%d requests failed; first: %v", res.failed.Load(), res.firstErr)
	}
	if n := most(); n > 3 {
		t.Errorf("%d worker processes at once; recycling must replace one worker at a time (2 slots + 1)", n)
	}
}

// Issue 5, point 3: WithMaxRequests recycles workers through the rolling
// path with no failed request, never more than one at a time.
func TestRecycleAfterMaxRequests(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithMaxRequests(30, 10))
	recycleUnderLoad(t, s, "request count")
	got := points(t, m.collect(), "defuss.worker.restarts", "{restart}")
	for k := range got {
		if !strings.Contains(k, "defuss.reason=recycle") {
			t.Errorf("restart counted with %q, want reason recycle only", k)
		}
	}
}

// Issue 5, point 3: WithMaxMemory recycles workers whose RSS passes the
// cap (1 byte here: every worker is over it), one at a time, with no
// failed request.
func TestRecycleAtMaxMemory(t *testing.T) {
	recycleUnderLoad(t, startTest(t, WithMaxMemory(1)), "memory")
}

// Issue 5, point 5: a worker that dies right after it becomes ready is
// respawned with exponential backoff: a handful of restarts in 3 s, not
// hundreds; the crash loop is logged and counted.
func TestCrashLoopBacksOff(t *testing.T) {
	var logs syncBuffer
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithWorkers(1), WithWorkerEnv(envTestApp+"=exit-after-ready"),
		WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	start := time.Now()
	waitWorkers(t, s, 10*time.Second, "three restarts", func(ws []WorkerInfo) bool { return ws[0].Restarts >= 3 })
	time.Sleep(3*time.Second - time.Since(start)) // let the loop run for a fixed time
	n := s.Workers()[0].Restarts
	t.Logf("crash loop: %d restarts in %v", n, time.Since(start).Round(time.Millisecond))
	// Backoff 50ms, 100ms, 200ms, 400ms, 800ms, 1.6s: at most 6-7 in 3 s.
	if n > 8 {
		t.Errorf("%d restarts in 3s: the backoff does not hold", n)
	}
	if !strings.Contains(string(logs.Bytes()), "crash loop") {
		t.Error("the crash loop was not logged")
	}
	if got := points(t, m.collect(), "defuss.worker.restarts", "{restart}"); got["defuss.reason=crash,defuss.worker.index=0"].value < 3 {
		t.Errorf("worker.restarts = %v, want >= 3 crashes", got)
	}
}

// Issue 5, point 6: operations run safely alongside each other and
// alongside shutdown; shutdown wins.
func TestRestartConcurrentWithRestartAndShutdown(t *testing.T) {
	s := startTest(t)
	errs := make(chan error, 2)
	go func() { errs <- s.Restart(context.Background()) }()
	go func() { errs <- s.Restart(context.Background()) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent Restart: %v", err)
		}
	}
	for _, w := range s.Workers() {
		if w.Restarts != 2 || !w.Healthy {
			t.Errorf("after two restarts: %+v", w)
		}
	}
	go func() { errs <- s.Restart(context.Background()) }()
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-errs; err != nil && !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("Restart during shutdown = %v, want nil or ErrShuttingDown", err)
	}
	if err := s.Restart(context.Background()); !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("Restart after shutdown = %v, want ErrShuttingDown", err)
	}
}

// Issue 5, point 4: Scale up and down under load with no failed request;
// scaling down drains before it stops.
func TestScaleUnderLoad(t *testing.T) {
	s := startTest(t)
	var res loadResult
	stop := make(chan struct{})
	wait := runLoad(s.Addr().String(), "/pid", stop, &res)
	waitFor(t, 5*time.Second, "load running", func() bool { return res.sent.Load() > 100 })
	if err := s.Scale(context.Background(), 4); err != nil {
		t.Fatalf("Scale(4): %v", err)
	}
	ws := s.Workers()
	if len(ws) != 4 {
		t.Fatalf("after Scale(4): %d workers", len(ws))
	}
	for _, w := range ws {
		if !w.Healthy {
			t.Errorf("after Scale(4): %+v", w)
		}
	}
	// The new workers take connections.
	seen := map[string]bool{}
	waitFor(t, 10*time.Second, "answers from 4 workers", func() bool {
		_, pid := get(t, s.Addr().String(), "/pid")
		seen[pid] = true
		return len(seen) == 4
	})
	// A slow request on worker 3 finishes although worker 3 is scaled away.
	slow := make(chan string, 1)
	inFlight := make(chan struct{})
	go func() {
		// Find a connection that worker 3 serves, then ask it for a slow answer.
		for {
			c, err := net.Dial("tcp", s.Addr().String())
			if err != nil {
				slow <- err.Error()
				return
			}
			r := bufio.NewReader(c)
			fmt.Fprint(c, "GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
			resp, err := http.ReadResponse(r, nil)
			if err != nil {
				slow <- err.Error()
				return
			}
			pid, _ := io.ReadAll(resp.Body)
			if string(pid) != strconv.Itoa(ws[3].PID) {
				c.Close()
				continue
			}
			defer c.Close()
			fmt.Fprint(c, "GET /sleep?d=500ms HTTP/1.1\r\nHost: t\r\n\r\n")
			if resp, err = http.ReadResponse(r, nil); err != nil {
				slow <- err.Error()
				return
			}
			close(inFlight) // the header came: the handler is sleeping
			b, _ := io.ReadAll(resp.Body)
			slow <- string(b)
			return
		}
	}()
	select {
	case <-inFlight:
	case err := <-slow:
		t.Fatalf("slow request: %s", err)
	}
	if err := s.Scale(context.Background(), 1); err != nil {
		t.Fatalf("Scale(1): %v", err)
	}
	if got := <-slow; got != "done" {
		t.Errorf("in-flight request on a scaled-away worker: %q, want \"done\"", got)
	}
	if ws := s.Workers(); len(ws) != 1 || !ws[0].Healthy {
		t.Fatalf("after Scale(1): %+v", ws)
	}
	for _, w := range ws[1:] {
		if alive(w.PID) {
			t.Errorf("scaled-away worker %d (pid %d) still runs", w.Index, w.PID)
		}
	}
	n := res.sent.Load()
	waitFor(t, 5*time.Second, "load on one worker", func() bool { return res.sent.Load() > n+100 })
	close(stop)
	wait()
	t.Logf("scaling 2 → 4 → 1 under load: %d requests sent, %d failed", res.sent.Load(), res.failed.Load())
	if res.failed.Load() != 0 {
		t.Errorf("%d requests failed; first: %v", res.failed.Load(), res.firstErr)
	}
	if err := s.Scale(context.Background(), 0); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("Scale(0) = %v, want ErrInvalidOption", err)
	}
}

// Issue 5, point 4: SIGTTIN adds a worker, SIGTTOU removes one.
func TestSIGTTINAndSIGTTOUScale(t *testing.T) {
	p := startPrimaryProcess(t, 2, nil)
	p.cmd.Process.Signal(syscall.SIGTTIN)
	seen := map[string]bool{}
	waitFor(t, 10*time.Second, "answers from 3 workers", func() bool {
		_, pid := get(t, p.addr, "/pid")
		seen[pid] = true
		return len(seen) == 3
	})
	added := 0
	for pid := range seen {
		if n, _ := strconv.Atoi(pid); n != p.pids[0] && n != p.pids[1] {
			added = n
		}
	}
	// One signal at a time: the kernel merges a signal sent again before
	// the first was delivered.
	p.cmd.Process.Signal(syscall.SIGTTOU)
	waitFor(t, 10*time.Second, "the added worker gone", func() bool { return !alive(added) })
	p.cmd.Process.Signal(syscall.SIGTTOU)
	waitFor(t, 10*time.Second, "worker 1 gone", func() bool { return !alive(p.pids[1]) })
	for range 6 {
		if _, pid := get(t, p.addr, "/pid"); pid != strconv.Itoa(p.pids[0]) {
			t.Fatalf("answer from %s, want only worker 0 (%d)", pid, p.pids[0])
		}
	}
}

// Issue 11, point 1: a hijacked connection (a WebSocket, a CONNECT
// tunnel, an upgraded echo here) lives on through a rolling restart: the
// draining worker keeps serving it until it ends (or the shutdown timeout
// passes), while new connections already go to the new worker. It used to
// be cut at once: the worker counted it as closed when it was hijacked.
func TestHijackedConnectionSurvivesRestart(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithShutdownTimeout(20*time.Second))
	addr := s.Addr().String()
	old := s.Workers()[0].PID
	ws := dialRaw(t, addr)
	upgrade(t, ws, []byte(upgradeHead))
	if err := ws.echo("before"); err != nil {
		t.Fatal(err)
	}
	restarted := make(chan error, 1)
	go func() { restarted <- s.Restart(context.Background()) }()
	waitWorkers(t, s, 10*time.Second, "the new worker in rotation", func(w []WorkerInfo) bool {
		return w[0].PID != old && w[0].State == WorkerReady
	})
	if pid, _ := strconv.Atoi(dialRaw(t, addr).roundTrip(t, "/pid")); pid == old {
		t.Fatal("a new connection went to the draining worker")
	}
	time.Sleep(300 * time.Millisecond) // the old worker drains meanwhile
	if err := ws.echo("during the drain"); err != nil {
		t.Fatalf("the hijacked connection did not survive the restart: %v", err)
	}
	if !alive(old) {
		t.Fatal("the old worker exited while its hijacked connection was open")
	}
	ws.Close()
	select {
	case err := <-restarted:
		if err != nil {
			t.Fatalf("Restart: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Restart still waits 10s after the hijacked connection closed")
	}
}

// Issue 11, point 3: keep-alive clients that do not retry lose nothing to
// a rolling restart. A draining worker used to close idle keep-alive
// connections at once, racing each client's next request (EOF or a
// reset, and ab, wrk and non-idempotent requests do not retry). Now it
// answers the next request on each connection with Connection: close,
// and closes a connection only once it has been idle for a while with
// nothing unread.
func TestKeepAliveClientsLoseNothingToRestarts(t *testing.T) {
	s := startTest(t, WithShutdownTimeout(10*time.Second))
	addr := s.Addr().String()
	const clients = 20
	var (
		stop            atomic.Bool
		sent, lost, fin atomic.Int64
		wg              sync.WaitGroup
		errMu           sync.Mutex
		firstErrs       []string
	)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := mrand.New(mrand.NewPCG(uint64(i), 7))
			var c net.Conn
			var r *bufio.Reader
			for !stop.Load() {
				if c == nil {
					var err error
					if c, err = net.DialTimeout("tcp", addr, time.Second); err != nil {
						lost.Add(1)
						continue
					}
					r = bufio.NewReader(c)
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				sent.Add(1)
				_, err := io.WriteString(c, "GET /pid HTTP/1.1\r\nHost: test\r\n\r\n")
				var resp *http.Response
				if err == nil {
					resp, err = http.ReadResponse(r, nil)
				}
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil {
					lost.Add(1)
					errMu.Lock()
					if len(firstErrs) < 5 {
						firstErrs = append(firstErrs, err.Error())
					}
					errMu.Unlock()
					c.Close()
					c = nil
					continue
				}
				if resp.Close { // the server ends the connection: a new one
					fin.Add(1)
					c.Close()
					c = nil
				}
				time.Sleep(time.Duration(rnd.IntN(3000)) * time.Microsecond)
			}
			if c != nil {
				c.Close()
			}
		}()
	}
	for range 3 {
		before := sent.Load()
		waitFor(t, 10*time.Second, "requests flowing", func() bool { return sent.Load() > before+200 })
		if err := s.Restart(context.Background()); err != nil {
			t.Errorf("Restart: %v", err)
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d requests on %d keep-alive connections through 3 restarts: %d lost, %d connections ended by Connection: close",
		sent.Load(), clients, lost.Load(), fin.Load())
	if lost.Load() != 0 {
		t.Fatalf("%d requests lost (first errors: %v)", lost.Load(), firstErrs)
	}
}

// freePorts returns a base port with n free consecutive ports after it.
func freePorts(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 100; try++ {
		base := 20000 + mrand.IntN(30000)
		var lns []net.Listener
		for i := range n {
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(base+i)))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		for _, ln := range lns {
			ln.Close()
		}
		if len(lns) == n {
			return base
		}
	}
	t.Fatal("no free port range")
	return 0
}

// Issue 11, point 7: with WithBaseWorkerPort every operation works. The
// successor used to be spawned on base+i while its predecessor still held
// the port: Restart failed with "address already in use", and recycling
// retried on every heartbeat. The primary now holds each fixed port and
// every process of the slot serves on it.
func TestFixedWorkerPortsRestartAndRecycle(t *testing.T) {
	t.Run("restart", func(t *testing.T) {
		base := freePorts(t, 2)
		s := startTest(t, WithBaseWorkerPort(base))
		var res loadResult
		stop := make(chan struct{})
		wait := runLoad(s.Addr().String(), "/pid", stop, &res)
		before := s.Workers()
		for range 2 {
			if err := s.Restart(context.Background()); err != nil {
				t.Fatalf("Restart: %v", err)
			}
		}
		close(stop)
		wait()
		after := s.Workers()
		for i, w := range after {
			if w.PID == before[i].PID || w.Addr != net.JoinHostPort("127.0.0.1", strconv.Itoa(base+i)) {
				t.Errorf("worker %d: pid %d (was %d), addr %s, want a new process on port %d", i, w.PID, before[i].PID, w.Addr, base+i)
			}
		}
		t.Logf("two restarts on fixed ports: %d requests, %d failed", res.sent.Load(), res.failed.Load())
		if res.failed.Load() != 0 {
			t.Errorf("%d requests failed; first: %v", res.failed.Load(), res.firstErr)
		}
	})
	t.Run("recycle", func(t *testing.T) {
		s := startTest(t, WithBaseWorkerPort(freePorts(t, 2)), WithMaxRequests(30, 10))
		recycleUnderLoad(t, s, "request count, fixed ports")
	})
}

// Issue 11, point 2: long handlers learn that a drain began through the
// standard hook: functions registered with the RegisterOnShutdown of the
// server given to WithServer run when the worker begins to drain. An SSE
// handler sends a last event and returns; the restart then takes no
// longer than that.
func TestSSEHandlerSaysGoodbyeOnRestart(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithShutdownTimeout(20*time.Second), WithWorkerEnv(envTestServer+"=hooks"))
	resp, err := http.Get("http://" + s.Addr().String() + "/sse-goodbye")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if line, err := r.ReadString('\n'); err != nil || line != "data: tick\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	start := time.Now()
	restarted := make(chan error, 1)
	go func() { restarted <- s.Restart(context.Background()) }()
	var bye bool
	for {
		line, err := r.ReadString('\n')
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("stream ended with %v, want a clean end", err)
		}
		bye = bye || line == "event: bye\n"
	}
	if !bye {
		t.Fatal("the stream ended without the goodbye event")
	}
	if err := <-restarted; err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Restart took %v, as if the stream had held on to the shutdown timeout", d)
	}
}

// Issue 11, point 2: a WebSocket handler (github.com/coder/websocket)
// closes with 1001 (going away) when the drain begins, through the
// primary, and the client sees that close code.
func TestWebSocketClosesGoingAwayOnRestart(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithShutdownTimeout(20*time.Second), WithWorkerEnv(envTestServer+"=hooks"))
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws://"+s.Addr().String()+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	if err := c.Write(ctx, websocket.MessageText, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, msg, err := c.Read(ctx); err != nil || string(msg) != "hello" {
		t.Fatalf("echo %q, %v", msg, err)
	}
	restarted := make(chan error, 1)
	go func() { restarted <- s.Restart(context.Background()) }()
	_, _, err = c.Read(ctx)
	if status := websocket.CloseStatus(err); status != websocket.StatusGoingAway {
		t.Fatalf("read after the restart began: %v (close status %v), want 1001 going away", err, status)
	}
	if err := <-restarted; err != nil {
		t.Fatalf("Restart: %v", err)
	}
}

// Issue 12: the timeouts of the program's own server take effect in the
// workers, through the primary: an idle keep-alive connection is closed at
// its IdleTimeout, a client that does not finish its head at its
// ReadHeaderTimeout, and the primary lets go of both.
func TestUserServerTimeouts(t *testing.T) {
	s := startTest(t, WithWorkerEnv(envTestServer+"=idle=300ms;readheader=300ms"))
	addr := s.Addr().String()
	idle := dialRaw(t, addr)
	idle.roundTrip(t, "/pid")
	slow := dialRaw(t, addr)
	fmt.Fprint(slow, "GET / HTTP/1.1\r\nHost: te") // and nothing more
	for name, c := range map[string]*rawConn{"idle keep-alive": idle, "slow head": slow} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		_, err := io.Copy(io.Discard, c.r)
		if err != nil {
			t.Errorf("%s connection: %v, want it closed by the worker", name, err)
		}
		t.Logf("%s connection closed after %v", name, time.Since(start).Round(time.Millisecond))
	}
	waitFor(t, 5*time.Second, "the primary to let go of both", func() bool { return activeTotal(s) == 0 })
}

// The slot's socket on a fixed port is shared by the primary and every
// process of the slot, so its flags are shared too. exec.Cmd calls Fd on
// inherited files, which turned it to blocking mode: a worker could then
// block in accept(2), and its drain in Close, until the next connection.
// It travels over the hand-off socket instead and stays non-blocking.
func TestFixedWorkerPortStaysNonBlocking(t *testing.T) {
	s := startTest(t, WithBaseWorkerPort(freePorts(t, 2)))
	if err := s.Restart(context.Background()); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	s.p.fixedMu.Lock()
	ln := s.p.fixedLns[0]
	s.p.fixedMu.Unlock()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	rc.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK == 0 {
		t.Fatal("the slot's shared listening socket is in blocking mode")
	}
}

// A download that a slow client has not finished when a rolling restart
// begins keeps its worker until it ends: the drain waits for it, and the
// client gets every byte. (64 MiB is more than the sockets on the way
// hold, so the handler is still writing: in hand-off mode the client's
// socket takes about 128 KiB unsent (TCP_NOTSENT_LOWAT); in splice mode
// the worker's socket to the primary takes its buffer's worth, the
// primary as much as the client takes, and the client's socket as in
// hand-off mode.)
func TestSlowDownloadFinishesAcrossRestart(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithShutdownTimeout(20*time.Second))
	old := s.Workers()[0].PID
	const size, first = 64 << 20, 64 << 10
	restarted := make(chan error, 1)
	done := make(chan struct{})
	t.Cleanup(func() { <-done }) // after the download's connection closes (a later cleanup runs first)
	body := startDownload(t, s.Addr().String(), size, first)
	go func() {
		defer close(done)
		restarted <- s.Restart(context.Background())
	}()
	waitWorkers(t, s, 10*time.Second, "the new worker in rotation", func(w []WorkerInfo) bool {
		return w[0].PID != old && w[0].State == WorkerReady
	})
	select {
	case err := <-restarted:
		t.Fatalf("Restart returned (%v) while a download was under way", err)
	default:
	}
	if !alive(old) {
		t.Fatal("the old worker exited while a download was under way")
	}
	if n, err := io.Copy(io.Discard, body); err != nil || n != size-first {
		t.Fatalf("read %d more bytes after the restart began, %v; want %d", n, err, size-first)
	}
	select {
	case err := <-restarted:
		if err != nil {
			t.Fatalf("Restart: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Restart still waits 10s after the download ended")
	}
}

// What the drain of TestSlowDownloadFinishesAcrossRestart cannot wait
// for: a download still under way when the shutdown timeout passes is
// cut, and the client sees a short body, not a complete one.
func TestShutdownTimeoutCutsASlowDownload(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithShutdownTimeout(300*time.Millisecond))
	old := s.Workers()[0].PID
	const size, first = 64 << 20, 64 << 10
	body := startDownload(t, s.Addr().String(), size, first)
	err := s.Restart(context.Background())
	t.Logf("Restart: %v", err)
	waitFor(t, 10*time.Second, "the old worker gone", func() bool { return !alive(old) })
	n, err := io.Copy(io.Discard, body)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) || n >= size-first {
		t.Fatalf("read %d more bytes after the timeout, %v; want fewer than %d and the connection's end", n, err, size-first)
	}
	t.Logf("the client got %d of %d bytes, then %v", first+n, size, err)
}

// startDownload asks addr for size bytes (/download) and reads the
// head and the first bytes of the body; the rest is for the test to read.
func startDownload(t *testing.T, addr string, size, first int) io.Reader {
	t.Helper()
	c, err := dialChaos(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	fmt.Fprintf(c, "GET /download?n=%d HTTP/1.1\r\nHost: test\r\n\r\n", size)
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil || resp.StatusCode != 200 || resp.ContentLength != int64(size) {
		t.Fatalf("download: %v, %v", resp, err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, first)); err != nil {
		t.Fatal(err)
	}
	return resp.Body
}
