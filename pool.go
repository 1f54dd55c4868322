package defuss

import (
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
)

// slot is one worker position for the life of the primary. Its supervisor
// goroutine owns the process; conns is touched by connection goroutines.
type slot struct {
	index   int
	conns   atomic.Int64
	attrs   slotAttrs
	info    WorkerInfo       // guarded by pool.mu
	gone    bool             // never runs again (respawn off); guarded by pool.mu
	replace chan *replaceReq // to the supervisor
	retire  chan struct{}    // closed: drain the slot's processes and end (scaling down)
	done    chan struct{}    // closed when the supervisor has ended
}

func newSlot(i int) *slot {
	s := &slot{index: i, attrs: newSlotAttrs(i), replace: make(chan *replaceReq),
		retire: make(chan struct{}), done: make(chan struct{})}
	s.info = WorkerInfo{Index: i, State: WorkerStarting, conns: &s.conns, slot: s}
	return s
}

// A WorkerState is the state of a worker slot, as [WorkerInfo] reports
// it. Only a WorkerReady slot takes new connections.
type WorkerState int

const (
	// WorkerStarting: a process was started and has not reported ready.
	WorkerStarting WorkerState = iota
	// WorkerReady: the process serves and takes new connections.
	WorkerReady
	// WorkerStale: no heartbeat for the stale time; no new connections. A
	// process that stays silent as long again is killed and replaced.
	WorkerStale
	// WorkerUnhealthy: the process sent a malformed or misattributed
	// frame; no new connections until a valid heartbeat.
	WorkerUnhealthy
	// WorkerDraining: the process finishes its connections and stops.
	WorkerDraining
	// WorkerDown: no process, for example between a crash and its
	// respawn, or after shutdown.
	WorkerDown
)

var workerStateNames = [...]string{"starting", "ready", "stale", "unhealthy", "draining", "down"}

// String returns the state's name, as StatusHandler reports it:
// "starting", "ready", "stale", "unhealthy", "draining" or "down".
func (s WorkerState) String() string {
	if s >= 0 && int(s) < len(workerStateNames) {
		return workerStateNames[s]
	}
	return "WorkerState(" + strconv.Itoa(int(s)) + ")"
}

// MarshalText returns the state's name, so that JSON and log output show
// "ready" rather than a number.
func (s WorkerState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// poolView is an immutable snapshot of the slot table.
type poolView struct {
	all   []WorkerInfo
	cands []WorkerInfo // the healthy subset, handed to the Balancer
}

// pool is the slot table: every slot of the primary and the view of
// them that it publishes. Supervisors change their slot's record through
// its methods; the connection path reads the published view without a
// lock.
type pool struct {
	mu      sync.Mutex
	slots   []*slot
	closed  bool          // shutting down: no more slots
	changed chan struct{} // closed and replaced on every publish
	view    atomic.Pointer[poolView]
}

func newPool(n int) *pool {
	pl := &pool{slots: make([]*slot, n), changed: make(chan struct{})}
	for i := range pl.slots {
		pl.slots[i] = newSlot(i)
	}
	pl.mu.Lock()
	pl.publish()
	pl.mu.Unlock()
	return pl
}

// list returns the slots in the table now.
func (pl *pool) list() []*slot {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return slices.Clone(pl.slots)
}

// grow adds slots up to n in all, starting each with start while the
// table is locked, unless the pool is closed. It returns the new slots.
func (pl *pool) grow(n int, start func(*slot)) ([]*slot, error) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		return nil, ErrShuttingDown
	}
	var added []*slot
	for i := len(pl.slots); i < n; i++ {
		s := newSlot(i)
		pl.slots = append(pl.slots, s)
		added = append(added, s)
		start(s)
	}
	pl.publish()
	return added, nil
}

// remove takes slots out of the table. It reports whether every slot left
// is gone.
func (pl *pool) remove(slots []*slot) (none bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.slots = slices.DeleteFunc(pl.slots, func(s *slot) bool { return slices.Contains(slots, s) })
	pl.publish()
	return pl.allGone()
}

// close marks the pool as shutting down: grow refuses from now on.
func (pl *pool) close() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.closed = true
	pl.publish()
}

// slotGone records that slot s will never run again, and reports whether
// every slot is gone.
func (pl *pool) slotGone(s *slot) (none bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	s.gone = true
	return pl.allGone()
}

// noneLeft reports whether every slot is gone.
func (pl *pool) noneLeft() bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.allGone()
}

// allGone reports whether every slot in the table is gone. pl.mu must be
// held.
func (pl *pool) allGone() bool {
	for _, s := range pl.slots {
		if !s.gone {
			return false
		}
	}
	return len(pl.slots) > 0
}

// update changes slot s's record with f and publishes the table.
func (pl *pool) update(s *slot, f func(*WorkerInfo)) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	f(&s.info)
	pl.publish()
}

// setState moves slot s to state, with process pid, and publishes.
func (pl *pool) setState(s *slot, state WorkerState, pid int) {
	pl.update(s, func(w *WorkerInfo) { w.State, w.PID = state, pid })
}

// state returns slot s's state.
func (pl *pool) state(s *slot) WorkerState {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return s.info.State
}

// publish stores a new view of the table. pl.mu must be held.
func (pl *pool) publish() {
	v := &poolView{all: make([]WorkerInfo, len(pl.slots))}
	for i, s := range pl.slots {
		info := s.info
		info.Ready = info.Ready && info.State != WorkerDown
		info.Healthy = info.State == WorkerReady
		v.all[i] = info
		if info.Healthy {
			v.cands = append(v.cands, info)
		}
	}
	pl.view.Store(v)
	close(pl.changed)
	pl.changed = make(chan struct{})
}

// snapshot returns the table as last published.
func (pl *pool) snapshot() *poolView { return pl.view.Load() }

// candidates returns the workers that take new connections now.
func (pl *pool) candidates() []WorkerInfo { return pl.view.Load().cands }

// changes returns a channel closed at the next publish.
func (pl *pool) changes() <-chan struct{} {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.changed
}
