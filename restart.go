package defuss

import (
	"context"
	"fmt"
	"net"
)

func (p *primary) restart(ctx context.Context) error {
	p.restartMu.Lock()
	defer p.restartMu.Unlock()
	p.notify.reloading("restarting workers")
	defer func() {
		if !p.stopping() {
			p.notify.ready(p.pool.snapshot())
		}
	}()
	slots := p.pool.list()
	p.log.Info("rolling restart", "workers", len(slots))
	for _, s := range slots {
		if p.stopping() {
			return ErrShuttingDown // checked first: the selects below pick at random
		}
		select {
		case p.replaceTok <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.life.drain:
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
	case <-p.life.drain:
		return ErrShuttingDown
	}
	return <-req.done // the supervisor always answers, also when shutting down
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
	if p.stopping() {
		return ErrShuttingDown
	}
	slots := p.pool.list()
	have := len(slots)
	switch n := target(have); {
	case n > have:
		if err := p.cfg.checkWorkerPorts(n, listenerPort(p.ln)); err != nil {
			return fmt.Errorf("%w (Scale to %d workers)", err, n)
		}
		startup := make(chan error, n-have)
		added, err := p.pool.grow(n, func(s *slot) { p.goSupervise(s, startup) })
		if err != nil {
			return err
		}
		p.log.Info("scaling up", "from", have, "to", n)
		for range added {
			select {
			case err = <-startup:
			case <-ctx.Done():
				err = ctx.Err()
			case <-p.life.drain:
				err = ErrShuttingDown
			}
			if err != nil {
				p.log.Error("scaling up failed; removing the new workers", "err", err)
				p.removeSlots(added)
				return err
			}
		}
	case n < have:
		p.log.Info("scaling down", "from", have, "to", n)
		p.removeSlots(slots[n:])
	}
	return nil
}

// removeSlots takes slots out of the table, drains them and waits until
// their supervisors have ended.
func (p *primary) removeSlots(slots []*slot) {
	if p.pool.remove(slots) {
		p.fail(ErrNoWorkers) // with respawn off, only dead slots are left
	}
	for _, s := range slots {
		close(s.retire)
	}
	for _, s := range slots {
		<-s.done
	}
}

// listenerPort is ln's TCP port, or -1.
func listenerPort(ln net.Listener) int {
	if a, ok := ln.Addr().(*net.TCPAddr); ok {
		return a.Port
	}
	return -1
}
