package defuss

import (
	"math/rand/v2"
	"sync/atomic"
	"time"
)

// A Balancer picks the worker that takes a new connection. It gets the
// sniffed request head and the current candidates: the workers that are
// ready, healthy and not stale, in slot order, never empty. It returns a
// pointer to one element of candidates.
//
// The primary calls a Balancer from many goroutines at once, once per new
// connection, on the hot path: it must be safe for concurrent use and
// should return quickly without blocking. (On Linux most calls come from
// the one goroutine of the accept loop: a slow Balancer delays every
// accept.) It must not modify candidates or keep req or candidates after
// it returns.
//
// A Balancer that panics, returns nil or returns a worker that is not one
// of the candidates does not hurt the primary: the connection goes to the
// next worker in round-robin order, the event is counted and logged (once
// per burst).
type Balancer func(req *Request, candidates []WorkerInfo) *WorkerInfo

// WorkerInfo describes one worker slot as the primary sees it. The values
// are a snapshot, except ActiveConnections, which reads a live counter.
type WorkerInfo struct {
	// Index is the worker's slot, 0 to workers-1. It stays the same when the
	// worker process is replaced.
	Index int
	// PID is the process id of the slot's current worker process, 0 if none.
	PID int
	// Addr is the worker's "host:port", empty until it has reported ready.
	Addr string
	// Ready reports whether the worker has reported ready and is serving.
	Ready bool
	// Healthy reports whether the worker takes new connections: ready, its
	// heartbeat is not stale, its last frame was valid, and it is not
	// draining.
	Healthy bool
	// State is the slot's state.
	State WorkerState
	// Started is when the current process was started.
	Started time.Time
	// LastHeartbeat is when the primary last received a valid frame.
	LastHeartbeat time.Time
	// Restarts counts how many times the slot's process was replaced.
	Restarts int
	// Stats is the worker's latest self-reported resource use.
	Stats Stats

	conns *atomic.Int64
	slot  *slot
	proc  *process // the process connections go to
}

// ActiveConnections returns how many connections the primary is forwarding
// to this worker right now. Unlike the other fields it is live: the count
// may change between two calls.
func (w *WorkerInfo) ActiveConnections() int64 {
	if w.conns == nil {
		return 0
	}
	return w.conns.Load()
}

// RoundRobin returns a Balancer that hands connections to the candidates in
// turn, with one counter for all connections of the primary.
func RoundRobin() Balancer {
	var n atomic.Uint64
	return func(_ *Request, c []WorkerInfo) *WorkerInfo {
		return &c[(n.Add(1)-1)%uint64(len(c))]
	}
}

// LeastConnections returns a Balancer that picks the candidate with the
// fewest active connections. A tie is broken at random, so that a burst of
// simultaneous new connections spreads over the equally loaded workers
// instead of piling onto the first.
func LeastConnections() Balancer {
	return func(_ *Request, c []WorkerInfo) *WorkerInfo {
		best, bestN, ties := 0, c[0].ActiveConnections(), 1
		for i := 1; i < len(c); i++ {
			switch n := c[i].ActiveConnections(); {
			case n < bestN:
				best, bestN, ties = i, n, 1
			case n == bestN:
				// Reservoir sampling: each of the tied candidates seen so
				// far is kept with the same chance.
				ties++
				if rand.IntN(ties) == 0 {
					best = i
				}
			}
		}
		return &c[best]
	}
}

// ResourceAware returns a Balancer that picks the candidate with the lowest
// score, where
//
//	score = connections*10 + cpuPercent*2 + heapInUse/heapTotal*100
//
// A term whose stats are missing counts as 0;
// ties go to the first candidate.
func ResourceAware() Balancer {
	return func(_ *Request, c []WorkerInfo) *WorkerInfo {
		best, bestScore := 0, 0.0
		for i := range c {
			if s := resourceScore(&c[i]); i == 0 || s < bestScore {
				best, bestScore = i, s
			}
		}
		return &c[best]
	}
}

func resourceScore(w *WorkerInfo) float64 {
	s := float64(w.ActiveConnections())*10 + w.Stats.CPUPercent*2
	if w.Stats.HeapTotal > 0 {
		s += float64(w.Stats.HeapInUse) / float64(w.Stats.HeapTotal) * 100
	}
	return s
}

// pickResult says how a pick went, for the caller's metrics and logs.
type pickResult int

const (
	pickOK       pickResult = iota
	pickPanic               // the balancer panicked
	pickNil                 // the balancer returned nil
	pickStranger            // the balancer returned a non-candidate
)

// pick asks b for a worker and falls back to fallback when b misbehaves.
// It returns the index into cands. cands is never empty.
func pick(b, fallback Balancer, req *Request, cands []WorkerInfo) (i int, res pickResult) {
	w, res := callBalancer(b, req, cands)
	if res == pickOK {
		if i = candidateIndex(cands, w); i >= 0 {
			return i, pickOK
		}
		res = pickStranger
	}
	w, _ = callBalancer(fallback, req, cands)
	return candidateIndex(cands, w), res
}

func callBalancer(b Balancer, req *Request, cands []WorkerInfo) (w *WorkerInfo, res pickResult) {
	defer func() {
		if recover() != nil {
			w, res = nil, pickPanic
		}
	}()
	if w = b(req, cands); w == nil {
		return nil, pickNil
	}
	return w, pickOK
}

// candidateIndex finds w among cands by slot index, so a balancer may
// return a copy as well as a pointer into the slice.
func candidateIndex(cands []WorkerInfo, w *WorkerInfo) int {
	if w == nil {
		return -1
	}
	for i := range cands {
		if cands[i].Index == w.Index {
			return i
		}
	}
	return -1
}

func (r pickResult) String() string {
	switch r {
	case pickPanic:
		return "panic"
	case pickNil:
		return "nil"
	case pickStranger:
		return "not a candidate"
	}
	return "ok"
}
