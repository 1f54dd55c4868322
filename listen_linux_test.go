//go:build linux

package defuss

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
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
	rc, err := listenerConn(ln)
	if err != nil {
		t.Fatal(err)
	}
	var proto int
	var gerr error
	if err := rc.Control(func(fd uintptr) { proto, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) }); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	return proto
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
