package defuss

import "sync/atomic"

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
	s.info = WorkerInfo{Index: i, State: stateStarting, conns: &s.conns, slot: s}
	return s
}

// Slot states, as reported in WorkerInfo.State.
const (
	stateStarting  = "starting"
	stateReady     = "ready"
	stateStale     = "stale"
	stateUnhealthy = "unhealthy"
	stateDraining  = "draining"
	stateDown      = "down"
)

// poolView is an immutable snapshot of the slot table.
type poolView struct {
	all   []WorkerInfo
	cands []WorkerInfo // the healthy subset, handed to the Balancer
}

// setState moves slot s to state and publishes the table.
func (p *primary) setState(s *slot, state string, pid int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s.info.State = state
	s.info.PID = pid
	p.publish()
}

func (p *primary) state(s *slot) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return s.info.State
}

// publish stores a new view of the slot table. p.mu must be held.
func (p *primary) publish() {
	v := &poolView{all: make([]WorkerInfo, len(p.slots))}
	for i, s := range p.slots {
		info := s.info
		info.Ready = info.Ready && info.State != stateDown
		info.Healthy = info.State == stateReady
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
