//go:build linux

package defuss

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The public socket is plain TCP, not net's default Multipath TCP, which
// takes no socket filter.
func TestPublicSocketIsPlainTCP(t *testing.T) {
	if proto := sockProtocol(t, publicListener(t, listenConfig())); proto != unix.IPPROTO_TCP {
		t.Fatalf("SO_PROTOCOL %d; want IPPROTO_TCP (%d)", proto, unix.IPPROTO_TCP)
	}
}

// publicListener listens on loopback with lc until the test ends.
func publicListener(t *testing.T, lc net.ListenConfig) net.Listener {
	t.Helper()
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// sockProtocol is the protocol of ln's socket (SO_PROTOCOL).
func sockProtocol(t *testing.T, ln net.Listener) int {
	t.Helper()
	return getsockopt(t, ln, unix.SOL_SOCKET, unix.SO_PROTOCOL)
}

// rawConnOf is c's descriptor, for a c that has one (syscall.Conn).
func rawConnOf(t *testing.T, c any) syscall.RawConn {
	t.Helper()
	sc, ok := c.(syscall.Conn)
	if !ok {
		t.Fatalf("%T has no descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// stopHandshakes: a connection the kernel completed before it waits in the
// accept queue and is served whole; one that begins after it gets no
// handshake (its dial times out, where a closed socket would refuse it
// and a reset would come after the handshake); allowHandshakes lets new
// ones in again. acceptQueue counts what waits.
func TestStopHandshakes(t *testing.T) {
	ln := publicListener(t, listenConfig())
	queued, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer queued.Close()
	if _, err := io.WriteString(queued, "before"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "the connection in the accept queue", func() bool {
		n, err := acceptQueue(ln)
		return err == nil && n == 1
	})
	if err := stopHandshakes(ln); err != nil {
		t.Fatal(err)
	}
	_, err = net.DialTimeout("tcp", ln.Addr().String(), 300*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("a dial after stopHandshakes: %v, want a timeout (its SYN dropped)", err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	got := make([]byte, len("before"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "before" {
		t.Fatalf("the queued connection read %q, %v", got, err)
	}
	if n, err := acceptQueue(ln); err != nil || n != 0 {
		t.Fatalf("acceptQueue after the accept: %d, %v; want 0", n, err)
	}
	if err := allowHandshakes(ln); err != nil {
		t.Fatal(err)
	}
	after, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
	if err != nil {
		t.Fatalf("a dial after allowHandshakes: %v", err)
	}
	after.Close()
}

// stopHandshakes, allowHandshakes and acceptQueue refuse a listener that
// is not TCP, and one whose socket takes no filter (Multipath TCP).
func TestStopHandshakesRefusesOtherListeners(t *testing.T) {
	ul, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer ul.Close()
	if err := stopHandshakes(ul); err == nil {
		t.Error("stopHandshakes took a unix listener")
	}
	if _, err := acceptQueue(ul); err == nil {
		t.Error("acceptQueue took a unix listener")
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(true)
	ml := publicListener(t, lc)
	if proto := sockProtocol(t, ml); proto != unix.IPPROTO_MPTCP {
		t.Logf("no MPTCP here (SO_PROTOCOL %d): that part not checked", proto)
		return
	}
	if err := stopHandshakes(ml); err == nil {
		t.Error("stopHandshakes said it held off connections on an MPTCP socket")
	}
}

// emptyAcceptQueue waits while connections wait in the accept queue that
// nobody takes, for at most queueMax, with the filter on; a second stop
// signal meanwhile forces the stop at once. Either way the filter is off
// again when it returns.
func TestEmptyAcceptQueueWaitsAndASecondSignalForces(t *testing.T) {
	for _, second := range []bool{false, true} {
		t.Run(map[bool]string{false: "no signal: queueMax", true: "a second signal"}[second], func(t *testing.T) {
			p := newTestPrimary(t, nil, nil, "127.0.0.1:1")
			ln := publicListener(t, listenConfig())
			p.ln = ln
			// A second descriptor of the socket, as another process that
			// holds it would have: it keeps listening after p.ln closes.
			other, err := ln.(*net.TCPListener).File()
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "GET / HTTP/1.1\r\n\r\n") // in the queue, which nobody empties
			sigs := make(chan os.Signal, 1)
			if second {
				sigs <- syscall.SIGTERM
			}
			var ops sync.WaitGroup
			signalled := true // the first stop signal began the stop
			start := time.Now()
			p.emptyAcceptQueue(sigs, &ops, &signalled)
			took := time.Since(start)
			switch {
			case second && (took > queueMax/2 || !p.stopping()):
				t.Errorf("with a second signal it took %v (stopping %v); want at once, forced", took, p.stopping())
			case !second && (took < queueMax || p.stopping()):
				t.Errorf("with the queue never emptied it took %v (stopping %v); want queueMax (%v), not forced", took, p.stopping(), queueMax)
			}
			if second && !p.stopping() {
				t.Fatal("not forced")
			}
			// The filter is off, forced or not (the socket is still open
			// through other): a new connection completes at once.
			d, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
			if err != nil {
				t.Fatalf("a dial after emptyAcceptQueue: %v", err)
			}
			d.Close()
		})
	}
}

// setUnsentLimit sets TCP_NOTSENT_LOWAT on a listening socket with none,
// and the sockets it accepts inherit it; it keeps a socket's own value
// and a system-wide one as low.
func TestSetUnsentLimit(t *testing.T) {
	for _, c := range []struct {
		name        string
		own, system int
		want        int
	}{
		{"default", 0, math.MaxInt, unsentLimit},
		{"system higher", 0, unsentLimit + 1, unsentLimit},
		{"system as low", 0, unsentLimit, 0},
		{"system lower", 0, 16 << 10, 0},
		{"own value kept", 1 << 20, math.MaxInt, 1 << 20},
		{"own lower value kept", 4 << 10, math.MaxInt, 4 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			ln := publicListener(t, plainTCP())
			if c.own != 0 {
				setsockopt(t, ln, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, c.own)
			}
			rc, err := listenerConn(ln)
			if err != nil {
				t.Fatal(err)
			}
			var serr error
			var set bool
			if err := rc.Control(func(fd uintptr) { set, serr = setUnsentLimit(int(fd), c.system) }); err != nil || serr != nil {
				t.Fatal(err, serr)
			}
			if want := c.own == 0 && c.want == unsentLimit; set != want {
				t.Errorf("setUnsentLimit reports set %v; want %v", set, want)
			}
			if got := getsockopt(t, ln, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT); got != c.want {
				t.Fatalf("listener's TCP_NOTSENT_LOWAT %d; want %d", got, c.want)
			}
			cc, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			if got := getsockopt(t, sc, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT); got != c.want {
				t.Fatalf("accepted socket's TCP_NOTSENT_LOWAT %d; want %d, inherited", got, c.want)
			}
		})
	}
	if v := systemUnsentLimit(); v <= 0 {
		t.Fatalf("systemUnsentLimit %d", v)
	}
}

// The primary limits unsent data on a socket it opened, and leaves
// WithListener's as its owner made it.
func TestStartLimitsUnsent(t *testing.T) {
	if systemUnsentLimit() <= unsentLimit {
		t.Skipf("net.ipv4.tcp_notsent_lowat is %d: the system's limit is kept", systemUnsentLimit())
	}
	t.Run("own socket", func(t *testing.T) {
		s := startTest(t)
		if got := getsockopt(t, s.p.ln, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT); got != unsentLimit {
			t.Errorf("public socket's TCP_NOTSENT_LOWAT %d; want %d", got, unsentLimit)
		}
	})
	t.Run("WithListener", func(t *testing.T) {
		lc := plainTCP()
		own, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := startTest(t, WithListener(own))
		if got := getsockopt(t, s.p.ln, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT); got != 0 {
			t.Errorf("WithListener's socket's TCP_NOTSENT_LOWAT %d; want 0, untouched", got)
		}
	})
}

// plainTCP listens with plain TCP, not the Multipath TCP that net's
// default may open, whose sockets do not report TCP_NOTSENT_LOWAT.
func plainTCP() net.ListenConfig {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc
}

// A client that reads nothing of a large answer makes the server hold at
// most about unsentLimit of it in the kernel, in either mode: the socket
// that faces the client (the primary's in splice mode, the worker's in
// hand-off mode) has at most that much queued, where without the limit
// its send buffer grows to take megabytes. Read from /proc/net/tcp, which
// shows every socket of the network namespace, for 500 ms after the answer
// began.
func TestSlowReaderAnswerStaysOutOfTheKernel(t *testing.T) {
	if systemUnsentLimit() <= unsentLimit {
		t.Skipf("net.ipv4.tcp_notsent_lowat is %d: the system's limit applies", systemUnsentLimit())
	}
	s := startTest(t)
	t.Logf("the server's socket held at most %d bytes", unsentQueued(t, s.Addr()))
}

// unsentQueued asks the server at addr for 32 MiB and reads none of it,
// and returns the most that the server's socket for this connection (its
// local address is addr, its remote one the client's) had queued over
// 500 ms, read from /proc/net/tcp; it fails the test at once if that is
// more than unsentLimit allows.
func unsentQueued(t *testing.T, addr net.Addr) int {
	t.Helper()
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /download?n=33554432 HTTP/1.1\r\nHost: test\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	return watchUnsent(t, addr, c)
}

// watchUnsent is unsentQueued's watch of the server's socket for c, a
// connection to addr that has asked for a large answer and reads none.
func watchUnsent(t *testing.T, addr net.Addr, c net.Conn) int {
	t.Helper()
	local, remote := procNetAddr(addr), procNetAddr(c.LocalAddr())
	const bound = 512 << 10 // unsentLimit, a segment of up to 64 KiB past it, room for what is in flight
	var most int
	start := time.Now()
	for time.Since(start) < 500*time.Millisecond || most == 0 {
		if time.Since(start) > 10*time.Second {
			t.Fatal("the server's socket for the client never had data queued")
		}
		q, ok := procNetTxQueue(t, local, remote)
		if ok && q > most {
			most = q
		}
		if most > bound {
			t.Fatalf("the server's socket holds %d bytes for a client that reads nothing; want at most %d", most, bound)
		}
		time.Sleep(5 * time.Millisecond) // a sampling interval, not a wait for something
	}
	return most
}

// procNetAddr is a as /proc/net/tcp writes it: the IPv4 address as a
// hex word in the host's byte order, then the port in hex.
func procNetAddr(a net.Addr) string {
	ta := a.(*net.TCPAddr)
	return fmt.Sprintf("%08X:%04X", binary.NativeEndian.Uint32(ta.IP.To4()), ta.Port)
}

// procNetTxQueue is the send queue (bytes written, not yet acknowledged)
// of the TCP socket from local to remote in /proc/net/tcp.
func procNetTxQueue(t *testing.T, local, remote string) (int, bool) {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || f[1] != local || f[2] != remote {
			continue
		}
		tx, _, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseUint(tx, 16, 64)
		if err != nil {
			t.Fatalf("/proc/net/tcp: %q: %v", line, err)
		}
		return int(n), true
	}
	return 0, false
}

// getsockopt and setsockopt are unix's on the socket of c (a listener
// or a connection), failing the test on an error.
func getsockopt(t *testing.T, c any, level, opt int) int {
	t.Helper()
	rc := rawConnOf(t, c)
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	return v
}

func setsockopt(t *testing.T, c any, level, opt, v int) {
	t.Helper()
	rc := rawConnOf(t, c)
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, v) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
}
