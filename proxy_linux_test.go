package defuss

import (
	"io"
	"net/http"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
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
// sockets: copyStream waits for data without holding a splice pipe (with
// io.Copy, each idle direction held a pipe: six descriptors per
// connection, which the benchmark's 10,000 idle connections ran out of).
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
	before := fds()
	for range n {
		c := dialRaw(t, s.Addr().String())
		c.roundTrip(t, "/pid") // routed and spliced, now idle
	}
	waitFor(t, 5*time.Second, "connections counted", func() bool {
		ws := s.Workers()
		return ws[0].ActiveConnections()+ws[1].ActiveConnections() == n
	})
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
