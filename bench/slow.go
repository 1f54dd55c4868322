//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The slow-read attack of the slow-reader table (issue 14): h.slowConns
// connections that each ask for /huge (1 MiB) with a tiny receive buffer
// and then read it a few bytes at a time, as slowhttptest -X does.
const (
	slowRcvBuf   = 1024 // SO_RCVBUF of each slow reader; Linux raises it to its minimum, about 2.3 KiB
	slowRead     = 16   // bytes each slow reader reads per round
	slowInterval = 100 * time.Millisecond
	slowDialers  = 16 // connections opened at once
	slowRequest  = "GET /huge HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: defuss-bench-slow\r\n\r\n"
)

// slowWorkloads are the normal requests measured beside the attack.
var slowWorkloads = workloads[:2]

// slowAttack is a running slow-read attack. One goroutine reads every
// connection in turn, without waiting on any, so the attack costs the
// harness little CPU.
type slowAttack struct {
	conns    []*net.TCPConn
	answered atomic.Int64 // connections whose first bytes were a 200 head
	closed   atomic.Int64 // connections the other side closed or reset
	minRead  int64        // the fewest and most bytes a connection read; set by stop
	maxRead  int64
	quit     chan struct{}
	done     chan struct{}
}

// openSlow opens n slow readers to addr, each sending its request, and
// starts reading them. It returns an error, having closed what it opened,
// if a connection cannot be opened.
func openSlow(ctx context.Context, addr string, n int) (*slowAttack, error) {
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		// Before connect, so that the window the handshake offers is the
		// small one.
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, slowRcvBuf)
		})
		return errors.Join(err, serr)
	}}
	a := &slowAttack{conns: make([]*net.TCPConn, n), quit: make(chan struct{}), done: make(chan struct{})}
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range slowDialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := d.DialContext(ctx, "tcp", addr)
				if err == nil {
					a.conns[i] = c.(*net.TCPConn)
					_, err = c.Write([]byte(slowRequest))
				}
				if err != nil {
					mu.Lock()
					firstErr = cmpErr(firstErr, fmt.Errorf("slow reader %d: %w", i+1, err))
					mu.Unlock()
					next.Store(int64(n)) // stop the others
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		a.closeAll()
		return nil, firstErr
	}
	go a.run()
	return a, nil
}

func cmpErr(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

// run reads up to slowRead bytes from every open connection every
// slowInterval until stop, and counts the answered and the closed ones.
func (a *slowAttack) run() {
	defer close(a.done)
	const head = "HTTP/1.1 200 "
	read := make([]int64, len(a.conns))
	first := make([][]byte, len(a.conns)) // the start of each answer, up to len(head)
	open := make([]bool, len(a.conns))
	for i := range open {
		open[i] = true
	}
	buf := make([]byte, slowRead)
	tick := time.NewTicker(slowInterval)
	defer tick.Stop()
	for {
		for i, c := range a.conns {
			if !open[i] {
				continue
			}
			n, err := readNow(c, buf)
			if err != nil {
				open[i] = false
				a.closed.Add(1)
				continue
			}
			if len(first[i]) < len(head) {
				first[i] = append(first[i], buf[:min(n, len(head)-len(first[i]))]...)
				if len(first[i]) == len(head) && string(first[i]) == head {
					a.answered.Add(1)
				}
			}
			read[i] += int64(n)
		}
		select {
		case <-a.quit:
			a.minRead, a.maxRead = read[0], read[0]
			for _, n := range read {
				a.minRead, a.maxRead = min(a.minRead, n), max(a.maxRead, n)
			}
			return
		case <-tick.C:
		}
	}
}

// readNow reads what c has queued, up to len(buf), without waiting: 0
// bytes when nothing is there. The other side's close is an error.
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
		return 0, errors.New("closed by the other side")
	}
	return n, nil
}

// stop ends the reading and closes every connection.
func (a *slowAttack) stop() {
	close(a.quit)
	<-a.done
	a.closeAll()
}

func (a *slowAttack) closeAll() {
	for _, c := range a.conns {
		if c != nil {
			c.Close()
		}
	}
}

// slowSetup is what the slow-reader table measured on one setup.
type slowSetup struct {
	name                string
	without, inPlace    []wrkResult // per slowWorkloads entry; a zero rps: not measured
	opening             wrkResult   // slowWorkloads[0] while the attack opened
	errs                []string
	answered, closed    int64
	minRead, maxRead    int64
	openTime, settle    time.Duration
	fdsBefore, fdsAfter int
	rssBefore, rssAfter int64 // KiB
	tcpBefore, tcpAfter int64 // machine-wide TCP memory, KiB
	pressures           int64 // times the kernel entered TCP memory pressure during the attack
}

// slowTable measures other clients with and without a slow-read attack on
// each selected setup that has one front process, and prints two tables.
func (h *harness) slowTable(ctx context.Context) {
	var results []*slowSetup
	for _, s := range h.selected() {
		if !s.slow {
			continue
		}
		r := &slowSetup{name: s.name}
		results = append(results, r)
		switch {
		case s.missing != "":
			r.errs = append(r.errs, "n/a ("+s.missing+")")
			continue
		case ctx.Err() != nil:
			r.errs = append(r.errs, "not run: "+cause(ctx))
			continue
		}
		fmt.Fprintf(os.Stderr, "bench: slow readers: starting %s\n", s.name)
		t, err := s.start(h, ctx)
		if err != nil {
			r.errs = append(r.errs, firstLine(err.Error()))
			continue
		}
		h.measureSlow(ctx, t, r)
		h.stopTarget(t)
	}
	h.printSlow(results)
}

// measureSlow runs the phases on t: the workloads without the attack;
// the first one again while the attack opens; then, once the attack is
// in place and the processes have settled, the workloads beside it.
func (h *harness) measureSlow(ctx context.Context, t *target, r *slowSetup) {
	wrk := func(w workload) wrkResult {
		if h.warmup > 0 {
			h.runWrk(ctx, w, t, h.warmup)
		}
		res, err := h.runWrk(ctx, w, t, h.duration)
		if err != nil {
			r.errs = append(r.errs, fmt.Sprintf("%s: %s", w.name, firstLine(err.Error())))
		}
		return res
	}
	time.Sleep(300 * time.Millisecond) // the readiness probes' connections go
	front := t.frontPID()
	for _, w := range slowWorkloads {
		r.without = append(r.without, wrk(w))
		fmt.Fprintf(os.Stderr, "bench: %-32s %-18s without the attack: %s\n", r.name, w.name, fmtWrk(r.without[len(r.without)-1]))
	}
	if ctx.Err() != nil {
		return
	}
	r.tcpBefore, r.pressures = tcpMemKiB(), -tcpPressures()

	// The attack opens 200ms into a measured run of the first workload.
	if h.warmup > 0 {
		h.runWrk(ctx, slowWorkloads[0], t, h.warmup)
	}
	// The front's descriptors and memory just before the attack, after
	// the runs without it: what those runs grew (a Go heap that ran
	// thousands of connections) is not the attack's.
	r.fdsBefore, r.rssBefore = countFDs(front), rssOrZero(front)
	opening := make(chan wrkResult, 1)
	go func() {
		res, err := h.runWrk(ctx, slowWorkloads[0], t, h.duration)
		if err != nil {
			r.errs = append(r.errs, "while opening: "+firstLine(err.Error()))
		}
		opening <- res
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	a, err := openSlow(ctx, t.addr, h.slowConns)
	r.openTime = time.Since(start)
	r.opening = <-opening
	if err != nil {
		r.errs = append(r.errs, "opening the slow readers: "+firstLine(err.Error()))
		return
	}
	defer func() {
		a.stop()
		r.answered, r.closed, r.minRead, r.maxRead = a.answered.Load(), a.closed.Load(), a.minRead, a.maxRead
	}()
	fmt.Fprintf(os.Stderr, "bench: %-32s %-18s while %d slow readers open: %s\n", r.name, slowWorkloads[0].name, h.slowConns, fmtWrk(r.opening))

	// In place: every reader answered or closed, and the processes no
	// longer busy writing the responses into the buffers.
	settleStart := time.Now()
	for time.Since(settleStart) < 30*time.Second && a.answered.Load()+a.closed.Load() < int64(h.slowConns) && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	if err := h.waitQuiet(ctx, t, 60*time.Second); err != nil {
		r.errs = append(r.errs, err.Error())
	}
	r.settle = time.Since(settleStart)
	r.fdsAfter, r.rssAfter, r.tcpAfter = countFDs(front), rssOrZero(front), tcpMemKiB()
	for _, w := range slowWorkloads {
		r.inPlace = append(r.inPlace, wrk(w))
		fmt.Fprintf(os.Stderr, "bench: %-32s %-18s attack in place: %s\n", r.name, w.name, fmtWrk(r.inPlace[len(r.inPlace)-1]))
	}
	r.pressures += tcpPressures()
}

// waitQuiet waits until t's processes together use less than 10% of a
// core over 250ms.
func (h *harness) waitQuiet(ctx context.Context, t *target, timeout time.Duration) error {
	const window = 250 * time.Millisecond
	deadline := time.Now().Add(timeout)
	last, _ := t.cpu()
	for ctx.Err() == nil {
		time.Sleep(window)
		now, _ := t.cpu()
		used := now.proxy + now.servers - last.proxy - last.servers
		if used < window/10 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the processes still used %v of CPU per %v after %v", used, window, timeout)
		}
		last = now
	}
	return ctx.Err()
}

func (h *harness) printSlow(results []*slowSetup) {
	rows := [][]string{{"config", "workload", "slow readers", "req/s", "p50", "p99", "max", "p99 ÷ without"}}
	var notes []string
	for _, r := range results {
		for _, e := range r.errs {
			notes = append(notes, r.name+": "+e)
		}
		if len(r.without) == 0 {
			rows = append(rows, []string{r.name, "", "", "error"})
			continue
		}
		for j, w := range slowWorkloads {
			if j >= len(r.without) {
				break
			}
			base := r.without[j]
			add := func(phase string, res wrkResult) {
				if res.rps == 0 {
					rows = append(rows, []string{r.name, w.name, phase, "error"})
					return
				}
				ratio := "–"
				if base.p99 > 0 {
					ratio = fmt.Sprintf("%.2fx", float64(res.p99)/float64(base.p99))
				}
				rows = append(rows, []string{r.name, w.name, phase, fmt.Sprintf("%.0f", res.rps),
					fmtLatency(res.p50), fmtLatency(res.p99), fmtLatency(res.max), ratio})
			}
			add("none", base)
			if j == 0 && r.opening.rps > 0 {
				add(fmt.Sprintf("%d opening", h.slowConns), r.opening)
			}
			if j < len(r.inPlace) {
				add(fmt.Sprintf("%d in place", h.slowConns), r.inPlace[j])
			}
		}
	}
	fmt.Print(markdownTable(rows, []bool{false, false, false, true, true, true, true, true}))
	fmt.Println()
	warm := "without a warm-up run"
	if h.warmup > 0 {
		warm = fmt.Sprintf("after an unreported %v warm-up run", h.warmup)
	}
	fmt.Printf("The attack: %d connections, opened %d at a time, each asking for a 1 MiB body with SO_RCVBUF %d (Linux raises it to its minimum, about 2.3 KiB) and then reading %d bytes every %v. Each row is one wrk run as in the first table, %s: \"none\" before the attack, \"opening\" the run during which the attack opened (200ms after wrk started), \"in place\" a run once every slow reader had the head of its answer and the setup's processes used less than 10%% of a core. The ratio compares each p99 with the same workload's without the attack.\n",
		h.slowConns, slowDialers, slowRcvBuf, slowRead, slowInterval, warm)
	fmt.Println()

	rows = [][]string{{"config", "answered", "opened in", "settled in", "front fds / reader", "front KiB / reader", "kernel TCP KiB / reader", "closed by the server"}}
	for _, r := range results {
		if r.answered == 0 && r.closed == 0 {
			continue
		}
		n := float64(h.slowConns)
		rows = append(rows, []string{r.name,
			fmt.Sprintf("%d of %d", r.answered, h.slowConns),
			r.openTime.Round(time.Millisecond).String(), r.settle.Round(time.Millisecond).String(),
			fmt.Sprintf("%.1f", float64(r.fdsAfter-r.fdsBefore)/n),
			fmt.Sprintf("%.1f", float64(r.rssAfter-r.rssBefore)/n),
			fmt.Sprintf("%.0f", float64(r.tcpAfter-r.tcpBefore)/n),
			strconv.FormatInt(r.closed, 10)})
		if r.pressures > 0 {
			notes = append(notes, fmt.Sprintf("%s: the kernel entered TCP memory pressure %d times during the attack (tcp_mem %s pages)", r.name, r.pressures, tcpMemLimits()))
		}
		if r.maxRead > 0 {
			notes = append(notes, fmt.Sprintf("%s: each slow reader read %d to %d bytes", r.name, r.minRead, r.maxRead))
		}
	}
	fmt.Print(markdownTable(rows, []bool{false, true, true, true, true, true, true, true}))
	fmt.Println()
	fmt.Println("\"front\" is the process that accepts the public connections (the defuss primary, HAProxy, the direct server): its descriptors and VmRSS with the attack in place, less just before it (after the runs without it), per slow reader. \"kernel TCP\" is the machine's TCP buffer memory (the mem of /proc/net/sockstat, all sockets, other processes' included) with the attack in place, less before it: the response bytes queued in socket buffers on their way to the slow readers.")
	for _, n := range notes {
		fmt.Println("- " + n)
	}
}

// fmtWrk is a one-line summary of a wrk run, for progress lines.
func fmtWrk(r wrkResult) string {
	return fmt.Sprintf("%.0f req/s, p50 %s, p99 %s, max %s", r.rps, fmtLatency(r.p50), fmtLatency(r.p99), fmtLatency(r.max))
}

func rssOrZero(pid int) int64 {
	kib, _ := rssKiB(pid)
	return kib
}

// tcpMemKiB is the memory of all TCP sockets, from /proc/net/sockstat
// ("TCP: ... mem PAGES"), in KiB; -1 if unknown.
func tcpMemKiB() int64 {
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return -1
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "TCP:" {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			if f[i] == "mem" {
				pages, _ := strconv.ParseInt(f[i+1], 10, 64)
				return pages * int64(os.Getpagesize()) / 1024
			}
		}
	}
	return -1
}

// tcpPressures is TcpExt TCPMemoryPressures from /proc/net/netstat: how
// often the kernel has entered TCP memory pressure since boot.
func tcpPressures() int64 {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return 0
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(values) != len(names) || values[0] != "TcpExt:" {
			continue
		}
		for k, n := range names {
			if n == "TCPMemoryPressures" {
				v, _ := strconv.ParseInt(values[k], 10, 64)
				return v
			}
		}
	}
	return 0
}

// tcpMemLimits is net.ipv4.tcp_mem: the low, pressure and high limits in
// pages.
func tcpMemLimits() string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_mem")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(b)), " ")
}
