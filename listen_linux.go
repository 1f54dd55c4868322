package defuss

import (
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenConfig is how the primary opens its public socket. On Linux an
// accepted connection inherits TCP keep-alive and TCP_NODELAY from the
// listening socket, so they are set there once (publicSocketOpts), rather
// than with five system calls on every connection.
//
// The socket is plain TCP, as HAProxy's and nginx's are by default, not
// the Multipath TCP that net's Listen opens where the kernel has it (since
// Go 1.24). A plain TCP client, nearly every client, gets plain TCP from
// either. An MPTCP listening socket refuses the socket filter with which
// a graceful stop holds off new connections (stopHandshakes). For MPTCP,
// give WithListener a socket from a ListenConfig with SetMultipathTCP(true).
func listenConfig() net.ListenConfig {
	lc := net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = publicSocketOpts(int(fd)) }); err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false)
	return lc
}

// publicOpts are the options publicSocketOpts sets.
var publicOpts = [...]struct{ level, opt, v int }{
	{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
	{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
	{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
	{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
}

// publicSocketOpts sets on a listening socket what net's Accept sets on
// each connection by default: TCP_NODELAY, and keep-alive probes after
// 15 s idle, every 15 s, 9 of them. Accepted sockets inherit them.
func publicSocketOpts(fd int) error {
	for _, o := range publicOpts {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return os.NewSyscallError("setsockopt", err)
		}
	}
	return nil
}

// hasPublicSocketOpts reports whether the listening socket fd has what
// publicSocketOpts sets.
func hasPublicSocketOpts(fd int) bool {
	for _, o := range publicOpts {
		if v, err := unix.GetsockoptInt(fd, o.level, o.opt); err != nil || v != o.v {
			return false
		}
	}
	return true
}

// unsentLimit is TCP_NOTSENT_LOWAT on the public socket, which every
// accepted connection inherits: the kernel takes a write only while less
// than this much of the connection's data waits unsent (beyond what the
// client's window lets go). Without it a socket's send buffer grows to
// hold a whole large answer (up to net.ipv4.tcp_wmem's 4 MiB), so a
// client that reads slowly makes the server copy all of it into the
// kernel at once and keep it there: 2.5 MiB of kernel memory for each
// 1 MiB answer in bench/run.sh's slow-reader table, and a burst of such
// copies that starved every other request while 500 slow readers opened.
// With it the writer waits (its goroutine parks, or splice mode's event
// loop moves on) and the rest of the answer stays in the handler, or in
// the worker's socket. A client that reads at speed empties the queue as
// fast as it is written and sees no difference (bench/NOTES.md, "Unsent
// data per connection"). 128 KiB is meant to keep a fast link busy
// between two wake-ups of the writer (at 10 Gbit/s it lasts about 100 µs:
// arithmetic, not measured here); HAProxy's buffers are 16 KiB.
const unsentLimit = 128 << 10

// limitUnsent sets unsentLimit on the listening socket ln (see
// setUnsentLimit). It reports whether it set it.
func limitUnsent(ln net.Listener) (set bool, err error) {
	rc, err := listenerConn(ln)
	if err != nil {
		return false, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { set, serr = setUnsentLimit(int(fd), systemUnsentLimit()) }); err != nil {
		return false, err
	}
	return set, serr
}

// setUnsentLimit sets TCP_NOTSENT_LOWAT to unsentLimit on the socket fd,
// unless the socket has a value of its own already (an inherited socket:
// its first owner's choice is kept) or the system's, system, is as low.
// It reports whether it set it.
func setUnsentLimit(fd, system int) (bool, error) {
	v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT)
	if err != nil {
		return false, os.NewSyscallError("getsockopt", err)
	}
	if v != 0 || system <= unsentLimit {
		return false, nil
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, unsentLimit); err != nil {
		return false, os.NewSyscallError("setsockopt", err)
	}
	return true, nil
}

// systemUnsentLimit is net.ipv4.tcp_notsent_lowat, which applies to a
// socket with no value of its own: by default 4294967295, no limit. It
// reports no limit where the setting cannot be read.
func systemUnsentLimit() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_notsent_lowat")
	if err != nil {
		return math.MaxInt
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || v > math.MaxInt { // the default, 4294967295, is past a 32-bit int
		return math.MaxInt
	}
	return int(v)
}

// stopHandshakes makes the listening socket ln complete no more
// handshakes while it stays open: a socket filter drops every SYN that
// comes without an ACK, which is how a new connection begins. The client
// sends it again after a second, and by then finds the socket closed and
// is refused, a clean error that tells it nothing was sent. What the
// kernel has completed already still waits in the accept queue, and
// packets of connections whose handshake is under way pass. Closing the
// socket then resets nobody whom the accept loop has had time to take
// (emptyAcceptQueue). The filter is the socket's, not the descriptor's:
// it must come off (allowHandshakes) before the close, for a socket that
// another process may hold.
func stopHandshakes(ln net.Listener) error {
	rc, err := listenerConn(ln)
	if err != nil {
		return err
	}
	// On a TCP socket the filter sees the packet from the TCP header on:
	// byte 13 holds the flags.
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 13},
		{Code: unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, K: tcpSYN, Jt: 0, Jf: 2}, // no SYN: pass
		{Code: unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, K: tcpACK, Jt: 1, Jf: 0}, // SYN and ACK: pass
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},                                    // a SYN alone: drop
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff},                           // pass it whole
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER,
			&unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]})
	})
	return errors.Join(err, os.NewSyscallError("setsockopt", serr))
}

// allowHandshakes takes stopHandshakes' filter off ln again: just before
// the close, for a socket that another process may hold too (one from an
// upgrade), which must not keep it.
func allowHandshakes(ln net.Listener) error {
	rc, err := listenerConn(ln)
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0)
	})
	return errors.Join(err, os.NewSyscallError("setsockopt", serr))
}

// The TCP header's flags that stopHandshakes looks at.
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

// acceptQueue reports how many connections wait in the accept queue of
// the listening socket ln: for a listener, TCP_INFO's unacked field
// holds its length.
func acceptQueue(ln net.Listener) (int, error) {
	rc, err := listenerConn(ln)
	if err != nil {
		return 0, err
	}
	var info *unix.TCPInfo
	var gerr error
	if err := rc.Control(func(fd uintptr) { info, gerr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		return 0, err
	}
	if gerr != nil {
		return 0, os.NewSyscallError("getsockopt", gerr)
	}
	return int(info.Unacked), nil
}

// listenerConn is ln's descriptor, for a TCP listener.
func listenerConn(ln net.Listener) (syscall.RawConn, error) {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("%T is not a TCP listener", ln)
	}
	return tl.SyscallConn()
}

// socketLingers reports whether closing a socket that ln accepted may
// wait: its listening socket has SO_LINGER on with a time, which each
// accepted socket takes (a WithListener listener's owner may have set
// it; the primary asks once, when it starts). Also true where that
// cannot be read: a listener that is not a *net.TCPListener may still
// give TCP connections to the event loops.
func socketLingers(ln net.Listener) bool {
	rc, err := listenerConn(ln)
	if err != nil {
		return true
	}
	var l *unix.Linger
	var gerr error
	if err := rc.Control(func(fd uintptr) { l, gerr = unix.GetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER) }); err != nil || gerr != nil {
		return true
	}
	return l.Onoff != 0 && l.Linger > 0
}
