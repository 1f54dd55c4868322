package defuss

// What the in-process primary holds: goroutines, descriptors (read from
// /proc/self/fd, hence Linux only) and live heap, and the descriptor limit
// the flood test raises.

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"
)

// usage is what this test process holds. The primary of an in-process test
// runs here, so a goroutine, descriptor or memory leak in it shows up in
// these numbers. The clients of the tests use raw connections, which own
// no goroutines, so at rest the numbers are the primary's plus a constant.
type usage struct {
	goroutines int
	fds        int
	heap       uint64 // live heap bytes after two GCs
}

func (u usage) String() string {
	return fmt.Sprintf("%d goroutines, %d fds, %d KiB heap", u.goroutines, u.fds, u.heap>>10)
}

func measureUsage() usage {
	// The first GC moves sync.Pool contents (the sniff buffers) to the
	// victim cache, the second frees them: what is left is live.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{goroutines: runtime.NumGoroutine(), fds: countFDs(), heap: ms.HeapAlloc}
}

// countFDs counts this process's open descriptors. The directory handle
// that lists them is counted too, the same way every time.
func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// slack is how far above the baseline each number may settle.
type slack struct {
	goroutines, fds int
	heap            uint64
}

// waitBaseline polls, up to timeout, until this process is back within
// tol of base, and returns what it measured last. If it never gets there
// the test fails with the goroutines and descriptors that are left.
func waitBaseline(t *testing.T, base usage, tol slack, timeout time.Duration) usage {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		u := measureUsage()
		if u.goroutines <= base.goroutines+tol.goroutines && u.fds <= base.fds+tol.fds && u.heap <= base.heap+tol.heap {
			return u
		}
		if time.Now().After(deadline) {
			t.Errorf("after %v the primary holds %v; baseline %v, allowed slack %d goroutines, %d fds, %d KiB heap",
				timeout, u, base, tol.goroutines, tol.fds, tol.heap>>10)
			var b bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&b, 1)
			t.Logf("goroutines:\n%s", b.String())
			t.Logf("descriptors:\n%s", listFDs())
			return u
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fdKinds() string {
	ents, _ := os.ReadDir("/proc/self/fd")
	kinds := map[string]int{}
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		k, _, _ := strings.Cut(target, ":")
		kinds[k]++
	}
	return fmt.Sprint(kinds)
}

func listFDs() string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var b strings.Builder
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		fmt.Fprintf(&b, "%s -> %s\n", e.Name(), target)
	}
	return b.String()
}

// raiseFDLimit raises this process's descriptor limit to want if it can,
// and returns the hard limit it ends with.
func raiseFDLimit(t *testing.T, want uint64) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < want {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}); err == nil {
			return want
		}
	}
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Max
}

// warmBaseline sends n requests, each on a new connection, so that the
// baseline includes the steady state of the runtime, the pools and the
// metric SDK; then it waits until the primary is idle and measures.
func warmBaseline(t *testing.T, s *Server, req chaosReq, n int) usage {
	t.Helper()
	addr := s.Addr().String()
	for range n {
		c, err := dialChaos(addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.do(req, -1); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	waitIdle(t, s, 10*time.Second)
	return measureUsage()
}

// waitIdle waits until the primary forwards no connection.
func waitIdle(t *testing.T, s *Server, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, "no forwarded connection left", func() bool { return activeTotal(s) == 0 })
}

// assertServing fails the test if the primary has stopped on its own.
func assertServing(t *testing.T, s *Server) {
	t.Helper()
	select {
	case <-s.p.life.done:
		t.Fatalf("the primary stopped: %v", s.p.life.err)
	default:
	}
}
