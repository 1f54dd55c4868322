package defuss

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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
		notifySignals(ch, syscall.SIGINT, syscall.SIGTERM, sigRestart, sigScaleUp, sigScaleDown)
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
		case sigRestart:
			op = func() error { return p.restart(context.Background()) }
		case sigScaleUp, sigScaleDown:
			delta := 1
			if sig == sigScaleDown {
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
