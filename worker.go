package defuss

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
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
	index int
	conns atomic.Int64
	info  WorkerInfo // guarded by primary.mu
}

// exitInfo describes how a worker process ended.
type exitInfo struct {
	err    error         // why it ended: the wait error, a failure message, or a kill reason
	ready  bool          // it reported ready at some point
	uptime time.Duration // how long it ran
	reason string        // "crash", "stale", "protocol", "start-timeout", "shutdown"
}

// supervise runs slot s's processes until the primary stops: spawn, watch,
// back off, respawn. startup receives the outcome of the slot's first
// process (nil once it is ready).
func (p *primary) supervise(s *slot, startup chan<- error) {
	failures := 0
	first := true
	for {
		ex := p.runProcess(s, startup, first)
		first = false
		if p.stopping() {
			p.setState(s, stateDown, 0)
			return
		}
		if !p.cfg.respawn {
			p.log.Warn("worker exited, not respawning", "worker", s.index, "reason", ex.reason, "err", ex.err)
			p.setState(s, stateDown, 0)
			p.slotGone()
			return
		}
		if ex.uptime >= stableUptime {
			failures = 0
		}
		failures++
		delay := min(backoffMin<<min(failures-1, 20), backoffMax)
		p.log.Warn("worker exited, respawning", "worker", s.index, "reason", ex.reason, "err", ex.err,
			"uptime", ex.uptime.Round(time.Millisecond), "backoff", delay)
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-p.drain:
			t.Stop()
			p.setState(s, stateDown, 0)
			return
		}
		p.mu.Lock()
		s.info.Restarts++
		p.mu.Unlock()
		p.tel.restart(s.index, ex.reason)
	}
}

// runProcess starts one worker process for s and watches it until it
// exits. It never returns while the process runs.
func (p *primary) runProcess(s *slot, startup chan<- error, first bool) exitInfo {
	report := func(err error) {
		if first {
			startup <- err
			first = false
		}
	}
	cmd, status, control, err := p.spawn(s.index)
	if err != nil {
		err = fmt.Errorf("defuss: spawn worker %d: %w", s.index, err)
		report(err)
		return exitInfo{err: err, reason: "spawn"}
	}
	started := time.Now()
	pid := cmd.Process.Pid
	p.mu.Lock()
	s.info.PID, s.info.Addr, s.info.Started, s.info.LastHeartbeat, s.info.Stats = pid, "", started, time.Time{}, Stats{}
	p.mu.Unlock()
	p.setState(s, stateStarting, pid)
	p.log.Info("worker spawned", "worker", s.index, "worker_pid", pid)

	events := make(chan frameEvent, 8)
	go readFrames(status, events)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	ex := exitInfo{reason: "crash"}
	var failMsg string
	kill := func(reason string, err error) {
		if ex.reason == "crash" {
			ex.reason, ex.err = reason, err
		}
		cmd.Process.Kill()
	}
	readyTimer := time.NewTimer(p.cfg.startTimeout)
	defer readyTimer.Stop()
	tick := time.NewTicker(min(p.cfg.heartbeat, p.cfg.staleAfter/4))
	defer tick.Stop()
	drain, force := p.drain, p.force
	var graceTimer <-chan time.Time
	lastBeat := started

	for {
		select {
		case ev, ok := <-events:
			if !ok {
				events = nil // EOF: the process is exiting; wait for it
				continue
			}
			if ev.err == nil {
				ev.err = p.checkMessage(s, pid, &ev.msg)
			}
			if ev.err != nil {
				p.tel.badFrames.Add(bg, 1, p.tel.worker[s.index])
				p.log.Error("bad frame from worker", "worker", s.index, "worker_pid", pid, "err", ev.err)
				p.setState(s, stateUnhealthy, pid)
				if ev.fatal {
					kill("protocol", ev.err)
				}
				continue
			}
			now := time.Now()
			lastBeat = now
			switch ev.msg.kind {
			case frameReady:
				readyTimer.Stop()
				ex.ready = true
				p.mu.Lock()
				s.info.Addr = net.JoinHostPort(p.cfg.workerHost, strconv.Itoa(ev.msg.port))
				s.info.Ready, s.info.LastHeartbeat, s.info.Stats = true, now, ev.msg.stats
				p.mu.Unlock()
				if graceTimer == nil {
					p.setState(s, stateReady, pid)
				}
				p.log.Info("worker ready", "worker", s.index, "worker_pid", pid, "addr", s.info.Addr,
					"startup", now.Sub(started).Round(time.Millisecond))
				report(nil)
			case frameStats:
				p.mu.Lock()
				s.info.LastHeartbeat, s.info.Stats = now, ev.msg.stats
				state := s.info.State
				p.publish()
				p.mu.Unlock()
				if ex.ready && (state == stateStale || state == stateUnhealthy) {
					p.log.Info("worker healthy again", "worker", s.index, "worker_pid", pid)
					p.setState(s, stateReady, pid)
				}
			case frameStopping:
				p.setState(s, stateDraining, pid)
			case frameFailed:
				failMsg = ev.msg.err
			}
		case werr := <-exited:
			status.Close() // unblocks readFrames if a descendant still holds the write end
			control.Close()
			if events != nil {
				for range events {
				}
			}
			ex.uptime = time.Since(started)
			if ex.reason == "crash" {
				ex.err = werr
				if failMsg != "" {
					ex.err = fmt.Errorf("%s (%w)", failMsg, werr)
				}
				if p.stopping() {
					ex.reason = "shutdown"
				}
			}
			p.mu.Lock()
			s.info.Ready, s.info.Addr, s.info.PID = false, "", 0
			p.mu.Unlock()
			p.setState(s, stateDown, 0)
			p.closeConnsOf(s.index, pid)
			if !ex.ready {
				report(fmt.Errorf("%w: worker %d (pid %d): %w", ErrWorkerStart, s.index, pid, ex.err))
			}
			p.log.Info("worker exited", "worker", s.index, "worker_pid", pid, "status", exitStatus(werr), "reason", ex.reason)
			if p.cfg.onExit != nil {
				p.cfg.onExit(s.index, pid, werr)
			}
			return ex
		case <-readyTimer.C:
			if !ex.ready {
				kill("start-timeout", fmt.Errorf("no ready report within %v", p.cfg.startTimeout))
			}
		case <-tick.C:
			if !ex.ready {
				continue
			}
			switch age := time.Since(lastBeat); {
			case age > 2*p.cfg.staleAfter:
				kill("stale", fmt.Errorf("no heartbeat for %v", age.Round(time.Millisecond)))
			case age > p.cfg.staleAfter:
				if p.state(s) == stateReady {
					p.log.Warn("worker stale", "worker", s.index, "worker_pid", pid, "silent", age.Round(time.Millisecond))
					p.setState(s, stateStale, pid)
				}
			}
		case <-drain:
			drain = nil
			p.setState(s, stateDraining, pid)
			if _, err := control.Write(appendCommand(nil, &command{kind: frameDrain, shutdownTimeout: p.cfg.shutdownTimeout})); err != nil {
				cmd.Process.Signal(syscall.SIGTERM)
			}
			graceTimer = time.After(p.cfg.shutdownTimeout)
		case <-graceTimer:
			graceTimer = nil
			p.log.Warn("worker did not stop in time, killing it", "worker", s.index, "worker_pid", pid, "timeout", p.cfg.shutdownTimeout)
			kill("shutdown", errors.New("shutdown timeout"))
		case <-force:
			force = nil
			kill("shutdown", errors.New("forced shutdown"))
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

// spawn starts a worker process for slot i with its two pipes, and sends
// it its configuration.
func (p *primary) spawn(i int) (cmd *exec.Cmd, status, control *os.File, err error) {
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	controlR, controlW, err := os.Pipe()
	if err != nil {
		statusR.Close()
		statusW.Close()
		return nil, nil, nil, err
	}
	cmd = exec.Command(p.exe, os.Args[1:]...)
	cmd.Env = p.workerEnv(i)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{statusW, controlR} // fd 3, fd 4
	cmd.SysProcAttr = proc.SysProcAttr()
	err = cmd.Start()
	statusW.Close()
	controlR.Close()
	if err != nil {
		statusR.Close()
		controlW.Close()
		return nil, nil, nil, err
	}
	port := 0
	if p.cfg.baseWorkerPort > 0 {
		port = p.cfg.baseWorkerPort + i
	}
	// The pipe buffer takes this small frame without blocking, even if the
	// worker never reads it.
	_, err = controlW.Write(appendCommand(nil, &command{kind: frameConfig, slot: i, port: port,
		host: p.cfg.workerHost, heartbeat: p.cfg.heartbeat, shutdownTimeout: p.cfg.shutdownTimeout, secret: p.secret}))
	if err != nil {
		p.log.Error("cannot send configuration to worker", "worker", i, "worker_pid", cmd.Process.Pid, "err", err)
		cmd.Process.Kill()
	}
	return cmd, statusR, controlW, nil
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

// worker is the worker role: it serves the handler on its loopback port
// and reports to the primary.
type worker struct {
	slot    int
	log     *slog.Logger
	srv     *http.Server
	ln      net.Listener
	status  *os.File
	control *os.File
	conns   atomic.Int64
	stats   *sampler

	heartbeat       time.Duration
	shutdownTimeout time.Duration
	secret          [secretLen]byte

	writeMu  sync.Mutex         // serialises frames on status
	stop     chan time.Duration // graceful stop requests with their timeout; 0 = at once
	done     chan struct{}      // closed when the server has stopped; ends the loops
	finished chan struct{}      // closed when everything is released; err is set
	err      error
	wg       sync.WaitGroup
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
		stop:     make(chan time.Duration, 1),
		done:     make(chan struct{}),
		finished: make(chan struct{}),
	}
	w.stats = newSampler(&w.conns)
	if err := w.start(h); err != nil {
		w.fail(err)
		if w.srv != nil {
			w.srv.Close()
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
		Handler:           h,
		ConnState:         w.connState,
		ReadHeaderTimeout: time.Minute,
		ErrorLog:          slog.NewLogLogger(w.log.Handler(), slog.LevelWarn),
	}
	w.wg.Add(1)
	go w.serve()
	return w.send(&message{kind: frameReady, port: ln.Addr().(*net.TCPAddr).Port, stats: w.stats.sample()})
}

func (w *worker) serve() {
	defer w.wg.Done()
	// Every connection must start with the primary's PROXY header: it
	// carries the client's address, and the secret proves where it comes
	// from, so a local process that dials the worker port directly is not
	// served and cannot claim any client address.
	ln := &proxyproto.Listener{
		Listener: w.ln,
		ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			return proxyproto.REQUIRE, nil
		},
		ValidateHeader:    w.checkSecret,
		ReadHeaderTimeout: 5 * time.Second,
	}
	if err := w.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		w.log.Error("serve", "err", err)
		w.requestStop(0)
	}
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
				w.requestStop(0) // the primary is gone
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
				w.requestStop(0)
			}
			return
		}
		c, err := decodeCommand(typ, payload)
		if err != nil || c.kind != frameDrain {
			w.log.Error("bad command from primary", "err", err, "type", typ)
			continue
		}
		w.requestStop(c.shutdownTimeout)
	}
}

// requestStop asks run to stop; timeout 0 means at once. The first
// request wins.
func (w *worker) requestStop(timeout time.Duration) {
	select {
	case w.stop <- timeout:
	default:
	}
}

// run waits for a stop request or a signal, then shuts the server down.
func (w *worker) run(signals bool) {
	var sigs chan os.Signal
	if signals {
		sigs = make(chan os.Signal, 1)
		notifySignals(sigs)
		defer stopSignals(sigs)
	}
	var timeout time.Duration
	select {
	case timeout = <-w.stop:
	case <-sigs:
		timeout = w.shutdownTimeout
	}
	w.log.Debug("stopping", "timeout", timeout)
	w.send(&message{kind: frameStopping})
	var err error
	if timeout > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		err = w.srv.Shutdown(ctx)
		cancel()
	}
	if timeout == 0 || err != nil {
		w.srv.Close()
	}
	if errors.Is(err, context.DeadlineExceeded) {
		err = nil // the remaining connections were closed; that is the contract
	}
	w.log.Debug("server stopped", "err", err)
	w.err = err
	close(w.done)
	w.control.Close()
	w.wg.Wait()
	w.status.Close()
	w.log.Debug("worker stopped")
	close(w.finished)
}

func notifySignals(ch chan<- os.Signal) { signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM) }

func stopSignals(ch chan<- os.Signal) { signal.Stop(ch) }
