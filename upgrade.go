package defuss

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Upgrade replaces the whole server, the primary included, with the binary
// on disk, without refusing or dropping a connection. It starts a new
// primary from that binary with this one's arguments and environment, and
// passes it the public listening socket (a descriptor at exec); the new
// primary starts its own workers and reports ready over a pipe. Only then
// does this primary stop accepting and shut down as on SIGTERM, without
// the drain delay: in-flight requests finish, keep-alive connections close
// after their current request, hijacked ones get the shutdown timeout.
// The kernel's queue of the listening socket is shared by both primaries
// meanwhile, so no connection is refused. Upgrade returns once the new
// primary serves; [Server.Wait] then returns nil when this one has
// drained. The new primary does not depend on this one: it runs on when
// this one exits, as the service's main process ([WithPIDFile], sd_notify
// MAINPID=).
//
// If the new primary fails (it cannot be started, exits, or does not
// report ready within the start timeout, [WithStartTimeout], which covers
// its workers' start), it is killed, this server keeps serving as before,
// and Upgrade returns an error wrapping [ErrWorkerStart] that says why. If
// ctx ends first, the new primary is killed and ctx.Err() returned.
// Upgrade refuses a second upgrade while one runs ([ErrUpgradeInProgress]),
// an upgrade during shutdown ([ErrShuttingDown]), and a server whose
// listener came from [WithListener] ([ErrNotSupported]: the new primary
// could not take it over). SIGUSR2 (with signal handling on) calls
// Upgrade, as it does for nginx and gunicorn. In a worker, Upgrade
// returns [ErrNotPrimary].
func (s *Server) Upgrade(ctx context.Context) error {
	if s.p == nil {
		return ErrNotPrimary
	}
	return s.p.upgrade(ctx)
}

func (p *primary) upgrade(ctx context.Context) error {
	err := p.tryUpgrade(ctx)
	switch {
	case err == nil:
	case errors.Is(err, ErrShuttingDown):
		p.log.Info("upgrade refused: shutting down")
	case errors.Is(err, ErrUpgradeInProgress):
		p.log.Warn("upgrade refused: another upgrade is in progress")
	default:
		p.log.Error("upgrade failed; this primary keeps serving", "err", err)
	}
	return err
}

func (p *primary) tryUpgrade(ctx context.Context) error {
	if p.stopping() {
		return ErrShuttingDown
	}
	if p.cfg.listener != nil && p.cfg.inherited == nil {
		return fmt.Errorf("%w: Upgrade: the listener came from WithListener, and a new primary cannot take it over; listen with WithAddr or socket activation", ErrNotSupported)
	}
	if !p.upgradeMu.TryLock() {
		return ErrUpgradeInProgress
	}
	defer p.upgradeMu.Unlock()
	began := time.Now()
	p.notify.reloading("upgrading: starting a new primary")
	succ, err := p.startSuccessor()
	if err != nil {
		err = fmt.Errorf("%w: upgrade: start a new primary from %s: %w", ErrWorkerStart, p.exe, err)
		p.keepServing(err)
		return err
	}
	p.log.Info("upgrade: new primary started; waiting until it is ready", "new_pid", succ.pid)
	line, err := succ.await(ctx, p.cfg.startTimeout, p.life.stopReq, p.life.drain)
	if err != nil {
		p.keepServing(err)
		return err
	}
	if line != "ok" {
		err = fmt.Errorf("%w: upgrade: new primary (pid %d): %s", ErrWorkerStart, succ.pid, strings.TrimPrefix(line, "error: "))
		p.keepServing(err)
		return err
	}
	p.upgraded.Store(true)
	p.log.Info("upgrade: new primary serves; this one stops accepting and drains", "new_pid", succ.pid, "took", time.Since(began).Round(time.Millisecond))
	p.requestStop()
	return nil
}

// keepServing undoes what a failed upgrade may have changed outside this
// process: the service manager's main pid and the PID file.
func (p *primary) keepServing(err error) {
	p.notify.keep(err.Error())
	if p.cfg.pidFile != "" {
		if err := writePIDFile(p.cfg.pidFile); err != nil {
			p.log.Error("cannot rewrite the PID file after a failed upgrade", "err", err)
		}
	}
}

// A successor is the new primary of an upgrade, from its start until it
// reports ready or is killed.
type successor struct {
	pid   int
	proc  *os.Process
	ready *os.File // the read end of its ready pipe
}

// successorEnv is the environment of the new primary: this process's,
// without what passed descriptors to this one, and naming this one as
// its predecessor.
func successorEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !isInheritEnv(kv) {
			env = append(env, kv)
		}
	}
	return append(env, envUpgradeFrom+"="+fmt.Sprint(os.Getpid()))
}

// await waits for the successor's report on its ready pipe: "ok", or
// "error: why" when its Start failed. On anything else (it exits, the
// start timeout passes, ctx ends, a shutdown begins) it kills the
// successor and returns an error. On "ok" the successor is left to run on
// its own.
func (s *successor) await(ctx context.Context, timeout time.Duration, stop, drain <-chan struct{}) (string, error) {
	type report struct {
		line string
		err  error
	}
	reports := make(chan report, 1)
	go func() {
		b, err := io.ReadAll(io.LimitReader(s.ready, 4096))
		line, _, _ := bytes.Cut(b, []byte("\n"))
		reports <- report{string(line), err}
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	var fail error
	select {
	case r := <-reports:
		return s.settle(r.line)
	case <-t.C:
		fail = fmt.Errorf("%w: upgrade: new primary (pid %d) not ready within the start timeout (%v); killed", ErrWorkerStart, s.pid, timeout)
	case <-ctx.Done():
		fail = fmt.Errorf("defuss: upgrade: %w", ctx.Err())
	case <-stop:
		fail = ErrShuttingDown
	case <-drain:
		fail = ErrShuttingDown
	}
	select {
	case r := <-reports: // it reported at the same moment: its report wins
		if r.line == "ok" {
			return s.settle(r.line)
		}
	default:
	}
	s.proc.Kill()
	s.proc.Wait()
	s.ready.Close() // ends the reader even if a child of the successor holds the pipe
	<-reports
	return "", fail
}

// settle acts on the successor's report: on "ok" it is left to run on
// its own; on anything else it is killed and reaped.
func (s *successor) settle(line string) (string, error) {
	s.ready.Close()
	if line == "ok" {
		s.proc.Release()
		return line, nil
	}
	s.proc.Kill()
	st, err := s.proc.Wait()
	if line != "" {
		return line, nil
	}
	// EOF without a report: it has exited (or closed the pipe).
	how := "exited"
	if err == nil {
		how = st.String()
	}
	return "", fmt.Errorf("%w: upgrade: new primary (pid %d) ended before it was ready (%s)", ErrWorkerStart, s.pid, how)
}
