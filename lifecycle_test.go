//go:build unix

package defuss

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
		if _, err := fmt.Sscanf(body, "pid=%d slot=%d procs=%d remote=%s", &pid, &slot, &gmp, &remote); err != nil {
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
	waitRefused(t, addr, 5*time.Second, "listener closed")
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "done" {
		t.Fatalf("in-flight response body %q, %v; want \"done\"", body, err)
	}
	if d := time.Since(start); d < 2*time.Second {
		t.Errorf("response after %v, before the handler's 2s", d)
	}
	if err := s.Wait(); err != nil {
		t.Errorf("Wait = %v, want nil", err)
	}
	for _, w := range s.Workers() {
		if w.PID != 0 || w.State != WorkerDown {
			t.Errorf("after Wait, slot %d: %+v", w.Index, w)
		}
	}
}

// Behaviour 8: kill -9 of a worker under load. New connections keep
// succeeding (a dial refused by the dead worker goes to the other one),
// the slot is ready again with a new process within 1s, and the only
// requests that may fail are those that started before the primary saw
// the worker die.
func TestKillWorkerUnderLoad(t *testing.T) {
	s := startTest(t)
	addr := s.Addr().String()
	victim := s.Workers()[0]

	type failure struct {
		start time.Time
		err   error
	}
	var (
		mu       sync.Mutex
		failures []failure
		sent     atomic.Int64
	)
	stop := make(chan struct{})
	var load sync.WaitGroup
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
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
				start := time.Now()
				sent.Add(1)
				resp, err := client.Get("http://" + addr + "/pid")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, failure{start, err})
					mu.Unlock()
				}
			}
		}()
	}
	waitFor(t, 5*time.Second, "load running", func() bool { return sent.Load() > 50 })
	killed := time.Now()
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var down time.Time
	ws := waitWorkers(t, s, 5*time.Second, "slot 0 ready with a new process", func(ws []WorkerInfo) bool {
		if down.IsZero() && ws[0].PID != victim.PID {
			down = time.Now()
		}
		return ws[0].Healthy && ws[0].PID != victim.PID && ws[0].PID != 0
	})
	back := time.Since(killed)
	// Keep the load on the respawned pool for a moment.
	n := sent.Load()
	waitFor(t, 5*time.Second, "load on the respawned pool", func() bool { return sent.Load() > n+100 })
	close(stop)
	load.Wait()
	t.Logf("sent %d requests, %d failed; slot 0 back in %v (pid %d → %d, restarts %d)",
		sent.Load(), len(failures), back.Round(time.Millisecond), victim.PID, ws[0].PID, ws[0].Restarts)
	if back > time.Second {
		t.Errorf("slot 0 ready again after %v, want within 1s", back)
	}
	if ws[0].Restarts != 1 {
		t.Errorf("Restarts = %d, want 1", ws[0].Restarts)
	}
	for _, f := range failures {
		if f.start.After(down) {
			t.Errorf("request started %v after the primary saw the worker die failed: %v", f.start.Sub(down), f.err)
		}
	}
}

// Behaviour 8: a worker that cannot bind its port makes Start fail with
// the reason, and no process is left behind.
func TestStartFailsWhenWorkerPortTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	_, err = Start(http.NotFoundHandler(), WithAddr("127.0.0.1:0"), WithWorkers(2),
		WithBaseWorkerPort(port-1), // worker 0 gets port-1 (likely free), worker 1 the taken port
		WithSignalHandling(false), WithLogger(testLogger(t)),
		WithWorkerEnv("GORACE=atexit_sleep_ms=0"))
	if !errors.Is(err, ErrWorkerStart) {
		t.Fatalf("Start = %v, want an error wrapping ErrWorkerStart", err)
	}
	if !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("error %q does not say why", err)
	}
	assertNoChildren(t)
}

// Behaviour 8: a worker that exits before it reports ready makes Start
// fail, and no process is left behind.
func TestStartFailsWhenWorkerExits(t *testing.T) {
	_, err := Start(http.NotFoundHandler(), WithAddr("127.0.0.1:0"), WithWorkers(2),
		WithSignalHandling(false), WithLogger(testLogger(t)),
		WithWorkerEnv("GORACE=atexit_sleep_ms=0", envTestApp+"=exit-before-start"))
	if !errors.Is(err, ErrWorkerStart) || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("Start = %v, want ErrWorkerStart with the exit status", err)
	}
	assertNoChildren(t)
}

// A worker that never reports ready is killed after the start timeout,
// and Start says so.
func TestStartTimeout(t *testing.T) {
	start := time.Now()
	_, err := Start(http.NotFoundHandler(), WithAddr("127.0.0.1:0"), WithWorkers(1),
		WithStartTimeout(300*time.Millisecond), WithSignalHandling(false), WithLogger(testLogger(t)),
		WithWorkerEnv("GORACE=atexit_sleep_ms=0", envTestApp+"=hang-before-start"))
	if !errors.Is(err, ErrWorkerStart) || !strings.Contains(err.Error(), "no ready report") {
		t.Fatalf("Start = %v, want ErrWorkerStart naming the start timeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Start took %v with a 300ms start timeout", d)
	}
	assertNoChildren(t)
}

// Behaviour 9: when the primary is killed with SIGKILL, every worker exits
// within 1s.
func TestPrimarySIGKILLLeavesNoWorkers(t *testing.T) {
	p := startPrimaryProcess(t, 2, nil)
	if code, _ := get(t, p.addr, "/pid"); code != 200 {
		t.Fatalf("status %d", code)
	}
	p.cmd.Process.Kill()
	killed := time.Now()
	p.wait()
	waitFor(t, 2*time.Second, "workers to exit", func() bool {
		for _, pid := range p.pids {
			if alive(pid) {
				return false
			}
		}
		return true
	})
	if d := time.Since(killed); d > time.Second {
		t.Errorf("workers outlived the primary by %v, want < 1s", d)
	}
}

// Behaviour 10 (signals): SIGTERM lets the in-flight request finish with
// 200 and refuses new connections; the primary exits 0 with no worker
// left. A second signal stops at once.
func TestSIGTERMDrainsThenSecondSignalStopsAtOnce(t *testing.T) {
	t.Run("graceful", func(t *testing.T) {
		p := startPrimaryProcess(t, 2, nil)
		c := dialRaw(t, p.addr)
		fmt.Fprint(c, "GET /sleep?d=2s HTTP/1.1\r\nHost: test\r\n\r\n")
		resp, err := http.ReadResponse(c.r, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("response %v, %v", resp, err)
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		waitRefused(t, p.addr, 5*time.Second, "listener closed")
		if body, err := io.ReadAll(resp.Body); err != nil || string(body) != "done" {
			t.Fatalf("in-flight body %q, %v; want \"done\"", body, err)
		}
		if line, _ := p.readLine(); line != "stopped\n" {
			t.Errorf("primary said %q, want \"stopped\"", line)
		}
		if err := p.wait(); err != nil {
			t.Fatalf("primary exited with %v, want 0", err)
		}
		for _, pid := range p.pids {
			if alive(pid) {
				t.Errorf("worker %d still running after the primary exited", pid)
			}
		}
	})
	t.Run("second signal", func(t *testing.T) {
		p := startPrimaryProcess(t, 2, nil)
		c := dialRaw(t, p.addr)
		fmt.Fprint(c, "GET /sleep?d=60s HTTP/1.1\r\nHost: test\r\n\r\n")
		if resp, err := http.ReadResponse(c.r, nil); err != nil || resp.StatusCode != 200 {
			t.Fatalf("response %v, %v", resp, err)
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		waitRefused(t, p.addr, 5*time.Second, "listener closed")
		start := time.Now()
		p.cmd.Process.Signal(syscall.SIGINT)
		p.wait()
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("primary took %v to stop after the second signal (shutdown timeout 5s)", d)
		}
		waitFor(t, time.Second, "workers gone", func() bool {
			for _, pid := range p.pids {
				if alive(pid) {
					return false
				}
			}
			return true
		})
	})
}

// Behaviour 6: connection counts stay exact while connections live across
// many heartbeats and a respawn, return to 0 when they close, and
// LeastConnections then spreads new connections.
func TestConnectionCountsStayExact(t *testing.T) {
	s := startTest(t, WithBalancer(LeastConnections()))
	addr := s.Addr().String()
	total := func(ws []WorkerInfo) (n int64) {
		for i := range ws {
			n += ws[i].ActiveConnections()
		}
		return n
	}
	conns := make([]*rawConn, 50)
	bySlot := map[int][]*rawConn{}
	for i := range conns {
		conns[i] = dialRaw(t, addr)
		pid, _ := strconv.Atoi(conns[i].roundTrip(t, "/pid"))
		for _, w := range s.Workers() {
			if w.PID == pid {
				bySlot[w.Index] = append(bySlot[w.Index], conns[i])
			}
		}
	}
	if len(bySlot[0]) != 25 || len(bySlot[1]) != 25 {
		t.Fatalf("LeastConnections spread 50 held connections %d/%d, want 25/25", len(bySlot[0]), len(bySlot[1]))
	}
	// Hold them through 10 heartbeats of each worker.
	beats := map[int]map[time.Time]bool{0: {}, 1: {}}
	waitWorkers(t, s, 10*time.Second, "10 heartbeats per worker", func(ws []WorkerInfo) bool {
		if n := total(ws); n != 50 {
			t.Fatalf("connection count %d while 50 are held", n)
		}
		for _, w := range ws {
			beats[w.Index][w.LastHeartbeat] = true
		}
		return len(beats[0]) > 10 && len(beats[1]) > 10
	})
	// A respawn of worker 1 ends its connections, and only those.
	victim := s.Workers()[1].PID
	syscall.Kill(victim, syscall.SIGKILL)
	waitWorkers(t, s, 5*time.Second, "worker 1 respawned", func(ws []WorkerInfo) bool {
		return ws[1].Healthy && ws[1].PID != victim
	})
	waitFor(t, 5*time.Second, "worker 1's count back to 0", func() bool {
		ws := s.Workers()
		return ws[1].ActiveConnections() == 0
	})
	if n := s.Workers()[0].ActiveConnections(); n != 25 {
		t.Fatalf("worker 0 count %d after worker 1's respawn, want 25", n)
	}
	for _, c := range bySlot[0] {
		c.Close()
	}
	waitFor(t, 5*time.Second, "counts back to 0", func() bool { return total(s.Workers()) == 0 })
	// Now hold 3 connections on whatever LeastConnections picks: with both
	// at 0 the first goes to either (ties are broken at random), the second
	// to the other one, the third to either.
	var pids []int
	for range 3 {
		c := dialRaw(t, addr)
		pid, _ := strconv.Atoi(c.roundTrip(t, "/pid"))
		pids = append(pids, pid)
	}
	ws := s.Workers()
	isWorker := func(pid int) bool { return pid == ws[0].PID || pid == ws[1].PID }
	if !isWorker(pids[0]) || !isWorker(pids[1]) || !isWorker(pids[2]) || pids[0] == pids[1] {
		t.Errorf("LeastConnections sent held connections to %v, want the first two to different workers of %d,%d", pids, ws[0].PID, ws[1].PID)
	}
}

// Behaviour 2: a worker speaks only for its own slot. A frame that claims
// another slot is logged and marks the sender unhealthy; the claimed slot
// is untouched.
func TestForgedFrameMarksSenderUnhealthy(t *testing.T) {
	// Heartbeats far apart, so the sender is not healthy again at once.
	m, opt := newMetrics(t)
	s := startTest(t, WithHeartbeat(time.Hour, 2*time.Hour), opt)
	before := s.Workers()
	// Find a connection served by worker 0 and make it forge a frame for slot 1.
	for {
		c := dialRaw(t, s.Addr().String())
		pid, _ := strconv.Atoi(c.roundTrip(t, "/pid"))
		if pid != before[0].PID {
			continue
		}
		if got := c.roundTrip(t, "/forge?slot=1"); got != "forged" {
			t.Fatalf("forge: %q", got)
		}
		break
	}
	ws := waitWorkers(t, s, 5*time.Second, "worker 0 unhealthy", func(ws []WorkerInfo) bool {
		return ws[0].State == WorkerUnhealthy
	})
	if ws[0].Healthy || ws[0].PID != before[0].PID {
		t.Errorf("forger: %+v", ws[0])
	}
	if ws[1].State != WorkerReady || ws[1].PID != before[1].PID || ws[1].Addr != before[1].Addr ||
		!ws[1].LastHeartbeat.Equal(before[1].LastHeartbeat) {
		t.Errorf("slot 1 changed by a forged frame: before %+v, after %+v", before[1], ws[1])
	}
	if got := points(t, m.collect(), "defuss.worker.bad_frames", "{frame}"); got["defuss.worker.index=0"].value != 1 || len(got) != 1 {
		t.Errorf("worker.bad_frames = %v, want 1 from worker 0", got)
	}
	// New connections all go to the healthy worker.
	for range 4 {
		if _, pid := get(t, s.Addr().String(), "/pid"); pid != strconv.Itoa(before[1].PID) {
			t.Fatalf("connection went to %s, want the healthy worker %d", pid, before[1].PID)
		}
	}
}

// Behaviour 2: a frame that breaks the framing (a length over the cap)
// leaves nothing to trust on that pipe: the worker is killed and replaced,
// and the restart is counted with reason "protocol".
func TestBrokenFramingReplacesWorker(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt)
	before := s.Workers()
	for {
		c := dialRaw(t, s.Addr().String())
		pid, _ := strconv.Atoi(c.roundTrip(t, "/pid"))
		if pid != before[0].PID {
			continue
		}
		// The primary may kill the worker before its answer leaves.
		fmt.Fprint(c, "GET /forge?oversize=1 HTTP/1.1\r\nHost: test\r\n\r\n")
		break
	}
	waitWorkers(t, s, 5*time.Second, "worker 0 replaced", func(ws []WorkerInfo) bool {
		return ws[0].Healthy && ws[0].PID != before[0].PID && ws[0].PID != 0
	})
	if got := points(t, m.collect(), "defuss.worker.restarts", "{restart}"); got["defuss.reason=protocol,defuss.worker.index=0"].value != 1 || len(got) != 1 {
		t.Errorf("worker.restarts = %v, want 1 for reason protocol on worker 0", got)
	}
	if ws := s.Workers(); ws[1].PID != before[1].PID {
		t.Errorf("worker 1 was replaced too: %+v", ws[1])
	}
}

// WithRespawn(false): a worker that dies is not replaced; once none is
// left the primary stops, and Wait says why.
func TestNoRespawnStopsWhenNoWorkerIsLeft(t *testing.T) {
	s := startTest(t, WithWorkers(1), WithRespawn(false))
	pid := s.Workers()[0].PID
	syscall.Kill(pid, syscall.SIGKILL)
	done := make(chan error, 1)
	go func() { done <- s.Wait() }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNoWorkers) {
			t.Fatalf("Wait = %v, want ErrNoWorkers", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the primary kept running with no worker and respawn off")
	}
	if w := s.Workers()[0]; w.PID != 0 || w.State != WorkerDown || w.Restarts != 0 {
		t.Errorf("slot after the worker died: %+v", w)
	}
}

// TestStartNilHandler checks that Start validates before it does
// anything: a nil handler is an invalid option, reported together with
// the bad options, and nothing is spawned or listened on.
func TestStartNilHandler(t *testing.T) {
	before := children()
	tests := []struct {
		name string
		opts []Option
		want []string
	}{
		{"nil handler", []Option{WithAddr("127.0.0.1:0")}, []string{"handler"}},
		{"nil handler and a bad option", []Option{WithAddr("127.0.0.1:0"), WithWorkers(-1)}, []string{"handler", "WithWorkers"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Start(nil, tt.opts...)
			if s != nil {
				t.Errorf("Start(nil) returned a server")
				s.Shutdown(t.Context())
			}
			if !errors.Is(err, ErrInvalidOption) {
				t.Fatalf("Start(nil) error = %v, want one wrapping ErrInvalidOption", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %s", err, w)
				}
			}
		})
	}
	if after := children(); len(after) > len(before) {
		t.Errorf("Start(nil) left child processes: %v (before: %v)", after, before)
	}
}

// Issue 11, point 6: Server.Shutdown in a worker with a context that is
// already cancelled (and has no deadline) stops at once, as documented: it
// used to drain for the whole shutdown timeout while a slow request held
// on.
func TestWorkerShutdownWithCancelledContextStopsAtOnce(t *testing.T) {
	s := startTest(t, WithShutdownTimeout(20*time.Second))
	addr := s.Addr().String()
	ctl := dialRaw(t, addr)
	pid, _ := strconv.Atoi(ctl.roundTrip(t, "/pid"))
	// A slow request on the same worker.
	var slow *rawConn
	for slow == nil {
		c := dialRaw(t, addr)
		if p, _ := strconv.Atoi(c.roundTrip(t, "/pid")); p == pid {
			slow = c
		} else {
			c.Close()
		}
	}
	fmt.Fprintf(slow, "GET /sleep?d=60s HTTP/1.1\r\nHost: test\r\n\r\n")
	if _, err := http.ReadResponse(slow.r, nil); err != nil { // the header comes at once
		t.Fatal(err)
	}
	start := time.Now()
	if got := ctl.roundTrip(t, "/shutdown-cancelled"); got != "ok" {
		t.Fatalf("/shutdown-cancelled answered %q", got)
	}
	waitFor(t, 10*time.Second, "the worker to exit", func() bool { return !alive(pid) })
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the worker took %v to stop, want at once (the shutdown timeout is 20s)", d)
	}
}

// Issue 11, points 4 and 5: systemd's KillMode=control-group (and docker,
// and many supervisors) send SIGTERM to the primary and every worker at
// once. The workers used to drain on their own: the primary answered 503
// during the drain delay and respawned every worker as a crash. Now a
// worker leaves the drain to its primary: during the delay everything but
// the health path is served, nothing is respawned, and all exit.
func TestSIGTERMToEveryProcessAtOnce(t *testing.T) {
	logs, err := os.CreateTemp(t.TempDir(), "primary-*.log")
	if err != nil {
		t.Fatal(err)
	}
	p := startPrimaryProcess(t, 2, logs, envTestPrimaryOpts+"=health=/healthz;drain=1500ms")
	get := func(path string) (int, error) {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, fmt.Errorf("read response: %w", err)
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := get("/"); code != 200 {
		t.Fatalf("before the signals: %d, %v", code, err)
	}
	for _, pid := range append([]int{p.cmd.Process.Pid}, p.pids...) {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	signalled := time.Now()
	var ok, health int
	var failures []string
	for time.Since(signalled) < 10*time.Second {
		code, err := get("/")
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "dial" {
			break // the listener closed after the drain delay
		}
		switch {
		case err != nil:
			failures = append(failures, err.Error())
		case code != 200:
			failures = append(failures, fmt.Sprintf("status %d", code))
		default:
			ok++
		}
		if health == 0 {
			if code, err := get("/healthz"); err == nil && code == 503 {
				health++
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(failures) > 0 {
		t.Errorf("%d requests failed during the drain delay (%d served): %v", len(failures), ok, failures)
	}
	if ok < 20 {
		t.Errorf("only %d requests served during the 1.5s drain delay", ok)
	}
	if health == 0 {
		t.Error("the health path did not answer 503 during the drain delay")
	}
	if err := p.wait(); err != nil {
		t.Errorf("primary exited with %v, want 0", err)
	}
	for _, pid := range p.pids {
		waitFor(t, 2*time.Second, "worker gone", func() bool { return !alive(pid) })
	}
	out, _ := os.ReadFile(logs.Name())
	if bytes.Contains(out, []byte("respawning")) {
		t.Errorf("a worker was respawned during shutdown:\n%s", out)
	}
}

// Issue 11, point 12: the descriptors a worker inherits (the status and
// control pipes, with the secret, and the hand-off socket) are
// close-on-exec before any user code runs, so a child process started
// before Start does not get them.
func TestInheritedDescriptorsCloseOnExec(t *testing.T) {
	s := startTest(t, WithWorkerEnv(envTestApp+"=fdcheck"))
	if got := dialRaw(t, s.Addr().String()).roundTrip(t, "/fdcheck"); got != "none" {
		t.Fatalf("a child started before Start had fds %q open, want none", got)
	}
}

// Issue 12: Start's handler and WithServer's srv.Handler: one of them,
// not both; neither is the nil-handler error. Nothing is spawned.
func TestStartServerHandler(t *testing.T) {
	before := children()
	h := http.NotFoundHandler()
	for _, tc := range []struct {
		name    string
		handler http.Handler
		srv     *http.Server
		want    string
	}{
		{"both", h, &http.Server{Handler: h}, "srv.Handler"},
		{"neither", nil, &http.Server{}, "handler is nil"},
	} {
		s, err := Start(tc.handler, WithAddr("127.0.0.1:0"), WithServer(tc.srv))
		if s != nil {
			s.Shutdown(t.Context())
		}
		if !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Start = %v, want ErrInvalidOption mentioning %q", tc.name, err, tc.want)
		}
	}
	if after := children(); len(after) != len(before) {
		t.Errorf("Start spawned processes: %v", after)
	}
}

// A graceful stop resets no connection the kernel has already completed
// and whose request has come: those waiting in the listening socket's
// accept queue when the stop comes are served. The primary is stopped
// (SIGSTOP) while the clients connect and send their requests, so that
// they wait in its accept queue for certain when SIGTERM is handled; with
// no drain delay it closes the listener at once. (100 clients: an accept
// queue holds 128 where somaxconn is older Linux's default.)
func TestStopServesQueuedConnections(t *testing.T) {
	logs, err := os.CreateTemp(t.TempDir(), "primary-*.log")
	if err != nil {
		t.Fatal(err)
	}
	p := startPrimaryProcess(t, 1, logs)
	const n = 100
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err := syscall.Kill(p.cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for range n {
		c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
		if err != nil {
			syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT)
			t.Fatalf("dial %d: %v", len(conns), err)
		}
		conns = append(conns, c)
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
	}
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT)
	var failures []string
	for i, c := range conns {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			failures = append(failures, fmt.Sprintf("%d: %v", i, err))
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			failures = append(failures, fmt.Sprintf("%d: status %d", i, resp.StatusCode))
		}
	}
	if len(failures) > 0 {
		out, _ := os.ReadFile(logs.Name())
		t.Errorf("%d of %d connections queued at the stop were not served: %v\nprimary's log:\n%s", len(failures), n, failures[:min(len(failures), 5)], out)
	}
	if err := p.wait(); err != nil {
		t.Errorf("primary exited with %v, want 0", err)
	}
}
