package defuss

// Abuse of the public port: hostile heads sent beside a well-behaved
// client, and floods of held connections, with and without
// WithMaxConnections. Both measure what the primary holds through /proc
// (usage_linux_test.go), hence Linux only. The chaos helpers are in
// chaosutil_test.go.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestHostileHeadsBesideGoodClient sends every kind of hostile head to the
// public port, over and over, while a well-behaved client keeps sending
// requests: none of its requests fails, the primary keeps running, and
// afterwards it holds what it held before.
func TestHostileHeadsBesideGoodClient(t *testing.T) {
	m, mopt := newMetrics(t)
	s := startTest(t, mopt)
	addr := s.Addr().String()
	rounds, slowlorises := 10, 4
	if testing.Short() {
		rounds = 3
	}

	const warmup = 20
	base := warmBaseline(t, s, chaosReqs[0], warmup)

	good := newChaosLoad(addr, nil)
	good.client(1, -1, 0, chaosReqs)  // a new connection per request
	good.client(50, -1, 1, chaosReqs) // keep-alive
	good.waitSent(t, 20, "the good client running")

	heads := hostileHeads(t)
	var (
		hostile  atomic.Int64 // hostile connections opened
		mu       sync.Mutex
		answers  = map[string]map[string]int{} // kind → first line → count
		problems []string
		wg       sync.WaitGroup
	)
	record := func(kind, line string, err error) {
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", kind, err))
		}
		if answers[kind] == nil {
			answers[kind] = map[string]int{}
		}
		answers[kind][line]++
	}
	dial := func() *net.TCPConn {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Errorf("dial: %v", err)
			return nil
		}
		hostile.Add(1)
		return c.(*net.TCPConn)
	}

	// Slowloris: the request line one byte every 200ms for two seconds,
	// then the rest of the head at once. The worker must still answer it.
	for range slowlorises {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dial()
			if c == nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			head := "GET /pid HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
			for i := range 10 {
				if _, err := c.Write([]byte{head[i]}); err != nil {
					record("slowloris", "", err)
					return
				}
				time.Sleep(200 * time.Millisecond) // the abuse itself: one byte per 200ms
			}
			line, err := sendAndDrain(c, []byte(head[10:]))
			if err == nil && !strings.HasPrefix(line, "HTTP/1.1 200") {
				err = fmt.Errorf("answered %q, want 200", line)
			}
			record("slowloris", line, err)
		}()
	}
	for range rounds {
		// Silent clients connect and send nothing for the whole round.
		var silent []*net.TCPConn
		for range 2 {
			if c := dial(); c != nil {
				silent = append(silent, c)
			}
		}
		var round sync.WaitGroup
		for _, h := range heads {
			round.Add(1)
			go func() {
				defer round.Done()
				c := dial()
				if c == nil {
					return
				}
				defer c.Close()
				line, err := h.send(t, c)
				if err == nil && h.want200 && !strings.HasPrefix(line, "HTTP/1.1 200") {
					err = fmt.Errorf("answered %q, want 200", line)
				}
				record(h.name, line, err)
			}()
		}
		round.Wait()
		for _, c := range silent {
			c.Close()
			record("connect and send nothing", "", nil)
		}
	}
	wg.Wait()
	good.waitSent(t, 20, "the good client after the abuse")
	failures := good.finish()
	assertServing(t, s)

	for _, p := range problems {
		t.Errorf("hostile connection did not end as it must: %s", p)
	}
	for kind, lines := range answers {
		t.Logf("%-26s %v", kind, lines)
	}
	t.Logf("good client: %d sent, %d failed; %d hostile connections", good.sent.Load(), len(failures), hostile.Load())
	for _, f := range failures {
		t.Errorf("good request failed: %v", f)
	}

	waitIdle(t, s, 15*time.Second)
	// Goroutines and descriptors must come back exactly: at rest the
	// primary owns a fixed set (accept loop, one supervisor, frame reader
	// and process waiter per worker, the listener and two pipes per
	// worker), and the clients own none. The heap may keep a little more:
	// log lines buffered by the testing package and map buckets do not
	// shrink. 512 KiB is far below what a per-connection leak of the 16 KiB
	// sniff buffer over these connections would hold (more than 1 MiB).
	after := waitBaseline(t, base, slack{heap: 512 << 10}, 15*time.Second)
	t.Logf("primary before: %v; after: %v", base, after)

	ms := m.collect()
	want := float64(warmup + good.dials.Load() + hostile.Load())
	if got := total(points(t, ms, "defuss.connections.accepted", "{connection}")); got != want {
		t.Errorf("connections.accepted = %v, want %v (%d warm-up, %d good, %d hostile)", got, want, warmup, good.dials.Load(), hostile.Load())
	}
	for k, p := range points(t, ms, "defuss.connections.active", "{connection}") {
		if p.value != 0 {
			t.Errorf("connections.active{%s} = %v after every connection closed", k, p.value)
		}
	}
	if got := metricTotal(t, ms, "defuss.worker.restarts", "{restart}"); got != 0 {
		t.Errorf("worker.restarts = %v, want 0: hostile bytes must not hurt a worker", got)
	}
}

// hostileHead is one abusive client of the public port.
type hostileHead struct {
	name string
	// send does the abuse on c and returns the first line of whatever came
	// back, or an error if the connection did not end as it must.
	send func(t *testing.T, c *net.TCPConn) (string, error)
	// want200: the bytes are a valid HTTP/1.1 request, so however the
	// primary sniffed them the worker must answer 200.
	want200 bool
}

func hostileHeads(t *testing.T) []hostileHead {
	random := make([]byte, 64<<10)
	rand.Read(random)
	hello := clientHello(t)
	var many bytes.Buffer
	many.WriteString("GET /pid HTTP/1.1\r\nHost: test\r\n")
	for i := 0; many.Len() < 100<<10; i++ {
		fmt.Fprintf(&many, "X-Line-%d: %s\r\n", i, strings.Repeat("v", 40))
	}
	many.WriteString("\r\n")
	payload := func(b []byte) func(*testing.T, *net.TCPConn) (string, error) {
		return func(_ *testing.T, c *net.TCPConn) (string, error) { return sendAndDrain(c, b) }
	}
	return []hostileHead{
		{name: "bare LF head", send: payload([]byte("GET /pid HTTP/1.1\nHost: test\n\n"))},
		{name: "head over the 16 KiB cap", want200: true, send: payload([]byte(
			"GET /pid HTTP/1.1\r\nHost: test\r\nX-Pad: " + strings.Repeat("p", DefaultMaxHeaderBytes+4096) + "\r\n\r\n"))},
		{name: "100 KB of header lines", want200: true, send: payload(many.Bytes())},
		{name: "NUL bytes", send: payload([]byte("GET /\x00pid HTTP/1.1\r\nHost: te\x00st\r\n\r\n"))},
		{name: "TLS ClientHello", send: payload(hello)},
		{name: "HTTP/2 preface", send: payload([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))},
		{name: "random binary", send: payload(random)},
		{name: "reset mid-head", send: func(_ *testing.T, c *net.TCPConn) (string, error) {
			if _, err := c.Write([]byte("GET /pid HTTP/1.1\r\nHost: test\r\nX-Cut: ")); err != nil {
				return "", err
			}
			c.SetLinger(0) // Close sends RST
			return "", nil
		}},
	}
}

// sendAndDrain writes b, half-closes, and reads until the other side
// closes: every byte reached a worker (or the primary closed) and the
// connection ended. The read deadline only bounds a hang.
func sendAndDrain(c *net.TCPConn, b []byte) (string, error) {
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write(b); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if errors.Is(err, syscall.ECONNRESET) {
		err = nil // a worker that refuses garbage may reset: the connection ended
	}
	line, _, _ := strings.Cut(string(got), "\r\n")
	return line, err
}

// TestConnectionFlood holds 10,000 idle connections on the primary at
// once, checks that a fresh client is still served promptly, releases them
// and checks that every count returns to zero. With WithMaxConnections the
// connections over the cap are closed on accept, each counted once.
func TestConnectionFlood(t *testing.T) {
	t.Run("held", func(t *testing.T) {
		// Each held connection costs the primary two descriptors: the
		// client's socket and its own socket to the worker (copyStream
		// waits for data without holding a splice pipe). The clients run in
		// a helper process, so their descriptors do not count here.
		const fdsPerConn = 2
		target := 10000
		if testing.Short() {
			target = 2000
		}
		const reserve = 256 // the test binary's own descriptors, with room
		hard := raiseFDLimit(t, uint64(countFDs()+fdsPerConn*target+reserve))
		n := min(target, (int(hard)-countFDs()-reserve)/fdsPerConn)
		if n < 1000 {
			t.Skipf("RLIMIT_NOFILE hard limit %d cannot be raised (not privileged), and the primary needs %d descriptors per held connection: %d for %d connections",
				hard, fdsPerConn, fdsPerConn*target+reserve, target)
		}
		if n < target {
			t.Logf("holding %d connections, not %d: the RLIMIT_NOFILE hard limit is %d and cannot be raised without privilege, and the primary needs %d descriptors per held connection (%d for %d)",
				n, target, hard, fdsPerConn, fdsPerConn*target+reserve, target)
		}

		m, mopt := newMetrics(t)
		s := startTest(t, mopt)
		addr := s.Addr().String()
		const warmup = 4
		base := warmBaseline(t, s, chaosReqs[0], warmup)

		// The flood client: this test binary running
		// TestChaosFloodClientProcess. It holds its connections until its
		// stdin closes.
		cmd := exec.Command(os.Args[0], "-test.run=^TestChaosFloodClientProcess$", "-test.timeout=5m")
		cmd.Env = append(os.Environ(), envFloodAddr+"="+addr, "GORACE=atexit_sleep_ms=0")
		cmd.Stderr = os.Stderr
		inR, stdin, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, outW, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdin, cmd.Stdout = inR, outW
		start := time.Now()
		err = cmd.Start()
		inR.Close()
		outW.Close()
		if err != nil {
			t.Fatal(err)
		}
		var waitErr error
		exited := make(chan struct{})
		go func() { waitErr = cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			stdin.Close()
			select {
			case <-exited:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-exited
			}
			stdout.Close()
		})
		out := bufio.NewReader(stdout)
		stdout.SetReadDeadline(time.Now().Add(2 * time.Minute))
		// Open them in batches of 1,000, each forwarded before the next:
		// all n are held at once in the end, at the pace the workers
		// accept them. (At once, a loaded machine running -race lets the
		// workers' accept backlogs overflow and their heartbeats lapse;
		// the primary then refuses connections as it must, but the flood
		// under test is of held connections, not of handshakes.)
		for opened := 0; opened < n; {
			k := min(1000, n-opened)
			fmt.Fprintf(stdin, "open %d\n", k)
			line, err := out.ReadString('\n')
			if err != nil || line != fmt.Sprintf("opened %d\n", opened+k) {
				t.Fatalf("flood client said %q, %v", line, err)
			}
			opened += k
			waitFor(t, time.Minute, fmt.Sprintf("%d connections forwarded", opened), func() bool { return activeTotal(s) == int64(opened) })
		}
		held := measureUsage()
		t.Logf("%d connections held after %v; primary holds %v (baseline %v); descriptors: %s",
			n, time.Since(start).Round(time.Millisecond), held, base, fdKinds())
		// Besides the connections: the helper's stdin, stdout and pidfd.
		if extra := held.fds - base.fds - 3; extra > fdsPerConn*n {
			t.Errorf("the primary holds %d descriptors for %d connections, more than %d each", extra, n, fdsPerConn)
		}

		// The primary stays responsive: fresh connections are served.
		const fresh = 10
		for i := range fresh {
			c, err := dialChaos(addr)
			if err != nil {
				t.Fatalf("fresh connection %d while %d are held: %v", i, n, err)
			}
			start := time.Now()
			_, err = c.do(chaosReqs[0], -1)
			c.Close()
			if d := time.Since(start); err != nil || d > 5*time.Second {
				t.Fatalf("fresh request %d while %d connections are held: %v after %v", i, n, err, d)
			}
		}

		stdin.Close()
		if line, err := out.ReadString('\n'); err != nil || line != "released\n" {
			t.Fatalf("flood client said %q, %v", line, err)
		}
		select {
		case <-exited:
			if waitErr != nil {
				t.Fatalf("flood client: %v", waitErr)
			}
		case <-time.After(time.Minute):
			t.Fatal("flood client did not exit")
		}
		stdout.Close() // the last of the helper's descriptors here
		waitIdle(t, s, time.Minute)
		// Goroutines and descriptors must come back exactly. The heap keeps
		// what the peak needed: the runtime never frees a goroutine's
		// descriptor (about 450 bytes, recycled for later goroutines) and
		// the primary held two goroutines per connection, and the map of
		// live connections keeps its buckets (Go maps do not shrink). That
		// measures about 1 KiB per held connection; 2 KiB is allowed. A
		// per-connection leak of the 16 KiB sniff buffer would be 8 times
		// that.
		after := waitBaseline(t, base, slack{heap: uint64(n) << 11}, time.Minute)
		t.Logf("after release the primary holds %v (baseline %v)", after, base)

		ms := m.collect()
		if got, want := total(points(t, ms, "defuss.connections.accepted", "{connection}")), float64(warmup+n+fresh); got != want {
			t.Errorf("connections.accepted = %v, want %v", got, want)
		}
		if got := metricTotal(t, ms, "defuss.connections.refused", "{connection}"); got != 0 {
			t.Errorf("connections.refused = %v without a cap", got)
		}
		if got := metricTotal(t, ms, "defuss.connections.unavailable", "{connection}"); got != 0 {
			t.Errorf("connections.unavailable = %v", got)
		}
	})

	t.Run("capped", func(t *testing.T) {
		limit, excess := 1000, 500
		if testing.Short() {
			limit, excess = 200, 100
		}
		m, mopt := newMetrics(t)
		s := startTest(t, mopt, WithMaxConnections(limit))
		addr := s.Addr().String()
		held := make([]net.Conn, 0, limit)
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for i := range limit {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatalf("connection %d under the cap: %v", i, err)
			}
			held = append(held, c)
		}
		// Idle connections are forwarded after the inspection timeout:
		// once all are, the cap is reached.
		waitFor(t, 30*time.Second, "the held connections forwarded", func() bool { return activeTotal(s) == int64(limit) })

		// The excess: the kernel completes each handshake, the primary
		// accepts, closes and counts it; the client reads nothing.
		// One more than excess: the last is "a fresh client at the cap".
		refusedSeen := 0
		for i := range excess + 1 {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatalf("connection %d over the cap: %v", i, err)
			}
			c.SetDeadline(time.Now().Add(15 * time.Second))
			c.Write([]byte("GET /pid HTTP/1.1\r\nHost: test\r\n\r\n"))
			got, err := io.ReadAll(c)
			c.Close()
			if len(got) != 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) {
				t.Fatalf("connection %d over the cap: read %q, %v; want it closed unanswered", i, got, err)
			}
			refusedSeen++
		}
		ms := m.collect()
		if got := total(points(t, ms, "defuss.connections.refused", "{connection}")); got != float64(excess+1) {
			t.Errorf("connections.refused = %v, want %d", got, excess+1)
		}
		if got := activeTotal(s); got != int64(limit) {
			t.Errorf("%d connections forwarded, want the %d under the cap untouched", got, limit)
		}

		for _, c := range held {
			c.Close()
		}
		held = nil
		waitIdle(t, s, 30*time.Second)
		c, err := dialChaos(addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.do(chaosReqs[0], -1); err != nil {
			t.Fatalf("request after the held connections closed: %v", err)
		}
		c.Close()
		ms = m.collect()
		refused := total(points(t, ms, "defuss.connections.refused", "{connection}"))
		accepted := total(points(t, ms, "defuss.connections.accepted", "{connection}"))
		t.Logf("cap %d: %d held, %d refused (client saw %d closed), %v accepted", limit, limit, int(refused), refusedSeen, accepted)
		if refused != float64(excess+1) {
			t.Errorf("connections.refused = %v after the cap freed up, want still %d", refused, excess+1)
		}
		if want := float64(limit + excess + 1 + 1); accepted != want {
			t.Errorf("connections.accepted = %v, want %v", accepted, want)
		}
	})
}

// envFloodAddr makes the test binary a flood client: see
// TestChaosFloodClientProcess.
const envFloodAddr = "DEFUSS_CHAOS_FLOOD_ADDR"

// TestChaosFloodClientProcess is not a test: TestConnectionFlood runs the
// test binary with this test selected and envFloodAddr set, so that the
// flood's client descriptors live in another process than the primary.
// For each line "open K" on its stdin it opens K more connections and
// prints "opened N" (N held in all); when its stdin closes it closes them
// all, prints "released" and exits.
func TestChaosFloodClientProcess(t *testing.T) {
	addr := os.Getenv(envFloodAddr)
	if addr == "" {
		t.Skip("helper process for TestConnectionFlood")
	}
	var conns []net.Conn
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var k int
		if _, err := fmt.Sscanf(in.Text(), "open %d", &k); err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		batch := make([]net.Conn, k)
		errc := make(chan error, 1)
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1)) - 1; i < k; i = int(next.Add(1)) - 1 {
					c, err := net.DialTimeout("tcp", addr, 30*time.Second)
					if err != nil {
						select {
						case errc <- fmt.Errorf("connection %d: %w", len(conns)+i, err):
						default:
						}
						return
					}
					batch[i] = c
				}
			}()
		}
		wg.Wait()
		select {
		case err := <-errc:
			fmt.Println("error", err)
			os.Exit(1)
		default:
		}
		conns = append(conns, batch...)
		fmt.Println("opened", len(conns))
	}
	for _, c := range conns {
		c.Close()
	}
	fmt.Println("released")
}
