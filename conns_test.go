package defuss

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Issue 11, point 8: two supervisors that quiesce at once (a scale-down
// by two, or one overlapping a restart) must both wait for a dial that
// began before either call. With the epochs alone, the second waited only
// on the other parity and returned while the dial was still in flight.
func TestConcurrentQuiesceWaitsForEarlierDial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newDialGate()
		e := g.enter() // a dial in flight
		var returned atomic.Int32
		for range 2 {
			go func() {
				g.quiesce(time.Hour)
				returned.Add(1)
			}()
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if n := returned.Load(); n != 0 {
			t.Errorf("%d of 2 quiesce calls returned while a dial that began before them was in flight", n)
		}
		g.exit(e)
		time.Sleep(time.Second)
		synctest.Wait()
		if n := returned.Load(); n != 2 {
			t.Fatalf("%d of 2 quiesce calls returned after the dial ended, want 2", n)
		}
	})
}

// A dial that begins after a quiesce call is not waited for.
func TestQuiesceIgnoresLaterDial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newDialGate()
		done := make(chan struct{})
		go func() {
			g.quiesce(time.Hour)
			close(done)
		}()
		synctest.Wait()
		e := g.enter()
		defer g.exit(e)
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Fatal("quiesce waited for a dial that began after it")
		}
	})
}
