package defuss

import (
	"strconv"
	"sync/atomic"
)

// slot is one worker position for the life of the primary. Its supervisor
// goroutine owns the process; conns is touched by connection goroutines.
type slot struct {
	index   int
	conns   atomic.Int64
	attrs   slotAttrs
	info    WorkerInfo       // guarded by primary.mu
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

// poolView is an immutable snapshot of the slot table.
type poolView struct {
	all   []WorkerInfo
	cands []WorkerInfo // the healthy subset, handed to the Balancer
}

// setState moves slot s to state and publishes the table.
func (p *primary) setState(s *slot, state WorkerState, pid int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s.info.State = state
	s.info.PID = pid
	p.publish()
}

func (p *primary) state(s *slot) WorkerState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return s.info.State
}

// publish stores a new view of the slot table. p.mu must be held.
func (p *primary) publish() {
	v := &poolView{all: make([]WorkerInfo, len(p.slots))}
	for i, s := range p.slots {
		info := s.info
		info.Ready = info.Ready && info.State != WorkerDown
		info.Healthy = info.State == WorkerReady
		v.all[i] = info
		if info.Healthy {
			v.cands = append(v.cands, info)
		}
	}
	p.view.Store(v)
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *primary) snapshot() *poolView { return p.view.Load() }

func (p *primary) candidates() []WorkerInfo { return p.view.Load().cands }

// changes returns a channel closed at the next publish.
func (p *primary) changes() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}
