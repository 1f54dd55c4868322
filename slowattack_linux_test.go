package defuss

// A slow-read attack (issue 14, point 5): many clients that each ask for
// a large response and read it a few bytes at a time through a tiny
// receive window must not slow down anybody else. The chaos helpers are
// in chaosutil_test.go; slowreader_test.go has the single slow reader.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Shape of the attack and of the other clients.
const (
	slowAttackConns    = 200     // slow-reading clients
	slowAttackSize     = 1 << 20 // the response each asks for
	slowAttackRcvBuf   = 1024    // SO_RCVBUF; the kernel makes it its minimum, about 2.3 KiB
	slowAttackRead     = 16      // bytes read from each connection per round
	slowAttackInterval = 100 * time.Millisecond

	othersClients  = 4                    // two on new connections, two keep-alive
	othersInterval = 5 * time.Millisecond // each sends at most this often
	othersPhase    = 3 * time.Second      // per measured phase

	// slowAttackFloor is the least the limit on the p99 under attack can
	// be: the criterion is 2×max(baseline p99, slowAttackFloor).
	slowAttackFloor = 2 * time.Millisecond
)

// TestSlowReadAttackHurtsNobodyElse measures the p99 latency of a light,
// paced load of other clients (GET /pid, each client at most one request
// per 5ms, half of them on a new connection per request) for 3s without
// an attack, then for 3s under one: 200 slow readers, each asking for a
// 1 MiB response with the kernel's smallest receive buffer and reading 16
// bytes every 100ms, so that the response stays stuck in the buffers on
// its way (in splice mode, in the primary's socket to the client) for the
// whole test. The primary runs in its own process, so neither load's
// goroutines share its runtime, and its descriptors per slow reader are
// read from /proc.
//
// The attack is measured once it is in place: after the slow readers are
// answered and the primary and workers have stopped writing their
// responses into the buffers (their CPU use has fallen below 10% of a
// core). The ramp before that is 200 requests for 1 MiB at once, the cost
// of serving them and not of their slowness; under the race detector it
// is mostly the test app writing 200 MiB through instrumented code. The
// benchmark (bench/run.sh, the slow-reader table) measures other clients
// from the first slow connection on, without the race detector.
//
// The criterion is issue 14's: the others' p99 under the attack at most
// 2× their p99 without it. The baseline entering that product is at least
// slowAttackFloor, 2ms: a p99 of less than that on two shared cores is
// set by when a runnable thread next gets a core (a scheduler slice is
// 0.75ms × (1 + log2 cores) = 1.5ms here), not by defuss, and a single
// such wait under attack would otherwise fail a 1ms baseline at 2ms.
// Every p99 this test has measured under -race is above the floor, so it
// does not move the limit of a real run; it keeps an idle machine's
// sub-millisecond baseline from failing the test on one preemption.
//
// Every other request must succeed, every slow reader must have been
// answered with a 200 head and still be open at the end, and afterwards
// the primary's descriptors must come back.
func TestSlowReadAttackHurtsNobodyElse(t *testing.T) {
	p := startPrimaryProcess(t, 2, nil)
	primary := p.cmd.Process.Pid
	mode := "splice"
	if handoffMode {
		mode = "hand-off"
	}

	// Warm up: the workers' and the primary's pools, the runtime's heap.
	measureOthers(t, p.addr, 500*time.Millisecond)
	base := measureOthers(t, p.addr, othersPhase)
	fdsBefore := procFDs(primary)

	rampStart := time.Now()
	attack, err := startSlowReaders(p.addr, slowAttackConns)
	if err != nil {
		t.Fatal(err)
	}
	if err := waitQuiet(append([]int{primary}, p.pids...), 60*time.Second); err != nil {
		attack.stop()
		t.Fatal(err)
	}
	ramp := time.Since(rampStart)
	under := measureOthers(t, p.addr, othersPhase)
	fdsDuring := procFDs(primary)
	got, err := attack.stop()
	if err != nil {
		t.Fatal(err)
	}
	if t.Failed() {
		return
	}

	limit := 2 * max(base.p99, slowAttackFloor)
	t.Logf("%s mode, others without the attack: %v", mode, base)
	t.Logf("%s mode, others under the attack:   %v", mode, under)
	t.Logf("%s mode: %d slow readers in place after %v, then read %d to %d bytes each; the primary held %.1f descriptors per slow reader (%d before, %d during)",
		mode, slowAttackConns, ramp.Round(time.Millisecond), slices.Min(got), slices.Max(got),
		float64(fdsDuring-fdsBefore)/slowAttackConns, fdsBefore, fdsDuring)
	if under.p99 > limit {
		t.Errorf("%s mode: others' p99 under the attack is %v, above 2×max(%v, %v) = %v: a slow reader hurts other clients",
			mode, under.p99, base.p99, slowAttackFloor, limit)
	}
	for _, n := range got {
		if n >= slowAttackSize {
			t.Errorf("a slow reader read its whole response (%d bytes): the attack was not slow", n)
			break
		}
	}

	// The slow connections are closed: the primary lets go of them.
	waitFor(t, 15*time.Second, "the primary's descriptors back at their baseline", func() bool {
		return procFDs(primary) <= fdsBefore
	})
}

// othersResult is the latency of the other clients over one phase.
type othersResult struct {
	n             int
	p50, p99, max time.Duration
}

func (r othersResult) String() string {
	return fmt.Sprintf("%d requests, p50 %v, p99 %v, max %v", r.n,
		r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond), r.max.Round(10*time.Microsecond))
}

// measureOthers runs othersClients paced clients against addr for d and
// returns their latencies; a request that fails fails the test.
func measureOthers(t *testing.T, addr string, d time.Duration) othersResult {
	t.Helper()
	var (
		mu   sync.Mutex
		lats []time.Duration
		wg   sync.WaitGroup
	)
	end := time.Now().Add(d)
	for i := range othersClients {
		newConns := i%2 == 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			var own []time.Duration
			defer func() {
				mu.Lock()
				lats = append(lats, own...)
				mu.Unlock()
			}()
			tick := time.NewTicker(othersInterval)
			defer tick.Stop()
			var c *chaosConn
			defer func() {
				if c != nil {
					c.Close()
				}
			}()
			for time.Now().Before(end) {
				start := time.Now()
				var err error
				if c == nil {
					c, err = dialChaos(addr)
				}
				if err == nil {
					_, err = c.do(chaosReqs[0], -1)
				}
				if err != nil {
					t.Errorf("another client's request: %v", err)
					return
				}
				own = append(own, time.Since(start))
				if newConns {
					c.Close()
					c = nil
				}
				<-tick.C
			}
		}()
	}
	wg.Wait()
	slices.Sort(lats)
	if len(lats) == 0 {
		t.Fatal("no request of the other clients completed")
	}
	pct := func(p float64) time.Duration { return lats[int(p*float64(len(lats)-1))] }
	return othersResult{n: len(lats), p50: pct(0.50), p99: pct(0.99), max: lats[len(lats)-1]}
}

// slowReaders is the attack: connections each reading a large response a
// few bytes at a time. One goroutine reads them all, in rounds, so the
// attack costs this process little CPU.
type slowReaders struct {
	conns []*net.TCPConn
	read  []int // bytes read from each
	quit  chan struct{}
	done  chan struct{}
	err   error // the first reader that failed: EOF, an error, a bad head
}

// startSlowReaders opens n slow-reading connections to addr, each asking
// for slowAttackSize bytes, and returns once every one of them has been
// answered with a 200 head.
func startSlowReaders(addr string, n int) (*slowReaders, error) {
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		// Before connect, so that the window offered in the handshake is
		// the small one.
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, slowAttackRcvBuf)
		})
		return errors.Join(err, serr)
	}}
	a := &slowReaders{read: make([]int, n), quit: make(chan struct{}), done: make(chan struct{})}
	req := fmt.Sprintf("GET /download?n=%d HTTP/1.1\r\nHost: slow\r\n\r\n", slowAttackSize)
	for i := range n {
		c, err := d.Dial("tcp", addr)
		if err == nil {
			a.conns = append(a.conns, c.(*net.TCPConn))
			_, err = c.Write([]byte(req))
		}
		if err != nil {
			a.closeAll()
			return nil, fmt.Errorf("slow reader %d: %w", i, err)
		}
	}
	started := make(chan struct{})
	go a.run(started)
	timeout := time.NewTimer(30 * time.Second)
	defer timeout.Stop()
	select {
	case <-started:
		return a, nil
	case <-a.done:
		a.closeAll()
		return nil, a.err
	case <-timeout.C:
		a.stop()
		return nil, errors.New("slow readers: not every one was answered within 30s")
	}
}

// run reads up to slowAttackRead bytes from every connection every
// slowAttackInterval, without waiting on any, until stop. It closes
// started once every connection has shown the first bytes of a 200 head.
func (a *slowReaders) run(started chan<- struct{}) {
	defer close(a.done)
	const head = "HTTP/1.1 200 "
	tick := time.NewTicker(slowAttackInterval)
	defer tick.Stop()
	buf := make([]byte, slowAttackRead)
	first := make([]byte, len(head)*len(a.conns)) // each connection's first bytes
	answered := 0
	for {
		for i, c := range a.conns {
			n, err := readNow(c, buf)
			if err != nil {
				a.err = fmt.Errorf("slow reader %d after %d bytes: %w", i, a.read[i], err)
				return
			}
			if a.read[i] < len(head) {
				k := copy(first[i*len(head)+a.read[i]:(i+1)*len(head)], buf[:n])
				if a.read[i]+k == len(head) {
					if got := string(first[i*len(head) : (i+1)*len(head)]); got != head {
						a.err = fmt.Errorf("slow reader %d was answered %q", i, got)
						return
					}
					if answered++; answered == len(a.conns) {
						close(started)
					}
				}
			}
			a.read[i] += n
		}
		select {
		case <-a.quit:
			return
		case <-tick.C:
		}
	}
}

// readNow reads what c has queued, up to len(buf), without waiting: 0
// bytes when nothing is there.
func readNow(c *net.TCPConn, buf []byte) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), buf) }); err != nil {
		return 0, err
	}
	switch {
	case rerr == unix.EAGAIN:
		return 0, nil
	case rerr != nil:
		return 0, os.NewSyscallError("read", rerr)
	case n == 0:
		return 0, errors.New("closed by the server")
	}
	return n, nil
}

// stop ends the attack, closes its connections, and returns how many
// bytes each had read, or the first failure of one.
func (a *slowReaders) stop() ([]int, error) {
	close(a.quit)
	<-a.done
	a.closeAll()
	return a.read, a.err
}

func (a *slowReaders) closeAll() {
	for _, c := range a.conns {
		c.Close()
	}
}

// waitQuiet waits until the processes pids together use less than 10% of
// a core over 250ms.
func waitQuiet(pids []int, timeout time.Duration) error {
	const window = 250 * time.Millisecond
	used := func() (total time.Duration) {
		for _, pid := range pids {
			total += procCPU(pid)
		}
		return total
	}
	deadline := time.Now().Add(timeout)
	for last := used(); ; {
		time.Sleep(window)
		now := used()
		if now-last < window/10 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the primary and workers still used %v of CPU in %v after %v", now-last, window, timeout)
		}
		last = now
	}
}

// procCPU is the CPU time (user and system, all threads) that process pid
// has used, from its CPU-time clock (clock_getcpuclockid(3): the clock id
// is ^pid<<3 | CPUCLOCK_SCHED), or 0 if it is gone.
func procCPU(pid int) time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(^pid<<3|2), &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// procFDs counts the open descriptors of process pid, -1 if unknown.
func procFDs(pid int) int {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
