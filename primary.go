package defuss

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// primary is the primary role: the public listener, the slot table, one
// supervisor per slot, and the connection goroutines. Its life is
// startPrimary (listen, spawn, await the workers, serve) and then run
// (wait for the reason to stop, shut down in named steps).
type primary struct {
	cfg  *config
	log  *slog.Logger
	logs primaryLogs
	// warnNotTCP: hand-off mode met a connection it must splice.
	warnNotTCP sync.Once
	tel        *telemetry
	pid        int
	exe        string // the binary workers run
	ln         net.Listener
	lingers    bool            // closing an accepted socket may wait (socketLingers): closeClient goes through the scheduler
	unsentSet  bool            // Start set TCP_NOTSENT_LOWAT on ln (limitUnsent): the accept loop sets it on sockets queued before
	secret     [secretLen]byte // in the PROXY header of every connection to a worker

	pool  *pool      // the slot table
	conns *connTable // live client connections
	evr   *evRelay   // splice mode's event loops, once relay started them; nil: goroutines relay
	evrOn sync.Once
	gate  *dialGate // connections being routed, dials in flight
	// The raw accept loop's (rawaccept_linux.go): how long it keeps a
	// connection whose head has not arrived (rawGrace; a test's), and how
	// many connections it handed off or spliced itself (for tests).
	rawGrace  time.Duration
	rawServed atomic.Uint64
	life      lifecycle // how the primary ends

	// spawn starts a worker process for a slot: the seam between the
	// supervisors and the operating system (spawnExec outside tests).
	spawn func(slot int, events chan<- procEvent) (*process, error)

	dialer   net.Dialer
	fallback Balancer
	bufs     sync.Pool // *[]byte of proxyRoom+cfg.maxHeaderBytes
	reqs     sync.Pool // *Request

	fixedMu  sync.Mutex
	fixedLns map[int]*net.TCPListener // WithBaseWorkerPort: each slot's port, held for its processes

	supervisors sync.WaitGroup
	acceptDone  chan struct{}
	replaceTok  chan struct{} // held while one worker of the pool is being replaced
	restartMu   sync.Mutex    // one Restart at a time
	scaleMu     sync.Mutex    // one Scale at a time
	upgradeMu   sync.Mutex    // held by the one Upgrade that runs
	upgraded    atomic.Bool   // a new primary took over: stop without STOPPING=1 or a drain delay
	heldMu      sync.Mutex    // guards held, and the listener's close
	held        bool          // emptyAcceptQueue's filter is on the listener
	notify      *notifier
	stopSignals func()
}

// lifecycle is how the primary ends. Each channel is closed once, and the
// close is the broadcast.
type lifecycle struct {
	stopReq   chan struct{} // a stop has begun: Shutdown, a stop signal, a fatal error, or an upgrade's hand-over
	drain     chan struct{} // the listener is closed and the workers drain
	force     chan struct{} // kill the workers and close every connection now
	done      chan struct{} // everything has stopped; err is set
	fatal     chan error    // a loop's fatal error; ends the primary
	err       error
	draining  atomic.Bool // a shutdown has begun: the health path answers 503
	stopOnce  sync.Once
	drainOnce sync.Once
	forceOnce sync.Once
}

// primaryLogs rate-limits each kind of log line that can repeat once per
// connection.
type primaryLogs struct {
	accept, noWorker, balancer, dial, proxy, limit burstLog
}

// newPrimary makes a primary that serves on ln with c, before anything
// runs.
func newPrimary(c *config, ln net.Listener, exe string) (*primary, error) {
	p := &primary{
		cfg:        c,
		log:        c.logger.With("component", "defuss", "role", "primary", "pid", os.Getpid()),
		pid:        os.Getpid(),
		rawGrace:   rawGrace,
		exe:        exe,
		ln:         ln,
		lingers:    socketLingers(ln),
		pool:       newPool(c.workers),
		conns:      newConnTable(c.maxConns),
		gate:       newDialGate(),
		dialer:     net.Dialer{Timeout: c.dialTimeout, KeepAlive: -1}, // loopback to a child: its exit, not probes, tells it is gone
		fallback:   RoundRobin(),
		acceptDone: make(chan struct{}),
		replaceTok: make(chan struct{}, 1),
		life: lifecycle{
			stopReq: make(chan struct{}),
			drain:   make(chan struct{}),
			force:   make(chan struct{}),
			done:    make(chan struct{}),
			fatal:   make(chan error, 1),
		},
	}
	if _, err := rand.Read(p.secret[:]); err != nil {
		return nil, fmt.Errorf("defuss: make secret: %w", err)
	}
	p.spawn = p.spawnExec
	p.notify = newNotifier(p.log)
	p.bufs.New = func() any { b := make([]byte, proxyRoom+c.maxHeaderBytes); return &b }
	p.reqs.New = func() any { return new(Request) }
	p.tel = newTelemetry(c.meterProvider, p.pool.snapshot)
	return p, nil
}

// startPrimary is Start in the primary: listen (or take the socket
// systemd or the old primary of an upgrade passed), spawn the workers,
// wait until every one is ready, announce it, then serve. cfgErr is what
// was wrong with the options: started by Upgrade, the primary tells its
// predecessor that too.
func startPrimary(c *config, cfgErr error) (_ *Server, err error) {
	var pred *net.UnixConn // started by Upgrade: to the old primary
	if upgradeChild() {
		// The old primary waits on this socket: "ok", or why not.
		if pred, err = inheritedSocket(fdUpgradeRdy); err != nil {
			return nil, errors.Join(cfgErr, fmt.Errorf("defuss: upgrade from pid %d: fd %d: %w", os.Getppid(), fdUpgradeRdy, err))
		}
		defer func() {
			if err != nil {
				pred.SetWriteDeadline(time.Now().Add(time.Second))
				fmt.Fprintf(pred, "error: %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
			}
			pred.Close()
		}()
	}
	if cfgErr != nil {
		return nil, cfgErr
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("defuss: find own binary: %w", err)
	}
	if c.executable != "" {
		exe = c.executable
	}
	ln, err := c.listen()
	if err != nil {
		return nil, err
	}
	p, err := newPrimary(c, ln, exe)
	if err != nil {
		ln.Close()
		return nil, err
	}
	if c.listener == nil {
		// Only on a socket the primary opened or inherited: WithListener's
		// owner configured it.
		set, err := limitUnsent(ln)
		p.unsentSet = set
		if err != nil && !errors.Is(err, errors.ErrUnsupported) {
			p.log.Debug("TCP_NOTSENT_LOWAT not set: a slow reader's answer may sit whole in the kernel", "err", err)
		}
	}
	sigs := p.notifySignals()
	p.log.Info("starting workers", "workers", c.workers, "addr", ln.Addr().String())
	startup := make(chan error, c.workers)
	for _, s := range p.pool.list() {
		p.goSupervise(s, startup)
	}
	err = p.awaitStartup(c.workers, startup, sigs)
	if err == nil {
		err = p.announce(pred)
	}
	if err != nil {
		p.forceShutdown()
		p.supervisors.Wait()
		close(p.acceptDone)
		p.stopRelay()
		p.unhook()
		return nil, err
	}
	go func() {
		defer close(p.acceptDone)
		if err := p.acceptLoop(); err != nil {
			p.fail(fmt.Errorf("defuss: accept: %w", err))
		}
	}()
	go p.run(sigs)
	if pred != nil {
		p.notify.takeOver(p.pool.snapshot())
	} else {
		p.notify.ready(p.pool.snapshot())
	}
	p.log.Info("serving", "addr", ln.Addr().String(), "workers", c.workers)
	return &Server{p: p}, nil
}

// listen returns the public listener: the inherited socket, WithListener's,
// or a new one on the address.
func (c *config) listen() (net.Listener, error) {
	if in := c.inherited; in != nil {
		if c.listener != nil {
			c.listener.Close() // an Upgrade's socket wins; see newConfig
		}
		return passedListener(in.fd, in.from)
	}
	if c.listener != nil {
		return c.listener, nil
	}
	lc := listenConfig()
	ln, err := lc.Listen(context.Background(), "tcp", c.addr)
	if err != nil {
		return nil, fmt.Errorf("defuss: listen: %w", err)
	}
	return ln, nil
}

// announce says that the workers are ready, before the accept loop
// starts: it writes the PID file, and, started by Upgrade, reports ready
// to the old primary and waits for its "go". Until then it must accept
// nothing, as the old one may still kill it; and nothing may fail after
// it, as the old one stops accepting then.
func (p *primary) announce(pred *net.UnixConn) error {
	if p.cfg.pidFile != "" {
		if err := writePIDFile(p.cfg.pidFile); err != nil {
			return err
		}
	}
	if pred != nil {
		return p.awaitGo(pred)
	}
	return nil
}

// awaitGo reports ready to the old primary of an upgrade and waits for
// its answer, within the time that one waits for the report.
func (p *primary) awaitGo(pred *net.UnixConn) error {
	pred.SetDeadline(time.Now().Add(p.cfg.startTimeout + upgradeGrace))
	_, err := pred.Write([]byte("ok\n"))
	var line string
	if err == nil {
		line, err = bufio.NewReader(pred).ReadString('\n')
	}
	if line != "go\n" {
		return fmt.Errorf("defuss: upgrade from pid %d: the old primary did not hand over (it stopped, or gave up): %v", os.Getppid(), err)
	}
	return nil
}

// notifySignals starts listening for the signals the primary acts on,
// when signal handling is on; stopSignals undoes it.
func (p *primary) notifySignals() <-chan os.Signal {
	if !p.cfg.signals {
		return nil
	}
	ch := make(chan os.Signal, 2)
	notifySignals(ch, syscall.SIGINT, syscall.SIGTERM, sigRestart, sigScaleUp, sigScaleDown, sigUpgrade)
	pipe := catchSIGPIPE()
	p.stopSignals = func() { stopSignals(ch); stopSignals(pipe) }
	return ch
}

// goSupervise starts slot s's supervisor. startup receives the outcome of
// the slot's first process.
func (p *primary) goSupervise(s *slot, startup chan<- error) {
	p.supervisors.Add(1)
	go func() {
		defer p.supervisors.Done()
		p.supervise(s, startup)
	}()
}

// awaitStartup waits for the first outcome of each of the n slots. Each
// slot's supervisor enforces the start timeout on its process.
func (p *primary) awaitStartup(n int, startup <-chan error, sigs <-chan os.Signal) error {
	for waiting := n; waiting > 0; {
		select {
		case err := <-startup:
			if err != nil {
				return err
			}
			waiting--
		case sig := <-sigs:
			if sig == syscall.SIGINT || sig == syscall.SIGTERM {
				return ErrInterrupted
			} // SIGHUP: the workers start from the binary on disk anyway; SIGUSR2, SIGTTIN, SIGTTOU: ignored until serving
		}
	}
	return nil
}

// run waits for the reason to stop, then shuts down in order, as
// http.Server.Shutdown does: the drain delay (the health path answers 503,
// everything else is still served), then no new connections and the
// workers drain, then what is left of the connections ends. Signals that
// arrive meanwhile start operations (ops) or, a second time, force the
// stop.
func (p *primary) run(sigs <-chan os.Signal) {
	var ops sync.WaitGroup
	// signalled: a stop signal has come; the next one stops at once. A
	// stop that began otherwise (Shutdown, an upgrade's hand-over) is
	// not forced by the first signal after it.
	signalled := p.awaitStop(sigs, &ops)
	p.life.draining.Store(true)
	if !p.upgraded.Load() {
		p.notify.stopping()
	}
	p.drainDelay(sigs, &ops, &signalled)
	p.emptyAcceptQueue(sigs, &ops, &signalled)
	p.beginShutdown()
	p.awaitWorkers(sigs, &ops, &signalled)
	p.endConnections()
	p.stopRelay() // every connection has ended
	ops.Wait()
	if p.life.err == nil && p.pool.noneLeft() {
		p.life.err = ErrNoWorkers
	}
	p.unhook()
	p.log.Info("stopped")
	close(p.life.done)
}

// awaitStop serves until a stop signal, a Shutdown call or a fatal error.
// Whatever the reason, the stop counts as requested from then on.
func (p *primary) awaitStop(sigs <-chan os.Signal, ops *sync.WaitGroup) (bySignal bool) {
	defer p.requestStop()
	for {
		select {
		case sig := <-sigs:
			if p.onSignal(sig, ops) {
				p.log.Info("signal received; shutting down gracefully (send another to stop at once)", "signal", sig.String())
				return true
			}
		case <-p.life.stopReq:
			p.log.Info("shutting down gracefully")
			return false
		case <-p.life.drain:
			return false
		case err := <-p.life.fatal:
			p.life.err = err
			p.log.Error("stopping", "err", err)
			return false
		}
	}
}

// secondStop reports whether a stop signal, sig being one, is the second:
// the first one after a stop that began without a signal only counts.
func (p *primary) secondStop(sig os.Signal, signalled *bool) bool {
	if *signalled {
		return true
	}
	*signalled = true
	p.log.Info("signal received; already shutting down gracefully (send another to stop at once)", "signal", sig.String())
	return false
}

// drainDelay keeps serving for WithDrainDelay while the health path
// answers 503, unless a second stop signal comes.
func (p *primary) drainDelay(sigs <-chan os.Signal, ops *sync.WaitGroup, signalled *bool) {
	d := p.cfg.drainDelay
	if d <= 0 || p.life.err != nil || p.stopping() || p.upgraded.Load() {
		return
	}
	p.log.Info("drain delay: health checks answer 503; still serving", "delay", d)
	p.serveFor(d, nil, sigs, ops, signalled)
}

// serveFor waits for d, handling signals as run does meanwhile. It
// reports false if the wait ended early: the shutdown began (a second
// stop signal forces it), or done closed (nil: never).
func (p *primary) serveFor(d time.Duration, done <-chan struct{}, sigs <-chan os.Signal, ops *sync.WaitGroup, signalled *bool) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case sig := <-sigs:
			if p.onSignal(sig, ops) && p.secondStop(sig, signalled) {
				p.log.Warn("second signal; stopping now")
				p.forceShutdown()
				return false
			}
		case <-p.life.drain:
			return false
		case <-done:
			return false
		}
	}
}

// emptyAcceptQueue readies the public socket for the close that begins the
// shutdown, so that the close resets no client whose handshake the kernel
// has completed (net/http's Shutdown resets those that wait in the accept
// queue). It stops new handshakes (stopHandshakes); gives those under way
// and the accept loop queueLinger; then waits until the accept queue is
// empty, for at most queueMax in all; and takes the filter off again
// just before the close (releaseHandshakes, which beginShutdown calls too,
// so that a forced stop leaves no filter on a socket another process may
// hold). Only for a socket the primary opened, or got from an upgrade and
// not from systemd, which holds it too (nothing in its queue is reset,
// and the next process serves it). Not for a WithListener socket, which
// others may hold. Not when the stop is forced, or the accept loop has
// ended, or after an upgrade, whose new primary accepts from the same
// socket. A second stop signal meanwhile forces the stop.
//
// A client that has connected and not yet sent its request is not in the
// accept queue (TCP_DEFER_ACCEPT keeps it out until its first bytes), so
// one whose request comes after queueLinger is reset at the close.
func (p *primary) emptyAcceptQueue(sigs <-chan os.Signal, ops *sync.WaitGroup, signalled *bool) {
	// An upgrade that was under way has given up by now (the stop was
	// requested), or has set upgraded.
	p.upgradeMu.Lock()
	upgraded := p.upgraded.Load()
	p.upgradeMu.Unlock()
	switch {
	case p.stopping() || p.life.err != nil || upgraded || closed(p.acceptDone):
		return
	case p.cfg.inherited != nil && p.cfg.inherited.activated:
		return
	case p.cfg.inherited == nil && p.cfg.listener != nil:
		return
	}
	p.heldMu.Lock()
	err := stopHandshakes(p.ln)
	p.held = err == nil
	p.heldMu.Unlock()
	if err != nil {
		if !errors.Is(err, errors.ErrUnsupported) {
			p.log.Debug("new connections not held off before the listener closes; those queued then are reset", "err", err)
		}
		return
	}
	defer p.releaseHandshakes()
	// The wait ends early too when nobody accepts any more.
	wait := func(d time.Duration) bool { return p.serveFor(d, p.acceptDone, sigs, ops, signalled) }
	start := time.Now()
	if !wait(queueLinger) {
		return
	}
	for {
		n, err := acceptQueue(p.ln)
		if err != nil || n == 0 || p.stopping() {
			return
		}
		if time.Since(start) >= queueMax {
			p.log.Warn("closing the listener with connections still waiting to be accepted; they are reset", "queued", n, "waited", time.Since(start).Round(time.Millisecond))
			return
		}
		if !wait(queueTick) {
			return
		}
	}
}

// releaseHandshakes takes emptyAcceptQueue's filter off the public socket,
// if it is on, before the close.
func (p *primary) releaseHandshakes() {
	p.heldMu.Lock()
	defer p.heldMu.Unlock()
	p.releaseHeld()
}

// releaseHeld is releaseHandshakes with heldMu held.
func (p *primary) releaseHeld() {
	if p.held {
		allowHandshakes(p.ln)
		p.held = false
	}
}

const (
	// queueLinger is how long emptyAcceptQueue lets handshakes under way
	// complete, and the accept loop take them: a client whose SYN came
	// just before sends its ACK (and, as a rule, its request) a round trip
	// later.
	queueLinger = 100 * time.Millisecond
	// queueMax bounds emptyAcceptQueue: an accept loop that cannot keep up does
	// not hold the stop.
	queueMax = time.Second
	// queueTick is how often emptyAcceptQueue looks at the accept queue.
	queueTick = 2 * time.Millisecond
)

// awaitWorkers waits until every supervisor has ended: the workers have
// drained, or were killed at the shutdown timeout. It forces the stop on a
// second signal, and a second after the shutdown timeout.
func (p *primary) awaitWorkers(sigs <-chan os.Signal, ops *sync.WaitGroup, signalled *bool) {
	deadline := time.NewTimer(p.cfg.shutdownTimeout + time.Second) // workers are killed at shutdownTimeout
	defer deadline.Stop()
	workersDone := make(chan struct{})
	go func() {
		p.supervisors.Wait()
		close(workersDone)
	}()
	for {
		select {
		case <-workersDone:
			return
		case sig := <-sigs:
			if p.onSignal(sig, ops) && p.secondStop(sig, signalled) {
				p.log.Warn("second signal; stopping now")
				p.forceShutdown()
			}
		case <-deadline.C:
			p.log.Error("workers still running after the shutdown timeout; killing them")
			p.forceShutdown()
		}
	}
}

// endConnections ends the connections that are left once every worker has
// exited, so nothing the clients send can reach one: it ends the client
// side, lets the last bytes from the workers through, and closes whatever
// still hangs after a second.
func (p *primary) endConnections() {
	p.log.Info("workers stopped; ending remaining connections")
	p.conns.endAll()
	connsDone := make(chan struct{})
	go func() {
		p.conns.wait()
		close(connsDone)
	}()
	select {
	case <-connsDone:
	case <-time.After(time.Second):
		p.log.Warn("connections still open a second after the workers stopped; closing them")
	}
	p.conns.closeAll()
	<-p.acceptDone
	<-connsDone
}

// onSignal handles a signal and reports whether it asks to stop. SIGHUP
// starts a rolling restart, SIGUSR2 an upgrade, SIGTTIN and SIGTTOU scale
// by one, in ops.
func (p *primary) onSignal(sig os.Signal, ops *sync.WaitGroup) (stop bool) {
	var op func() error
	switch sig {
	case sigRestart:
		op = func() error { return p.restart(context.Background()) }
	case sigScaleUp:
		op = func() error { return p.scaleBy(1) }
	case sigScaleDown:
		op = func() error { return p.scaleBy(-1) }
	case sigUpgrade:
		op = func() error { p.upgrade(context.Background()); return nil } // it logs its outcome
	default:
		return true
	}
	if p.stopRequested() {
		p.log.Info("signal ignored: shutting down", "signal", sig.String()) // a shutdown wins
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

// unhook undoes what startPrimary set up besides the workers and the
// connections: the signal handlers, the telemetry callback, the fixed
// worker ports and the PID file (unless it names a new primary).
func (p *primary) unhook() {
	if p.stopSignals != nil {
		p.stopSignals()
	}
	if p.cfg.pidFile != "" {
		removePIDFile(p.cfg.pidFile)
	}
	p.tel.close()
	p.fixedMu.Lock()
	for _, ln := range p.fixedLns {
		ln.Close()
	}
	p.fixedLns = nil
	p.fixedMu.Unlock()
}

// sendFixedListener passes slot i's listening socket on its fixed port
// (WithBaseWorkerPort) to a new process of the slot over uc, binding it
// the first time. The primary holds the socket for the life of the server
// and every process of the slot serves on it: a successor starts beside
// its predecessor on the same port, and a draining process that closes
// its descriptor resets nothing in the queue, which the successor goes on
// accepting from.
func (p *primary) sendFixedListener(uc *net.UnixConn, i int) error {
	p.fixedMu.Lock()
	defer p.fixedMu.Unlock()
	ln := p.fixedLns[i]
	if ln == nil {
		l, err := net.Listen("tcp", net.JoinHostPort(p.cfg.workerHost, strconv.Itoa(p.cfg.baseWorkerPort+i)))
		if err != nil {
			return err
		}
		ln = l.(*net.TCPListener)
		if p.fixedLns == nil {
			p.fixedLns = make(map[int]*net.TCPListener)
		}
		p.fixedLns[i] = ln
	}
	return sendFD(uc, ln)
}

// closeFixedListener closes slot i's fixed-port socket: the slot is gone
// (scaled down). A new slot i binds it again.
func (p *primary) closeFixedListener(i int) {
	p.fixedMu.Lock()
	defer p.fixedMu.Unlock()
	if ln := p.fixedLns[i]; ln != nil {
		ln.Close()
		delete(p.fixedLns, i)
	}
}

// requestStop asks run to shut down gracefully.
func (p *primary) requestStop() {
	p.life.stopOnce.Do(func() { close(p.life.stopReq) })
}

// beginShutdown starts a graceful shutdown: no new connections or slots,
// the workers drain.
func (p *primary) beginShutdown() {
	p.life.drainOnce.Do(func() {
		p.heldMu.Lock() // no filter is put on or taken off meanwhile
		p.releaseHeld()
		p.ln.Close()
		p.heldMu.Unlock()
		p.pool.close() // Scale adds no supervisor after this
		close(p.life.drain)
	})
}

// forceShutdown kills the workers and closes every connection now.
func (p *primary) forceShutdown() {
	p.beginShutdown()
	p.life.forceOnce.Do(func() {
		close(p.life.force)
		p.conns.closeAll()
	})
}

// fail ends the primary with err, unless it is already ending.
func (p *primary) fail(err error) {
	select {
	case p.life.fatal <- err:
	default:
	}
}

// stopRequested reports whether a stop has begun, during the drain delay
// too.
func (p *primary) stopRequested() bool { return closed(p.life.stopReq) }

// stopping reports whether a shutdown has begun: the listener is closed.
func (p *primary) stopping() bool { return closed(p.life.drain) }

// closed reports whether ch, a channel closed as a broadcast, is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// slotGone records that slot s will never run again (respawn is off);
// when none is left the primary stops.
func (p *primary) slotGone(s *slot) {
	if p.pool.slotGone(s) {
		p.fail(ErrNoWorkers)
	}
}
