package defuss

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/metric/noop"
)

// Fork-free tests of Restart and Scale: a whole pool of supervisors whose
// processes are fakes (see supervisor_test.go), on synctest's clock.

// fakePool is a primary with n slots of fake processes, serving (run is
// going) but without a listener's accept loop.
type fakePool struct {
	t      *testing.T
	p      *primary
	srv    *Server
	fw     *fakeWorkers
	mu     sync.Mutex
	held   map[int]bool // pids whose ready frame the test sends itself
	byPID  map[int]*fakeProc
	holdFn func(slot int) bool // which new processes to hold
}

// newFakePool starts a primary with n slots whose processes report ready
// at once and exit when drained, unless hold says otherwise for a slot.
// Make it inside a synctest bubble.
func newFakePool(t *testing.T, n int, opts ...Option) *fakePool {
	t.Helper()
	base := []Option{WithWorkers(n), WithHeartbeat(fakeBeat, fakeStale), WithShutdownTimeout(2 * time.Second),
		WithMeterProvider(noop.NewMeterProvider()), WithLogger(slog.New(slog.DiscardHandler))}
	c, err := newConfig(func(string) string { return "" }, append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPrimary(c, nopListener{}, "")
	if err != nil {
		t.Fatal(err)
	}
	fp := &fakePool{t: t, p: p, srv: &Server{p: p}, fw: &fakeWorkers{spawned: make(chan *fakeProc, 256), base: c.baseWorkerPort},
		held: map[int]bool{}, byPID: map[int]*fakeProc{}}
	p.spawn = func(slot int, events chan<- procEvent) (*process, error) {
		pr, err := fp.fw.spawn(slot, events)
		if err != nil {
			return nil, err
		}
		f := <-fp.fw.spawned
		fp.mu.Lock()
		fp.byPID[pr.pid] = f
		hold := fp.holdFn != nil && fp.holdFn(slot)
		fp.held[pr.pid] = hold
		fp.mu.Unlock()
		go f.behave(!hold)
		return pr, nil
	}
	startup := make(chan error, n)
	for _, s := range p.pool.list() {
		p.goSupervise(s, startup)
	}
	for range n {
		if err := recv(t, startup, "start-up outcome"); err != nil {
			t.Fatalf("startup: %v", err)
		}
	}
	close(p.acceptDone)
	go p.run(nil)
	t.Cleanup(func() {
		p.forceShutdown()
		recv(t, p.life.done, "end of the primary")
	})
	return fp
}

// behave plays a well-behaved worker: ready at once (unless held), and an
// exit when drained.
func (f *fakeProc) behave(ready bool) {
	if ready {
		f.ready()
	}
	select {
	case <-f.drains:
		f.exit(nil)
	case <-f.pr.gone:
	}
}

// proc returns the fake process with pid.
func (fp *fakePool) proc(pid int) *fakeProc {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	return fp.byPID[pid]
}

// async runs f in the bubble and returns where its error arrives.
func async(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// Issue 11, point 9: a Restart that reaches a slot still starting from a
// scale-up used to start a successor, promote it and drain the first
// process without ever reporting the slot's start-up, so Scale waited
// forever (holding scaleMu: SIGTTIN uses no deadline). A process that is
// starting already runs the binary on disk: the replacement has nothing
// to do.
func TestRestartOverlappingScaleUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 1)
		fp.mu.Lock()
		fp.holdFn = func(slot int) bool { return slot == 1 }
		fp.mu.Unlock()
		ctx := context.Background()
		scaled := async(func() error { return fp.srv.Scale(ctx, 2) })
		synctest.Wait()
		starting := fp.srv.Workers()[1]
		if starting.State != WorkerStarting {
			t.Fatalf("new slot %v, want starting", starting.State)
		}
		restarted := async(func() error { return fp.srv.Restart(ctx) })
		if err := recv(t, restarted, "Restart's answer"); err != nil {
			t.Fatalf("Restart: %v", err)
		}
		fp.proc(starting.PID).ready()
		if err := recv(t, scaled, "Scale's answer"); err != nil {
			t.Fatalf("Scale: %v", err)
		}
		if w := fp.srv.Workers()[1]; w.PID != starting.PID || w.State != WorkerReady {
			t.Fatalf("slot 1: pid %d %v, want the first process %d ready", w.PID, w.State, starting.PID)
		}
	})
}

// Issue 11, point 10: with WithRespawn(false), a slot whose worker died
// and was then scaled away no longer counts as gone: a clean shutdown
// returns nil, not ErrNoWorkers.
func TestScaleAwayDeadSlotNoRespawn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 2, WithRespawn(false))
		ws := fp.srv.Workers()
		fp.proc(ws[1].PID).exit(errors.New("exit status 1"))
		synctest.Wait()
		if err := fp.srv.Scale(context.Background(), 1); err != nil {
			t.Fatalf("Scale: %v", err)
		}
		if err := fp.srv.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if err := fp.srv.Wait(); err != nil {
			t.Fatalf("Wait after a clean shutdown: %v, want nil", err)
		}
	})
}

// Issue 11, point 10: with WithRespawn(false), scaling away the last live
// slot while the others are dead stops the primary with ErrNoWorkers
// (it used to serve on with no worker).
func TestScaleAwayLastLiveSlotNoRespawn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 2, WithRespawn(false))
		ws := fp.srv.Workers()
		fp.proc(ws[0].PID).exit(errors.New("exit status 1"))
		synctest.Wait()
		if err := fp.srv.Scale(context.Background(), 1); err != nil {
			t.Fatalf("Scale: %v", err)
		}
		if err := recv(t, fp.p.life.done, "the primary's end"); err != struct{}{} {
			t.Fatal("unreachable")
		}
		if err := fp.srv.Wait(); !errors.Is(err, ErrNoWorkers) {
			t.Fatalf("Wait: %v, want ErrNoWorkers", err)
		}
	})
}

// Issue 11, point 11: Scale checks the fixed worker ports for the new
// count, as Start does for the first.
func TestScaleChecksWorkerPorts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 1, WithBaseWorkerPort(65534))
		err := fp.srv.Scale(context.Background(), 3)
		if !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), "WithBaseWorkerPort") {
			t.Fatalf("Scale to 3 from port 65534: %v, want ErrInvalidOption naming WithBaseWorkerPort", err)
		}
		if n := len(fp.srv.Workers()); n != 1 {
			t.Fatalf("%d workers after the refused Scale, want 1", n)
		}
		if err := fp.srv.Scale(context.Background(), 2); err != nil {
			t.Fatalf("Scale to 2 (ports 65534-65535): %v", err)
		}
	})
}

// Issue 11, point 15: Workers returns a copy; a caller that sorts or
// changes it does not change what others (and the balancer) see.
func TestWorkersReturnsACopy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 2)
		ws := fp.srv.Workers()
		ws[0], ws[1] = ws[1], ws[0]
		ws[0].Addr = "mangled"
		if again := fp.srv.Workers(); again[0].Index != 0 || again[0].Addr == "mangled" || again[1].Index != 1 {
			t.Fatalf("Workers after a caller changed its result: %+v", again)
		}
	})
}

// Issue 11, point 15: StatusHandler says draining as soon as the health
// path answers 503, that is during the drain delay too.
func TestStatusDrainingDuringDrainDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fp := newFakePool(t, 1, WithDrainDelay(time.Minute))
		status := func() (out struct{ Draining bool }) {
			rec := httptest.NewRecorder()
			StatusHandler(fp.srv).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
			if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
				t.Fatal(err)
			}
			return out
		}
		if status().Draining {
			t.Fatal("draining before any shutdown")
		}
		fp.p.requestStop()
		synctest.Wait()
		if !fp.p.life.draining.Load() {
			t.Fatal("the health path does not answer 503 yet")
		}
		if !status().Draining {
			t.Fatal("StatusHandler says not draining while the health path answers 503")
		}
	})
}

// While Start waits for the workers, SIGHUP, SIGUSR2, SIGTTIN and SIGTTOU
// are taken and ignored (WithSignalHandling's doc), and SIGTERM stops the
// start.
func TestAwaitStartupIgnoresOperationSignals(t *testing.T) {
	p := &primary{}
	sigs, startup := make(chan os.Signal), make(chan error, 1)
	done := make(chan error, 1)
	go func() { done <- p.awaitStartup(1, startup, sigs) }()
	for _, sig := range []os.Signal{sigRestart, sigUpgrade, sigScaleUp, sigScaleDown} {
		select {
		case sigs <- sig: // taken: awaitStartup is still waiting
		case err := <-done:
			t.Fatalf("awaitStartup returned %v on %v", err, sig)
		}
	}
	startup <- nil
	if err := <-done; err != nil {
		t.Fatalf("awaitStartup: %v, want nil once the worker is ready", err)
	}

	go func() { done <- p.awaitStartup(1, startup, sigs) }()
	sigs <- syscall.SIGTERM
	if err := <-done; !errors.Is(err, ErrInterrupted) {
		t.Fatalf("awaitStartup after SIGTERM: %v, want ErrInterrupted", err)
	}
}
