//go:build unix

package defuss

// The chaos tests' shared helpers: a balancer that records routes, a
// client that owns no goroutines, and load with exact accounting.
//
// The chaos tests (issue 7: reliability and hostile input) are
// abuse_linux_test.go, faults_test.go, slowreader_test.go and
// soak_linux_test.go; what the primary holds is measured in
// usage_linux_test.go. Each test runs real primaries and real worker
// processes on loopback, injects one kind of trouble, and asserts exact
// counts: requests sent and failed, connections accepted and
// refused, and the goroutines, descriptors and heap the primary holds
// before and after.
//
// Covered elsewhere, not repeated here:
//   - SIGKILL of the primary leaves no worker within 1s:
//     TestPrimarySIGKILLLeavesNoWorkers.
//   - 1 GiB up and down through the primary with flat memory:
//     TestLargeBodiesKeepPrimaryMemoryFlat.
//   - a worker that hangs in start-up is killed after the start timeout:
//     TestStartTimeout.
//   - kill -9 under plain round-robin load: TestKillWorkerUnderLoad.
//   - fuzzing of the head parser and the frame decoders: FuzzParseRequest,
//     FuzzDecodeMessage, FuzzDecodeCommand.
//
// DEFUSS_SOAK=10m (any duration) lengthens TestSoak; bench/chaos.sh runs
// the whole suite that way.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// metricTotal is the sum of a metric's points, 0 if it was never
// recorded (the SDK reports a counter only once it has been added to).
func metricTotal(t *testing.T, ms map[string]metricdata.Metrics, name, unit string) float64 {
	t.Helper()
	if _, ok := ms[name]; !ok {
		return 0
	}
	return total(points(t, ms, name, unit))
}

// activeTotal is the primary's count of connections it forwards to workers.
func activeTotal(s *Server) (n int64) {
	for _, w := range s.Workers() {
		n += w.ActiveConnections()
	}
	return n
}

// ---------------------------------------------------------------------------
// Routing the chaos tests can see.

// chaosSlotHeader steers a connection: a connection whose first request
// carries it goes to that slot, when the slot takes connections.
const chaosSlotHeader = "X-Chaos-Slot"

// chaosBalancer is the Balancer of the chaos tests. A connection whose first
// request carries "X-Chaos-Slot: i" goes to slot i when it is a candidate;
// every other connection goes round robin. Either way it records which
// worker process got the connection, by client address, so that a failed
// request can be attributed to the worker it was on. The record is the
// balancer's pick: when the primary then finds that worker's port closed it
// moves on to the next worker without asking again, which happens only
// while a dead worker is still listed.
type chaosBalancer struct {
	rr     Balancer
	mu     sync.Mutex
	routes map[netip.AddrPort]int
	missed atomic.Int64 // steered to a slot that was not a candidate
}

func newChaosBalancer() *chaosBalancer {
	return &chaosBalancer{rr: RoundRobin(), routes: map[netip.AddrPort]int{}}
}

func (b *chaosBalancer) balance(req *Request, cands []WorkerInfo) *WorkerInfo {
	var w *WorkerInfo
	if v := req.Header(chaosSlotHeader); v != "" {
		want, _ := strconv.Atoi(v)
		for i := range cands {
			if cands[i].Index == want {
				w = &cands[i]
			}
		}
		if w == nil {
			b.missed.Add(1)
		}
	}
	if w == nil {
		w = b.rr(req, cands)
	}
	b.mu.Lock()
	b.routes[req.RemoteAddr] = w.PID
	b.mu.Unlock()
	return w
}

// take returns and forgets the worker pid that the connection from addr
// was given to, 0 if it never reached the balancer.
func (b *chaosBalancer) take(addr netip.AddrPort) int {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	pid := b.routes[addr]
	delete(b.routes, addr)
	return pid
}

// ---------------------------------------------------------------------------
// A client that owns no goroutines.

// chaosConn is a client connection speaking HTTP/1.1 by hand.
type chaosConn struct {
	*net.TCPConn
	r     *bufio.Reader
	local netip.AddrPort // the balancer's key for this connection
	start time.Time      // when it was opened
}

func dialChaos(addr string) (*chaosConn, error) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	return &chaosConn{TCPConn: tc, r: bufio.NewReader(tc), local: tc.LocalAddr().(*net.TCPAddr).AddrPort(), start: start}, nil
}

// chaosReq is one kind of request of the load, with what its answer must be.
type chaosReq struct {
	method, path string
	body         []byte
	check        func(body string) error
}

var (
	uploadBody = bytes.Repeat([]byte("u"), 1024)
	chaosReqs  = []chaosReq{
		{method: "GET", path: "/pid", check: func(b string) error {
			if _, err := strconv.Atoi(b); err != nil {
				return fmt.Errorf("body %q is not a pid", b)
			}
			return nil
		}},
		{method: "GET", path: "/sleep?d=5ms", check: wantBody("done")},
		{method: "POST", path: "/upload", body: uploadBody, check: func(b string) error {
			if !strings.HasPrefix(b, "1024 ") {
				return fmt.Errorf("upload answer %q, want 1024 bytes counted", b)
			}
			return nil
		}},
		{method: "GET", path: "/download?n=65536", check: func(b string) error {
			if len(b) != 65536 {
				return fmt.Errorf("downloaded %d bytes, want 65536", len(b))
			}
			return nil
		}},
	}
)

func wantBody(want string) func(string) error {
	return func(b string) error {
		if b != want {
			return fmt.Errorf("body %q, want %q", b, want)
		}
		return nil
	}
}

// do sends one request and reads the whole answer. It fails unless the
// status is 200 and check accepts the body. slot >= 0 steers the
// connection (it matters on the first request only).
func (c *chaosConn) do(r chaosReq, slot int) (string, error) {
	c.SetDeadline(time.Now().Add(15 * time.Second))
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: chaos\r\n", r.method, r.path)
	if slot >= 0 {
		fmt.Fprintf(&b, "%s: %d\r\n", chaosSlotHeader, slot)
	}
	if r.body != nil {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(r.body))
	}
	b.WriteString("\r\n")
	b.Write(r.body)
	if _, err := c.Write(b.Bytes()); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return "", err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return string(body), err
	}
	if resp.StatusCode != http.StatusOK {
		return string(body), fmt.Errorf("status %d: %q", resp.StatusCode, body)
	}
	if r.check != nil {
		err = r.check(string(body))
	}
	return string(body), err
}

// ---------------------------------------------------------------------------
// Load with exact accounting.

// chaosFailure is one failed request of the load.
type chaosFailure struct {
	connStart time.Time // when its connection was opened (and routed)
	start     time.Time
	pid       int // worker process the balancer gave the connection to; 0: none
	what      string
	err       error
}

func (f chaosFailure) String() string {
	return fmt.Sprintf("%s (connection routed to pid %d, opened %s, request at %s): %v",
		f.what, f.pid, f.connStart.Format("15:04:05.000"), f.start.Format("15:04:05.000"), f.err)
}

// chaosLoad runs clients against a primary and counts every request.
type chaosLoad struct {
	addr string
	bal  *chaosBalancer // nil: no attribution

	sent, ok, dials atomic.Int64

	mu       sync.Mutex
	failures []chaosFailure

	stop chan struct{}
	wg   sync.WaitGroup
}

func newChaosLoad(addr string, bal *chaosBalancer) *chaosLoad {
	return &chaosLoad{addr: addr, bal: bal, stop: make(chan struct{})}
}

// client starts one client: perConn requests per connection (1 opens a
// new connection for every request), the connection steered to slot
// (-1: round robin), cycling through reqs from offset.
func (l *chaosLoad) client(perConn, slot, offset int, reqs []chaosReq) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := offset; !l.stopped(); {
			c, err := dialChaos(l.addr)
			if err != nil {
				l.sent.Add(1)
				l.fail(chaosFailure{connStart: time.Now(), start: time.Now(), what: "dial", err: err})
				continue
			}
			l.dials.Add(1)
			for k := 0; k < perConn && !l.stopped(); k++ {
				r := reqs[i%len(reqs)]
				i++
				start := time.Now()
				l.sent.Add(1)
				steer := -1
				if k == 0 {
					steer = slot
				}
				if _, err := c.do(r, steer); err != nil {
					l.fail(chaosFailure{connStart: c.start, start: start, pid: l.bal.take(c.local), what: r.method + " " + r.path, err: err})
					break
				}
				l.ok.Add(1)
			}
			// Forget the route before the port can be reused.
			l.bal.take(c.local)
			c.Close()
		}
	}()
}

func (l *chaosLoad) fail(f chaosFailure) {
	l.mu.Lock()
	l.failures = append(l.failures, f)
	l.mu.Unlock()
}

func (l *chaosLoad) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

// waitSent waits until n more requests than now have been sent.
func (l *chaosLoad) waitSent(t *testing.T, n int64, what string) {
	t.Helper()
	target := l.sent.Load() + n
	waitFor(t, 30*time.Second, what, func() bool { return l.sent.Load() >= target })
}

// finish stops the clients and returns the failures.
func (l *chaosLoad) finish() []chaosFailure {
	close(l.stop)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]chaosFailure(nil), l.failures...)
}

// workerFault is a worker process that the test made fail, and when the
// primary stopped giving it connections (as the test observed it).
type workerFault struct {
	pid  int
	seen time.Time
}

// explain splits failures into those a fault explains and the rest. A
// failure is explained when its connection was given to a faulted process
// before the primary stopped routing to that process: the request was in
// flight on the faulted worker, or was sent on a connection to it.
func explain(fs []chaosFailure, faults []workerFault) (explained, unexplained []chaosFailure) {
next:
	for _, f := range fs {
		for _, w := range faults {
			if f.pid == w.pid && f.connStart.Before(w.seen) {
				explained = append(explained, f)
				continue next
			}
		}
		unexplained = append(unexplained, f)
	}
	return explained, unexplained
}
