//go:build unix

package defuss

// A slow reader: one client that reads a large response slowly must not
// hold up the others.

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestSlowReaderDoesNotBlockOthers: a client downloads a large response
// and reads it very slowly, so the worker's writes and the primary's copy
// for that connection block; every other client, on the same worker and on
// the other, is served promptly. The slow client then gets every byte.
// 1 GiB each way with flat primary memory is
// TestLargeBodiesKeepPrimaryMemoryFlat.
func TestSlowReaderDoesNotBlockOthers(t *testing.T) {
	s := startTest(t)
	addr := s.Addr().String()
	const size = 64 << 20 // far more than the socket buffers on the way hold

	slow, err := dialChaos(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slowPID, err := slow.do(chaosReqs[0], -1)
	if err != nil {
		t.Fatal(err)
	}
	slow.SetDeadline(time.Now().Add(2 * time.Minute))
	fmt.Fprintf(slow, "GET /download?n=%d HTTP/1.1\r\nHost: test\r\n\r\n", size)
	resp, err := http.ReadResponse(slow.r, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("download: %v, %v", resp, err)
	}

	// Others, while the slow client reads 4 KiB every 20ms for two seconds.
	var (
		sent, failed, onSlowWorker atomic.Int64
		worst                      atomic.Int64
		wg                         sync.WaitGroup
	)
	stop := make(chan struct{})
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := dialChaos(addr)
				for k := 0; err == nil && k < 1+i*5; k++ { // 1, 6 or 11 requests per connection
					start := time.Now()
					sent.Add(1)
					var pid string
					pid, err = c.do(chaosReqs[0], -1)
					d := time.Since(start)
					if d > time.Duration(worst.Load()) {
						worst.Store(int64(d))
					}
					if err == nil && d > 2*time.Second {
						err = fmt.Errorf("took %v", d)
					}
					if pid == slowPID {
						onSlowWorker.Add(1)
					}
				}
				if err != nil {
					failed.Add(1)
					t.Errorf("request beside the slow reader: %v", err)
				}
				if c != nil {
					c.Close()
				}
			}
		}()
	}
	var slowRead int64
	buf := make([]byte, 4096)
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		n, err := io.ReadFull(resp.Body, buf)
		slowRead += int64(n)
		if err != nil {
			t.Fatalf("slow read: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // the slowness under test
	}
	close(stop)
	wg.Wait()
	rest, err := io.Copy(io.Discard, resp.Body)
	if err != nil || slowRead+rest != size {
		t.Fatalf("slow client got %d + %d bytes (%v), want %d", slowRead, rest, err, size)
	}
	t.Logf("others: %d requests, %d failed, %d on the slow reader's worker, slowest %v; slow client read %d KiB slowly, then the rest",
		sent.Load(), failed.Load(), onSlowWorker.Load(), time.Duration(worst.Load()).Round(time.Millisecond), slowRead>>10)
	if onSlowWorker.Load() == 0 || onSlowWorker.Load() == sent.Load() {
		t.Errorf("%d of %d requests went to the slow reader's worker; want both workers used", onSlowWorker.Load(), sent.Load())
	}
}
