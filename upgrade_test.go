//go:build unix

package defuss

// Issue 13: Upgrade, the whole server replaced in place, primary included.

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// runRawKeepAlive sends GET path from n raw keep-alive connections until
// stop is closed, counting in res: no client library that retries, so
// that a connection closed under a request shows as a failure. A
// connection the server ends with Connection: close is replaced by a new
// one. It returns a func that waits until all have stopped.
func runRawKeepAlive(addr, path string, n int, stop <-chan struct{}, res *loadResult) func() {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c net.Conn
			var r *bufio.Reader
			defer func() {
				if c != nil {
					c.Close()
				}
			}()
			for {
				select {
				case <-stop:
					return
				default:
				}
				res.sent.Add(1)
				var err error
				if c == nil {
					if c, err = net.DialTimeout("tcp", addr, 5*time.Second); err == nil {
						r = bufio.NewReader(c)
					}
				}
				var resp *http.Response
				var body []byte
				if err == nil {
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err = io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: test\r\n\r\n"); err == nil {
						resp, err = http.ReadResponse(r, nil)
					}
				}
				if err == nil {
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = errors.New("status " + resp.Status)
					}
				}
				res.record(body, err)
				if err != nil || resp.Close {
					if c != nil {
						c.Close()
					}
					c = nil
				}
			}
		}()
	}
	return wg.Wait
}

// successorOf reads p's stdout until the new primary of an upgrade prints
// its ready line, and returns its pid (from the PID file at pidFile, or
// found as the process whose workers are listed), address and workers. It
// registers a cleanup that stops the new primary with SIGTERM and fails
// if it or a worker of it is still alive 15s later.
func successorOf(t *testing.T, p *primaryProc, pidFile string) (pid int, addr string, workers []int) {
	t.Helper()
	p.stdout.SetReadDeadline(time.Now().Add(time.Minute))
	for {
		line, err := p.readLine()
		if err != nil {
			t.Fatalf("waiting for the new primary's ready line: %v after %q", err, line)
		}
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "ready" {
			addr = f[1]
			for _, s := range strings.Split(f[2], ",") {
				w, _ := strconv.Atoi(s)
				workers = append(workers, w)
			}
			break
		}
	}
	p.stdout.SetReadDeadline(time.Time{})
	ppid, _, ok := procStat(workers[0])
	if !ok {
		t.Fatalf("worker %d of the new primary not found", workers[0])
	}
	pid = ppid
	if pidFile != "" {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			t.Fatalf("PID file: %v", err)
		}
		if got, _ := strconv.Atoi(strings.TrimSpace(string(b))); got != pid {
			t.Errorf("PID file says %q; the new primary is %d", b, pid)
		}
	}
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(15 * time.Second)
		for _, q := range append([]int{pid}, workers...) {
			for alive(q) && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if alive(q) {
				t.Errorf("process %d of the upgraded server still alive 15s after SIGTERM", q)
				syscall.Kill(q, syscall.SIGKILL)
			}
		}
		if pidFile != "" {
			if _, err := os.Stat(pidFile); !os.IsNotExist(err) {
				t.Errorf("PID file after the new primary stopped: %v (want it removed)", err)
			}
		}
	})
	return pid, addr, workers
}

// Issue 13: SIGUSR2 under load, onto a different binary renamed over the
// running one. No request fails, on new connections or on keep-alive ones;
// afterwards every answer comes from the new build, the primary's pid has
// changed, the old primary and its workers are gone, and the PID file
// names the new primary.
func TestUpgradeUnderLoadOntoNewBinary(t *testing.T) {
	dir := t.TempDir()
	app, pidFile := filepath.Join(dir, "app"), filepath.Join(dir, "defuss.pid")
	v1 := copyBinary(t, app, "")
	old := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 2, nil, envTestPrimaryOpts+"=pidfile="+pidFile)
	oldPID := old.cmd.Process.Pid
	if b, _ := os.ReadFile(pidFile); strings.TrimSpace(string(b)) != strconv.Itoa(oldPID) {
		t.Fatalf("PID file says %q, want %d", b, oldPID)
	}
	if _, v := get(t, old.addr, "/version"); v != strconv.FormatInt(v1, 10) {
		t.Fatalf("version %s, want %d", v, v1)
	}

	var res loadResult
	stop := make(chan struct{})
	waitHTTP := runLoad(old.addr, "/version", stop, &res) // 2 on new connections, 2 keep-alive
	waitRaw := runRawKeepAlive(old.addr, "/version", 4, stop, &res)
	waitFor(t, 10*time.Second, "load running", func() bool { return res.sent.Load() > 200 })

	v2 := copyBinary(t, app, "defuss upgrade v2")
	began := time.Now()
	if err := old.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	newPID, addr, workers := successorOf(t, old, pidFile)
	if err := old.wait(); err != nil {
		t.Errorf("old primary: %v, want exit 0", err)
	}
	took := time.Since(began)
	if newPID == oldPID || addr != old.addr {
		t.Errorf("new primary %d on %s; old %d on %s", newPID, addr, oldPID, old.addr)
	}
	for _, w := range old.pids {
		if alive(w) {
			t.Errorf("worker %d of the old primary outlived it", w)
		}
	}
	// From here on, only the new build answers.
	res.mu.Lock()
	clear(res.versions)
	res.mu.Unlock()
	n := res.sent.Load()
	waitFor(t, 10*time.Second, "load after the upgrade", func() bool { return res.sent.Load() > n+300 })
	close(stop)
	waitHTTP()
	waitRaw()
	t.Logf("upgrade under load: %d requests sent, %d failed; SIGUSR2 to old primary's exit %v; answers after it: %v",
		res.sent.Load(), res.failed.Load(), took.Round(time.Millisecond), res.versions)
	if res.failed.Load() != 0 {
		t.Errorf("%d requests failed; first: %v", res.failed.Load(), res.firstErr)
	}
	if len(res.versions) != 1 || res.versions[strconv.FormatInt(v2, 10)] == 0 {
		t.Errorf("answers after the upgrade came from %v, want only %d", res.versions, v2)
	}
	if slices.ContainsFunc(workers, func(w int) bool { return slices.Contains(old.pids, w) }) {
		t.Errorf("new primary's workers %v include old ones %v", workers, old.pids)
	}
}

// Issue 13: a new binary whose primary fails its Start. The old server
// keeps serving with its pids and PID file unchanged, logs why, leaves no
// process of the failed one, and a later upgrade onto a good binary works.
func TestUpgradeFailingSuccessorKeepsServing(t *testing.T) {
	dir := t.TempDir()
	app, pidFile, flag := filepath.Join(dir, "app"), filepath.Join(dir, "defuss.pid"), filepath.Join(dir, "fail")
	copyBinary(t, app, "")
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	old := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 2, stderr, envTestPrimaryOpts+"=pidfile="+pidFile+";badsuccessor="+flag)
	oldPID := old.cmd.Process.Pid
	if err := old.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	var failed string // the old primary's log line
	waitFor(t, 30*time.Second, "the failed upgrade logged", func() bool {
		b, _ := os.ReadFile(stderr.Name())
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "upgrade failed") {
				failed = line
			}
		}
		return failed != ""
	})
	if !strings.Contains(failed, "WithWorkers(-1)") || !strings.Contains(failed, ErrWorkerStart.Error()) {
		t.Errorf("the old primary's log does not say why the upgrade failed: %s", failed)
	}
	t.Logf("the old primary logged: %s", failed)
	if b, _ := os.ReadFile(pidFile); strings.TrimSpace(string(b)) != strconv.Itoa(oldPID) {
		t.Errorf("PID file says %q after a failed upgrade, want %d", b, oldPID)
	}
	if kids := childrenOf(oldPID); !slices.Equal(sorted(kids), sorted(old.pids)) {
		t.Errorf("the old primary's children after the failed upgrade: %v, want its workers %v", kids, old.pids)
	}
	for i := range 20 {
		if _, body := get(t, old.addr, "/pid"); !slices.Contains(old.pids, atoi(body)) {
			t.Fatalf("request %d after the failed upgrade served by pid %s, not one of %v", i, body, old.pids)
		}
	}
	select {
	case <-old.exited:
		t.Fatalf("old primary exited: %v", old.waitErr)
	default:
	}

	// The binary is fixed: the next upgrade goes through.
	os.Remove(flag)
	if err := old.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	newPID, _, workers := successorOf(t, old, pidFile)
	if err := old.wait(); err != nil {
		t.Errorf("old primary after the second upgrade: %v, want exit 0", err)
	}
	if _, body := get(t, old.addr, "/pid"); newPID == oldPID || !slices.Contains(workers, atoi(body)) {
		t.Errorf("after the second upgrade: primary %d, served by %s, new workers %v", newPID, body, workers)
	}
}

// Issue 13: a stop wins over an upgrade. SIGUSR2 during the drain delay
// of a SIGTERM is ignored: the primary drains and exits 0, and no new
// primary is left (nothing else holds its stdout when it exits).
func TestUpgradeSignalDuringShutdownIgnored(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	copyBinary(t, app, "")
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	p := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 2, stderr, envTestPrimaryOpts+"=drain=2s", "DEFUSS_TEST_PRIMARY_DEBUG=1")
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 10*time.Second, "the drain delay", func() bool {
		b, _ := os.ReadFile(stderr.Name())
		return strings.Contains(string(b), "drain delay")
	})
	p.cmd.Process.Signal(syscall.SIGUSR2)
	p.stdout.SetReadDeadline(time.Now().Add(30 * time.Second))
	rest, err := io.ReadAll(p.stdout) // EOF once every holder of stdout has exited
	if err != nil {
		t.Fatalf("stdout: %v after %q", err, rest)
	}
	if string(rest) != "stopped\n" {
		t.Errorf("stdout after the ready line: %q, want only the old primary's \"stopped\"", rest)
	}
	if err := p.wait(); err != nil {
		t.Errorf("primary: %v, want exit 0", err)
	}
	b, _ := os.ReadFile(stderr.Name())
	if !strings.Contains(string(b), "signal ignored: shutting down") || strings.Contains(string(b), "new primary started") {
		t.Errorf("log of SIGUSR2 during the drain delay:\n%s", b)
	}
}

// Issue 13: a hijacked connection (a WebSocket, a tunnel) on the old
// primary lives on through an upgrade, as through SIGTERM: the old
// primary stops accepting but keeps relaying it (splice) or its worker
// keeps serving it (hand-off), and exits 0 once it closes, before the
// shutdown timeout (5s) would end it.
func TestUpgradeKeepsHijackedConnection(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	copyBinary(t, app, "")
	old := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 1, nil)
	ws := dialRaw(t, old.addr)
	upgrade(t, ws, []byte(upgradeHead))
	if err := ws.echo("before"); err != nil {
		t.Fatal(err)
	}
	old.cmd.Process.Signal(syscall.SIGUSR2)
	_, _, workers := successorOf(t, old, "")
	// Both primaries accept until the old one has taken in the new one's
	// "go" (Upgrade's doc), which can come a moment after the new one's
	// ready line: a connection may still reach the old workers until
	// then, and none may after.
	waitFor(t, 10*time.Second, "a new connection served by the new workers", func() bool {
		_, body := get(t, old.addr, "/pid")
		return slices.Contains(workers, atoi(body))
	})
	for range 10 {
		if _, body := get(t, old.addr, "/pid"); !slices.Contains(workers, atoi(body)) {
			t.Fatalf("a new connection went to %s, not to the new workers %v", body, workers)
		}
	}
	if err := ws.echo("after the upgrade"); err != nil {
		t.Fatalf("the hijacked connection did not survive the upgrade: %v", err)
	}
	select {
	case <-old.exited:
		t.Fatalf("the old primary exited with its hijacked connection open: %v", old.waitErr)
	default:
	}
	closed := time.Now()
	ws.Close()
	if err := old.wait(); err != nil {
		t.Errorf("old primary: %v, want exit 0", err)
	}
	if d := time.Since(closed); d > 4*time.Second {
		t.Errorf("the old primary took %v to exit after the hijacked connection closed", d)
	}
}

// Issue 13: the new primary of an upgrade can be upgraded in turn: its
// inherited descriptors and environment are its own, and a third
// generation takes over from it as it did from the first.
func TestUpgradeTwice(t *testing.T) {
	dir := t.TempDir()
	app, pidFile := filepath.Join(dir, "app"), filepath.Join(dir, "defuss.pid")
	copyBinary(t, app, "")
	first := startPrimaryCmd(t, exec.Command(app, "-test.run=^$"), 2, nil, envTestPrimaryOpts+"=pidfile="+pidFile)
	first.cmd.Process.Signal(syscall.SIGUSR2)
	second, _, secondWorkers := successorOf(t, first, pidFile)
	if err := first.wait(); err != nil {
		t.Errorf("first primary: %v, want exit 0", err)
	}
	v3 := copyBinary(t, app, "third")
	syscall.Kill(second, syscall.SIGUSR2)
	third, addr, thirdWorkers := successorOf(t, first, pidFile) // the same stdout, inherited
	waitFor(t, 15*time.Second, "the second primary's exit", func() bool { return !alive(second) })
	for _, w := range secondWorkers {
		if alive(w) {
			t.Errorf("worker %d of the second primary outlived it", w)
		}
	}
	if third == second || addr != first.addr {
		t.Errorf("third primary %d on %s; second %d, address %s", third, addr, second, first.addr)
	}
	for range 10 {
		if _, v := get(t, addr, "/version"); v != strconv.FormatInt(v3, 10) {
			t.Fatalf("after the second upgrade, version %s, want %d", v, v3)
		}
	}
	if _, body := get(t, addr, "/pid"); !slices.Contains(thirdWorkers, atoi(body)) {
		t.Errorf("served by %s, not by the third primary's workers %v", body, thirdWorkers)
	}
}

func atoi(s string) int { n, _ := strconv.Atoi(strings.TrimSpace(s)); return n }

// Issue 13: Upgrade onto binaries that cannot become a primary, called
// through the API: each returns an error wrapping ErrWorkerStart that says
// why, kills what it started, and leaves the server as it was.
func TestUpgradeBrokenBinary(t *testing.T) {
	cases := []struct {
		name, script string
		want         string
	}{
		{"exits", "#!/bin/sh\necho broken build >&2\nexit 3\n", "exit status 3"},
		{"not an executable", "\x7fELF garbage", "exec format error"},
		{"hangs", "#!/bin/sh\nexec sleep 60\n", "not ready within the start timeout"},
		{"answers garbage", "#!/bin/sh\necho nonsense >&4\nexec sleep 60\n", "new primary (pid"},
		// A new primary writes the PID file before it reports ready; the
		// old one puts its own pid back when the upgrade fails after that.
		{"writes the PID file, then hangs", "#!/bin/sh\necho $$ > \"$DEFUSS_TEST_PIDFILE\"\nexec sleep 60\n", "not ready within the start timeout"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			app, pidFile := filepath.Join(dir, "app"), filepath.Join(dir, "defuss.pid")
			copyBinary(t, app, "")
			t.Setenv("DEFUSS_TEST_PIDFILE", pidFile) // for the script; the successor gets this environment
			s := startTest(t, WithStartTimeout(5*time.Second), WithPIDFile(pidFile), optionFunc(func(c *config) { c.executable = app }))
			before := s.Workers()
			kids := children()
			if err := os.WriteFile(app+".new", []byte(tc.script), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(app+".new", app); err != nil {
				t.Fatal(err)
			}
			err := s.Upgrade(context.Background())
			if !errors.Is(err, ErrWorkerStart) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Upgrade: %v; want ErrWorkerStart saying %q", err, tc.want)
			}
			t.Logf("Upgrade: %v", err)
			if now := children(); !slices.Equal(sorted(now), sorted(kids)) {
				t.Errorf("children after the failed upgrade %v, before %v", now, kids)
			}
			for i, w := range s.Workers() {
				if w.PID != before[i].PID || !w.Healthy {
					t.Errorf("worker %d after the failed upgrade: %+v, before pid %d", i, w, before[i].PID)
				}
			}
			if code, _ := get(t, s.Addr().String(), "/"); code != http.StatusOK {
				t.Errorf("after the failed upgrade: status %d", code)
			}
			if b, _ := os.ReadFile(pidFile); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
				t.Errorf("PID file says %q after the failed upgrade, want this primary's %d", b, os.Getpid())
			}
		})
	}
}

func sorted(s []int) []int { s = slices.Clone(s); slices.Sort(s); return s }

// Issue 13: what Upgrade refuses, at once and with a clear error: a second
// upgrade while one runs, an upgrade after shutdown; and what ends one
// early: ctx, a shutdown.
func TestUpgradeRefusals(t *testing.T) {
	app := filepath.Join(t.TempDir(), "app")
	if err := os.WriteFile(app, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	s := startTest(t, optionFunc(func(c *config) { c.executable = os.Args[0] }))
	s.p.exe = app // the workers started from the test binary; a successor hangs

	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { first <- s.Upgrade(ctx) }()
	waitFor(t, 5*time.Second, "the first upgrade's new primary started", func() bool { return len(children()) == 3 })
	if err := s.Upgrade(context.Background()); !errors.Is(err, ErrUpgradeInProgress) {
		t.Errorf("second Upgrade: %v, want ErrUpgradeInProgress", err)
	}
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Errorf("first Upgrade after cancel: %v, want context.Canceled", err)
	}
	if n := len(children()); n != 2 {
		t.Errorf("%d children after the cancelled upgrade, want the 2 workers", n)
	}

	// A shutdown that begins while an upgrade waits wins: the new primary
	// is killed.
	go func() { first <- s.Upgrade(context.Background()) }()
	waitFor(t, 5*time.Second, "the next upgrade's new primary started", func() bool { return len(children()) == 3 })
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-first; !errors.Is(err, ErrShuttingDown) {
		t.Errorf("Upgrade cut short by Shutdown: %v, want ErrShuttingDown", err)
	}
	if err := s.Upgrade(context.Background()); !errors.Is(err, ErrShuttingDown) {
		t.Errorf("Upgrade after Shutdown: %v, want ErrShuttingDown", err)
	}
}

// Issue 13: fixed worker ports are held by the old primary until it exits,
// so a new primary's workers could not bind them: Upgrade refuses.
func TestUpgradeRefusesFixedWorkerPorts(t *testing.T) {
	s := startTest(t, WithBaseWorkerPort(freePorts(t, 2)))
	if err := s.Upgrade(context.Background()); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "WithBaseWorkerPort") {
		t.Errorf("Upgrade with WithBaseWorkerPort: %v, want ErrNotSupported naming the option", err)
	}
}

// Issue 13: a listener of WithListener belongs to the caller's code, which
// would bind it again in the new primary: Upgrade refuses it.
func TestUpgradeRefusesWithListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := startTest(t, WithListener(ln), WithWorkers(1))
	if err := s.Upgrade(context.Background()); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Upgrade with WithListener: %v, want ErrNotSupported", err)
	}
}
