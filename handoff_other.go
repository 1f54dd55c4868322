//go:build !unix

package defuss

import (
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Hand-off needs SCM_RIGHTS, which this platform lacks. Start returns
// ErrNotSupported before any of these could be called; they exist so that
// the shared code builds.

func sendConn(*net.UnixConn, syscall.Conn, []byte) error { return ErrNotSupported }

func peekHead(peeker, []byte, time.Duration, bool, time.Duration) (int, int, string, error) {
	return 0, 0, sniffEOF, ErrNotSupported
}

func handoffPair() (*net.UnixConn, *os.File, error) { return nil, nil, ErrNotSupported }

func sendFD(*net.UnixConn, syscall.Conn) error { return ErrNotSupported }

func receiveListener(*net.UnixConn, time.Duration) (net.Listener, error) { return nil, ErrNotSupported }

func (l *handoffListener) receive(wg *sync.WaitGroup, _ *slog.Logger) { wg.Done() }

func announceHandoff(*net.UnixConn) error { return ErrNotSupported }

func handoffAnnounced(*net.UnixConn) byte { return handoffV2 }
