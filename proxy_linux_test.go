package defuss

import (
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Behaviour 5: a 1 GiB streamed upload and a 1 GiB download pass through
// the primary, whose memory stays flat: the Go runtime's memory (all it
// has mapped: heap, stacks, buffers) and, without the race detector, whose
// shadow memory would swamp it, the process's RSS. The primary runs in
// this process; the client here streams from and to fixed buffers.
func TestLargeBodiesKeepPrimaryMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 2 GiB")
	}
	s := startTest(t)
	addr := s.Addr().String()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	// Warm up so that the baseline includes the primary's steady state.
	for range 4 {
		if code, _ := get(t, addr, "/pid"); code != 200 {
			t.Fatalf("warm-up status %d", code)
		}
	}
	sample := func() (goMem, rssBytes int64) {
		m := []metrics.Sample{{Name: "/memory/classes/total:bytes"}}
		metrics.Read(m)
		r, _ := readRSS(os.Getpid())
		return int64(m[0].Value.Uint64()), r
	}
	runtime.GC()
	goBefore, rssBefore := sample()
	var goPeak, rssPeak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				g, r := sample()
				goPeak.Store(max(goPeak.Load(), g))
				rssPeak.Store(max(rssPeak.Load(), r))
			}
		}
	}()
	const size = 1 << 30
	req, _ := http.NewRequest("POST", "http://"+addr+"/upload", io.LimitReader(patternReader{}, size))
	req.ContentLength = size
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if n, _, _ := strings.Cut(string(body), " "); n != strconv.Itoa(size) {
		t.Fatalf("upload: worker counted %q, want %d bytes", body, size)
	}
	resp, err = client.Get("http://" + addr + "/download?n=" + strconv.Itoa(size))
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != size {
		t.Fatalf("download: %d bytes, %v", n, err)
	}
	close(stop)
	<-sampled
	t.Logf("primary's Go memory: %d KiB before, %d KiB peak; RSS: %d KiB before, %d KiB peak (race detector: %v)",
		goBefore>>10, goPeak.Load()>>10, rssBefore>>10, rssPeak.Load()>>10, raceEnabled)
	if growth := goPeak.Load() - goBefore; growth > 16<<20 {
		t.Errorf("Go memory grew by %d KiB while streaming 2 GiB; want flat (< 16 MiB)", growth>>10)
	}
	if growth := rssPeak.Load() - rssBefore; !raceEnabled && growth > 16<<20 {
		t.Errorf("RSS grew by %d KiB while streaming 2 GiB; want flat (< 16 MiB)", growth>>10)
	}
}

func readRSS(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	_, v, _ := strings.Cut(string(b), "VmRSS:")
	v, _, _ = strings.Cut(v, "kB")
	kb, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	return kb << 10, err
}

// An idle proxied connection costs the primary two descriptors, its two
// sockets, and no goroutine. No splice pipe: with io.Copy, each idle
// direction held a pipe, six descriptors per connection, which the
// benchmark's 10,000 idle connections ran out of. No goroutine: an event
// loop carries it (evrelay_linux.go), where two goroutines per connection
// held their stacks, 10 KiB per idle connection in the benchmark.
func TestIdleConnectionsHoldNoPipes(t *testing.T) {
	s := startTest(t)
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	const n = 200
	// The event loops start with the first relayed connection.
	dialRaw(t, s.Addr().String()).roundTrip(t, "/pid")
	waitFor(t, 5*time.Second, "the warm-up connection counted", func() bool {
		ws := s.Workers()
		return ws[0].ActiveConnections()+ws[1].ActiveConnections() == 1
	})
	before, goroutines := fds(), runtime.NumGoroutine()
	for range n {
		c := dialRaw(t, s.Addr().String())
		c.roundTrip(t, "/pid") // routed and spliced, now idle
	}
	waitFor(t, 5*time.Second, "connections counted", func() bool {
		ws := s.Workers()
		return ws[0].ActiveConnections()+ws[1].ActiveConnections() == n+1
	})
	if g := runtime.NumGoroutine() - goroutines; g > n/10 {
		t.Errorf("%d idle connections: %d more goroutines; want none per connection", n, g)
	}
	// Each connection: the test's client socket, and the primary's client
	// and worker sockets, all in this process.
	grown := fds() - before
	t.Logf("%d idle connections: %d more descriptors in this process (client and primary)", n, grown)
	// Splice pipes that Go's pool keeps for reuse add a few, not 4 per
	// connection as pipes held by idle connections would.
	if grown > 3*n+n/4 {
		t.Errorf("%d idle connections took %d descriptors; want about %d (3 per connection, no pipes)", n, grown, 3*n)
	}
}

// Accepted public connections keep TCP keep-alive (as net's defaults set
// it) although it is set once on the listening socket, not on each.
func TestPublicConnectionsKeepAlive(t *testing.T) {
	c, err := newConfig(func(string) string { return "" }, WithAddr("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := c.listen()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	// Accepted raw, as the raw accept loop does (net's Accept would set
	// TCP_NODELAY itself).
	lrc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	sfd := -1
	var aerr error
	lrc.Control(func(fd uintptr) { sfd, _, aerr = syscall.Accept4(int(fd), syscall.SOCK_CLOEXEC) })
	if aerr != nil {
		t.Fatal(aerr)
	}
	defer syscall.Close(sfd)
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
	} {
		if v, err := unix.GetsockoptInt(sfd, o.level, o.opt); err != nil || v != o.want {
			t.Errorf("%s = %d (%v), want %d", o.name, v, err, o.want)
		}
	}
}
