//go:build unix

package defuss

import (
	"errors"
	"fmt"
	"io"
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

// sendConn passes c's descriptor over uc (SCM_RIGHTS) in the hand-off
// message msg, waiting at most handoffTimeout for room in the worker's
// queue.
func sendConn(uc *net.UnixConn, c syscall.Conn, msg []byte) error {
	// Concurrent sends share uc; each moves its deadline on, which only
	// ever extends another's wait to at most handoffTimeout from now.
	uc.SetWriteDeadline(time.Now().Add(handoffTimeout))
	return sendFDWith(uc, c, msg)
}

// sendFD passes the descriptor of c (a listener) over uc (SCM_RIGHTS),
// leaving its flags alone.
func sendFD(uc *net.UnixConn, c syscall.Conn) error {
	return sendFDWith(uc, c, []byte{handoffV1})
}

// sendFDWith passes the descriptor of c over uc (SCM_RIGHTS) in the
// hand-off message msg, leaving its flags alone.
func sendFDWith(uc *net.UnixConn, c syscall.Conn, msg []byte) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	err = rc.Control(func(fd uintptr) {
		_, _, werr = uc.WriteMsgUnix(msg, unix.UnixRights(int(fd)), nil)
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
// worker. With detectProxy, a PROXY header at the start is looked for
// first, and the head after it. It returns what sniff returns: how many
// bytes it saw, the length of the PROXY header at their start (0 if none,
// -1 if one started but is malformed or did not arrive in time), why it
// stopped, and the error that ended it early.
func peekHead(c peeker, buf []byte, timeout time.Duration, detectProxy bool, firstByteWait time.Duration) (n, hdr int, outcome string, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, sniffEOF, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	if detectProxy {
		hdr = proxyUnknown
	}
	outcome = sniffTimeout
	var perr error
	peek := func(fd uintptr) bool {
		m, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
			return false
		case err != nil:
			perr = os.NewSyscallError("recvfrom", err)
			return true
		case m == 0:
			outcome = sniffEOF
			if n == 0 {
				perr = io.EOF // closed without a byte: nobody to serve, as sniff says
			}
			return true
		}
		prev := n // a peek sees everything from the start again
		n = m
		if hdr == proxyUnknown {
			if hdr = proxyHeaderLen(buf[:n]); hdr == proxyMalformed {
				outcome = sniffComplete
				return true
			}
		}
		switch {
		case hdr >= 0 && headComplete(buf[hdr:n], max(prev-hdr, 0)):
			outcome = sniffComplete
		case n == len(buf):
			outcome = sniffCap
		default:
			return false // wait for more bytes to arrive
		}
		return true
	}
	for waited := firstByteWait <= 0; ; waited = true {
		err = rc.Read(peek)
		if waited || n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		// No byte from a trusted proxy yet: wait for the first ones
		// (see trustedFirstByteWait).
		c.SetReadDeadline(time.Now().Add(firstByteWait))
	}
	if hdr == proxyUnknown {
		hdr = 0
		if n > 0 {
			hdr = -1 // a PROXY header began but did not finish in time, or in buf
		}
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return n, hdr, sniffTimeout, nil
	}
	if err == nil {
		err = perr
	}
	if err != nil {
		return n, hdr, sniffEOF, err
	}
	return n, hdr, outcome, nil
}

// handoffPair returns the primary's end of a new hand-off socket pair and
// the worker's end, to pass as fd 5. Both ends are close-on-exec; the
// worker's end is inherited through exec.Cmd.ExtraFiles all the same.
func handoffPair() (*net.UnixConn, *os.File, error) {
	fds, err := handoffSocketpair()
	if err != nil {
		return nil, nil, err
	}
	return filePair(fds, "defuss-handoff")
}

// filePair turns the socket pair fds into this process's end, as a
// *net.UnixConn, and the child's end, a file to pass at exec.
func filePair(fds [2]int, name string) (*net.UnixConn, *os.File, error) {
	ours := os.NewFile(uintptr(fds[0]), name)
	defer ours.Close() // FileConn made its own descriptor
	c, err := net.FileConn(ours)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), name+"-child"), nil
}

// receive reads descriptors, each in its hand-off message or a record
// of a version 4 one, from the hand-off socket until it closes.
func (l *handoffListener) receive(wg *sync.WaitGroup, log *slog.Logger) {
	defer wg.Done()
	var b [handoffBatchMsgMax + 1]byte // a byte to spare: a longer message is refused
	oob := make([]byte, unix.CmsgSpace(4*handoffBatchMax))
	ms := make([]handoffMsg, 0, handoffBatchMax)
	var fds []int
	for {
		n, oobn, flags, _, err := l.uc.ReadMsgUnix(b[:], oob)
		if err != nil {
			return // the primary is gone, or the worker stops
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			log.Error("hand-off message", "err", err)
			continue
		}
		fds = fds[:0]
		for _, cm := range msgs {
			if got, err := unix.ParseUnixRights(&cm); err == nil {
				fds = append(fds, got...)
			}
		}
		var merr error
		if n > 0 && b[0] == handoffV4 {
			// The nth descriptor is the nth record's.
			if ms, merr = decodeHandoffBatch(b[:n], ms[:0]); merr == nil && len(fds) > len(ms) {
				merr = fmt.Errorf("%w: hand-off batch of %d records with %d descriptors", errFrame, len(ms), len(fds))
			}
		} else {
			// Every descriptor of an earlier version's message is the
			// message's (version 1 carries a fixed port's listener).
			var m handoffMsg
			m, merr = decodeHandoff(b[:n])
			ms = append(ms[:0], m)
		}
		if merr == nil && len(fds) < len(ms) {
			// The kernel installs what it can, in order, and closes the
			// rest (MSG_CTRUNC; out of descriptors): the primary counted
			// them handed, so they count as accepted and closed.
			lost := len(ms) - len(fds)
			log.Error("handed-off connections lost: their descriptors did not arrive", "lost", lost, "truncated", flags&unix.MSG_CTRUNC != 0)
			for range lost {
				l.accepted.Add(1)
				l.w.handedClose(nil)
			}
		}
		for i, fd := range fds {
			var m handoffMsg
			if merr == nil {
				m = ms[min(i, len(ms)-1)]
			}
			l.deliver(fd, m, merr, log)
		}
	}
}

// deliver serves the connection whose descriptor fd arrived in the
// hand-off message m (malformed if merr is set): it consumes the PROXY
// header the message announces, and passes the connection to Accept. A
// connection that cannot be served is closed, and its close reported; it
// counts as accepted, so that a drain does not wait for it.
func (l *handoffListener) deliver(fd int, m handoffMsg, merr error, log *slog.Logger) {
	if merr != nil {
		m = handoffMsg{} // nothing it says is known
	}
	tc, err := handedTCPConn(fd, m)
	if err != nil {
		log.Error("handed-off connection cannot be served", "err", err)
		l.accepted.Add(1)
		l.w.handedClose(nil)
		return
	}
	hc := &workerConn{tcpConn: tc, w: l.w, handed: true}
	if merr == nil && m.proxied > 0 {
		if merr = consumeProxyHeader(tc, m.proxied); merr == nil {
			hc.remote = net.TCPAddrFromAddrPort(m.client)
		}
	}
	if merr == nil {
		// A primary that sends version 2 or 3 messages records each served
		// connection's duration and bytes from its close report.
		hc.stats, hc.since = m.version >= handoffV2, time.Now()
	}
	l.w.trackConn(hc) // from here on, its close is reported
	if merr != nil {
		log.Error("handed-off connection closed", "err", merr)
		l.accepted.Add(1)
		hc.Close()
		return
	}
	select {
	case l.conns <- hc:
	case <-l.done:
		hc.Close()
	}
}

// fileTCPConn makes the descriptor fd a *net.TCPConn, with net.FileConn:
// a copy of the descriptor, with the options net's Accept sets. It takes
// fd, also when it fails.
func fileTCPConn(fd int) (tcpConn, error) {
	f := os.NewFile(uintptr(fd), "handed-off")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("a %T, not a TCP connection", c)
	}
	return tc, nil
}

// consumeProxyHeader reads the n bytes of the PROXY header at the start
// of c, which the primary has seen in c's receive queue, without waiting
// for them, and checks that they are one PROXY header of exactly n bytes:
// the worker strips nothing else.
func consumeProxyHeader(c syscall.Conn, n int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	buf := make([]byte, n)
	got := 0
	var rerr error
	err = rc.Control(func(fd uintptr) {
		for got < n && rerr == nil {
			m, _, err := unix.Recvfrom(int(fd), buf[got:], unix.MSG_DONTWAIT)
			switch {
			case err == unix.EINTR:
			case err != nil:
				rerr = os.NewSyscallError("recvfrom", err)
			case m == 0:
				rerr = io.ErrUnexpectedEOF
			default:
				got += m
			}
		}
	})
	if err = errors.Join(err, rerr); err != nil {
		return fmt.Errorf("read the PROXY header the primary announced (%d of %d bytes): %w", got, n, err)
	}
	if proxyHeaderLen(buf) != n {
		return fmt.Errorf("%w: the %d bytes announced as a PROXY header are not one", errFrame, n)
	}
	return nil
}

// announceHandoff tells the primary, on the hand-off socket uc, the
// highest hand-off message version this worker decodes: a one-byte
// message, written before the ready frame (see handoffAnnounced).
func announceHandoff(uc *net.UnixConn) error {
	_, err := uc.Write([]byte{handoffV4})
	return err
}

// handoffAnnounced is the highest hand-off message version the worker
// at the other end of uc announced it decodes, read without waiting once
// its ready frame has come (which it wrote after the announcement, so the
// message is there): version 2 if there is none, as from a worker before
// version 3; never more than this primary sends. Only the first byte
// counts, so that a later worker may say more after it. A worker must
// write it before its ready frame.
func handoffAnnounced(uc *net.UnixConn) byte {
	rc, err := uc.SyscallConn()
	if err != nil {
		return handoffV2
	}
	var b [8]byte
	n := 0
	rc.Control(func(fd uintptr) {
		for {
			var err error
			if n, _, err = unix.Recvfrom(int(fd), b[:], unix.MSG_DONTWAIT); err != unix.EINTR {
				return
			}
		}
	})
	if n < 1 || b[0] < handoffV3 {
		return handoffV2
	}
	return min(b[0], handoffV4)
}
