package defuss

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Upgrade replaces the whole server, the primary included, with the binary
// on disk, without refusing or dropping a connection. It starts a new
// primary from that binary with this one's arguments and environment, and
// passes it the public listening socket (a descriptor at exec); the new
// primary starts its own workers and reports ready over a socket pair.
// Only then does this primary stop accepting and shut down as on SIGTERM,
// without the drain delay: in-flight requests finish, keep-alive
// connections close after their current request, hijacked ones get the
// shutdown timeout. The kernel's queue of the listening socket is shared
// by both primaries meanwhile, so no connection is refused. Upgrade
// returns once the new primary has been told to go; [Server.Wait] then
// returns nil when this one has drained. The new primary does not depend
// on this one: it runs on when this one exits, as the service's main
// process ([WithPIDFile], sd_notify MAINPID=).
//
// The hand-over is two-phase: the new primary writes the PID file and
// reports ready, and accepts and tells systemd MAINPID= only once this one
// answers "go"; nothing in it can fail after that. Until then it has
// accepted nothing, so a failed upgrade loses nothing, and this one puts
// its own pid back in the PID file. If the new primary fails (it cannot
// be started, exits, or does not report ready within the start timeout,
// [WithStartTimeout], plus 3 seconds for its own start), it is killed, this server keeps
// serving as before, and Upgrade returns an error wrapping
// [ErrWorkerStart] that says why. If ctx ends or a shutdown begins first,
// the new primary is killed and ctx.Err() or [ErrShuttingDown] returned.
//
// Upgrade refuses a second upgrade while one runs
// ([ErrUpgradeInProgress]), an upgrade once a shutdown has begun (also
// during the drain delay) or after an upgrade ([ErrShuttingDown]), and,
// with [ErrNotSupported], a server whose listener came from
// [WithListener] (the caller's code would bind it again) or that has
// fixed worker ports ([WithBaseWorkerPort]: this primary holds them until
// it exits). The new primary starts with [WithWorkers]'s count: a Scale
// done at run time is not carried over. SIGUSR2 (with signal handling on)
// calls Upgrade, as it does for nginx and gunicorn. In a worker, Upgrade
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
	if !p.upgradeMu.TryLock() {
		return ErrUpgradeInProgress // that one tells the service manager how it ends
	}
	defer p.upgradeMu.Unlock()
	if p.stopRequested() || p.upgraded.Load() {
		return ErrShuttingDown
	}
	p.notify.reloading("upgrading: starting a new primary")
	err := p.handOver(ctx)
	if err != nil {
		p.keepServing(err)
	}
	return err
}

// keepServing undoes what a failed upgrade may have changed outside this
// process: the new primary writes the PID file before it reports ready.
// It also ends the service manager's reload.
func (p *primary) keepServing(err error) {
	if p.cfg.pidFile != "" && !errors.Is(err, ErrNotSupported) {
		if err := writePIDFile(p.cfg.pidFile); err != nil {
			p.log.Error("cannot rewrite the PID file after a failed upgrade", "err", err)
		}
	}
	p.notify.keep(err.Error())
}

// upgradeGrace is what the new primary of an upgrade gets on top of the
// start timeout, for its exec and the program's code before Start: its
// workers get the whole start timeout each, and when one fails, the new
// primary's report of why should arrive before this one gives up.
const upgradeGrace = 3 * time.Second

// handOver starts the new primary, waits for its report, and on "ok"
// tells it to go and begins this one's shutdown.
func (p *primary) handOver(ctx context.Context) error {
	switch {
	case p.cfg.listener != nil && p.cfg.inherited == nil:
		return fmt.Errorf("%w: Upgrade: the listener came from WithListener, and a new primary cannot take it over; listen with WithAddr or socket activation", ErrNotSupported)
	case p.cfg.baseWorkerPort > 0:
		return fmt.Errorf("%w: Upgrade with WithBaseWorkerPort: this primary holds the workers' ports until it exits, so a new primary's workers could not bind them; use Restart", ErrNotSupported)
	}
	began := time.Now()
	succ, err := p.startSuccessor()
	if err != nil {
		return fmt.Errorf("%w: upgrade: start a new primary from %s: %w", ErrWorkerStart, p.exe, err)
	}
	p.log.Info("upgrade: new primary started; waiting until it is ready", "new_pid", succ.pid)
	if err := succ.await(ctx, p.cfg.startTimeout+upgradeGrace, p.life.stopReq); err != nil {
		return err
	}
	p.upgraded.Store(true)
	p.log.Info("upgrade: new primary serves; this one stops accepting and drains", "new_pid", succ.pid, "took", time.Since(began).Round(time.Millisecond))
	p.requestStop()
	return nil
}

// A successor is the new primary of an upgrade, from its start until it
// takes over or is killed.
type successor struct {
	pid  int
	proc *os.Process
	conn *net.UnixConn // to it: it reports "ok" or "error: why", and is told "go"
}

// successorEnv is the environment of the new primary: this process's,
// without what passed descriptors to this one, naming this one as its
// predecessor, and saying whether the socket is systemd's (activated).
func successorEnv(activated bool) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !isInheritEnv(kv) {
			env = append(env, kv)
		}
	}
	if activated {
		env = append(env, envUpgradeActivated+"=1")
	}
	return append(env, envUpgradeFrom+"="+strconv.Itoa(os.Getpid()))
}

// await waits for the successor's report and, on "ok", tells it to go:
// from then on it runs on its own. On anything else (it reports an error,
// exits, the timeout passes, ctx ends, a stop begins) it kills the
// successor, which has accepted nothing yet, reaps it, and returns why.
func (s *successor) await(ctx context.Context, timeout time.Duration, stop <-chan struct{}) error {
	reports := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(io.LimitReader(s.conn, 4096)).ReadString('\n')
		reports <- strings.TrimSuffix(line, "\n")
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	var fail error
	reported := false
	select {
	case line := <-reports:
		reported = true
		if fail = s.settle(ctx, line, stop); fail == nil {
			return nil
		}
	case <-t.C:
		fail = fmt.Errorf("%w: upgrade: new primary (pid %d) not ready within the start timeout and %v; killed", ErrWorkerStart, s.pid, upgradeGrace)
	case <-ctx.Done():
		fail = fmt.Errorf("defuss: upgrade: %w", ctx.Err())
	case <-stop:
		fail = ErrShuttingDown
	}
	s.proc.Kill()
	st, werr := s.proc.Wait()
	s.conn.Close() // ends the reader even if a child of the successor holds its end
	if !reported {
		<-reports
	}
	if errors.Is(fail, errEnded) {
		how := "exited"
		if werr == nil {
			how = st.String()
		}
		fail = fmt.Errorf("%w: upgrade: new primary (pid %d) ended before it was ready (%s)", ErrWorkerStart, s.pid, how)
	}
	return fail
}

// errEnded: the successor closed its end without a report.
var errEnded = errors.New("ended")

// settle acts on the successor's report. On "ok", unless ctx has ended or
// a stop has begun meanwhile, it answers "go" and releases the process.
func (s *successor) settle(ctx context.Context, line string, stop <-chan struct{}) error {
	switch {
	case line == "":
		return errEnded
	case line != "ok":
		return fmt.Errorf("%w: upgrade: new primary (pid %d): %s", ErrWorkerStart, s.pid, strings.TrimPrefix(line, "error: "))
	case ctx.Err() != nil:
		return fmt.Errorf("defuss: upgrade: %w", ctx.Err())
	case closed(stop):
		return ErrShuttingDown
	}
	s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := s.conn.Write([]byte("go\n")); err != nil {
		return fmt.Errorf("%w: upgrade: new primary (pid %d) was ready, then gone: %v", ErrWorkerStart, s.pid, err)
	}
	s.conn.Close()
	s.proc.Release()
	return nil
}
