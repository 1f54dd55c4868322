//go:build unix

package defuss

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// handoffTimeout bounds the wait to pass a descriptor to a worker whose
// queue is full (a worker that is stopped or stuck): the connection then
// goes to the next worker instead of blocking its goroutine.
const handoffTimeout = time.Second

// sendConn passes c's descriptor over uc (SCM_RIGHTS), waiting at most
// handoffTimeout for room in the worker's queue.
func sendConn(uc *net.UnixConn, c *net.TCPConn) error {
	// Concurrent sends share uc; each moves its deadline on, which only
	// ever extends another's wait to at most handoffTimeout from now.
	uc.SetWriteDeadline(time.Now().Add(handoffTimeout))
	return sendFD(uc, c)
}

// sendFD passes the descriptor of c (a connection or a listener) over uc
// (SCM_RIGHTS), leaving its flags alone.
func sendFD(uc *net.UnixConn, c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	err = rc.Control(func(fd uintptr) {
		_, _, werr = uc.WriteMsgUnix([]byte{1}, unix.UnixRights(int(fd)), nil)
	})
	return errors.Join(err, werr)
}

// receiveListener receives the TCP listening socket the primary sends
// first on uc (fixed worker ports).
func receiveListener(uc *net.UnixConn, timeout time.Duration) (net.Listener, error) {
	uc.SetReadDeadline(time.Now().Add(timeout))
	defer uc.SetReadDeadline(time.Time{})
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := uc.ReadMsgUnix(b[:], oob)
	if err != nil {
		return nil, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, fmt.Errorf("no listening socket in the message (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, fmt.Errorf("no listening socket in the message (%v)", err)
	}
	f := os.NewFile(uintptr(fds[0]), "defuss-listener")
	defer f.Close() // FileListener made its own descriptor
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	if _, ok := ln.(*net.TCPListener); !ok {
		ln.Close()
		return nil, errors.New("the descriptor received is not a TCP listener")
	}
	return ln, nil
}

// peekHead waits, as sniff does, for a complete head, a full buf, EOF or
// the timeout, but with MSG_PEEK: the bytes stay in the socket for the
// worker. It returns how many bytes it saw and why it stopped.
func peekHead(c *net.TCPConn, buf []byte, timeout time.Duration) (int, string, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, sniffEOF, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	n, outcome := 0, sniffTimeout
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		m, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
			return false
		case err != nil:
			perr = os.NewSyscallError("recvfrom", err)
			return true
		case m == 0:
			outcome = sniffEOF
			return true
		}
		n = m
		switch {
		case headComplete(buf[:m], 0):
			outcome = sniffComplete
		case m == len(buf):
			outcome = sniffCap
		default:
			return false // wait for more bytes to arrive
		}
		return true
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return n, sniffTimeout, nil
	}
	if err == nil {
		err = perr
	}
	if err != nil {
		return n, sniffEOF, err
	}
	return n, outcome, nil
}

// handoffPair returns the primary's end of a new hand-off socket pair and
// the worker's end, to pass as fd 5. Both ends are close-on-exec; the
// worker's end is inherited through exec.Cmd.ExtraFiles all the same.
func handoffPair() (*net.UnixConn, *os.File, error) {
	fds, err := handoffSocketpair()
	if err != nil {
		return nil, nil, err
	}
	ours := os.NewFile(uintptr(fds[0]), "defuss-handoff")
	defer ours.Close() // FileConn made its own descriptor
	c, err := net.FileConn(ours)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "defuss-handoff-worker"), nil
}

// receive reads descriptors from the hand-off socket until it closes.
func (l *handoffListener) receive(wg *sync.WaitGroup, log *slog.Logger) {
	defer wg.Done()
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		_, oobn, _, _, err := l.uc.ReadMsgUnix(b[:], oob)
		if err != nil {
			return // the primary is gone, or the worker stops
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			log.Error("hand-off message", "err", err)
			continue
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				f := os.NewFile(uintptr(fd), "handed-off")
				c, err := net.FileConn(f)
				f.Close()
				tc, ok := c.(*net.TCPConn)
				if err != nil || !ok {
					log.Error("handed-off connection is not TCP", "err", err)
					if c != nil {
						c.Close()
					}
					continue
				}
				hc := l.w.track(tc, true)
				select {
				case l.conns <- hc:
				case <-l.done:
					hc.Close()
				}
			}
		}
	}
}
