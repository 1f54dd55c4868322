package defuss

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/metric/noop"
)

// Tests of the supervisor's state machine without forking: the spawn seam
// hands it fake processes whose frames and exits the test sends, and
// testing/synctest runs its timers (backoff, start and shutdown timeouts,
// staleness) on a fake clock. Every test ends with a forced shutdown and
// checks that the supervisor has ended, so no goroutine outlives it.

// fakeProc is a worker process that exists only in the test.
type fakeProc struct {
	pr      *process
	slot    int
	spawned time.Time
	port    int           // what it reports ready on
	drains  chan *command // drain commands the supervisor sent
	sent    chan *command // other commands it sent
	refuse  atomic.Bool   // send fails, as on a closed pipe
	killed  chan struct{} // closed by the first kill
	kill1   sync.Once
}

var _ osProcess = (*fakeProc)(nil)

var errKilled = errors.New("signal: killed")

func (f *fakeProc) drain(c *command) { f.drains <- c }

func (f *fakeProc) send(c *command) error {
	if f.refuse.Load() {
		return os.ErrClosed
	}
	f.sent <- c
	return nil
}

// kill makes the process exit, as SIGKILL would.
func (f *fakeProc) kill() {
	f.kill1.Do(func() {
		close(f.killed)
		go f.pr.emit(procEvent{kind: evExit, err: errKilled})
	})
}

func (f *fakeProc) release() {}

// ready sends the ready frame; beat a heartbeat.
func (f *fakeProc) ready() {
	f.pr.emit(procEvent{kind: evFrame, frame: frameEvent{msg: message{kind: frameReady, slot: f.slot, pid: f.pr.pid, port: f.port}}})
}

func (f *fakeProc) beat() {
	f.pr.emit(procEvent{kind: evFrame, frame: frameEvent{msg: message{kind: frameStats, slot: f.slot, pid: f.pr.pid}}})
}

// exit makes the process exit by itself with err.
func (f *fakeProc) exit(err error) { f.pr.emit(procEvent{kind: evExit, err: err}) }

// fakeWorkers is the spawn seam of a test primary.
type fakeWorkers struct {
	spawned chan *fakeProc // every process, in spawn order
	mu      sync.Mutex
	fail    error // when set, spawn fails with it
	pid     int
	base    int // WithBaseWorkerPort: slot i reports port base+i
}

func (fw *fakeWorkers) setFail(err error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.fail = err
}

func (fw *fakeWorkers) spawn(slot int, events chan<- procEvent) (*process, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.fail != nil {
		return nil, fw.fail
	}
	fw.pid++
	f := &fakeProc{slot: slot, spawned: time.Now(), port: 4000 + fw.pid, drains: make(chan *command, 4), sent: make(chan *command, 4), killed: make(chan struct{})}
	if fw.base > 0 {
		f.port = fw.base + slot
	}
	f.pr = newProcess(fw.pid, f, events)
	fw.spawned <- f
	return f.pr, nil
}

// supervised is one slot of a primary whose processes are fakes. Make it
// inside a synctest bubble.
type supervised struct {
	t       *testing.T
	p       *primary
	s       *slot
	fw      *fakeWorkers
	startup chan error
	done    chan struct{}
	logs    *syncBuffer
}

// nopListener stands in for the public listener, which the supervisor
// never touches.
type nopListener struct{}

func (nopListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (nopListener) Close() error              { return nil }
func (nopListener) Addr() net.Addr            { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func (s *syncBuffer) String() string { return string(s.Bytes()) }

// Heartbeat settings of the fake slot: stale after 1s, killed after 2s.
const (
	fakeBeat  = 100 * time.Millisecond
	fakeStale = time.Second
)

func superviseFake(t *testing.T, opts ...Option) *supervised {
	t.Helper()
	logs := &syncBuffer{}
	base := []Option{WithWorkers(1), WithHeartbeat(fakeBeat, fakeStale), WithStartTimeout(5 * time.Second),
		WithShutdownTimeout(2 * time.Second), WithMeterProvider(noop.NewMeterProvider()),
		WithLogger(slog.New(slog.NewTextHandler(logs, nil)))}
	c, err := newConfig(func(string) string { return "" }, append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPrimary(c, nopListener{}, "")
	if err != nil {
		t.Fatal(err)
	}
	close(p.acceptDone) // no accept loop: nothing is being routed
	fw := &fakeWorkers{spawned: make(chan *fakeProc, 64)}
	p.spawn = fw.spawn
	sv := &supervised{t: t, p: p, s: p.pool.slots[0], fw: fw, startup: make(chan error, 1), done: make(chan struct{}), logs: logs}
	go func() {
		p.supervise(sv.s, sv.startup)
		close(sv.done)
	}()
	t.Cleanup(func() {
		// Still inside the bubble: end the slot and wait for it.
		p.forceShutdown()
		<-sv.done
	})
	return sv
}

// next waits for the next process the supervisor spawns (on the bubble's
// clock, which moves on while everything waits).
func (sv *supervised) next() *fakeProc {
	sv.t.Helper()
	select {
	case f := <-sv.fw.spawned:
		return f
	case <-time.After(time.Hour):
		sv.t.Fatal("no process was spawned within an hour")
		return nil
	}
}

// noSpawn fails if a process was spawned that the test has not taken.
func (sv *supervised) noSpawn() {
	sv.t.Helper()
	synctest.Wait()
	select {
	case f := <-sv.fw.spawned:
		sv.t.Fatalf("unexpected spawn of pid %d", f.pr.pid)
	default:
	}
}

// recv receives from ch, or fails the test if nothing comes within an
// hour on the bubble's clock (a supervisor that never acts would otherwise
// keep the bubble's clock ticking forever).
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(time.Hour):
		t.Fatalf("no %s within an hour", what)
		var zero T
		return zero
	}
}

// info returns the slot as last published, once the supervisor is idle.
func (sv *supervised) info() WorkerInfo {
	synctest.Wait()
	return sv.p.pool.snapshot().all[0]
}

// startReady spawns the first process and makes it ready.
func (sv *supervised) startReady() *fakeProc {
	sv.t.Helper()
	f := sv.next()
	f.ready()
	if err := recv(sv.t, sv.startup, "start-up outcome"); err != nil {
		sv.t.Fatalf("startup: %v", err)
	}
	if w := sv.info(); w.State != WorkerReady || w.PID != f.pr.pid {
		sv.t.Fatalf("after ready: state %v pid %d, want ready pid %d", w.State, w.PID, f.pr.pid)
	}
	return f
}

// TestSupervisorBackoff: crashes are respawned after 50ms, doubling per
// consecutive crash; the third consecutive one is logged as a crash loop;
// a process that ran for stableUptime resets the sequence.
func TestSupervisorBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		f.exit(errors.New("exit status 1")) // crash after start-up: respawn
		var prev = time.Now()
		for i, want := range []time.Duration{50, 100, 200, 400, 800} {
			f = sv.next()
			if got := f.spawned.Sub(prev); got != want*time.Millisecond {
				t.Fatalf("respawn %d after %v, want %v", i+1, got, want*time.Millisecond)
			}
			if w := sv.info(); w.State != WorkerStarting || w.PID != f.pr.pid || w.Restarts != i+1 {
				t.Fatalf("respawn %d: state %v pid %d restarts %d", i+1, w.State, w.PID, w.Restarts)
			}
			prev = time.Now()
			f.exit(errors.New("exit status 1"))
		}
		synctest.Wait()
		if n := strings.Count(sv.logs.String(), "worker crash loop"); n != 4 {
			t.Errorf("crash loop logged %d times, want 4 (failures 3 to 6)", n)
		}
		// A process that runs for stableUptime and then dies starts the
		// sequence again.
		f = sv.next()
		f.ready()
		for range int(stableUptime / fakeBeat) {
			time.Sleep(fakeBeat)
			f.beat()
		}
		prev = time.Now()
		f.exit(errors.New("exit status 2"))
		if f = sv.next(); f.spawned.Sub(prev) != backoffMin {
			t.Fatalf("after a stable run: respawn after %v, want %v", f.spawned.Sub(prev), backoffMin)
		}
	})
}

// TestSupervisorBackoffCap: the delay stops doubling at backoffMax.
func TestSupervisorBackoffCap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		var last time.Duration
		for range 12 {
			prev := time.Now()
			f.exit(errors.New("exit status 1"))
			f = sv.next()
			last = f.spawned.Sub(prev)
		}
		if last != backoffMax {
			t.Fatalf("12th respawn after %v, want the cap %v", last, backoffMax)
		}
	})
}

// TestSupervisorRespawnOff: with WithRespawn(false) a dead worker's slot
// is over, and the last one ends the primary with ErrNoWorkers.
func TestSupervisorRespawnOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t, WithRespawn(false))
		f := sv.startReady()
		f.exit(errors.New("exit status 1"))
		recv(t, sv.done, "end of the slot") // nothing left to supervise
		sv.noSpawn()
		select {
		case err := <-sv.p.life.fatal:
			if !errors.Is(err, ErrNoWorkers) {
				t.Fatalf("fatal: %v, want ErrNoWorkers", err)
			}
		default:
			t.Fatal("the primary was not told that no worker is left")
		}
		if w := sv.info(); w.State != WorkerDown || w.PID != 0 {
			t.Fatalf("state %v pid %d, want down", w.State, w.PID)
		}
	})
}

// TestSupervisorStartTimeout: a first process that does not report ready
// within the start timeout is killed, and Start learns why.
func TestSupervisorStartTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t, WithStartTimeout(3*time.Second))
		f := sv.next()
		time.Sleep(3*time.Second - time.Millisecond)
		synctest.Wait()
		select {
		case <-f.killed:
			t.Fatal("killed before the start timeout")
		default:
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		recv(t, f.killed, "kill")
		err := recv(t, sv.startup, "start-up outcome")
		if !errors.Is(err, ErrWorkerStart) || !strings.Contains(err.Error(), "no ready report within 3s") {
			t.Fatalf("startup: %v, want ErrWorkerStart saying no ready report within 3s", err)
		}
		if sv.next().spawned.Sub(f.spawned) != 3*time.Second+backoffMin {
			t.Fatal("the slot was not respawned after the backoff")
		}
	})
}

// TestSupervisorStaleness: a silent worker is stale after staleAfter (no
// new connections), healthy again at its next heartbeat, and killed and
// replaced after 2×staleAfter of silence.
func TestSupervisorStaleness(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		time.Sleep(fakeStale + fakeStale/4 + time.Millisecond) // the stale check runs every staleAfter/4
		if w := sv.info(); w.State != WorkerStale || w.Healthy {
			t.Fatalf("silent for %v: state %v healthy %v, want stale", fakeStale, w.State, w.Healthy)
		}
		if n := len(sv.p.pool.candidates()); n != 0 {
			t.Fatalf("%d candidates, want none while stale", n)
		}
		f.beat()
		if w := sv.info(); w.State != WorkerReady {
			t.Fatalf("after a heartbeat: state %v, want ready", w.State)
		}
		time.Sleep(2*fakeStale + fakeStale/4 + time.Millisecond)
		synctest.Wait()
		select {
		case <-f.killed:
		default:
			t.Fatalf("silent for %v and not killed", 2*fakeStale)
		}
		if g := sv.next(); g.pr.pid == f.pr.pid {
			t.Fatal("not replaced")
		}
	})
}

// TestSupervisorBadFrames: a frame that speaks for another slot marks the
// worker unhealthy until its next valid heartbeat; an unreadable stream
// gets it killed.
func TestSupervisorBadFrames(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		f.pr.emit(procEvent{kind: evFrame, frame: frameEvent{msg: message{kind: frameStats, slot: 7, pid: f.pr.pid}}})
		if w := sv.info(); w.State != WorkerUnhealthy {
			t.Fatalf("after a frame for slot 7: state %v, want unhealthy", w.State)
		}
		f.beat()
		if w := sv.info(); w.State != WorkerReady {
			t.Fatalf("after a valid heartbeat: state %v, want ready", w.State)
		}
		f.pr.emit(procEvent{kind: evFrame, frame: frameEvent{err: errFrame, fatal: true}})
		recv(t, f.killed, "kill")
		sv.next() // respawned
	})
}

// TestSupervisorReplace: a replacement starts a successor while the old
// process keeps the slot's connections, switches to the successor once it
// is ready, drains the old one with the count of connections made to it,
// and answers once the old one has exited.
func TestSupervisorReplace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		old := sv.startReady()
		old.pr.dialed.Add(3)
		req := &replaceReq{reason: "reload", done: make(chan error, 1)}
		sv.s.replace <- req
		succ := sv.next()
		if w := sv.info(); w.State != WorkerReady || w.PID != old.pr.pid {
			t.Fatalf("while the successor starts: state %v pid %d, want ready on the old pid %d", w.State, w.PID, old.pr.pid)
		}
		// A second replacement of the same slot is refused meanwhile.
		again := &replaceReq{reason: "reload", done: make(chan error, 1)}
		sv.s.replace <- again
		if err := recv(t, again.done, "answer"); err == nil {
			t.Fatal("a second replacement in progress was accepted")
		}
		succ.ready()
		if w := sv.info(); w.State != WorkerReady || w.PID != succ.pr.pid || w.Restarts != 1 {
			t.Fatalf("after the successor's ready: state %v pid %d restarts %d", w.State, w.PID, w.Restarts)
		}
		drain := recv(t, old.drains, "drain command")
		if drain.kind != frameDrain || drain.conns != 3 || drain.shutdownTimeout != 2*time.Second {
			t.Fatalf("drain command %+v, want 3 connections and the 2s shutdown timeout", drain)
		}
		select {
		case err := <-req.done:
			t.Fatalf("answered (%v) before the old process exited", err)
		default:
		}
		old.exit(nil)
		if err := recv(t, req.done, "answer"); err != nil {
			t.Fatalf("replace: %v", err)
		}
		sv.noSpawn()
	})
}

// TestSupervisorReplaceFails: a successor that dies before it is ready
// fails the replacement with ErrWorkerStart; the old process keeps
// serving, untouched.
func TestSupervisorReplaceFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		old := sv.startReady()
		req := &replaceReq{reason: "reload", done: make(chan error, 1)}
		sv.s.replace <- req
		succ := sv.next()
		succ.exit(errors.New("exit status 3"))
		if err := recv(t, req.done, "answer"); !errors.Is(err, ErrWorkerStart) {
			t.Fatalf("replace: %v, want ErrWorkerStart", err)
		}
		if w := sv.info(); w.State != WorkerReady || w.PID != old.pr.pid {
			t.Fatalf("after the failed replacement: state %v pid %d, want ready on pid %d", w.State, w.PID, old.pr.pid)
		}
		if len(old.drains) != 0 {
			t.Fatal("the old process was drained")
		}
		sv.noSpawn()
	})
}

// TestSupervisorShutdownTimeout: on shutdown the process is drained, and
// killed when it has not exited within the shutdown timeout.
func TestSupervisorShutdownTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		start := time.Now()
		sv.p.beginShutdown()
		recv(t, f.drains, "drain command")
		if w := sv.info(); w.State != WorkerDraining {
			t.Fatalf("state %v, want draining", w.State)
		}
		recv(t, f.killed, "kill")
		if d := time.Since(start); d != 2*time.Second {
			t.Fatalf("killed after %v, want the 2s shutdown timeout", d)
		}
		recv(t, sv.done, "end of the slot")
		sv.noSpawn()
	})
}

// TestSupervisorRetire: a slot removed by scaling down drains its process
// and ends when it has exited, without a respawn.
func TestSupervisorRetire(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		close(sv.s.retire)
		recv(t, f.drains, "drain command")
		select {
		case <-sv.done:
			t.Fatal("the slot ended before its process exited")
		default:
		}
		f.exit(nil)
		recv(t, sv.done, "end of the slot")
		sv.noSpawn()
	})
}

// TestSupervisorReportGap: in hand-off mode the supervisor tells its
// workers the gap between close reports for the pool's size, again after
// each scale and only then, retries a send that failed at the next tick,
// tells a draining process nothing, and tells nothing in splice mode.
func TestSupervisorReportGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t, WithHandoff(true))
		f := sv.startReady()
		gap := func(want time.Duration) {
			t.Helper()
			c := recv(t, f.sent, "report gap")
			if c.kind != frameReportGap || c.reportGap != want {
				t.Fatalf("sent %+v, want a report gap of %v", c, want)
			}
			time.Sleep(3 * fakeBeat) // three more ticks: nothing more to tell
			synctest.Wait()
			if len(f.sent) != 0 {
				t.Fatalf("sent %+v again", <-f.sent)
			}
		}
		// The fake spawn sends no configuration: the first tick tells it.
		gap(closeReportGap)
		if _, err := sv.p.pool.grow(8, func(*slot) {}); err != nil { // slots nobody supervises
			t.Fatal(err)
		}
		gap(8 * time.Millisecond)
		f.refuse.Store(true)
		if _, err := sv.p.pool.grow(40, func(*slot) {}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * fakeBeat)
		f.refuse.Store(false)
		gap(maxCloseReportGap)
		sv.p.pool.remove(sv.p.pool.list()[1:])
		gap(closeReportGap)
		// A draining process is told nothing more.
		close(sv.s.retire)
		recv(t, f.drains, "drain command")
		if _, err := sv.p.pool.grow(8, func(*slot) {}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * fakeBeat)
		synctest.Wait()
		if len(f.sent) != 0 {
			t.Fatalf("told a draining process %+v", <-f.sent)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		sv := superviseFake(t)
		f := sv.startReady()
		sv.p.pool.grow(8, func(*slot) {})
		time.Sleep(3 * fakeBeat)
		synctest.Wait()
		if len(f.sent) != 0 {
			t.Fatalf("splice mode: sent %+v", <-f.sent)
		}
	})
}

// TestSupervisorSpawnFails: a failure to start a process at all is a
// start-up error, and later a crash like any other.
func TestSupervisorSpawnFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		boom := errors.New("fork: resource temporarily unavailable")
		sv := superviseFake(t)
		f := sv.startReady()
		sv.fw.setFail(boom)
		f.exit(errors.New("exit status 1"))
		time.Sleep(backoffMin + 50*time.Millisecond) // the respawn at 50ms fails, the next is due at 150ms
		if w := sv.info(); w.State != WorkerDown || w.Restarts != 2 {
			t.Fatalf("state %v restarts %d, want down after two failures", w.State, w.Restarts)
		}
		sv.fw.setFail(nil)
		time.Sleep(100 * time.Millisecond)
		sv.next().ready()
		if w := sv.info(); w.State != WorkerReady {
			t.Fatalf("state %v, want ready once spawning works again", w.State)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		boom := errors.New("fork: resource temporarily unavailable")
		logs := &syncBuffer{}
		c, err := newConfig(func(string) string { return "" }, WithWorkers(1), WithMeterProvider(noop.NewMeterProvider()),
			WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
		if err != nil {
			t.Fatal(err)
		}
		p, err := newPrimary(c, nopListener{}, "")
		if err != nil {
			t.Fatal(err)
		}
		p.spawn = func(int, chan<- procEvent) (*process, error) { return nil, boom }
		startup := make(chan error, 1)
		done := make(chan struct{})
		go func() { p.supervise(p.pool.slots[0], startup); close(done) }()
		if err := recv(t, startup, "start-up outcome"); !errors.Is(err, boom) {
			t.Fatalf("startup: %v, want the spawn error", err)
		}
		close(p.acceptDone)
		p.forceShutdown()
		<-done
	})
}
