package defuss

// Soak: mixed load while workers are killed in turn, with every failure
// accounted for and the primary's usage (read through /proc) back at its
// baseline afterwards.

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSoak runs mixed load (new connections and keep-alive, small and 64
// KiB bodies, uploads) for 30s (DEFUSS_SOAK=10m for a long run; 5s with
// -short), killing a worker every 3s, the two slots in turn. Every failed
// request must have been on a connection given to a killed worker before
// the primary saw it die; every kill is one restart and nothing else
// restarts; and afterwards the primary holds what it held before.
//
// A slot killed again before it has run for stableUptime is respawned
// with a doubling backoff: a long soak kills only when both slots serve,
// so its kills space out to that backoff (up to backoffMax).
func TestSoak(t *testing.T) {
	d := 30 * time.Second
	if testing.Short() {
		d = 5 * time.Second
	}
	if v := os.Getenv("DEFUSS_SOAK"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			t.Fatalf("DEFUSS_SOAK=%q: %v", v, err)
		}
	}
	const killEvery = 3 * time.Second

	m, mopt := newMetrics(t)
	bal := newChaosBalancer()
	s := startTest(t, mopt, WithBalancer(bal.balance))
	addr := s.Addr().String()
	const warmup = 20
	base := warmBaseline(t, s, chaosReqs[3], warmup)

	load := newChaosLoad(addr, bal)
	load.client(1, -1, 0, chaosReqs)
	load.client(1, -1, 1, chaosReqs)
	load.client(10, -1, 2, chaosReqs)
	load.client(100, -1, 3, chaosReqs)
	load.waitSent(t, 20, "the load running")

	var faults []workerFault
	end := time.Now().Add(d)
	for slot := 0; time.Until(end) > killEvery; slot = 1 - slot {
		// Let the load run on the whole pool, then kill. A slot whose
		// worker keeps dying before stableUptime is respawned with a
		// growing backoff (up to backoffMax): in a long soak the kills
		// wait for it, so that one worker always serves.
		timer := time.NewTimer(killEvery)
		<-timer.C
		assertServing(t, s)
		ws := waitWorkers(t, s, backoffMax+10*time.Second, "every slot serving", func(ws []WorkerInfo) bool {
			return ws[0].Healthy && ws[1].Healthy
		})
		victim := ws[slot]
		if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitWorkers(t, s, 10*time.Second, "the killed worker out of rotation", func(ws []WorkerInfo) bool {
			return ws[slot].PID != victim.PID
		})
		faults = append(faults, workerFault{pid: victim.PID, seen: time.Now()})
	}
	if rest := time.Until(end); rest > 0 {
		timer := time.NewTimer(rest)
		<-timer.C
	}
	failures := load.finish()
	assertServing(t, s)

	explained, unexplained := explain(failures, faults)
	t.Logf("soak %v: %d requests sent on %d connections, %d failed (all on killed workers: %d); %d workers killed",
		d, load.sent.Load(), load.dials.Load(), len(failures), len(explained), len(faults))
	for _, f := range unexplained {
		t.Errorf("request failed that was not on a killed worker: %v", f)
	}
	if load.ok.Load()+int64(len(failures)) != load.sent.Load() {
		t.Errorf("%d sent, %d succeeded, %d failed: requests unaccounted for", load.sent.Load(), load.ok.Load(), len(failures))
	}

	waitWorkers(t, s, backoffMax+10*time.Second, "every slot serving", func(ws []WorkerInfo) bool {
		return ws[0].Healthy && ws[1].Healthy
	})
	waitIdle(t, s, 15*time.Second)
	// Goroutines and descriptors exactly: each replaced worker has the same
	// supervisor, frame reader, process waiter and two pipes as the one it
	// replaced. Heap: 1 MiB, against at least 16 KiB × the connections
	// opened (tens of thousands) that a per-connection leak of the sniff
	// buffer would hold; log lines of the restarts, buffered by the testing
	// package, account for a few KiB.
	after := waitBaseline(t, base, slack{heap: 1 << 20}, 15*time.Second)
	t.Logf("primary before: %v; after: %v", base, after)

	ms := m.collect()
	restarts := points(t, ms, "defuss.worker.restarts", "{restart}")
	var crashes float64
	for k, p := range restarts {
		if !strings.Contains(k, "defuss.reason=crash") {
			t.Errorf("worker.restarts{%s} = %v: only the kills may restart workers", k, p.value)
		}
		crashes += p.value
	}
	if crashes != float64(len(faults)) {
		t.Errorf("worker.restarts = %v, want %d crashes", restarts, len(faults))
	}
	if got, want := total(points(t, ms, "defuss.connections.accepted", "{connection}")), float64(warmup+load.dials.Load()); got != want {
		t.Errorf("connections.accepted = %v, want %v", got, want)
	}
	if got := metricTotal(t, ms, "defuss.connections.unavailable", "{connection}"); got != 0 {
		t.Errorf("connections.unavailable = %v: one worker was always serving", got)
	}
}
