//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A proc is a process the harness started. Every one is registered in a
// registry, which stops it (and whatever it spawned) at the end of its
// configuration, on an error, and on SIGINT/SIGTERM.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	addr    chan string   // the address from its first "listening ADDR" line
	exited  chan struct{} // closed when it has exited and been reaped
	waitErr error         // set before exited is closed
	kids    []pidStart    // descendants seen while it ran (defuss workers)
}

// pidStart names a process unambiguously: a pid plus its start time, so a
// recycled pid is never killed by mistake.
type pidStart struct {
	pid   int
	start string
}

type registry struct {
	dir     string   // where logs go
	pidfile *os.File // every pid we start, for run.sh's last-resort sweep
	mu      sync.Mutex
	live    []*proc
}

func newRegistry(dir, pidfile string) (*registry, error) {
	r := &registry{dir: dir}
	if pidfile != "" {
		f, err := os.OpenFile(pidfile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return nil, err
		}
		r.pidfile = f
	}
	return r, nil
}

func (r *registry) notePID(pid int) {
	if r.pidfile != nil {
		fmt.Fprintln(r.pidfile, pid)
	}
}

// start runs path with args. Its stdout is scanned for the "listening"
// line and, like its stderr, kept in <dir>/<name>.log. env nil means the
// harness's own environment.
func (r *registry) start(name string, env []string, path string, args ...string) (*proc, error) {
	logPath := filepath.Join(r.dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "# %s %s\n", path, strings.Join(args, " "))
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = outW, logf
	// Own process group (a terminal's Ctrl-C reaches only the harness,
	// which stops everything in order), and SIGKILL if the harness dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	outW.Close()
	if err != nil {
		outR.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	r.notePID(cmd.Process.Pid)
	p := &proc{name: name, cmd: cmd, logPath: logPath, addr: make(chan string, 1), exited: make(chan struct{})}
	logw, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		logw = nil
	}
	// The pipe is read to EOF by this goroutine, which ends when the last
	// holder of the write end (the process and any worker it spawned) is
	// gone; cmd.Wait does not wait for it.
	go scanOutput(outR, logw, p.addr)
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	r.mu.Lock()
	r.live = append(r.live, p)
	r.mu.Unlock()
	return p, nil
}

func scanOutput(out, log *os.File, addr chan<- string) {
	defer out.Close()
	if log != nil {
		defer log.Close()
	}
	sent := false
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		if log != nil {
			fmt.Fprintln(log, line)
		}
		if a, ok := strings.CutPrefix(line, "listening "); ok && !sent {
			addr <- strings.TrimSpace(a)
			sent = true
		}
	}
}

// waitListening waits for p's "listening ADDR" line.
func (p *proc) waitListening(ctx context.Context, timeout time.Duration) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case a := <-p.addr:
		return a, nil
	case <-p.exited:
		return "", fmt.Errorf("%s exited before listening (%v); log %s:\n%s", p.name, p.waitErr, p.logPath, tail(p.logPath, 12))
	case <-t.C:
		return "", fmt.Errorf("%s did not report its address within %v; log %s", p.name, timeout, p.logPath)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// rememberKids records p's current descendants so that stop can make sure
// they are gone too (defuss workers live in their own process groups).
func (r *registry) rememberKids(p *proc) {
	kids := descendants(p.pid())
	r.mu.Lock()
	p.kids = append(p.kids, kids...)
	r.mu.Unlock()
	for _, k := range kids {
		r.notePID(k.pid)
	}
}

// stop asks p to stop with SIGTERM, waits up to grace, then kills its
// process group; descendants that survive are killed as well.
func (r *registry) stop(p *proc, grace time.Duration) {
	r.mu.Lock()
	for i, q := range r.live {
		if q == p {
			r.live = append(r.live[:i], r.live[i+1:]...)
			break
		}
	}
	r.mu.Unlock()
	kids := append(p.kids, descendants(p.pid())...)
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(grace)
		select {
		case <-p.exited:
		case <-t.C:
			fmt.Fprintf(os.Stderr, "bench: %s (pid %d) ignored SIGTERM for %v; killing it\n", p.name, p.pid(), grace)
			syscall.Kill(-p.pid(), syscall.SIGKILL)
			p.cmd.Process.Kill()
			<-p.exited
		}
		t.Stop()
	}
	// A graceful defuss primary waits for its workers; this catches any
	// that outlived it anyway, and says so.
	deadline := time.Now().Add(2 * time.Second)
	for _, k := range kids {
		for alive(k) {
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "bench: pid %d, started by %s, outlived it; killing it\n", k.pid, p.name)
				syscall.Kill(k.pid, syscall.SIGKILL)
				deadline = time.Now().Add(2 * time.Second)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// stopAll stops every process still registered, newest first.
func (r *registry) stopAll() {
	for {
		r.mu.Lock()
		n := len(r.live)
		var p *proc
		if n > 0 {
			p = r.live[n-1]
		}
		r.mu.Unlock()
		if p == nil {
			return
		}
		r.stop(p, 3*time.Second)
	}
}

// killAll kills every process still registered, and what they spawned,
// with SIGKILL, without waiting for them.
func (r *registry) killAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range r.live {
		kids := append(p.kids, descendants(p.pid())...)
		syscall.Kill(-p.pid(), syscall.SIGKILL)
		p.cmd.Process.Kill()
		for _, k := range kids {
			if alive(k) {
				syscall.Kill(k.pid, syscall.SIGKILL)
			}
		}
	}
}

// statFields returns the fields of /proc/pid/stat after the command name:
// [0] is the state, [1] the parent pid, [19] the start time.
func statFields(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(s[i+1:])
}

// alive reports whether k still runs (a zombie does not count).
func alive(k pidStart) bool {
	f := statFields(k.pid)
	return len(f) > 19 && f[19] == k.start && f[0] != "Z"
}

// descendants lists the processes below pid, found through parent pids.
func descendants(pid int) []pidStart {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]pidStart{}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(n)
		if len(f) <= 19 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pidStart{n, f[19]})
	}
	var out []pidStart
	queue := []int{pid}
	for len(queue) > 0 {
		for _, c := range children[queue[0]] {
			out = append(out, c)
			queue = append(queue, c.pid)
		}
		queue = queue[1:]
	}
	return out
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// cpuSample is a moment's CPU accounting: the machine's total ticks, and
// the ticks used so far by user processes outside the harness's own tree
// (their reaped children included, through cutime and cstime). Kernel
// threads are left out: on a benchmark they mostly work for it (softirq,
// RCU).
type cpuSample struct {
	total, others uint64
	ok            bool
}

func sampleCPU() cpuSample {
	var s cpuSample
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return s
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return s
	}
	for i, v := range f[1:] {
		if i == 8 || i == 9 { // guest time is already in user time
			continue
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		s.total += n
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return s
	}
	type info struct {
		ppid  int
		ticks uint64
	}
	procs := map[int]info{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(pid)
		if len(f) < 15 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		if pid == 2 || ppid == 2 { // kthreadd and kernel threads
			continue
		}
		var t uint64
		for _, v := range f[11:15] { // utime stime cutime cstime
			n, _ := strconv.ParseUint(v, 10, 64)
			t += n
		}
		procs[pid] = info{ppid, t}
	}
	self := os.Getpid()
	ours := func(pid int) bool {
		for range 64 { // bounded walk up the tree
			if pid == self {
				return true
			}
			p, ok := procs[pid]
			if !ok || pid <= 1 {
				return false
			}
			pid = p.ppid
		}
		return false
	}
	for pid, p := range procs {
		if !ours(pid) {
			s.others += p.ticks
		}
	}
	s.ok = true
	return s
}

// otherCPU is the share of the machine's CPU time between a and b that
// user processes outside the harness used, or -1 if unknown.
func otherCPU(a, b cpuSample) float64 {
	if !a.ok || !b.ok || b.total <= a.total {
		return -1
	}
	return max(0, float64(b.others)-float64(a.others)) / float64(b.total-a.total)
}

// cpuTimes is CPU time used by a target's processes: its proxy, and its
// servers together.
type cpuTimes struct {
	proxy, servers time.Duration
}

func (c cpuTimes) sub(d cpuTimes) cpuTimes {
	return cpuTimes{c.proxy - d.proxy, c.servers - d.servers}
}

// procCPU is the CPU time, user and system, that process pid has used so
// far, all its threads together (those that have exited included), in
// nanoseconds: it reads the process's CPU-time clock, as
// clock_getcpuclockid(3) names it (the clock id is ^pid<<3 |
// CPUCLOCK_SCHED). That is the scheduler's runtime, which the kernel
// splits into the utime and stime of /proc/pid/stat in clock ticks; the
// clock gives the same sum without the 10ms steps.
func procCPU(pid int) (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(^pid<<3|2), &ts); err != nil {
		return 0, fmt.Errorf("CPU clock of pid %d: %w", pid, err)
	}
	return time.Duration(ts.Nano()), nil
}

// procSwitches is how many times the threads of process pid have been
// switched out so far, voluntarily (to wait) or not: the sum of
// voluntary_ctxt_switches and nonvoluntary_ctxt_switches over
// /proc/pid/task/*/status. Threads that have exited are not counted; Go
// keeps its threads.
func procSwitches(pid int) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var n int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue // the thread has exited
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok || (k != "voluntary_ctxt_switches" && k != "nonvoluntary_ctxt_switches") {
				continue
			}
			c, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/task/%s/status: %q: %w", pid, t.Name(), line, err)
			}
			n += c
		}
	}
	return n, nil
}
