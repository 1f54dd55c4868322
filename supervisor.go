package defuss

import (
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"strconv"
	"time"
)

// Respawn backoff: the first retry after a crash waits backoffMin, each
// further consecutive failure doubles it up to backoffMax; a worker that
// ran for stableUptime resets the sequence.
const (
	backoffMin   = 50 * time.Millisecond
	backoffMax   = 30 * time.Second
	stableUptime = 10 * time.Second
)

// crashLoopAfter consecutive early deaths are logged as a crash loop.
const crashLoopAfter = 3

// replaceReq asks a slot's supervisor to replace its process by a new
// one: start it, wait until it is ready, route new connections to it,
// then drain the old one. done receives the outcome once the old process
// has exited.
type replaceReq struct {
	reason string // "reload" or "recycle"
	done   chan error
}

// supervisor owns one slot: its current process, a successor being
// started for a replacement, and a predecessor being drained. One
// goroutine runs it, and every process of the slot reports to it on one
// channel, events.
type supervisor struct {
	p        *primary
	s        *slot
	events   chan procEvent // from every process of the slot
	startup  chan<- error   // the first process's outcome; nil once sent
	cur      *process       // the process the slot routes to (nil while down)
	next     *process       // a successor that has not reported ready yet
	old      *process       // a predecessor that drains
	pending  *replaceReq    // the replacement in progress
	failures int            // consecutive early deaths, for the backoff
	respawn  *time.Timer    // armed while the slot waits to respawn
	stopping bool
	retiring bool // scaling down removed the slot
	gone     bool // respawn is off and the process died: the slot is over
}

// supervise runs slot s until the primary has stopped and every process
// of the slot has exited. startup receives the outcome of the slot's
// first process (nil once it is ready).
func (p *primary) supervise(s *slot, startup chan<- error) {
	sv := &supervisor{p: p, s: s, startup: startup, events: make(chan procEvent, 8)}
	sv.startCur()
	tick := time.NewTicker(min(p.cfg.heartbeat, p.cfg.staleAfter/4))
	defer tick.Stop()
	defer close(s.done)
	drain, force, retire := p.life.drain, p.life.force, s.retire
	for sv.running() {
		var respawn <-chan time.Time
		if sv.respawn != nil {
			respawn = sv.respawn.C
		}
		select {
		case ev := <-sv.events:
			sv.handle(ev)
		case <-respawn:
			sv.respawn = nil
			sv.startCur()
		case <-tick.C:
			sv.checkStale()
			sv.tellReportGap()
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
			sv.each(func(pr *process) { pr.kill("shutdown", errors.New("forced shutdown")) })
		}
	}
	if sv.respawn != nil {
		sv.respawn.Stop()
	}
	if sv.retiring {
		p.closeFixedListener(s.index)
	}
	p.pool.setState(s, WorkerDown, 0)
}

// running reports whether the slot goes on: it is neither stopping nor
// over, or one of its processes has not exited yet.
func (sv *supervisor) running() bool {
	return !(sv.stopping || sv.gone) || sv.cur != nil || sv.next != nil || sv.old != nil
}

// each calls f for every process of the slot.
func (sv *supervisor) each(f func(*process)) {
	for _, pr := range [...]*process{sv.cur, sv.next, sv.old} {
		if pr != nil {
			f(pr)
		}
	}
}

// handle dispatches one event of one of the slot's processes. Events of a
// process that is no longer the slot's (a late timer, a frame that came
// after the exit) are dropped.
func (sv *supervisor) handle(ev procEvent) {
	pr := ev.pr
	if pr != sv.cur && pr != sv.next && pr != sv.old {
		return
	}
	switch ev.kind {
	case evFrame:
		sv.onFrame(pr, ev.frame)
	case evExit:
		sv.onExit(pr, ev.err)
	case evTimer:
		if ev.gen == pr.timerGen && pr.timer != nil {
			pr.disarm()
			sv.onTimer(pr)
		}
	}
}

// start spawns a new process for the slot. It returns nil if spawning
// failed; the failure is handled like a process that died at once.
func (sv *supervisor) start() (*process, error) {
	p, s := sv.p, sv.s
	pr, err := p.spawn(s.index, sv.events)
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
	pr.arm(p.cfg.startTimeout)
	p.log.Info("worker spawned", "worker", s.index, "worker_pid", pr.pid)
	if sv.cur == nil && sv.next == nil {
		p.pool.update(s, func(w *WorkerInfo) {
			w.State, w.PID, w.Addr, w.Started, w.Ready = WorkerStarting, pr.pid, "", pr.started, false
			w.LastHeartbeat, w.Stats = time.Time{}, Stats{}
		})
	}
	return pr, nil
}

// startCur starts the slot's current process, or handles the failure to
// spawn one like a death at once.
func (sv *supervisor) startCur() {
	var err error
	if sv.cur, err = sv.start(); err != nil {
		sv.report(fmt.Errorf("%w: %w", ErrWorkerStart, err))
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

// onFrame handles a frame from pr, or the failure to read one.
func (sv *supervisor) onFrame(pr *process, ev frameEvent) {
	p, s := sv.p, sv.s
	if ev.err == nil {
		ev.err = p.checkMessage(s, pr.pid, &ev.msg)
	}
	if ev.err != nil {
		p.tel.badFrames.Add(bg, 1, s.attrs.worker.add...)
		p.log.Error("bad frame from worker", "worker", s.index, "worker_pid", pr.pid, "err", ev.err)
		if pr == sv.cur {
			p.pool.setState(s, WorkerUnhealthy, pr.pid)
		}
		if ev.fatal {
			pr.kill("protocol", ev.err)
		}
		return
	}
	now := time.Now()
	pr.lastBeat = now
	switch m := &ev.msg; m.kind {
	case frameReady:
		sv.onReady(pr, m, now)
	case frameStats:
		sv.onStats(pr, m, now)
	case frameStopping:
		if pr == sv.cur {
			p.pool.setState(s, WorkerDraining, pr.pid)
		}
	case frameFailed:
		pr.failMsg = m.err
	case frameClosed:
		sv.onClosed(pr, m)
	}
}

// onReady handles pr's ready frame: a first process goes into rotation,
// a successor takes over from its predecessor.
func (sv *supervisor) onReady(pr *process, m *message, now time.Time) {
	p, s := sv.p, sv.s
	if pr.ready {
		return
	}
	pr.ready = true
	pr.addr = net.JoinHostPort(p.cfg.workerHost, strconv.Itoa(m.port))
	if !p.cfg.handoff && !pr.sharedListener {
		pr.sock = newWorkerSocket(&p.secret, pr.pid)
	}
	if pr.handoffSock != nil {
		pr.handoffVersion.Store(uint32(handoffAnnounced(pr.handoffSock)))
	}
	if !pr.draining {
		pr.disarm() // the start timeout
	}
	p.log.Info("worker ready", "worker", s.index, "worker_pid", pr.pid, "addr", pr.addr,
		"startup", now.Sub(pr.started).Round(time.Millisecond))
	switch pr {
	case sv.next:
		sv.promote(now, &m.stats)
	case sv.cur:
		sv.publishCur(now, &m.stats)
		sv.report(nil)
	}
}

// onStats records a heartbeat of the current process; a stale or
// unhealthy worker that beats again is ready again.
func (sv *supervisor) onStats(pr *process, m *message, now time.Time) {
	p, s := sv.p, sv.s
	if pr != sv.cur {
		return
	}
	var state WorkerState
	p.pool.update(s, func(w *WorkerInfo) {
		w.LastHeartbeat, w.Stats = now, m.stats
		state = w.State
	})
	if pr.ready && !pr.draining && (state == WorkerStale || state == WorkerUnhealthy) {
		p.log.Info("worker healthy again", "worker", s.index, "worker_pid", pr.pid)
		p.pool.setState(s, WorkerReady, pr.pid)
	}
	sv.checkLimits(pr, &m.stats)
}

// onClosed counts the handed-off connections that pr reports closed, and
// records their durations and bytes when the report has them (as splice
// mode records them when a relay ends), before they leave the counts.
func (sv *supervisor) onClosed(pr *process, m *message) {
	p, s := sv.p, sv.s
	n := int64(m.closed)
	if pr.open.Add(-n) < 0 {
		pr.open.Add(n) // more closes than connections: not trusted
		p.log.Error("bad frame from worker", "worker", s.index, "worker_pid", pr.pid,
			"err", fmt.Errorf("%w: %d closes reported, more than were handed", errFrame, n))
		p.tel.badFrames.Add(bg, 1, s.attrs.worker.add...)
		return
	}
	if len(m.durations) > 0 {
		// Bytes first: a reader that sees the durations sees the bytes.
		p.tel.bytes.Add(bg, int64(m.bytesIn), s.attrs.toWorker.add...)
		p.tel.bytes.Add(bg, int64(m.bytesOut), s.attrs.toClient.add...)
		for _, d := range m.durations {
			p.tel.duration.Record(bg, d.Seconds(), s.attrs.worker.record...)
		}
	}
	p.conns.closedHanded(n)
	s.conns.Add(-n)
	p.tel.active.Add(bg, -n, s.attrs.worker.add...)
}

// publishCur routes the slot's new connections to its current process,
// which has just reported ready.
func (sv *supervisor) publishCur(now time.Time, st *Stats) {
	p, s, pr := sv.p, sv.s, sv.cur
	p.pool.update(s, func(w *WorkerInfo) {
		w.PID, w.Addr, w.Started, w.proc = pr.pid, pr.addr, pr.started, pr
		w.Ready, w.LastHeartbeat, w.Stats = true, now, *st
		if !pr.draining {
			w.State = WorkerReady
		}
	})
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
	p.pool.update(s, func(w *WorkerInfo) { w.Restarts++ })
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
	prev.drain(p.cfg.shutdownTimeout, reason, true)
}

// onExit handles the end of one of the slot's processes.
func (sv *supervisor) onExit(pr *process, werr error) {
	p, s := sv.p, sv.s
	pr.release()
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
	if !pr.sharedListener || pr.handoffSock != nil {
		// Connections spliced to this process end on its side. (With a
		// shared fixed port its successor may serve connections dialed to
		// it: those end by themselves when their worker closes them.)
		p.conns.endOf(s.index, pr.pid)
	}
	if n := pr.settleHanded(); n != 0 {
		// Handed-off connections the worker had not reported closed died
		// with it.
		p.conns.closedHanded(n)
		s.conns.Add(-n)
		p.tel.active.Add(bg, -n, s.attrs.worker.add...)
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
		p.pool.update(s, func(w *WorkerInfo) { w.State, w.Ready, w.Addr, w.PID = WorkerDown, false, "", 0 })
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
	if sv.stopping || p.life.draining.Load() {
		return // no respawn once a shutdown has begun, drain delay included
	}
	if sv.next != nil {
		return // a successor is starting; it takes over when ready
	}
	if !p.cfg.respawn {
		p.log.Warn("worker exited, not respawning", "worker", s.index, "reason", reason, "err", err)
		sv.gone = true
		p.slotGone(s)
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
	p.pool.update(s, func(w *WorkerInfo) { w.Restarts++ })
	sv.respawn = time.NewTimer(delay)
}

// onTimer handles pr's timeout: the start timeout before it is ready, the
// shutdown timeout while it drains.
func (sv *supervisor) onTimer(pr *process) {
	p := sv.p
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
		if p.pool.state(s) == WorkerReady {
			p.log.Warn("worker stale", "worker", s.index, "worker_pid", pr.pid, "silent", age.Round(time.Millisecond))
			p.pool.setState(s, WorkerStale, pr.pid)
		}
	}
}

// tellReportGap tells the slot's hand-off workers the gap between close
// reports for the pool's size now, when it is not what they were told
// (the pool was scaled since). So a scaled pool's workers follow within a
// tick. A process started after a scale got the new gap with its
// configuration, except the first of a slot the scale adds, which may get
// the old one (the pool publishes its new size once every slot is
// started) and the new one at its slot's first tick.
func (sv *supervisor) tellReportGap() {
	if !sv.p.cfg.handoff {
		return
	}
	gap := sv.p.reportGap()
	sv.each(func(pr *process) {
		if pr.reportGap == gap || pr.draining {
			return
		}
		if err := pr.sys.send(&command{kind: frameReportGap, reportGap: gap}); err != nil {
			return // gone, or going: its exit comes
		}
		pr.reportGap = gap
	})
}

// reportGap is the gap between close reports for the pool's size now.
func (p *primary) reportGap() time.Duration {
	return closeReportGapFor(len(p.pool.snapshot().all))
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
	case sv.cur == nil || !sv.cur.ready:
		// The slot is down, or its process is still starting: either way
		// it runs the binary on disk already. (Replacing a starting
		// process would promote the successor without ever reporting the
		// slot's start-up, which Scale waits for.)
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

// stop starts the slot's part of a graceful shutdown, once every
// accepted connection has been routed.
func (sv *supervisor) stop() {
	sv.windDown("shutdown", ErrShuttingDown, sv.p.awaitRoutingIdle)
	if sv.cur != nil {
		sv.p.pool.setState(sv.s, WorkerDraining, sv.cur.pid)
	}
}

// retire drains the slot's processes and ends the slot: scaling down. The
// slot is no longer in the table, so no new connection picks it; those
// that picked it from an older snapshot finish dialing first.
func (sv *supervisor) retire() {
	sv.retiring = true
	sv.windDown("scale-down", errors.New("slot retired"), sv.p.quiesce)
	sv.p.log.Info("worker slot retired; draining", "worker", sv.s.index)
}

// windDown ends the slot: no respawn, a successor still starting is
// killed, and once settle returns (no connection can still be dialed to
// them) the current and old processes drain.
func (sv *supervisor) windDown(reason string, err error, settle func()) {
	sv.stopping = true
	if sv.respawn != nil {
		sv.respawn.Stop()
		sv.respawn = nil
	}
	if sv.next != nil {
		sv.next.kill(reason, err)
	}
	settle()
	for _, pr := range [...]*process{sv.cur, sv.old} {
		if pr != nil {
			pr.drain(sv.p.cfg.shutdownTimeout, reason, false)
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
