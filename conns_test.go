package defuss

import (
	"net"
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

// Issue 14: WithMaxConnections counts the connections handed off to
// workers until they report them closed, exactly even when a worker's
// report comes before the primary has moved the connection over.
func TestConnTableCountsHandedOff(t *testing.T) {
	tb := newConnTable(2)
	conn := func() net.Conn {
		c, peer := net.Pipe()
		t.Cleanup(func() { peer.Close() })
		return c
	}
	track := func(c net.Conn, want bool) {
		t.Helper()
		if ok, full := tb.track(c); ok != want || full == want {
			t.Fatalf("track with %d live and %d handed off: ok %v, full %v; want ok %v", len(tb.live), tb.handed.Load(), ok, full, want)
		}
	}
	a, b := conn(), conn()
	track(a, true)
	tb.handedOff(a) // a worker holds a
	track(b, true)
	track(conn(), false) // a held by its worker, b being routed: at the cap
	tb.closedHanded(1)   // b's worker reports b closed before b is moved over
	tb.handedOff(b)
	c := conn()
	track(c, true)       // b is gone: a and c
	track(conn(), false) // at the cap again
	tb.untrack(c)
	tb.closedHanded(1) // a closes
	if n := tb.handed.Load(); n != 0 || len(tb.live) != 0 {
		t.Fatalf("%d handed off, %d live at the end; want none", n, len(tb.live))
	}
	tb.wait() // every tracked connection was let go of
}
