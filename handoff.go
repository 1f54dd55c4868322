package defuss

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
)

// handTo passes c's descriptor to process pr. The connection counts as
// open in pr before it is sent, so that a close the worker reports at once
// finds it there.
func handTo(pr *process, c *net.TCPConn) error {
	pr.open.Add(1)
	if err := sendConn(pr.handoffSock, c); err != nil {
		pr.open.Add(-1)
		return err
	}
	return nil
}

// serveHandoff serves the connections the primary hands off.
func (w *worker) serveHandoff() {
	defer w.wg.Done()
	if err := w.srv.Serve(w.withTLS(w.handed)); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
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
