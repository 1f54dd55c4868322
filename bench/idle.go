//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// idleResult is the proxy's memory before and after holding idle
// connections.
type idleResult struct {
	target, open          int
	rssBefore, rssAfter   int64 // KiB
	fdsBefore, fdsAfter   int
	firstErr              error
	openTime, settleAfter time.Duration
}

func (r idleResult) kibPerConn() float64 {
	if r.open == 0 {
		return 0
	}
	return float64(r.rssAfter-r.rssBefore) / float64(r.open)
}

func (r idleResult) fdsPerConn() float64 {
	if r.open == 0 {
		return 0
	}
	return float64(r.fdsAfter-r.fdsBefore) / float64(r.open)
}

// idleRequest is one keep-alive request, so that the proxy has dialed a
// backend for the connection before it goes idle.
const idleRequest = "GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: defuss-bench\r\n\r\n"

// measureIdle opens h.idleConns connections to t, each completing one
// keep-alive request, and reports the proxy process's RSS and descriptor
// count before and after. It stops opening at the first failure (for
// example when the proxy runs out of descriptors) and reports how many
// were open. It closes them all before it returns.
func (h *harness) measureIdle(ctx context.Context, t *target) idleResult {
	res := idleResult{target: h.idleConns}
	time.Sleep(300 * time.Millisecond) // let the readiness probes' connections go
	var err error
	if res.rssBefore, err = rssKiB(t.proxyPID); err != nil {
		res.firstErr = err
		return res
	}
	res.fdsBefore = countFDs(t.proxyPID)

	var (
		mu     sync.Mutex
		conns  = make([]net.Conn, 0, h.idleConns)
		next   atomic.Int64
		failed atomic.Bool
		wg     sync.WaitGroup
	)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	const dialers = 32
	for range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() && ctx.Err() == nil {
				i := next.Add(1) - 1
				if i >= int64(h.idleConns) {
					return
				}
				c, err := openIdle(ctx, t.addr, int(i))
				if err != nil {
					if !failed.Swap(true) {
						mu.Lock()
						res.firstErr = fmt.Errorf("connection %d: %w", i+1, err)
						mu.Unlock()
					}
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.openTime = time.Since(start)
	res.open = len(conns)
	if res.firstErr == nil && ctx.Err() != nil {
		res.firstErr = ctx.Err()
	}
	// Let the proxy settle (the copy goroutines park, the runtime frees
	// what the dial burst used), then read.
	res.settleAfter = time.Second
	time.Sleep(res.settleAfter)
	if res.rssAfter, err = rssKiB(t.proxyPID); err != nil && res.firstErr == nil {
		res.firstErr = err
	}
	res.fdsAfter = countFDs(t.proxyPID)
	return res
}

// openIdle opens connection i to addr and completes one keep-alive
// request on it. Beyond about 20,000 connections it spreads the source
// address over 127.0.0.2, 127.0.0.3, ... so that ephemeral ports last.
func openIdle(ctx context.Context, addr string, i int) (net.Conn, error) {
	d := net.Dialer{Timeout: 3 * time.Second}
	if k := i / 20000; k > 0 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+k))}
	}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, idleRequest); err != nil {
		c.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("reading the response: %w", err)
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s", resp.Status)
	}
	if err == nil && resp.Close {
		err = errors.New("the server closed a keep-alive connection")
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// rssKiB is VmRSS from /proc/pid/status.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// countFDs is the number of open descriptors of pid, or -1.
func countFDs(pid int) int {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
