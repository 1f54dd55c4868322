package defuss

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/defuss-go/defuss/internal/proc"
)

// Errors. Every error this package returns that callers may act on wraps
// one of these; test with errors.Is.
var (
	// ErrNotSupported is returned by Start on a platform where defuss cannot
	// start workers (Windows), and by Upgrade for a server it cannot
	// upgrade.
	ErrNotSupported = errors.New("defuss: not supported")
	// ErrInvalidOption is wrapped by every error Start returns for a bad
	// option, a bad argument, or a bad value of an environment variable it
	// reads (PORT, LISTEN_PORT, LISTEN_HOST, socket activation's
	// LISTEN_*); the message names it.
	ErrInvalidOption = errors.New("defuss: invalid option")
	// ErrWorkerStart is wrapped by the error that Start, Restart or Scale
	// returns when a new worker fails before it reports ready (it exits,
	// cannot bind its port, or stays silent past the start timeout), and
	// by Upgrade's when the new primary fails; the message says which
	// process and why.
	ErrWorkerStart = errors.New("defuss: worker failed to start")
	// ErrInterrupted is returned by Start when SIGINT or SIGTERM arrives
	// while it waits for the workers to become ready.
	ErrInterrupted = errors.New("defuss: interrupted during start-up")
	// ErrNoWorkers is returned by Wait when every worker has exited and
	// none will be respawned (WithRespawn(false)).
	ErrNoWorkers = errors.New("defuss: no workers left")
	// ErrShuttingDown is returned by Restart, Scale and Upgrade when they
	// are refused or cut short because the server is shutting down.
	ErrShuttingDown = errors.New("defuss: server is shutting down")
	// ErrUpgradeInProgress is returned by Upgrade while another upgrade of
	// the same server runs: upgrades are refused, not queued.
	ErrUpgradeInProgress = errors.New("defuss: an upgrade is already in progress")
	// ErrNotPrimary is returned by Restart, Scale and Upgrade in a worker:
	// they exist only in the primary.
	ErrNotPrimary = errors.New("defuss: not the primary")
)

// IsWorker reports whether this process is a defuss worker, started by a
// primary. It can be called before Start, to skip work in the workers that
// only the primary needs (or the other way round).
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
		return nil, fmt.Errorf("%w on this platform: workers need Unix", ErrNotSupported)
	}
	c, err := newConfig(os.Getenv, opts...)
	if c != nil && c.server != nil {
		switch {
		case handler != nil && c.server.Handler != nil:
			err = fmt.Errorf("%w: both Start's handler and WithServer's srv.Handler are set; set one of them", ErrInvalidOption)
		case handler == nil:
			handler = c.server.Handler
		}
	}
	if handler == nil {
		err = errors.Join(fmt.Errorf("%w: handler is nil (and no WithServer with a Handler)", ErrInvalidOption), err)
	}
	if IsWorker() {
		if err != nil {
			return nil, err
		}
		return startWorker(handler, c)
	}
	return startPrimary(c, err)
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
	<-s.p.life.done
	return s.p.life.err
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
		done = s.p.life.done
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		if s.p != nil {
			s.p.forceShutdown()
		} else {
			s.w.forceStop()
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

// Addr returns the address the server accepts on: the public address in
// the primary, the worker's loopback address in a worker.
func (s *Server) Addr() net.Addr {
	if s.w != nil {
		return s.w.ln.Addr()
	}
	return s.p.ln.Addr()
}

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
	return slices.Clone(s.p.pool.snapshot().all) // the view is shared
}
