package defuss

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/defuss-go/defuss/internal/proc"
	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
)

// envSlot marks a process as a worker and names its slot. It is a
// convenience for IsWorker, not a security boundary: the inherited pipes
// are what bind a worker to its primary.
const envSlot = "DEFUSS_WORKER_SLOT"

// Inherited descriptors in a worker: fd 3 carries frames to the primary,
// fd 4 carries commands from it.
const (
	fdStatus  = 3
	fdControl = 4
	fdHandoff = 5 // hand-off mode only
)

// Respawn backoff: the first retry after a crash waits backoffMin, each
// further consecutive failure doubles it up to backoffMax; a worker that
// ran for stableUptime resets the sequence.
const (
	backoffMin   = 50 * time.Millisecond
	backoffMax   = 30 * time.Second
	stableUptime = 10 * time.Second
)

// Slot states, as reported in WorkerInfo.State.
const (
	stateStarting  = "starting"
	stateReady     = "ready"
	stateStale     = "stale"
	stateUnhealthy = "unhealthy"
	stateDraining  = "draining"
	stateDown      = "down"
)

// ErrWorkerStart is wrapped by the error Start returns when a worker fails
// before it ever reports ready.
var ErrWorkerStart = errors.New("defuss: worker failed to start")

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

// process is one worker process of a slot and what the supervisor knows of
// it. Only the slot's supervisor goroutine touches it.
type process struct {
	cmd     *exec.Cmd
	pid     int
	status  *os.File
	control *os.File
	events  chan frameEvent // from readFrames; closed at EOF
	exited  chan error      // cmd.Wait's result
	started time.Time
	dialed  atomic.Uint64 // connections the primary made (or handed) to this process
	handoff *net.UnixConn // hand-off mode: connections' descriptors go here (fd 5 in the worker)
	open    atomic.Int64  // hand-off mode: handed connections the worker has not reported closed

	ready     bool
	addr      string
	lastBeat  time.Time
	failMsg   string
	limit     uint64 // recycle after this many requests; 0 = never
	reason    string // why the primary ended it; "" = it died by itself
	reasonErr error
	timer     *time.Timer // start timeout before ready, shutdown timeout while draining
	draining  bool
}

func (pr *process) eventsC() <-chan frameEvent {
	if pr == nil {
		return nil
	}
	return pr.events
}

func (pr *process) exitC() <-chan error {
	if pr == nil {
		return nil
	}
	return pr.exited
}

func (pr *process) timerC() <-chan time.Time {
	if pr == nil || pr.timer == nil {
		return nil
	}
	return pr.timer.C
}

// kill ends the process, remembering the first reason given.
func (pr *process) kill(reason string, err error) {
	if pr.reason == "" {
		pr.reason, pr.reasonErr = reason, err
	}
	pr.cmd.Process.Kill()
}

// drainProc asks the process to stop gracefully within timeout, and arms
// the timer that kills it after that.
func (pr *process) drainProc(timeout time.Duration, reason string) {
	if pr.draining {
		return
	}
	pr.draining = true
	if pr.reason == "" {
		pr.reason = reason
	}
	// The worker serves until it has accepted every connection the primary
	// made to it, then stops accepting: the callers made sure that no
	// connection to it is still being dialed.
	drain := &command{kind: frameDrain, shutdownTimeout: timeout, conns: pr.dialed.Load()}
	if _, err := pr.control.Write(appendCommand(nil, drain)); err != nil {
		pr.cmd.Process.Signal(syscall.SIGTERM)
	}
	if pr.timer != nil {
		pr.timer.Stop()
	}
	pr.timer = time.NewTimer(timeout)
}

// replaceReq asks a slot's supervisor to replace its process by a new
// one: start it, wait until it is ready, route new connections to it,
// then drain the old one. done receives the outcome once the old process
// has exited.
type replaceReq struct {
	reason string // "reload" or "recycle"
	done   chan error
}

// supervisor owns one slot: its current process, a successor being
// started for a replacement, and a predecessor being drained.
type supervisor struct {
	p        *primary
	s        *slot
	startup  chan<- error // the first process's outcome; nil once sent
	cur      *process     // the process the slot routes to (nil while down)
	next     *process     // a successor that has not reported ready yet
	old      *process     // a predecessor that drains
	pending  *replaceReq  // the replacement in progress
	failures int          // consecutive early deaths, for the backoff
	respawn  *time.Timer  // armed while the slot waits to respawn
	stopping bool
	retiring bool // scaling down removed the slot
	gone     bool // respawn is off and the process died: the slot is over
}

// supervise runs slot s until the primary has stopped and every process
// of the slot has exited. startup receives the outcome of the slot's
// first process (nil once it is ready).
func (p *primary) supervise(s *slot, startup chan<- error) {
	sv := &supervisor{p: p, s: s, startup: startup}
	sv.startCur()
	tick := time.NewTicker(min(p.cfg.heartbeat, p.cfg.staleAfter/4))
	defer tick.Stop()
	defer close(s.done)
	drain, force, retire := p.drain, p.force, s.retire
	for !(sv.stopping || sv.gone) || sv.cur != nil || sv.next != nil || sv.old != nil {
		var respawn <-chan time.Time
		if sv.respawn != nil {
			respawn = sv.respawn.C
		}
		select {
		case ev, ok := <-sv.cur.eventsC():
			sv.onEvent(sv.cur, ev, ok)
		case ev, ok := <-sv.next.eventsC():
			sv.onEvent(sv.next, ev, ok)
		case ev, ok := <-sv.old.eventsC():
			sv.onEvent(sv.old, ev, ok)
		case err := <-sv.cur.exitC():
			sv.onExit(sv.cur, err)
		case err := <-sv.next.exitC():
			sv.onExit(sv.next, err)
		case err := <-sv.old.exitC():
			sv.onExit(sv.old, err)
		case <-sv.cur.timerC():
			sv.onTimer(sv.cur)
		case <-sv.next.timerC():
			sv.onTimer(sv.next)
		case <-sv.old.timerC():
			sv.onTimer(sv.old)
		case <-respawn:
			sv.respawn = nil
			sv.startCur()
		case <-tick.C:
			sv.checkStale()
		case req := <-s.replace:
			sv.startReplace(req)
		case <-drain:
			drain = nil
			sv.stop()
		case <-retire:
			retire = nil
			sv.retire()
		case <-force:
			force = nil
			for _, pr := range []*process{sv.cur, sv.next, sv.old} {
				if pr != nil {
					pr.kill("shutdown", errors.New("forced shutdown"))
				}
			}
		}
	}
	if sv.respawn != nil {
		sv.respawn.Stop()
	}
	p.setState(s, stateDown, 0)
}

// start spawns a new process for the slot. It returns nil if spawning
// failed; the failure is handled like a process that died at once.
func (sv *supervisor) start() (*process, error) {
	p, s := sv.p, sv.s
	pr, err := p.spawn(s.index)
	if err != nil {
		err = fmt.Errorf("defuss: spawn worker %d: %w", s.index, err)
		p.log.Error("spawn failed", "worker", s.index, "err", err)
		return nil, err
	}
	if p.cfg.maxRequests > 0 {
		pr.limit = p.cfg.maxRequests
		if j := p.cfg.maxRequestsJitter; j > 0 {
			pr.limit += uint64(mrand.Int64N(int64(j) + 1))
		}
	}
	p.log.Info("worker spawned", "worker", s.index, "worker_pid", pr.pid)
	if sv.cur == nil && sv.next == nil {
		p.mu.Lock()
		s.info.PID, s.info.Addr, s.info.Started, s.info.LastHeartbeat, s.info.Stats = pr.pid, "", pr.started, time.Time{}, Stats{}
		s.info.Ready = false
		p.mu.Unlock()
		p.setState(s, stateStarting, pr.pid)
	}
	return pr, nil
}

// startCur starts the slot's current process, or handles the failure to
// spawn one like a death at once.
func (sv *supervisor) startCur() {
	var err error
	if sv.cur, err = sv.start(); err != nil {
		sv.report(err)
		sv.died("spawn", err, 0)
	}
}

// report sends the first process's outcome to Start.
func (sv *supervisor) report(err error) {
	if sv.startup != nil {
		sv.startup <- err
		sv.startup = nil
	}
}

func (sv *supervisor) onEvent(pr *process, ev frameEvent, ok bool) {
	p, s := sv.p, sv.s
	if !ok {
		pr.events = nil // EOF: the process is exiting; wait for it
		return
	}
	if ev.err == nil {
		ev.err = p.checkMessage(s, pr.pid, &ev.msg)
	}
	if ev.err != nil {
		p.tel.badFrames.Add(bg, 1, s.attrs.worker)
		p.log.Error("bad frame from worker", "worker", s.index, "worker_pid", pr.pid, "err", ev.err)
		if pr == sv.cur {
			p.setState(s, stateUnhealthy, pr.pid)
		}
		if ev.fatal {
			pr.kill("protocol", ev.err)
		}
		return
	}
	now := time.Now()
	pr.lastBeat = now
	switch ev.msg.kind {
	case frameReady:
		if pr.ready {
			return
		}
		pr.ready = true
		pr.addr = net.JoinHostPort(p.cfg.workerHost, strconv.Itoa(ev.msg.port))
		if pr.timer != nil && !pr.draining {
			pr.timer.Stop()
			pr.timer = nil
		}
		p.log.Info("worker ready", "worker", s.index, "worker_pid", pr.pid, "addr", pr.addr,
			"startup", now.Sub(pr.started).Round(time.Millisecond))
		switch pr {
		case sv.next:
			sv.promote(now, &ev.msg.stats)
		case sv.cur:
			sv.publishCur(now, &ev.msg.stats)
			sv.report(nil)
		}
	case frameStats:
		if pr != sv.cur {
			return
		}
		p.mu.Lock()
		s.info.LastHeartbeat, s.info.Stats = now, ev.msg.stats
		state := s.info.State
		p.publish()
		p.mu.Unlock()
		if pr.ready && !pr.draining && (state == stateStale || state == stateUnhealthy) {
			p.log.Info("worker healthy again", "worker", s.index, "worker_pid", pr.pid)
			p.setState(s, stateReady, pr.pid)
		}
		sv.checkLimits(pr, &ev.msg.stats)
	case frameStopping:
		if pr == sv.cur {
			p.setState(s, stateDraining, pr.pid)
		}
	case frameFailed:
		pr.failMsg = ev.msg.err
	case frameClosed:
		n := int64(ev.msg.closed)
		if pr.open.Add(-n) < 0 {
			pr.open.Add(n) // more closes than connections: not trusted
			p.log.Error("bad frame from worker", "worker", s.index, "worker_pid", pr.pid,
				"err", fmt.Errorf("%w: %d closes reported, more than were handed", errFrame, n))
			p.tel.badFrames.Add(bg, 1, s.attrs.worker)
			return
		}
		s.conns.Add(-n)
		p.tel.active.Add(bg, -n, s.attrs.worker)
	}
}

// publishCur routes the slot's new connections to its current process,
// which has just reported ready.
func (sv *supervisor) publishCur(now time.Time, st *Stats) {
	p, s, pr := sv.p, sv.s, sv.cur
	p.mu.Lock()
	s.info.PID, s.info.Addr, s.info.Started = pr.pid, pr.addr, pr.started
	s.info.Ready, s.info.LastHeartbeat, s.info.Stats = true, now, *st
	s.info.proc = pr
	if !pr.draining {
		s.info.State = stateReady
	}
	p.publish()
	p.mu.Unlock()
}

// promote makes the ready successor the slot's process and drains the
// predecessor: new connections go to the successor from now on.
func (sv *supervisor) promote(now time.Time, st *Stats) {
	p, s := sv.p, sv.s
	prev := sv.cur
	sv.cur, sv.next = sv.next, nil
	reason := "reload"
	if sv.pending != nil {
		reason = sv.pending.reason
	}
	p.mu.Lock()
	s.info.Restarts++
	p.mu.Unlock()
	sv.publishCur(now, st)
	p.tel.restart(s.index, reason)
	if prev == nil {
		sv.finishReplace(nil)
		return
	}
	p.log.Info("worker replaced; draining the old process", "worker", s.index, "old_pid", prev.pid,
		"new_pid", sv.cur.pid, "reason", reason)
	sv.old = prev
	p.quiesce() // no connection is still being dialed to prev
	prev.drainProc(p.cfg.shutdownTimeout, reason)
}

// onExit handles the end of one of the slot's processes.
func (sv *supervisor) onExit(pr *process, werr error) {
	p, s := sv.p, sv.s
	pr.finish()
	uptime := time.Since(pr.started)
	reason, err := pr.reason, pr.reasonErr
	if reason == "" {
		reason, err = "crash", werr
		if pr.failMsg != "" {
			err = fmt.Errorf("%s (%w)", pr.failMsg, werr)
		}
		if sv.stopping {
			reason = "shutdown"
		}
	}
	if pr.timer != nil {
		pr.timer.Stop()
	}
	p.endConnsOf(s.index, pr.pid)
	if n := pr.open.Swap(0); n != 0 {
		// Handed-off connections the worker had not reported closed died
		// with it.
		s.conns.Add(-n)
		p.tel.active.Add(bg, -n, s.attrs.worker)
	}
	p.log.Info("worker exited", "worker", s.index, "worker_pid", pr.pid, "status", exitStatus(werr), "reason", reason)
	if p.cfg.onExit != nil {
		p.cfg.onExit(s.index, pr.pid, werr)
	}
	switch pr {
	case sv.old:
		sv.old = nil
		sv.finishReplace(nil)
	case sv.next:
		sv.next = nil
		sv.finishReplace(fmt.Errorf("%w: worker %d (pid %d): %w", ErrWorkerStart, s.index, pr.pid, err))
		if sv.cur == nil {
			sv.died(reason, err, uptime) // the predecessor died meanwhile: respawn
		}
	case sv.cur:
		sv.cur = nil
		p.mu.Lock()
		s.info.Ready, s.info.Addr, s.info.PID = false, "", 0
		p.mu.Unlock()
		p.setState(s, stateDown, 0)
		if !pr.ready {
			sv.report(fmt.Errorf("%w: worker %d (pid %d): %w", ErrWorkerStart, s.index, pr.pid, err))
		}
		sv.died(reason, err, uptime)
	}
}

// died decides what follows the death of the slot's current process (or
// the failure to spawn it): a respawn after a backoff, or nothing during
// shutdown or with respawn off.
func (sv *supervisor) died(reason string, err error, uptime time.Duration) {
	p, s := sv.p, sv.s
	if sv.stopping {
		return
	}
	if sv.next != nil {
		return // a successor is starting; it takes over when ready
	}
	if !p.cfg.respawn {
		p.log.Warn("worker exited, not respawning", "worker", s.index, "reason", reason, "err", err)
		sv.gone = true
		p.slotGone()
		return
	}
	if uptime >= stableUptime {
		sv.failures = 0
	}
	sv.failures++
	delay := min(backoffMin<<min(sv.failures-1, 20), backoffMax)
	attrs := []any{"worker", s.index, "reason", reason, "err", err, "uptime", uptime.Round(time.Millisecond), "backoff", delay}
	if sv.failures >= crashLoopAfter {
		p.log.Error("worker crash loop: respawning with backoff", append(attrs, "consecutive_failures", sv.failures)...)
	} else {
		p.log.Warn("worker exited, respawning", attrs...)
	}
	p.tel.restart(s.index, reason)
	p.mu.Lock()
	s.info.Restarts++
	p.mu.Unlock()
	sv.respawn = time.NewTimer(delay)
}

// crashLoopAfter consecutive early deaths are logged as a crash loop.
const crashLoopAfter = 3

func (sv *supervisor) onTimer(pr *process) {
	p := sv.p
	pr.timer = nil
	switch {
	case pr.draining:
		p.log.Warn("worker did not stop in time, killing it", "worker", sv.s.index, "worker_pid", pr.pid, "timeout", p.cfg.shutdownTimeout)
		pr.kill(pr.reason, errors.New("shutdown timeout"))
	case !pr.ready:
		pr.kill("start-timeout", fmt.Errorf("no ready report within %v", p.cfg.startTimeout))
	}
}

// checkStale marks a silent current process stale, and kills it when it
// stays silent for twice staleAfter.
func (sv *supervisor) checkStale() {
	p, s, pr := sv.p, sv.s, sv.cur
	if pr == nil || !pr.ready || pr.draining {
		return
	}
	switch age := time.Since(pr.lastBeat); {
	case age > 2*p.cfg.staleAfter:
		pr.kill("stale", fmt.Errorf("no heartbeat for %v", age.Round(time.Millisecond)))
	case age > p.cfg.staleAfter:
		if p.state(s) == stateReady {
			p.log.Warn("worker stale", "worker", s.index, "worker_pid", pr.pid, "silent", age.Round(time.Millisecond))
			p.setState(s, stateStale, pr.pid)
		}
	}
}

// checkLimits starts recycling the current process once it has served its
// request quota or passed the memory cap, one worker of the pool at a time.
func (sv *supervisor) checkLimits(pr *process, st *Stats) {
	p := sv.p
	over := (pr.limit > 0 && st.Requests >= pr.limit) || (p.cfg.maxMemory > 0 && st.RSS >= p.cfg.maxMemory)
	if !over || sv.pending != nil || sv.stopping || pr.draining {
		return
	}
	select {
	case p.replaceTok <- struct{}{}:
	default:
		return // another worker is being replaced; try at the next heartbeat
	}
	p.log.Info("worker over its limit; recycling", "worker", sv.s.index, "worker_pid", pr.pid,
		"requests", st.Requests, "request_limit", pr.limit, "rss", st.RSS, "rss_limit", p.cfg.maxMemory)
	sv.startReplace(&replaceReq{reason: "recycle", done: nil})
}

// startReplace begins replacing the current process.
func (sv *supervisor) startReplace(req *replaceReq) {
	switch {
	case sv.retiring:
		sv.reply(req, nil) // the slot is going away: nothing to replace
		return
	case sv.stopping:
		sv.reply(req, ErrShuttingDown)
		return
	case sv.pending != nil:
		sv.reply(req, errors.New("defuss: a replacement of this worker is already in progress"))
		return
	case sv.cur == nil:
		// The slot is down and respawns from the binary on disk anyway.
		sv.reply(req, nil)
		return
	}
	sv.pending = req
	var err error
	if sv.next, err = sv.start(); err != nil {
		sv.finishReplace(fmt.Errorf("%w: %w", ErrWorkerStart, err))
	}
}

// finishReplace ends the replacement in progress with err.
func (sv *supervisor) finishReplace(err error) {
	req := sv.pending
	if req == nil {
		return
	}
	sv.pending = nil
	sv.reply(req, err)
}

func (sv *supervisor) reply(req *replaceReq, err error) {
	if req.done != nil {
		req.done <- err
	} else {
		<-sv.p.replaceTok // a recycle: give the token back
	}
}

// stop starts the slot's part of a graceful shutdown.
func (sv *supervisor) stop() {
	sv.stopping = true
	if sv.respawn != nil {
		sv.respawn.Stop()
		sv.respawn = nil
	}
	if sv.next != nil {
		sv.next.kill("shutdown", ErrShuttingDown)
	}
	sv.p.awaitRoutingIdle() // every accepted connection has been routed
	for _, pr := range []*process{sv.cur, sv.old} {
		if pr != nil {
			pr.drainProc(sv.p.cfg.shutdownTimeout, "shutdown")
		}
	}
	if sv.cur != nil {
		sv.p.setState(sv.s, stateDraining, sv.cur.pid)
	}
}

// retire drains the slot's processes and ends the slot: scaling down. The
// slot is no longer in the table, so no new connection picks it; those
// that picked it from an older snapshot finish dialing first.
func (sv *supervisor) retire() {
	p := sv.p
	sv.stopping, sv.retiring = true, true
	if sv.respawn != nil {
		sv.respawn.Stop()
		sv.respawn = nil
	}
	if sv.next != nil {
		sv.next.kill("scale-down", errors.New("slot retired"))
	}
	p.quiesce()
	for _, pr := range []*process{sv.cur, sv.old} {
		if pr != nil {
			pr.drainProc(p.cfg.shutdownTimeout, "scale-down")
		}
	}
	p.log.Info("worker slot retired; draining", "worker", sv.s.index)
}

// finish releases the pipes of an exited process. Frames still in the
// pipe are read first (a failure frame says why the process died), for a
// bounded time in case a descendant still holds the write end.
func (pr *process) finish() {
	if pr.events != nil {
		t := time.NewTimer(200 * time.Millisecond)
	drain:
		for {
			select {
			case ev, ok := <-pr.events:
				if !ok {
					break drain
				}
				if ev.err == nil && ev.msg.kind == frameFailed {
					pr.failMsg = ev.msg.err
				}
			case <-t.C:
				break drain
			}
		}
		t.Stop()
	}
	pr.status.Close() // unblocks readFrames if it still waits
	pr.control.Close()
	if pr.handoff != nil {
		pr.handoff.Close()
	}
	if pr.events != nil {
		for range pr.events {
		}
	}
}

// checkMessage validates a decoded frame against the slot and process it
// came from: a worker speaks only for its own slot.
func (p *primary) checkMessage(s *slot, pid int, m *message) error {
	switch {
	case m.slot != s.index:
		return fmt.Errorf("%w: worker %d sent a frame for slot %d", errFrame, s.index, m.slot)
	case m.pid != pid:
		return fmt.Errorf("%w: worker %d (pid %d) sent a frame for pid %d", errFrame, s.index, pid, m.pid)
	case m.kind == frameReady && p.cfg.baseWorkerPort > 0 && m.port != p.cfg.baseWorkerPort+s.index:
		return fmt.Errorf("%w: worker %d reported port %d, want %d", errFrame, s.index, m.port, p.cfg.baseWorkerPort+s.index)
	}
	return nil
}

// frameEvent is one frame read from a worker, or why it could not be.
type frameEvent struct {
	msg   message
	err   error
	fatal bool // the stream is out of sync; nothing more can be trusted
}

// readFrames reads frames from a worker's status pipe until EOF or an
// unrecoverable error, then closes events.
func readFrames(r *os.File, events chan<- frameEvent) {
	defer close(events)
	buf := make([]byte, maxFramePayload)
	for {
		typ, payload, err := readFrame(r, buf)
		if err != nil {
			if errors.Is(err, errFrame) {
				events <- frameEvent{err: err, fatal: true}
			}
			return
		}
		m, err := decodeMessage(typ, payload)
		events <- frameEvent{msg: m, err: err}
	}
}

// spawn starts a worker process for slot i with its two pipes, sends it
// its configuration, and starts the goroutines that watch it.
func (p *primary) spawn(i int) (*process, error) {
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	controlR, controlW, err := os.Pipe()
	if err != nil {
		statusR.Close()
		statusW.Close()
		return nil, err
	}
	cmd := exec.Command(p.exe, os.Args[1:]...)
	cmd.Env = p.workerEnv(i)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{statusW, controlR} // fd 3, fd 4
	cmd.SysProcAttr = proc.SysProcAttr()
	var handoff *net.UnixConn
	if p.cfg.handoff {
		var theirs *os.File
		if handoff, theirs, err = handoffPair(); err != nil {
			statusR.Close()
			statusW.Close()
			controlR.Close()
			controlW.Close()
			return nil, err
		}
		cmd.ExtraFiles = append(cmd.ExtraFiles, theirs) // fd 5
		defer theirs.Close()
	}
	err = cmd.Start()
	statusW.Close()
	controlR.Close()
	if err != nil {
		statusR.Close()
		controlW.Close()
		if handoff != nil {
			handoff.Close()
		}
		return nil, err
	}
	pr := &process{
		cmd:     cmd,
		pid:     cmd.Process.Pid,
		status:  statusR,
		control: controlW,
		handoff: handoff,
		events:  make(chan frameEvent, 8),
		exited:  make(chan error, 1),
		started: time.Now(),
		timer:   time.NewTimer(p.cfg.startTimeout),
	}
	go readFrames(statusR, pr.events)
	go func() { pr.exited <- cmd.Wait() }()
	port := 0
	if p.cfg.baseWorkerPort > 0 {
		port = p.cfg.baseWorkerPort + i
	}
	// The pipe buffer takes this small frame without blocking, even if the
	// worker never reads it.
	_, err = controlW.Write(appendCommand(nil, &command{kind: frameConfig, slot: i, port: port,
		host: p.cfg.workerHost, heartbeat: p.cfg.heartbeat, shutdownTimeout: p.cfg.shutdownTimeout, secret: p.secret,
		handoff: p.cfg.handoff}))
	if err != nil {
		// The process is gone already (or going): its exit status says why.
		p.log.Warn("cannot send configuration to worker", "worker", i, "worker_pid", pr.pid, "err", err)
		cmd.Process.Kill()
	}
	return pr, nil
}

// workerEnv is the environment of slot i's process.
func (p *primary) workerEnv(i int) []string {
	env := make([]string, 0, len(os.Environ())+len(p.cfg.workerEnv)+2)
	procsSet := false
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, envSlot+"=") {
			continue
		}
		procsSet = procsSet || strings.HasPrefix(kv, "GOMAXPROCS=")
		env = append(env, kv)
	}
	for _, kv := range p.cfg.workerEnv {
		procsSet = procsSet || strings.HasPrefix(kv, "GOMAXPROCS=")
	}
	env = append(env, p.cfg.workerEnv...)
	if !procsSet {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(p.cfg.workerProcs()))
	}
	return append(env, envSlot+"="+strconv.Itoa(i))
}

func exitStatus(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "signal " + ws.Signal().String()
		}
		return "exit " + strconv.Itoa(ee.ExitCode())
	}
	if err == nil {
		return "exit 0"
	}
	return err.Error()
}

// handoffPair returns the primary's end of a new hand-off socket pair and
// the worker's end, to pass as fd 5. SOCK_SEQPACKET keeps each descriptor
// in its own message.
func handoffPair() (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "defuss-handoff")
	defer ours.Close() // FileConn made its own descriptor
	c, err := net.FileConn(ours)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "defuss-handoff-worker"), nil
}

// worker is the worker role: it serves the handler on its loopback port
// and reports to the primary.
type worker struct {
	slot     int
	log      *slog.Logger
	srv      *http.Server
	ln       net.Listener
	status   *os.File
	control  *os.File
	conns    atomic.Int64
	requests atomic.Uint64
	stats    *sampler

	heartbeat       time.Duration
	shutdownTimeout time.Duration
	secret          [secretLen]byte

	writeMu  sync.Mutex       // serialises frames on status
	stop     chan stopRequest // the first stop request wins
	accepted atomic.Uint64    // connections accepted on the listener, all told
	draining atomic.Bool      // the listener was closed on purpose

	handoff      *handoffListener // hand-off mode
	handedClosed atomic.Int64     // handed-off connections closed, not yet reported
	kick         chan struct{}    // wakes reportCloses
	done         chan struct{}    // closed when the server has stopped; ends the loops
	finished     chan struct{}    // closed when everything is released; err is set
	err          error
	wg           sync.WaitGroup
}

// errNotWorker says the process looks like a worker but lacks its pipes.
var errNotWorker = errors.New("defuss: " + envSlot + " is set but this process was not started by a defuss primary")

// startWorker is Start in a worker process.
func startWorker(h http.Handler, c *config) (*Server, error) {
	slot, err := strconv.Atoi(os.Getenv(envSlot))
	if err != nil || slot < 0 {
		return nil, fmt.Errorf("%w: %s=%q", errNotWorker, envSlot, os.Getenv(envSlot))
	}
	status, err1 := inheritedPipe(fdStatus, "defuss-status")
	control, err2 := inheritedPipe(fdControl, "defuss-control")
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("%w: %w", errNotWorker, err)
	}
	w := &worker{
		slot:     slot,
		log:      c.logger.With("component", "defuss", "role", "worker", "worker", slot, "pid", os.Getpid()),
		status:   status,
		control:  control,
		stop:     make(chan stopRequest, 1),
		done:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	w.stats = newSampler(&w.conns, &w.requests)
	if err := w.start(h); err != nil {
		w.fail(err)
		if w.srv != nil {
			w.srv.Close()
			close(w.done)
			if w.handoff != nil {
				w.handoff.Close()
				w.handoff.uc.Close()
			}
			w.wg.Wait()
		}
		status.Close()
		control.Close()
		return nil, err
	}
	w.wg.Add(2)
	go w.heartbeats()
	go w.commands()
	go w.run(c.signals)
	return &Server{w: w}, nil
}

// inheritedPipe returns fd as a pollable *os.File after checking that it
// is a pipe, and marks it close-on-exec so that the worker's own children
// do not inherit it.
func inheritedPipe(fd int, name string) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return nil, fmt.Errorf("fd %d is not a pipe", fd)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// start reads the configuration, binds the port, starts serving and
// reports ready.
func (w *worker) start(h http.Handler) error {
	w.control.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, maxFramePayload)
	typ, payload, err := readFrame(w.control, buf)
	if err != nil {
		return fmt.Errorf("defuss: worker %d: read configuration: %w", w.slot, err)
	}
	w.control.SetReadDeadline(time.Time{})
	cfg, err := decodeCommand(typ, payload)
	if err == nil && (cfg.kind != frameConfig || cfg.slot != w.slot) {
		err = fmt.Errorf("%w: want configuration for slot %d", errFrame, w.slot)
	}
	if err != nil {
		return fmt.Errorf("defuss: worker %d: %w", w.slot, err)
	}
	w.heartbeat, w.shutdownTimeout = cfg.heartbeat, cfg.shutdownTimeout
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.port)))
	if err != nil {
		return fmt.Errorf("defuss: worker %d: %w", w.slot, err)
	}
	w.ln = ln
	w.secret = cfg.secret
	w.srv = &http.Server{
		Handler:           w.counting(h),
		ConnState:         w.connState,
		ReadHeaderTimeout: time.Minute,
		ErrorLog:          slog.NewLogLogger(w.log.Handler(), slog.LevelWarn),
	}
	w.wg.Add(1)
	go w.serve()
	if cfg.handoff {
		uc, err := inheritedSocket(fdHandoff)
		if err != nil {
			return fmt.Errorf("defuss: worker %d: hand-off socket: %w", w.slot, err)
		}
		w.handoff = &handoffListener{uc: uc, addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{}),
			accepted: &w.accepted, w: w}
		w.kick = make(chan struct{}, 1)
		w.wg.Add(3)
		go w.serveHandoff()
		go w.handoff.receive(&w.wg, w.log)
		go w.reportCloses()
	}
	return w.send(&message{kind: frameReady, port: ln.Addr().(*net.TCPAddr).Port, stats: w.stats.sample()})
}

// serveHandoff serves the connections the primary hands off.
func (w *worker) serveHandoff() {
	defer w.wg.Done()
	if err := w.srv.Serve(w.handoff); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		w.log.Error("serve handed-off connections", "err", err)
	}
}

// reportCloses tells the primary, in batches, how many handed-off
// connections have closed, so that its connection counts stay exact.
func (w *worker) reportCloses() {
	defer w.wg.Done()
	for {
		select {
		case <-w.kick:
			if n := w.handedClosed.Swap(0); n > 0 {
				if err := w.send(&message{kind: frameClosed, closed: int(n)}); err != nil {
					return
				}
			}
		case <-w.done:
			return
		}
	}
}

// handedConn is a connection that the primary handed off: its close,
// also after a handler hijacked it, is reported to the primary.
type handedConn struct {
	*net.TCPConn
	w    *worker
	once sync.Once
}

var _ net.Conn = (*handedConn)(nil)

func (c *handedConn) Close() error {
	err := c.TCPConn.Close()
	c.once.Do(c.w.handedClose)
	return err
}

// handedClose counts one closed handed-off connection and wakes the
// reporter.
func (w *worker) handedClose() {
	w.handedClosed.Add(1)
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// handoffListener yields the connections whose descriptors arrive on the
// hand-off socket.
type handoffListener struct {
	uc       *net.UnixConn
	addr     net.Addr
	conns    chan net.Conn
	done     chan struct{}
	once     sync.Once
	accepted *atomic.Uint64
	w        *worker // for close reports
}

var _ net.Listener = (*handoffListener)(nil)

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		l.accepted.Add(1)
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept; the socket itself closes when the worker stops.
func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// receive reads descriptors from the hand-off socket until it closes.
func (l *handoffListener) receive(wg *sync.WaitGroup, log *slog.Logger) {
	defer wg.Done()
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		_, oobn, _, _, err := l.uc.ReadMsgUnix(b[:], oob)
		if err != nil {
			return // the primary is gone, or the worker stops
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			log.Error("hand-off message", "err", err)
			continue
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				f := os.NewFile(uintptr(fd), "handed-off")
				c, err := net.FileConn(f)
				f.Close()
				tc, ok := c.(*net.TCPConn)
				if err != nil || !ok {
					log.Error("handed-off connection is not TCP", "err", err)
					if c != nil {
						c.Close()
					}
					continue
				}
				hc := &handedConn{TCPConn: tc, w: l.w}
				select {
				case l.conns <- hc:
				case <-l.done:
					hc.Close()
				}
			}
		}
	}
}

// inheritedSocket returns fd as a Unix socket after checking what it is.
func inheritedSocket(fd int) (*net.UnixConn, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("fd %d is not a socket", fd)
	}
	unix.CloseOnExec(fd)
	f := os.NewFile(uintptr(fd), "defuss-handoff")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("fd %d is not a Unix socket", fd)
	}
	return uc, nil
}

func (w *worker) serve() {
	defer w.wg.Done()
	// Every connection must start with the primary's PROXY header: it
	// carries the client's address, and the secret proves where it comes
	// from, so a local process that dials the worker port directly is not
	// served and cannot claim any client address.
	ln := &proxyproto.Listener{
		Listener: countingListener{w.ln, &w.accepted},
		ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			return proxyproto.REQUIRE, nil
		},
		ValidateHeader:    w.checkSecret,
		ReadHeaderTimeout: 5 * time.Second,
	}
	if err := w.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !w.draining.Load() {
		w.log.Error("serve", "err", err)
		w.err = fmt.Errorf("defuss: worker %d: serve: %w", w.slot, err) // read after wg.Wait
		w.requestStop(0, 0)
	}
}

// drain stops the server gracefully within timeout, after accepting the
// conns connections the primary made to this worker.
//
// It does not use http.Server.Shutdown, which drops a request read after
// it began, even the first request of a connection accepted just before:
// the primary dials a draining worker only until it has been replaced, so
// such a request is a client's, and must be served. Instead: accept what
// the primary sent, stop accepting, turn keep-alives off (idle
// connections close now, busy ones after their current request), and
// wait for the connections to close.
func (w *worker) drain(timeout time.Duration, conns uint64) {
	deadline := time.Now().Add(timeout)
	if conns > 0 {
		waitUntil(min(timeout, 2*time.Second), func() bool { return w.accepted.Load() >= conns })
	}
	w.draining.Store(true)
	w.srv.SetKeepAlivesEnabled(false)
	w.ln.Close()
	if w.handoff != nil {
		w.handoff.Close()
	}
	waitUntil(time.Until(deadline), func() bool { return w.conns.Load() == 0 })
	if n := w.conns.Load(); n > 0 {
		w.log.Warn("connections still open at the shutdown timeout; closing them", "connections", n, "timeout", timeout)
	}
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n *atomic.Uint64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// errNotFromPrimary rejects a connection whose PROXY header lacks the secret.
var errNotFromPrimary = errors.New("defuss: connection does not come from this worker's primary")

// checkSecret accepts a PROXY header only if it carries the per-run secret.
func (w *worker) checkSecret(h *proxyproto.Header) error {
	tlvs, err := h.TLVs()
	if err != nil {
		return err
	}
	for _, t := range tlvs {
		if t.Type == tlvSecret && subtle.ConstantTimeCompare(t.Value, w.secret[:]) == 1 {
			return nil
		}
	}
	return errNotFromPrimary
}

// counting counts the requests h serves, for WithMaxRequests.
func (w *worker) counting(h http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.requests.Add(1)
		h.ServeHTTP(rw, r)
	})
}

func (w *worker) connState(_ net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		w.conns.Add(1)
	case http.StateClosed, http.StateHijacked:
		w.conns.Add(-1)
	}
}

// send writes one frame to the primary.
func (w *worker) send(m *message) error {
	m.slot, m.pid = w.slot, os.Getpid()
	b := appendMessage(make([]byte, 0, 128), m)
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	_, err := w.status.Write(b)
	return err
}

// fail tells the primary why this worker cannot start.
func (w *worker) fail(err error) {
	w.send(&message{kind: frameFailed, err: err.Error()})
}

// heartbeats sends a stats frame every interval until the worker stops.
func (w *worker) heartbeats() {
	defer w.wg.Done()
	t := time.NewTicker(w.heartbeat)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if err := w.send(&message{kind: frameStats, stats: w.stats.sample()}); err != nil {
				w.log.Warn("heartbeat", "err", err)
				w.requestStop(0, 0) // the primary is gone
				return
			}
		case <-w.done:
			return
		}
	}
}

// commands reads the control pipe. A drain command stops gracefully; EOF
// means the primary is gone, so the worker stops at once.
func (w *worker) commands() {
	defer w.wg.Done()
	buf := make([]byte, maxFramePayload)
	for {
		typ, payload, err := readFrame(w.control, buf)
		if err != nil {
			select {
			case <-w.done: // we closed the pipe ourselves
			default:
				w.log.Warn("primary gone, stopping now", "err", err)
				w.requestStop(0, 0)
			}
			return
		}
		c, err := decodeCommand(typ, payload)
		if err != nil || c.kind != frameDrain {
			w.log.Error("bad command from primary", "err", err, "type", typ)
			continue
		}
		w.requestStop(c.shutdownTimeout, c.conns)
	}
}

// stopRequest asks the worker to stop: gracefully within timeout (0: at
// once), after accepting conns connections in all (the primary's count of
// the connections it made to this worker, so none is left unaccepted in
// the listen queue when the listener closes).
type stopRequest struct {
	timeout time.Duration
	conns   uint64
}

// requestStop asks run to stop. The first request wins.
func (w *worker) requestStop(timeout time.Duration, conns uint64) {
	select {
	case w.stop <- stopRequest{timeout, conns}:
	default:
	}
}

// run waits for a stop request or a signal, then shuts the server down.
func (w *worker) run(signals bool) {
	var sigs chan os.Signal
	if signals {
		sigs = make(chan os.Signal, 1)
		notifySignals(sigs, syscall.SIGINT, syscall.SIGTERM)
		defer stopSignals(sigs)
		defer stopSignals(catchSIGPIPE())
	}
	var req stopRequest
	select {
	case req = <-w.stop:
	case <-sigs:
		req.timeout = w.shutdownTimeout
	}
	timeout := req.timeout
	w.log.Debug("stopping", "timeout", timeout)
	w.send(&message{kind: frameStopping})
	if timeout > 0 {
		w.drain(timeout, req.conns)
	}
	w.srv.Close()
	w.log.Debug("server stopped")
	close(w.done)
	w.control.Close()
	if w.handoff != nil {
		w.handoff.Close()
		w.handoff.uc.Close()
	}
	w.wg.Wait()
	w.status.Close()
	w.log.Debug("worker stopped")
	close(w.finished)
}

func notifySignals(ch chan<- os.Signal, sigs ...os.Signal) { signal.Notify(ch, sigs...) }

func stopSignals(ch chan<- os.Signal) { signal.Stop(ch) }

// catchSIGPIPE keeps a write to a closed stdout or stderr (a log line
// whose reader has gone) from killing the process: while SIGPIPE is
// notified, such a write returns EPIPE instead (see os/signal). The signal
// itself is dropped: nobody reads the channel.
func catchSIGPIPE() chan os.Signal {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGPIPE)
	return ch
}
