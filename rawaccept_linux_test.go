package defuss

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"go.opentelemetry.io/otel/metric/noop"
	"golang.org/x/sys/unix"
)

// rawTest is a primary in hand-off mode on a real listener, whose workers
// are the test's: each is a hand-off socket pair, whose far end the test
// reads as a worker would. Its accept loop runs once start is called.
type rawTest struct {
	p    *primary
	ln   net.Listener
	far  []*net.UnixConn // the workers' ends
	held [][]rawHanded   // received from each worker in a batch, not yet taken
	most int             // the most descriptors a message carried
	done chan error      // the accept loop's result
}

func newRawTest(t *testing.T, workers int, b Balancer, meter Option, opts ...Option) *rawTest {
	t.Helper()
	if meter == nil {
		meter = WithMeterProvider(noop.NewMeterProvider())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addrs := make([]string, workers)
	for i := range addrs {
		addrs[i] = "127.0.0.1:1" // never dialed: hand-off passes descriptors
	}
	p := newTestPrimary(t, b, meter, addrs...)
	for _, o := range append([]Option{WithHandoff(true)}, opts...) {
		o.apply(p.cfg)
	}
	p.conns = newConnTable(p.cfg.maxConns) // as the options say
	p.ln = ln
	rt := &rawTest{p: p, ln: ln}
	v := p.pool.view.Load()
	for i := range v.cands {
		ours, theirs, err := handoffPair()
		if err != nil {
			t.Fatal(err)
		}
		far, err := net.FileConn(theirs)
		theirs.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ours.Close(); far.Close() })
		v.cands[i].proc = &process{handoffSock: ours}
		if v.cands[i].proc.handoffRC, err = ours.SyscallConn(); err != nil { // as spawnExec makes it
			t.Fatal(err)
		}
		// A worker of this version announces it (handoffAnnounced).
		if err := announceHandoff(far.(*net.UnixConn)); err != nil {
			t.Fatal(err)
		}
		v.cands[i].proc.handoffVersion.Store(uint32(handoffAnnounced(ours)))
		rt.far = append(rt.far, far.(*net.UnixConn))
	}
	t.Cleanup(func() {
		ln.Close()
		if rt.done != nil {
			p.beginShutdown()
			if err := <-rt.done; err != nil {
				t.Errorf("accept loop: %v", err)
			}
		}
		p.stopRelay()
	})
	return rt
}

// start runs the accept loop, which must be the raw one.
func (rt *rawTest) start(t *testing.T) {
	rt.done = make(chan error, 1)
	go func() { rt.done <- rt.p.acceptLoop() }()
}

// dial connects n clients, each of which sends head, and closes them at
// the end of the test.
func (rt *rawTest) dial(t *testing.T, n int, head string) []net.Conn {
	t.Helper()
	var cs []net.Conn
	for range n {
		c, err := net.Dial("tcp", rt.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, head); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	return cs
}

// receive reads one handed-off connection from worker i, as the worker's
// receive does: the next of a version 4 message's, or of the next
// message.
func (rt *rawTest) receive(t *testing.T, i int) (handoffMsg, net.Conn) {
	t.Helper()
	if rt.held == nil {
		rt.held = make([][]rawHanded, len(rt.far))
	}
	if len(rt.held[i]) == 0 {
		rt.held[i] = rt.receiveMsg(t, i)
	}
	h := rt.held[i][0]
	rt.held[i] = rt.held[i][1:]
	return h.m, h.c
}

// rawHanded is a connection a test's worker received, with its record.
type rawHanded struct {
	m handoffMsg
	c net.Conn
}

// receiveMsg reads one hand-off message from worker i, and returns its
// connections.
func (rt *rawTest) receiveMsg(t *testing.T, i int) []rawHanded {
	t.Helper()
	uc := rt.far[i]
	uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, handoffBatchMsgMax)
	oob := make([]byte, unix.CmsgSpace(4*handoffBatchMax))
	n, oobn, _, _, err := uc.ReadMsgUnix(b, oob)
	if err != nil {
		t.Fatalf("worker %d: no hand-off: %v", i, err)
	}
	var ms []handoffMsg
	if n > 0 && b[0] == handoffV4 {
		ms, err = decodeHandoffBatch(b[:n], nil)
	} else {
		var m handoffMsg
		m, err = decodeHandoff(b[:n])
		ms = append(ms, m)
	}
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("hand-off without descriptors: %v", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != len(ms) {
		t.Fatalf("hand-off of %d records with %d descriptors: %v", len(ms), len(fds), err)
	}
	rt.most = max(rt.most, len(fds))
	var hs []rawHanded
	for k, fd := range fds {
		f := os.NewFile(uintptr(fd), "handed")
		if ms[k].optsSet {
			// What the message promises, before net.FileConn sets anything.
			if got, err := readSockOpts(f); err != nil || !hasPublicSocketOpts(fd) {
				t.Errorf("a hand-off message says the socket has net's options; it has %v (%v)", got, err)
			}
		}
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		hs = append(hs, rawHanded{ms[k], c})
	}
	return hs
}

// readExactly reads exactly len(want) bytes from c and checks them.
func readExactly(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("the worker read %q (%v); want the client's bytes %q, untouched", got, err, want)
	}
}

func (rt *rawTest) live() int {
	rt.p.conns.mu.Lock()
	defer rt.p.conns.mu.Unlock()
	return len(rt.p.conns.live)
}

const rawHead = "GET /raw HTTP/1.1\r\nHost: example.com\r\n\r\n"

// A worker that announced no hand-off version (one of an older binary,
// started after the binary on disk was replaced) gets version 2
// messages, which say nothing of the socket's options: it sets them.
func TestRawAcceptSendsVersion2ToAWorkerThatDidNotAnnounce(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	rt.p.pool.view.Load().cands[0].proc.handoffVersion.Store(0)
	rt.start(t)
	rt.dial(t, 1, rawHead)
	m, c := rt.receive(t, 0)
	if m != (handoffMsg{version: handoffV2}) {
		t.Errorf("hand-off message %+v; want version 2, nothing proxied", m)
	}
	readExactly(t, c, rawHead)
}

// The raw accept loop hands a connection whose head has already arrived
// to its worker itself, and one whose head is still on its way through
// route's path; either way the worker reads the client's bytes untouched,
// and the connection counts as handed off, not live.
func TestRawAcceptHandsOffCompleteHeadsAtOnce(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	// Connected and sent before the loop runs: the heads wait in the
	// sockets. (Loopback delivers a write at once, as a rule; the test
	// needs two of them there when they are accepted, for a batch.)
	const early = 20
	rt.dial(t, early, rawHead)
	rt.start(t)
	for range early {
		m, c := rt.receive(t, 0)
		// The listener has net's options (newRawTest's p.cfg.listener
		// is nil), and the message names the peer the worker serves.
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		if m.version != handoffV3 || !m.optsSet || m.proxied != 0 ||
			m.peer.Addr().Unmap() != peer.Addr().Unmap() || m.peer.Port() != peer.Port() {
			t.Errorf("hand-off message %+v; want version 3, options set, the peer %v, nothing proxied", m, peer)
		}
		readExactly(t, c, rawHead)
	}
	fast := rt.p.rawServed.Load()
	if fast == 0 {
		t.Fatalf("none of %d connections whose heads had arrived was handed off by the accept loop itself", early)
	}
	t.Logf("%d of %d early connections handed off by the accept loop itself, up to %d in a message", fast, early, rt.most)
	// Accepted in one pass, they go in batches (version 4), each record
	// checked above against its own descriptor's peer.
	if rt.most < 2 || rt.most > handoffBatchMax {
		t.Errorf("up to %d descriptors in a hand-off message; want batches of 2 to %d", rt.most, handoffBatchMax)
	}

	// A head that comes in two parts, after the connection is accepted:
	// route waits for the rest.
	c := rt.dial(t, 1, "")[0]
	waitFor(t, 5*time.Second, "the accepted connection in route's hands", func() bool { return rt.live() == 1 })
	io.WriteString(c, rawHead[:10])
	io.WriteString(c, rawHead[10:])
	_, wc := rt.receive(t, 0)
	readExactly(t, wc, rawHead)
	waitFor(t, 5*time.Second, "route done", func() bool { return rt.live() == 0 })
	if got := rt.p.rawServed.Load(); got != fast {
		t.Errorf("the accept loop handed off %d connections itself; want %d: the last one's head came later", got, fast)
	}
	if got := rt.p.conns.handed.Load(); got != early+1 {
		t.Errorf("%d connections count as handed off; want %d", got, early+1)
	}
}

// A worker whose hand-off queue is full (stopped, or stuck) does not
// stall the accept loop: the connection goes to the next worker at once,
// with no failure counted.
func TestRawAcceptSkipsAWorkerWithAFullQueue(t *testing.T) {
	always0 := func(_ *Request, c []WorkerInfo) *WorkerInfo { return &c[0] }
	m, meter := newMetrics(t)
	rt := newRawTest(t, 2, always0, meter)
	// Fill worker 0's queue with messages that carry no descriptor.
	full := rt.p.pool.view.Load().cands[0].proc.handoffSock
	for i := 0; ; i++ {
		err := sendNow(full, []byte{handoffV2, 0, 0}, nil)
		if errors.Is(err, errWouldWait) {
			break
		}
		if err != nil || i > 1<<20 {
			t.Fatalf("filling the queue: %v after %d messages", err, i)
		}
	}
	clients := rt.dial(t, 5, rawHead)
	rt.start(t)
	for range clients {
		_, c := rt.receive(t, 1)
		readExactly(t, c, rawHead)
	}
	if rt.p.rawServed.Load() == 0 {
		t.Error("no connection was handed off by the accept loop itself: the full queue sent them all to route's path")
	}
	if got := rt.p.pool.view.Load().cands[0].slot.conns.Load(); got != 0 {
		t.Errorf("the full worker counts %d connections; want 0", got)
	}
	ms := m.collect()
	if _, ok := ms["defuss.dial.failures"]; ok {
		t.Errorf("a full queue was counted as a failure: %v", points(t, ms, "defuss.dial.failures", "{dial}"))
	}
	if got := points(t, ms, "defuss.dial.retries", "{dial}"); got["defuss.worker.index=1"].value != 5 || len(got) != 1 {
		t.Errorf("dial.retries = %v, want 5 onto worker 1", got)
	}
}

// A pass of the raw accept loop that hands off connections whose heads
// are there allocates nothing once it has run a pass: not the telemetry,
// the accept (its own accept4, not syscall's, which returns the address
// as a new Sockaddr), the peek, the Request (a pooled one keeps the Path
// and Host strings of its last head, parseRequest), the batch or its
// send. (Before, about 8 a connection in all; 3 at c8cd769.)
//
// The count is the process's, and goroutines of other tests that are
// still ending add to it: the test measures in a process of its own, this
// binary run with it alone (envAllocsAlone).
//
// Not under the race detector, whose sync.Pool drops a quarter of what is
// put back (the Requests): .ci/run runs it without.
func TestRawAcceptPassAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's sync.Pool drops what is put back: run without -race (.ci/run does)")
	}
	if os.Getenv(envAllocsAlone) == "" {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestRawAcceptPassAllocations$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), envAllocsAlone+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("measured alone: %v\n%s", err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "allocations a connection") {
				t.Log(strings.TrimSpace(line))
			}
		}
		return
	}
	rt := newRawTest(t, 2, nil, nil)
	lrc, err := rt.ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	a, err := newRawAccepter(rt.p, lrc)
	if err != nil {
		t.Fatal(err)
	}
	defer a.file.Close()
	var oerr error
	lrc.Control(func(fd uintptr) { oerr = publicSocketOpts(int(fd)) }) // as the loop does
	if oerr != nil {
		t.Fatal(oerr)
	}
	a.optsSet = true
	addr := rt.ln.Addr().(*net.TCPAddr).AddrPort()
	sa := &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
	const n = 16
	pass := func() float64 {
		t.Helper()
		for range n { // clients with raw system calls: they allocate nothing
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Close(fd) })
			if err := unix.Connect(fd, sa); err != nil {
				t.Fatal(err)
			}
			if _, err := unix.Write(fd, []byte(rawHead)); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 5*time.Second, "the clients in the accept queue", func() bool {
			q, err := acceptQueue(rt.ln)
			return err == nil && q == n
		})
		served := rt.p.rawServed.Load()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		a.pass(lrc, []unix.EpollEvent{{Fd: rawListener}})
		runtime.ReadMemStats(&m1)
		if got := rt.p.rawServed.Load() - served; got != n {
			t.Fatalf("the pass handed off %d connections; want %d", got, n)
		}
		for i := range n { // empty the workers' queues
			_, c := rt.receive(t, i%2)
			readExactly(t, c, rawHead)
		}
		return float64(m1.Mallocs-m0.Mallocs) / n
	}
	warm := pass() // makes the batches and their SCM_RIGHTS buffers
	// The least of three passes: if the test's goroutine moved to another
	// P between a Put and a Get, the Request it put back is in the other
	// P's private slot of the pool, and that pass makes a new one, with
	// its strings. Something that allocates a connection does so in
	// every pass. (20 of 20 runs measured 0 in their second pass.)
	if got := min(pass(), pass(), pass()); got != 0 {
		t.Errorf("the least of three passes allocated %.2f objects a connection (%.2f in the first); want none", got, warm)
	} else {
		t.Logf("%.2f allocations a connection (%.2f in the first pass)", got, warm)
	}
}

// envAllocsAlone runs TestRawAcceptPassAllocations's measurement, in the
// process the test starts for it.
const envAllocsAlone = "DEFUSS_TEST_ALLOCS_ALONE"

// A worker that announced version 3 (one of an older binary) gets each
// connection in a version 3 message of its own.
func TestRawAcceptSendsVersion3ToAVersion3Worker(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	rt.p.pool.view.Load().cands[0].proc.handoffVersion.Store(uint32(handoffV3))
	const n = 5
	rt.dial(t, n, rawHead)
	rt.start(t)
	for range n {
		m, c := rt.receive(t, 0)
		if m.version != handoffV3 {
			t.Errorf("hand-off message %+v; want version 3", m)
		}
		readExactly(t, c, rawHead)
	}
	if rt.most != 1 {
		t.Errorf("up to %d descriptors in a message to a version 3 worker; want 1", rt.most)
	}
}

// A batch whose send fails because its worker has gone is taken back: its
// connections go to the next worker, the failure is counted once a
// connection, and the gone worker counts none of them. Each is served
// again from its own head: the Balancer, which always picks the gone
// worker first, checks that every Request it gets carries the header its
// client sent (a parsed Request aliases the loop's buffer, which later
// peeks overwrite).
func TestRawAcceptBatchToAGoneWorkerGoesToTheNext(t *testing.T) {
	var asked, wrong atomic.Int64
	always0 := func(r *Request, c []WorkerInfo) *WorkerInfo {
		asked.Add(1)
		if r.Header("X-Client") != strconv.Itoa(int(r.RemoteAddr.Port())) {
			wrong.Add(1)
		}
		return &c[0]
	}
	m, meter := newMetrics(t)
	rt := newRawTest(t, 2, always0, meter)
	rt.far[0].Close() // worker 0 has exited; the primary has not heard yet
	const n = 5
	heads := map[string]string{} // the client's address, as the worker sees it: its head
	for range n {
		c, err := net.Dial("tcp", rt.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		port := c.LocalAddr().(*net.TCPAddr).Port
		head := fmt.Sprintf("GET /raw HTTP/1.1\r\nHost: example.com\r\nX-Client: %d\r\n\r\n", port)
		heads[c.LocalAddr().String()] = head
		io.WriteString(c, head)
	}
	rt.start(t)
	for range n {
		_, c := rt.receive(t, 1)
		readExactly(t, c, heads[c.RemoteAddr().String()])
	}
	if got := wrong.Load(); got != 0 {
		t.Errorf("the Balancer got %d Requests (of %d) with another connection's header", got, asked.Load())
	}
	if got := asked.Load(); got != 2*n {
		t.Errorf("the Balancer was asked %d times; want %d, twice a connection", got, 2*n)
	}
	w0 := rt.p.pool.view.Load().cands[0]
	if got, open := w0.slot.conns.Load(), w0.proc.open.Load(); got != 0 || open != 0 {
		t.Errorf("the gone worker counts %d connections, %d open; want 0", got, open)
	}
	if got := w0.proc.dialed.Load(); got != 0 {
		t.Errorf("the gone worker was handed %d connections; want 0", got)
	}
	if got := rt.p.rawServed.Load(); got != n {
		t.Errorf("the accept loop handed off %d connections itself; want %d", got, n)
	}
	if got, live := rt.p.conns.handed.Load(), rt.live(); got != n || live != 0 {
		t.Errorf("%d connections count as handed off and %d as live; want %d and 0", got, live, n)
	}
	ms := m.collect()
	if got := points(t, ms, "defuss.dial.failures", "{dial}"); got["defuss.worker.index=0"].value != n || len(got) != 1 {
		t.Errorf("dial.failures = %v, want %d on worker 0", got, n)
	}
	if got := points(t, ms, "defuss.dial.retries", "{dial}"); got["defuss.worker.index=1"].value != n || len(got) != 1 {
		t.Errorf("dial.retries = %v, want %d onto worker 1", got, n)
	}
}

// A quiesce (a restart, a recycle, a scale-down tells a worker to drain
// once it returns) that begins during a pass waits for the Balancer call
// under way, not for the rest of the pass: the loop sends what it has
// gathered and joins the new epoch. Before, a pass held the gate to its
// end, and a slow Balancer over a pass of 64 accepts could keep a
// quiesce waiting past its limit, with a batch to the draining worker
// still unsent.
func TestRawAcceptPassLetsAQuiesceThrough(t *testing.T) {
	inFirst, releaseFirst, quiesced := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var calls, late atomic.Int64
	b := func(r *Request, c []WorkerInfo) *WorkerInfo {
		if calls.Add(1) == 1 {
			close(inFirst)
			<-releaseFirst
			return &c[0]
		}
		select {
		case <-quiesced:
		case <-time.After(3 * time.Second):
			late.Add(1) // the quiesce waited for this call, which began after it
		}
		return &c[0]
	}
	rt := newRawTest(t, 1, b, nil)
	const n = 3
	rt.dial(t, n, rawHead)
	waitFor(t, 5*time.Second, "the clients in the accept queue", func() bool { // so that one pass accepts them
		q, err := acceptQueue(rt.ln)
		return err == nil && q == n
	})
	rt.start(t)
	select {
	case <-inFirst:
	case <-time.After(10 * time.Second):
		t.Fatal("the Balancer was not asked")
	}
	g := rt.p.gate
	e := g.epoch.Load()
	go func() {
		g.quiesce(10 * time.Second)
		close(quiesced)
	}()
	t.Cleanup(func() { <-quiesced }) // bounded by the quiesce's limit
	waitUntil(5*time.Second, func() bool { return g.epoch.Load() != e })
	close(releaseFirst)
	select {
	case <-quiesced:
	case <-time.After(10 * time.Second):
		t.Fatal("the quiesce did not return")
	}
	// The first connection's batch was sent before the quiesce returned.
	rc, err := rt.far[0].SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var queued int
	rc.Control(func(fd uintptr) {
		queued, _, _ = unix.Recvfrom(int(fd), make([]byte, 1), unix.MSG_PEEK|unix.MSG_DONTWAIT)
	})
	if queued != 1 {
		t.Errorf("when the quiesce returned the worker had no hand-off waiting; want the first connection's")
	}
	for range n {
		_, c := rt.receive(t, 0)
		readExactly(t, c, rawHead)
	}
	if got := late.Load(); got != 0 {
		t.Errorf("the quiesce waited for %d Balancer calls that began after it; want 0", got)
	}
}

// The connection limit holds in the raw accept loop: a connection past it
// is closed unserved, and the ones within it are handed off.
func TestRawAcceptConnectionLimit(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil, WithMaxConnections(2))
	clients := rt.dial(t, 3, rawHead)
	rt.start(t)
	for range 2 {
		_, c := rt.receive(t, 0)
		readExactly(t, c, rawHead)
	}
	// The third is closed: its client reads EOF (or a reset: it sent
	// bytes nobody read).
	c := clients[2]
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection past the limit: read %d bytes, %v; want it closed", n, err)
	}
	if got := rt.p.conns.handed.Load(); got != 2 {
		t.Errorf("%d connections count as handed off; want 2", got)
	}
	if got := rt.p.rawServed.Load(); got != 2 {
		t.Errorf("the accept loop handed off %d connections itself; want 2", got)
	}
}

// The loop waits on a duplicate of the listening socket's descriptor.
// Once the drain begins it closes that too, so the socket stops
// listening: a new client is refused, not left in a queue nobody
// accepts.
func TestRawAcceptDrainClosesTheListeningSocket(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	rt.start(t)
	c := rt.dial(t, 1, rawHead)[0]
	_, wc := rt.receive(t, 0)
	readExactly(t, wc, rawHead)
	c.Close()
	if rt.p.rawServed.Load() != 1 {
		t.Fatal("the connection did not go through the raw accept loop")
	}

	rt.p.beginShutdown()
	if err := <-rt.done; err != nil {
		t.Fatalf("accept loop: %v", err)
	}
	rt.done = nil
	// The loop has returned: its duplicate is closed.
	if c, err := net.Dial("tcp", rt.ln.Addr().String()); err == nil {
		c.Close()
		t.Fatal("a client could connect after the drain began: the listening socket is still open")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial after the drain began: %v; want connection refused", err)
	}
}

// A connection whose head has not arrived when it is accepted waits in
// the loop's epoll set (for rawGrace): the head's arrival wakes the loop,
// which hands the connection off itself. The ones still waiting when the
// drain begins go to route, which serves them.
func TestRawAcceptWaitsForALateHead(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	rt.p.rawGrace = time.Hour // only the head's arrival can wake the loop for it
	late := rt.dial(t, 1, rawHead[:10])[0]
	rt.start(t)
	// Accepted (counted as handed off ahead of it), and kept: not live.
	waitFor(t, 5*time.Second, "the connection accepted", func() bool { return rt.p.conns.handed.Load() == 1 })
	if rt.live() != 0 {
		t.Fatal("a connection with part of a head went to route at once")
	}
	io.WriteString(late, rawHead[10:20])
	io.WriteString(late, rawHead[20:])
	_, c := rt.receive(t, 0)
	readExactly(t, c, rawHead)
	if got := rt.p.rawServed.Load(); got != 1 {
		t.Errorf("the accept loop handed off %d connections itself; want 1, the late head's", got)
	}

	// Silent until the drain begins.
	silent := rt.dial(t, 1, "")[0]
	waitFor(t, 5*time.Second, "the silent connection accepted", func() bool { return rt.p.conns.handed.Load() == 2 })
	// The drain begins as beginShutdown begins it, but for the pool,
	// which would drop the test's workers.
	rt.ln.Close()
	close(rt.p.life.drain)
	if err := <-rt.done; err != nil {
		t.Fatalf("accept loop: %v", err)
	}
	rt.done = nil
	if rt.live() != 1 {
		t.Fatalf("%d connections in route's hands once the loop ended; want the one that was waiting", rt.live())
	}
	io.WriteString(silent, rawHead)
	_, c = rt.receive(t, 0)
	readExactly(t, c, rawHead)
	waitFor(t, 5*time.Second, "route done", func() bool { return rt.live() == 0 })
}

// The raw accept loop sets TCP_DEFER_ACCEPT on a listening socket the
// primary opened: the kernel queues a connection for accept once its
// first bytes arrive, so that the loop finds heads there and serves them
// in the pass that accepts them. A silent connection is accepted about a
// second later (rawDeferSecs) and served as before.
func TestRawAcceptDefersSilentConnections(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	deferSecs := func() int { return listenerDeferAccept(t, rt.ln) }
	if v := deferSecs(); v != 0 {
		t.Fatalf("TCP_DEFER_ACCEPT is %d before the loop runs", v)
	}
	rt.start(t)
	waitFor(t, 5*time.Second, "TCP_DEFER_ACCEPT on the listener", func() bool { return deferSecs() > 0 })

	dialed := time.Now()
	silent := rt.dial(t, 1, "")[0]
	rt.dial(t, 1, rawHead)
	_, c := rt.receive(t, 0)
	readExactly(t, c, rawHead)
	// The silent one connected first and is not accepted yet: it would be
	// about a second after it connected, so a test that got here later
	// than that (a stalled machine) cannot tell.
	if got, late := rt.p.conns.handed.Load(), time.Since(dialed); late > 800*time.Millisecond {
		t.Logf("the talking connection was served %v after the silent one connected: too late to check that the silent one waits", late)
	} else if got != 1 {
		t.Fatalf("%d connections accepted; want 1: the silent one waits in the kernel", got)
	}
	if got := rt.p.rawServed.Load(); got != 1 {
		t.Fatalf("the accept loop served %d connections itself; want 1", got)
	}
	waitFor(t, 5*time.Second, "the silent connection accepted", func() bool { return rt.p.conns.handed.Load() == 2 })
	io.WriteString(silent, rawHead)
	_, c = rt.receive(t, 0)
	readExactly(t, c, rawHead)
}

// A listening socket that has TCP_DEFER_ACCEPT already (systemd's
// DeferAcceptSec= on a socket-activated one) keeps its value.
func TestRawAcceptKeepsADeferAcceptAlreadySet(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	get := func() int { return listenerDeferAccept(t, rt.ln) }
	lrc, err := rt.ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	lrc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 5) })
	want := get() // Linux rounds it to whole SYN-ACK retransmissions
	rt.start(t)
	rt.dial(t, 1, rawHead)
	_, c := rt.receive(t, 0)
	readExactly(t, c, rawHead)
	if got := get(); got != want || want <= rawDeferSecs {
		t.Fatalf("TCP_DEFER_ACCEPT = %d once the loop runs; want the %d set before it", got, want)
	}
}

// A WithListener listener is its owner's: the loop leaves its options
// alone.
func TestRawAcceptLeavesWithListenerOptions(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil)
	rt.p.cfg.listener = rt.ln
	rt.start(t)
	rt.dial(t, 1, rawHead)
	_, c := rt.receive(t, 0)
	readExactly(t, c, rawHead)
	if v := listenerDeferAccept(t, rt.ln); v != 0 {
		t.Fatalf("TCP_DEFER_ACCEPT = %d on a WithListener listener; want 0, as its owner left it", v)
	}
}

// listenerDeferAccept is ln's TCP_DEFER_ACCEPT, in seconds as Linux
// reports it.
func listenerDeferAccept(t *testing.T, ln net.Listener) int {
	t.Helper()
	return getsockopt(t, ln, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT)
}

// The raw accept loop does not wait to hand a descriptor to a worker
// whose exit is being settled (settleHanded waits for the sends in
// flight, each of which may take up to handoffTimeout): it moves on.
func TestHandToNowaitDoesNotWaitForASettlingExit(t *testing.T) {
	ours, theirs, err := handoffPair()
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	defer theirs.Close()
	pr := &process{handoffSock: ours}
	pr.handMu.Lock() // an exit being settled
	defer pr.handMu.Unlock()
	sent := false
	err = handTo(pr, func(*process, byte) error { sent = true; return nil }, true)
	if !errors.Is(err, errWouldWait) || sent {
		t.Fatalf("handTo without waiting, while an exit is settled: %v (sent %v); want errWouldWait, nothing sent", err, sent)
	}
	if pr.open.Load() != 0 {
		t.Errorf("%d connections count as open in the process; want 0", pr.open.Load())
	}
}

// spliceWorkers gives rt's workers real addresses, for splice mode:
// listeners that the test accepts on.
func (rt *rawTest) spliceWorkers(t *testing.T) []net.Listener {
	var lns []net.Listener
	v := rt.p.pool.view.Load()
	for i := range v.cands {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		v.cands[i].Addr = ln.Addr().String()
		lns = append(lns, ln)
	}
	return lns
}

// In splice mode the raw accept loop routes a connection whose head has
// arrived itself: it dials the worker, sends it the PROXY header (the
// client's address, the address it reached) and the head, and gives the
// pair to an event loop, which carries the answer back. Nothing stays
// counted once the connections end.
func TestRawAcceptSplicesCompleteHeadsAtOnce(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil, WithHandoff(false))
	worker := rt.spliceWorkers(t)[0]
	const early = 20
	clients := rt.dial(t, early, rawHead)
	want := map[string]bool{} // each client's PROXY header and head
	for _, c := range clients {
		h := appendProxyV2(nil, c.LocalAddr().(*net.TCPAddr).AddrPort(), rt.ln.Addr().(*net.TCPAddr).AddrPort(), &rt.p.secret)
		want[string(h)+rawHead] = true
	}
	rt.start(t)
	for range early {
		wc, err := worker.Accept()
		if err != nil {
			t.Fatal(err)
		}
		wc.SetDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		b := make([]byte, 4096)
		for !bytes.HasSuffix(got, []byte(rawHead)) {
			n, err := wc.Read(b)
			if err != nil {
				t.Fatalf("the worker read %q, then %v; want a PROXY header and the head", got, err)
			}
			got = append(got, b[:n]...)
		}
		if !want[string(got)] {
			t.Fatalf("the worker read %q: not one client's PROXY header (its address, the listener's) and head", got)
		}
		delete(want, string(got))
		io.WriteString(wc, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
		wc.Close()
	}
	for _, c := range clients {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil || !bytes.HasSuffix(b, []byte("\r\n\r\nok")) {
			t.Fatalf("the client read %q, %v; want the worker's answer", b, err)
		}
		c.Close()
	}
	if got := rt.p.rawServed.Load(); got != early {
		t.Errorf("the accept loop spliced %d of %d connections whose heads had arrived itself; want all", got, early)
	}
	waitFor(t, 5*time.Second, "every connection ended", func() bool { return rt.live() == 0 })
	if got := rt.p.conns.handed.Load(); got != 0 {
		t.Errorf("%d connections count as reserved; want 0", got)
	}
	if got := rt.p.pool.view.Load().cands[0].slot.conns.Load(); got != 0 {
		t.Errorf("the worker counts %d connections; want 0", got)
	}
}

// A late head in splice mode wakes the loop when it arrives, in pieces,
// and is spliced by the loop; a head longer than the loop splices itself
// (rawSpliceMax) goes to route, which splices it too.
func TestRawAcceptSplicesLateAndLongHeads(t *testing.T) {
	rt := newRawTest(t, 1, nil, nil, WithHandoff(false))
	rt.p.rawGrace = time.Hour // only the head's arrival can wake the loop for it
	worker := rt.spliceWorkers(t)[0]
	late := rt.dial(t, 1, rawHead[:10])[0]
	rt.start(t)
	waitFor(t, 5*time.Second, "the connection accepted", func() bool { return rt.p.conns.handed.Load() == 1 })
	io.WriteString(late, rawHead[10:20])
	io.WriteString(late, rawHead[20:])
	long := "GET /long HTTP/1.1\r\nHost: example.com\r\nX-Pad: " + strings.Repeat("a", rawSpliceMax) + "\r\n\r\n"
	rt.dial(t, 1, long)
	for _, head := range []string{rawHead, long} {
		wc, err := worker.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer wc.Close()
		wc.SetDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		b := make([]byte, 64<<10)
		for !bytes.HasSuffix(got, []byte(head)) {
			n, err := wc.Read(b)
			if err != nil {
				t.Fatalf("the worker read %d bytes, then %v; want a PROXY header and a head of %d", len(got), err, len(head))
			}
			got = append(got, b[:n]...)
		}
		if h := proxyHeaderLen(got); h <= 0 || h != len(got)-len(head) {
			t.Fatalf("the worker read %d bytes: want one PROXY header (%d by its own length) and a head of %d", len(got), h, len(head))
		}
	}
	if got := rt.p.rawServed.Load(); got != 1 {
		t.Errorf("the accept loop spliced %d connections itself; want 1, the late head's (the long one is route's)", got)
	}
}

// No worker takes the connection (the only one refuses): the loop
// answers 503 as route does, having asked the worker once, and nothing
// stays counted.
func TestRawAcceptSpliceWithNoWorkerAnswers503(t *testing.T) {
	m, meter := newMetrics(t)
	rt := newRawTest(t, 1, nil, meter, WithHandoff(false))
	dead := rt.spliceWorkers(t)[0]
	dead.Close() // refuses
	c := rt.dial(t, 1, rawHead)[0]
	rt.start(t)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	if !bytes.HasPrefix(b, []byte("HTTP/1.1 503 ")) {
		t.Fatalf("the client read %q; want a 503", b)
	}
	c.Close()
	waitFor(t, 5*time.Second, "the connection ended", func() bool { return rt.live() == 0 })
	if got := rt.p.conns.handed.Load(); got != 0 {
		t.Errorf("%d connections count as reserved; want 0", got)
	}
	if got := points(t, m.collect(), "defuss.dial.failures", "{dial}"); got["defuss.worker.index=0"].value != 1 {
		t.Errorf("dial.failures = %v; want 1: the loop dials once, and answers", got)
	}
}

// rawAddrPort reads accept4's address as sockaddrAddrPort reads the
// syscall.Sockaddr that syscall.Accept4 made of it: IPv4, IPv6, an IPv4
// client of a dual-stack socket, a link-local one with its zone.
func TestRawAddrPort(t *testing.T) {
	v6 := [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 7}
	linkLocal := [16]byte{0xfe, 0x80, 15: 1}
	mapped := netip.MustParseAddr("::ffff:192.0.2.9").As16()
	for _, sa := range []syscall.Sockaddr{
		&syscall.SockaddrInet4{Port: 40000, Addr: [4]byte{192, 0, 2, 1}},
		&syscall.SockaddrInet4{Port: 1, Addr: [4]byte{127, 0, 0, 1}},
		&syscall.SockaddrInet6{Port: 65535, Addr: v6},
		&syscall.SockaddrInet6{Port: 443, Addr: mapped},
		&syscall.SockaddrInet6{Port: 8080, Addr: linkLocal, ZoneId: 1},
	} {
		var rsa unix.RawSockaddrAny
		switch a := sa.(type) {
		case *syscall.SockaddrInet4:
			in := (*unix.RawSockaddrInet4)(unsafe.Pointer(&rsa))
			in.Family, in.Addr = unix.AF_INET, a.Addr
			binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&in.Port))[:], uint16(a.Port))
		case *syscall.SockaddrInet6:
			in := (*unix.RawSockaddrInet6)(unsafe.Pointer(&rsa))
			in.Family, in.Addr, in.Scope_id = unix.AF_INET6, a.Addr, a.ZoneId
			binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&in.Port))[:], uint16(a.Port))
		}
		want := sockaddrAddrPort(sa)
		if got := rawAddrPort(&rsa); got != want || !got.IsValid() {
			t.Errorf("rawAddrPort = %v; want %v", got, want)
		}
	}
	var unixAddr unix.RawSockaddrAny
	unixAddr.Addr.Family = unix.AF_UNIX
	if got := rawAddrPort(&unixAddr); got.IsValid() {
		t.Errorf("rawAddrPort of a Unix address = %v; want the zero AddrPort", got)
	}
}
