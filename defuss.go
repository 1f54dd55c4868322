// Package defuss turns a net/http program into a multi-process server with
// one call: a primary process that balances connections across N worker
// processes running the same binary.
//
// Typical usage:
//
//	func main() {
//		mux := http.NewServeMux()
//		mux.HandleFunc("/", hello)
//		if err := defuss.Run(mux); err != nil {
//			log.Fatal(err)
//		}
//	}
//
// # Code before Start runs in every process
//
// Start re-executes the program's own binary (os.Executable, with the same
// arguments) once per worker. EVERYTHING main does before it calls Start or
// Run therefore runs in the primary AND IN EVERY WORKER: opening files,
// connecting to databases, printing banners, binding other ports. Keep such
// work cheap and idempotent, or do it after Start returns and only when
// [IsWorker] says which role this process has.
//
// # Process model
//
// The primary listens on the public address (":3000" by default). For each
// new TCP connection it reads the start of the HTTP/1.x request head (for
// at most 10ms and 16 KiB by default), asks a [Balancer] which worker takes
// the connection, dials that worker on its loopback port, writes a PROXY
// header (the client's address) and the bytes it read, and then copies the
// two TCP streams (splice(2) on Linux for bulk data). With [WithHandoff] it
// instead peeks at the head and passes the connection itself to the worker.
// Routing is per connection: every request on a keep-alive connection goes
// to the same worker. Workers serve the handler with an http.Server on a loopback
// port and report readiness and heartbeats (CPU, RSS, Go heap, connections)
// to the primary over an inherited pipe. The primary replaces workers that
// die, with exponential backoff, replaces them one at a time on
// [Server.Restart] or SIGHUP, and on SIGINT/SIGTERM or [Server.Shutdown]
// stops accepting, lets in-flight requests finish, and kills what is left
// after the shutdown timeout.
//
// # What defuss does not do
//
// It does not terminate TLS or speak HTTP/2 to clients (such bytes are
// routed as "unknown" and passed through unchanged), it does not route
// request by request, and it does not run on Windows, which has no
// inherited pipes. Under "go run", the binary that workers re-execute is a
// temporary build; that works, but build the program for production.
package defuss

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/defuss-go/defuss/internal/proc"
)

// Sentinel errors. Errors returned by this package wrap them; test with
// errors.Is.
var (
	// ErrNotSupported: the platform cannot run workers.
	ErrNotSupported = errors.New("defuss: not supported on this platform")
	// ErrNoWorkers: every worker has exited and none will be respawned.
	ErrNoWorkers = errors.New("defuss: no workers left")
	// ErrInterrupted: a signal arrived while Start waited for the workers.
	ErrInterrupted = errors.New("defuss: interrupted during start-up")
	// ErrShuttingDown: the operation was refused or cut short because the
	// server is shutting down.
	ErrShuttingDown = errors.New("defuss: server is shutting down")
	// ErrNotPrimary: the operation exists only in the primary.
	ErrNotPrimary = errors.New("defuss: not the primary")
)

// IsWorker reports whether this process is a defuss worker, started by a
// primary.
func IsWorker() bool { return os.Getenv(envSlot) != "" }

// Run starts the server and waits until it stops: [Start], then
// [Server.Wait]. It is what main calls.
func Run(handler http.Handler, opts ...Option) error {
	s, err := Start(handler, opts...)
	if err != nil {
		return err
	}
	return s.Wait()
}

// Start starts the server in the role of this process. In the primary it
// spawns the workers and returns once every worker has reported ready and
// the public listener accepts; if a worker fails before it ever reports
// ready (it exits, cannot bind its port, or stays silent past the start
// timeout), Start stops everything and returns an error wrapping
// [ErrWorkerStart] that says why. In a worker, Start returns once the handler is served on the
// worker's port and readiness is reported.
func Start(handler http.Handler, opts ...Option) (*Server, error) {
	if !proc.Supported {
		return nil, ErrNotSupported
	}
	c, err := newConfig(os.Getenv, opts...)
	if handler == nil {
		err = errors.Join(fmt.Errorf("%w: handler is nil", ErrInvalidOption), err)
	}
	if err != nil {
		return nil, err
	}
	if IsWorker() {
		return startWorker(handler, c)
	}
	return startPrimary(c)
}

// A Server is a running primary or worker.
type Server struct {
	p *primary // set in the primary
	w *worker  // set in a worker
}

// Wait blocks until the server has stopped and returns why: nil after a
// graceful shutdown, otherwise the error that stopped it.
func (s *Server) Wait() error {
	if s.w != nil {
		<-s.w.finished
		return s.w.err
	}
	<-s.p.done
	return s.p.err
}

// Shutdown stops the server gracefully: the primary stops accepting, lets
// in-flight requests finish within the shutdown timeout, then kills the
// workers that are left; a worker stops serving in the same way. If ctx
// ends first, Shutdown stops at once and returns ctx.Err(). It may be
// called more than once and from several goroutines.
func (s *Server) Shutdown(ctx context.Context) error {
	var done <-chan struct{}
	if s.w != nil {
		t := s.w.shutdownTimeout
		if d, ok := ctx.Deadline(); ok {
			t = max(time.Until(d), time.Nanosecond)
		}
		s.w.requestStop(t, 0)
		done = s.w.finished
	} else {
		s.p.requestStop()
		done = s.p.done
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		if s.p != nil {
			s.p.forceShutdown()
		} else {
			s.w.requestStop(0, 0)
		}
		<-done
		return ctx.Err()
	}
}

// Restart replaces the workers one at a time, without dropping a
// connection: for each slot it starts a new worker from the binary on
// disk (so a new build copied over the old one is picked up), waits until
// it reports ready, routes new connections to it, then drains the old
// worker (its in-flight requests finish, keep-alive connections close
// after their current request) and waits until it has exited. The old
// worker serves until its successor is ready, so no slot is ever out of
// rotation; one slot is replaced at a time.
//
// If a new worker fails to become ready, Restart stops there and returns
// an error wrapping [ErrWorkerStart]; the remaining old workers keep
// serving. If ctx ends, Restart returns ctx.Err() after the slot in
// progress is done. A shutdown wins over a restart: Restart then returns
// [ErrShuttingDown]. SIGHUP (with signal handling on) calls Restart.
// In a worker, Restart returns [ErrNotPrimary].
func (s *Server) Restart(ctx context.Context) error {
	if s.p == nil {
		return ErrNotPrimary
	}
	return s.p.restart(ctx)
}

func (p *primary) restart(ctx context.Context) error {
	p.restartMu.Lock()
	defer p.restartMu.Unlock()
	p.mu.Lock()
	slots := slices.Clone(p.slots)
	p.mu.Unlock()
	p.log.Info("rolling restart", "workers", len(slots))
	for _, s := range slots {
		if p.stopping() {
			return ErrShuttingDown // checked first: the selects below pick at random
		}
		select {
		case p.replaceTok <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.drain:
			return ErrShuttingDown
		}
		err := p.replaceSlot(s)
		<-p.replaceTok
		if err == nil && p.stopping() {
			err = ErrShuttingDown
		}
		if err != nil {
			p.log.Error("rolling restart stopped", "worker", s.index, "err", err)
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	p.log.Info("rolling restart done")
	return nil
}

// replaceSlot asks s's supervisor for a replacement and waits for it.
func (p *primary) replaceSlot(s *slot) error {
	req := &replaceReq{reason: "reload", done: make(chan error, 1)}
	select {
	case s.replace <- req:
	case <-s.done:
		return nil // scaled away meanwhile
	case <-p.drain:
		return ErrShuttingDown
	}
	return <-req.done // the supervisor always answers, also when shutting down
}

// Scale changes the number of workers to n (at least 1) at run time.
// Scaling up starts the new workers and returns once they report ready
// (if one fails, the new slots are removed again and the error returned).
// Scaling down takes the highest slots out of rotation, drains them (their
// in-flight requests finish) and returns once their processes have
// exited. SIGTTIN and SIGTTOU (with signal handling on) scale by one, as
// gunicorn does. Scale is safe to call concurrently with Restart and with
// other Scale calls; a shutdown wins. In a worker, Scale returns
// [ErrNotPrimary].
func (s *Server) Scale(ctx context.Context, n int) error {
	if s.p == nil {
		return ErrNotPrimary
	}
	return s.p.scale(ctx, n)
}

func (p *primary) scale(ctx context.Context, n int) error {
	if n < 1 || n > maxWorkers {
		return fmt.Errorf("%w: Scale(%d): want 1 to %d workers", ErrInvalidOption, n, maxWorkers)
	}
	return p.scaleTo(ctx, func(int) int { return n })
}

// scaleBy adds delta workers (SIGTTIN, SIGTTOU), keeping 1 to maxWorkers.
func (p *primary) scaleBy(delta int) error {
	return p.scaleTo(context.Background(), func(have int) int { return min(max(have+delta, 1), maxWorkers) })
}

// scaleTo scales to target(the current number of workers).
func (p *primary) scaleTo(ctx context.Context, target func(have int) int) error {
	p.scaleMu.Lock()
	defer p.scaleMu.Unlock()
	p.mu.Lock()
	if p.stopping() {
		p.mu.Unlock()
		return ErrShuttingDown
	}
	have := len(p.slots)
	n := target(have)
	var changed []*slot
	switch {
	case n > have:
		startup := make(chan error, n-have)
		for i := have; i < n; i++ {
			s := newSlot(i)
			p.slots = append(p.slots, s)
			changed = append(changed, s)
			p.supervisors.Add(1) // before drain closes: see beginShutdown
			go func() {
				defer p.supervisors.Done()
				p.supervise(s, startup)
			}()
		}
		p.publish()
		p.mu.Unlock()
		p.log.Info("scaling up", "from", have, "to", n)
		for range changed {
			var err error
			select {
			case err = <-startup:
			case <-ctx.Done():
				err = ctx.Err()
			case <-p.drain:
				err = ErrShuttingDown
			}
			if err != nil {
				p.log.Error("scaling up failed; removing the new workers", "err", err)
				p.removeSlots(changed)
				return err
			}
		}
		return nil
	case n < have:
		changed = slices.Clone(p.slots[n:])
		p.mu.Unlock()
		p.log.Info("scaling down", "from", have, "to", n)
		return p.removeSlots(changed)
	}
	p.mu.Unlock()
	return nil
}

// removeSlots takes slots out of the table, drains them and waits until
// their supervisors have ended.
func (p *primary) removeSlots(slots []*slot) error {
	p.mu.Lock()
	p.slots = slices.DeleteFunc(p.slots, func(s *slot) bool { return slices.Contains(slots, s) })
	p.publish()
	p.mu.Unlock()
	for _, s := range slots {
		close(s.retire)
	}
	for _, s := range slots {
		<-s.done
	}
	return nil
}

// Addr returns the address the server accepts on: the public address in
// the primary, the worker's loopback address in a worker.
func (s *Server) Addr() net.Addr {
	if s.w != nil {
		return s.w.ln.Addr()
	}
	return s.p.ln.Addr()
}

// IsWorker reports whether s runs as a worker.
func (s *Server) IsWorker() bool { return s.w != nil }

// WorkerIndex returns the worker's slot index, or -1 in the primary.
func (s *Server) WorkerIndex() int {
	if s.w != nil {
		return s.w.slot
	}
	return -1
}

// Workers returns a consistent snapshot of every worker slot, in slot
// order. In a worker it returns nil.
func (s *Server) Workers() []WorkerInfo {
	if s.p == nil {
		return nil
	}
	return s.p.snapshot().all
}

// primary is the primary role: the public listener, the slot table, one
// supervisor per slot, and the connection goroutines.
type primary struct {
	cfg      *config
	log      *slog.Logger
	tel      *telemetry
	pid      int
	exe      string
	ln       net.Listener
	dialer   net.Dialer
	fallback Balancer
	slots    []*slot

	mu      sync.Mutex               // guards slot.info and publishing
	view    atomic.Pointer[poolView] // published on every state change
	changed chan struct{}            // closed and replaced on every publish
	gone    int                      // slots that will never run again

	bufs sync.Pool // *[]byte of cfg.maxHeaderBytes
	reqs sync.Pool // *Request

	connMu sync.Mutex
	live   map[net.Conn]liveConn // nil once the primary stops accepting
	conns  sync.WaitGroup        // connection goroutines

	supervisors sync.WaitGroup
	acceptDone  chan struct{}

	stopReq     chan struct{} // closed: Shutdown was called
	stopOnce    sync.Once
	drain       chan struct{} // closed: the listener is closed and workers drain
	force       chan struct{} // closed: stop at once
	drainOnce   sync.Once
	forceOnce   sync.Once
	fatal       chan error // a loop's fatal error; ends the primary
	done        chan struct{}
	err         error
	stopSignals func()

	epoch   atomic.Uint64   // see enterDial and quiesce
	dialing [2]atomic.Int64 // connects in progress, by epoch parity
	routing atomic.Int64    // accepted connections not yet routed

	replaceTok chan struct{} // held while one worker of the pool is being replaced
	restartMu  sync.Mutex    // one Restart at a time
	scaleMu    sync.Mutex    // one Scale at a time

	secret   [secretLen]byte // in the PROXY header of every connection to a worker
	draining atomic.Bool     // a shutdown has started: the health path answers 503

	acceptLog, noWorkerLog, balancerLog, dialLog, proxyLog, limitLog burstLog
}

// poolView is an immutable snapshot of the slot table.
type poolView struct {
	all   []WorkerInfo
	cands []WorkerInfo // the healthy subset, handed to the Balancer
}

func startPrimary(c *config) (*Server, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("defuss: find own binary: %w", err)
	}
	if c.executable != "" {
		exe = c.executable
	}
	ln := c.listener
	if ln == nil {
		if ln, err = net.Listen("tcp", c.addr); err != nil {
			return nil, fmt.Errorf("defuss: listen: %w", err)
		}
	}
	p := &primary{
		cfg:        c,
		log:        c.logger.With("component", "defuss", "role", "primary", "pid", os.Getpid()),
		pid:        os.Getpid(),
		exe:        exe,
		ln:         ln,
		dialer:     net.Dialer{Timeout: c.dialTimeout},
		fallback:   RoundRobin(),
		changed:    make(chan struct{}),
		live:       make(map[net.Conn]liveConn),
		acceptDone: make(chan struct{}),
		stopReq:    make(chan struct{}),
		replaceTok: make(chan struct{}, 1),
		drain:      make(chan struct{}),
		force:      make(chan struct{}),
		fatal:      make(chan error, 1),
		done:       make(chan struct{}),
	}
	if _, err := rand.Read(p.secret[:]); err != nil {
		ln.Close()
		return nil, fmt.Errorf("defuss: make secret: %w", err)
	}
	p.bufs.New = func() any { b := make([]byte, proxyRoom+c.maxHeaderBytes); return &b }
	p.reqs.New = func() any { return new(Request) }
	p.slots = make([]*slot, c.workers)
	for i := range p.slots {
		p.slots[i] = newSlot(i)
	}
	p.mu.Lock()
	p.publish()
	p.mu.Unlock()
	p.tel = newTelemetry(c.meterProvider, p.snapshot)

	var sigs <-chan os.Signal
	if c.signals {
		ch := make(chan os.Signal, 2)
		notifySignals(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU)
		pipe := catchSIGPIPE()
		p.stopSignals = func() { stopSignals(ch); stopSignals(pipe) }
		sigs = ch
	}
	p.log.Info("starting workers", "workers", c.workers, "addr", ln.Addr().String())
	startup := make(chan error, len(p.slots))
	for _, s := range p.slots {
		p.supervisors.Add(1)
		go func() {
			defer p.supervisors.Done()
			p.supervise(s, startup)
		}()
	}
	if err := p.awaitStartup(startup, sigs); err != nil {
		p.forceShutdown()
		p.beginShutdown()
		p.supervisors.Wait()
		ln.Close()
		if p.stopSignals != nil {
			p.stopSignals()
		}
		close(p.acceptDone)
		p.tel.close()
		return nil, err
	}
	go func() {
		defer close(p.acceptDone)
		if err := p.acceptLoop(); err != nil {
			p.fail(fmt.Errorf("defuss: accept: %w", err))
		}
	}()
	go p.run(sigs)
	p.log.Info("serving", "addr", ln.Addr().String(), "workers", c.workers)
	return &Server{p: p}, nil
}

// awaitStartup waits for the first outcome of every slot. Each slot's
// supervisor enforces the start timeout on its process.
func (p *primary) awaitStartup(startup <-chan error, sigs <-chan os.Signal) error {
	for waiting := len(p.slots); waiting > 0; {
		select {
		case err := <-startup:
			if err != nil {
				return err
			}
			waiting--
		case sig := <-sigs:
			if sig == syscall.SIGINT || sig == syscall.SIGTERM {
				return ErrInterrupted
			} // SIGHUP: the workers start from the binary on disk anyway
		}
	}
	return nil
}

// run waits for the reason to stop, then shuts down in order: the drain
// delay (the health path answers 503, everything else is still served),
// then no new connections, workers drain, what is left is killed. SIGHUP
// starts a rolling restart meanwhile.
func (p *primary) run(sigs <-chan os.Signal) {
	var ops sync.WaitGroup // restarts started by SIGHUP
	// stopSig reports whether a signal asks to stop; SIGHUP starts a
	// rolling restart instead.
	stopSig := func(sig os.Signal) bool {
		var op func() error
		switch sig {
		case syscall.SIGHUP:
			op = func() error { return p.restart(context.Background()) }
		case syscall.SIGTTIN, syscall.SIGTTOU:
			delta := 1
			if sig == syscall.SIGTTOU {
				delta = -1
			}
			op = func() error { return p.scaleBy(delta) }
		default:
			return true
		}
		if p.stopping() {
			return false
		}
		p.log.Info("signal received", "signal", sig.String())
		ops.Add(1)
		go func() {
			defer ops.Done()
			if err := op(); err != nil && !errors.Is(err, ErrShuttingDown) {
				p.log.Error("operation failed", "signal", sig.String(), "err", err)
			}
		}()
		return false
	}
wait:
	for {
		select {
		case sig := <-sigs:
			if stopSig(sig) {
				p.log.Info("signal received; shutting down gracefully (send another to stop at once)", "signal", sig.String())
				break wait
			}
		case <-p.stopReq:
			p.log.Info("shutting down gracefully")
			break wait
		case <-p.drain:
			break wait
		case err := <-p.fatal:
			p.err = err
			p.log.Error("stopping", "err", err)
			break wait
		}
	}
	p.draining.Store(true)
	if d := p.cfg.drainDelay; d > 0 && p.err == nil && !p.stopping() {
		p.log.Info("drain delay: health checks answer 503; still serving", "delay", d)
		t := time.NewTimer(d)
	delay:
		for {
			select {
			case <-t.C:
				break delay
			case sig := <-sigs:
				if stopSig(sig) {
					p.log.Warn("second signal; stopping now")
					p.forceShutdown()
					break delay
				}
			case <-p.drain:
				break delay
			}
		}
		t.Stop()
	}
	p.beginShutdown()
	deadline := time.NewTimer(p.cfg.shutdownTimeout + time.Second) // workers are killed at shutdownTimeout
	defer deadline.Stop()
	workersDone := make(chan struct{})
	go func() {
		p.supervisors.Wait()
		close(workersDone)
	}()
	for workersDone != nil {
		select {
		case <-workersDone:
			workersDone = nil
		case sig := <-sigs:
			if stopSig(sig) {
				p.log.Warn("second signal; stopping now")
				p.forceShutdown()
			}
		case <-deadline.C:
			p.log.Error("workers still running after the shutdown timeout; killing them")
			p.forceShutdown()
		}
	}
	// Every worker has exited, so nothing the clients send can reach one:
	// end what is left, let the last bytes from the workers through, and
	// close whatever still hangs after a second.
	p.log.Info("workers stopped; ending remaining connections")
	p.endAllConns()
	connsDone := make(chan struct{})
	go func() {
		p.conns.Wait()
		close(connsDone)
	}()
	select {
	case <-connsDone:
	case <-time.After(time.Second):
		p.log.Warn("connections still open a second after the workers stopped; closing them")
	}
	p.closeLive()
	<-p.acceptDone
	<-connsDone
	ops.Wait()
	if p.stopSignals != nil {
		p.stopSignals()
	}
	if p.err == nil && p.noneLeft() {
		p.err = ErrNoWorkers
	}
	p.tel.close()
	p.log.Info("stopped")
	close(p.done)
}

// requestStop asks run to shut down gracefully.
func (p *primary) requestStop() {
	p.stopOnce.Do(func() { close(p.stopReq) })
}

// beginShutdown starts a graceful shutdown: no new connections, workers drain.
func (p *primary) beginShutdown() {
	p.drainOnce.Do(func() {
		p.ln.Close()
		p.mu.Lock()
		close(p.drain) // under mu: Scale adds supervisors only before this
		p.publish()
		p.mu.Unlock()
	})
}

// forceShutdown kills the workers and closes every connection now.
func (p *primary) forceShutdown() {
	p.beginShutdown()
	p.forceOnce.Do(func() {
		close(p.force)
		p.closeLive()
	})
}

// fail ends the primary with err, unless it is already ending.
func (p *primary) fail(err error) {
	select {
	case p.fatal <- err:
	default:
	}
}

func (p *primary) stopping() bool {
	select {
	case <-p.drain:
		return true
	default:
		return false
	}
}

// slotGone records that a slot will never run again (respawn is off);
// when none is left the primary stops.
func (p *primary) slotGone() {
	p.mu.Lock()
	p.gone++
	all := p.gone == len(p.slots)
	p.mu.Unlock()
	if all {
		p.fail(ErrNoWorkers)
	}
}

func (p *primary) noneLeft() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.gone == len(p.slots)
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
