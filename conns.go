package defuss

import (
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connTable holds the primary's live client connections, so that shutdown
// can wait for them and, past its deadline, close them. It also counts
// the connections handed off to workers that they have not reported
// closed: WithMaxConnections caps both together.
type connTable struct {
	mu     sync.Mutex
	live   map[net.Conn]liveConn // nil once the table is closed
	max    int                   // WithMaxConnections; 0 = no cap
	wg     sync.WaitGroup        // one per tracked connection
	handed atomic.Int64          // handed off and not reported closed; see handedOff
}

// liveConn is what the primary knows of a live client connection: once it
// is routed, the worker connection and the worker process behind it.
type liveConn struct {
	worker net.Conn
	slot   int
	pid    int
	ev     relayedConn // set once an event loop carries it (evrelay_linux.go)
	ended  bool        // end has been asked for it
}

// relayedConn is a connection an event loop carries: its net.Conns are
// closed, and the loop does what the table asks.
type relayedConn interface {
	end()   // as SetReadDeadline(now) on the client: end its direction
	close() // close both sockets
}

func newConnTable(max int) *connTable {
	return &connTable{live: make(map[net.Conn]liveConn), max: max}
}

// track registers a new client connection. It reports false once the
// table is closed, or when the connection limit is reached (full).
func (t *connTable) track(c net.Conn) (ok, full bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if ok, full = t.room(); ok {
		t.live[c] = liveConn{slot: -1}
		t.wg.Add(1)
	}
	return ok, full
}

// room reports whether the table takes a new connection: not once it is
// closed, nor at the connection limit (full). t.mu is held.
func (t *connTable) room() (ok, full bool) {
	if t.live == nil {
		return false, false
	}
	if t.max > 0 && len(t.live)+int(t.handed.Load()) >= t.max {
		return false, true
	}
	return true, false
}

// reserve counts a new connection that has no net.Conn yet (the raw
// accept loop's) as handed off, ahead of the hand-off, so that the
// connection limit holds meanwhile. It reports what track reports. If
// the connection is not handed off at once, claim makes it live (splice
// mode's too).
func (t *connTable) reserve() (ok, full bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if ok, full = t.room(); ok {
		t.handed.Add(1)
	}
	return ok, full
}

// claim turns a reservation into the live connection c, in one step. It
// reports false, dropping the reservation, once the table is closed; the
// caller closes c.
func (t *connTable) claim(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.handed.Add(-1)
	if t.live == nil {
		return false
	}
	t.live[c] = liveConn{slot: -1}
	t.wg.Add(1)
	return true
}

// unclaim undoes claim, in one step: c is forgotten unused, and its
// connection counts as reserved again.
func (t *connTable) unclaim(c net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.live, c)
	t.handed.Add(1)
	t.wg.Done()
}

// routed records that c is now spliced to worker, served by process pid in
// slot.
func (t *connTable) routed(c, worker net.Conn, slot, pid int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if l, ok := t.live[c]; ok {
		// ended stays: for the raw accept loop's connection, with no
		// net.Conn to end, it is the only trace of an end asked for
		// meanwhile.
		t.live[c] = liveConn{worker: worker, slot: slot, pid: pid, ended: l.ended}
	}
}

// relayed records that an event loop carries c from now on. It reports
// false if the table has closed meanwhile, and the caller closes ev.
func (t *connTable) relayed(c net.Conn, ev relayedConn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	l, ok := t.live[c]
	if !ok {
		return false
	}
	l.ev = ev
	t.live[c] = l
	if l.ended {
		ev.end()
	}
	return true
}

// untrack closes c and forgets it.
func (t *connTable) untrack(c net.Conn) {
	c.Close()
	t.mu.Lock()
	delete(t.live, c)
	t.mu.Unlock()
	t.wg.Done()
}

// handedOff closes the primary's copy of c, which a worker now serves,
// and moves it from the live connections to the handed-off count in one
// step. The worker's close report may come first (closedHanded): the count
// is briefly -1 then, while c is still live, so that the sum stays exact.
func (t *connTable) handedOff(c net.Conn) {
	c.Close()
	t.mu.Lock()
	delete(t.live, c)
	t.handed.Add(1)
	t.mu.Unlock()
	t.wg.Done()
}

// closedHanded takes n connections that workers report closed (or that
// died with their worker) out of the handed-off count.
func (t *connTable) closedHanded(n int64) { t.handed.Add(-n) }

// closeAll closes every live connection and closes the table: track
// refuses from now on.
func (t *connTable) closeAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for c, l := range t.live {
		if l.ev != nil {
			l.ev.close()
			continue
		}
		c.Close()
		if l.worker != nil {
			l.worker.Close()
		}
	}
	t.live = nil
}

// endOf ends the client-to-worker direction of the connections spliced to
// process pid of slot, which has exited: nothing the client sends can
// reach it any more, and a half-open client side would otherwise keep them
// (and the slot's count) alive. The other direction still delivers what
// the worker wrote before it exited, then the connection closes as usual.
func (t *connTable) endOf(slot, pid int) {
	t.end(func(l liveConn) bool { return l.slot == slot && l.pid == pid })
}

// endAll does endOf for every live connection: at shutdown, once every
// worker has exited.
func (t *connTable) endAll() { t.end(func(liveConn) bool { return true }) }

func (t *connTable) end(match func(liveConn) bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	for c, l := range t.live {
		if !match(l) {
			continue
		}
		switch {
		case l.ev != nil:
			l.ev.end()
		default:
			c.SetReadDeadline(now)
			l.ended = true
			t.live[c] = l
		}
	}
}

// wait blocks until every tracked connection is untracked.
func (t *connTable) wait() { t.wg.Wait() }

// dialGate counts the connections being routed and the dials in flight,
// so that a supervisor can wait, before it drains a process, until no
// connection can still be dialed to it.
type dialGate struct {
	quiet   chan struct{}   // a token: one quiesce at a time
	epoch   atomic.Uint64   // see enter and quiesce
	dialing [2]atomic.Int64 // dials in flight, by epoch parity
	routing atomic.Int64    // accepted connections not yet routed or refused
}

func newDialGate() *dialGate { return &dialGate{quiet: make(chan struct{}, 1)} }

// enter and exit bracket the use of a candidate snapshot, from loading it
// to the end of the dial, so that quiesce can wait for every offer that
// may still dial a worker taken out of the snapshot (see offer). The two counters
// alternate by epoch, as in read-copy-update.
func (g *dialGate) enter() uint64 {
	for {
		e := g.epoch.Load()
		g.dialing[e&1].Add(1)
		if g.epoch.Load() == e {
			return e
		}
		g.dialing[e&1].Add(-1) // quiesce moved on meanwhile: join the new epoch
	}
}

func (g *dialGate) exit(e uint64) { g.dialing[e&1].Add(-1) }

// quiesce waits until every offer that loaded a candidate snapshot
// published before this call has finished dialing, for at most limit
// (the dial timeout bounds a dial).
//
// Calls are serialized: a second quiesce that moved the epoch on while the
// first waited would wait only on the newer parity, and miss the dials of
// the older one, which began before it too.
func (g *dialGate) quiesce(limit time.Duration) {
	g.quiet <- struct{}{}
	defer func() { <-g.quiet }()
	e := g.epoch.Add(1) - 1
	waitUntil(limit, func() bool { return g.dialing[e&1].Load() == 0 })
}

// waitUntil polls cond every millisecond until it holds or limit passes.
// The conditions it waits for last microseconds: a dial in progress, a
// head being sniffed.
func waitUntil(limit time.Duration, cond func() bool) {
	deadline := time.Now().Add(limit)
	for !cond() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}
