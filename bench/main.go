//go:build linux

// Command bench is the benchmark harness of issues 6 and 14. It compares
// defuss with one plain Go process, HAProxy in TCP mode (in front of Go
// servers on loopback TCP ports, and on Unix sockets, as splice mode's
// workers on Linux) and SO_REUSEPORT, on one machine, over loopback only, and prints markdown tables on stdout
// (progress goes to stderr):
//
//  1. throughput: requests/s, p50 and p99 latency, the ratio to "direct",
//     and CPU time per 10,000 requests (the proxy's, the servers', both)
//     for five workloads (13-byte and 64 KiB bodies, keep-alive and
//     "Connection: close"; a 1 MiB body on keep-alive, the one workload
//     whose handler writes more than 64 KiB at once; with BENCH_FILE=1 a
//     sixth, a 64 KiB file sent with http.ServeFile), measured with wrk;
//  2. idle: the proxy process's RSS per idle proxied connection (the
//     defuss primary beside HAProxy);
//  3. pool: the defuss primary's CPU per 10,000 requests with 2, 4 and 8
//     workers, splice and hand-off, and its context switches per request;
//  4. slow: other clients' latency (wrk) without and beside a slow-read
//     attack, and what the attack costs the front process and the kernel.
//
// bench/run.sh installs wrk and HAProxy where missing, raises the
// descriptor limit, builds the server and this harness, and runs it; it is
// the one command to use. Run by hand (go run ./bench) it builds the
// server itself. Settings come from flags, which default to environment
// variables:
//
//	BENCH_DURATION=5s     length of each wrk run
//	BENCH_ROUNDS=3        runs of each setup and workload, in rounds; the table shows the median
//	BENCH_WARMUP=1s       wrk run before each measured one, not reported (0 skips)
//	BENCH_CONNS=64        wrk connections (-c)
//	BENCH_THREADS=2       wrk threads (-t)
//	BENCH_WORKERS=2       defuss workers, HAProxy backends, SO_REUSEPORT processes
//	BENCH_HAPROXY_THREADS=2   HAProxy nbthread
//	BENCH_IDLE_CONNS=10000    idle connections for the memory table (0 skips it)
//	BENCH_POOL_WORKERS=2,4,8  worker counts of the pool table (empty skips it)
//	BENCH_SLOW_CONNS=1000     slow readers of the slow-reader table (0 skips it)
//	BENCH_ONLY=direct,defuss  run only these setups (direct, defuss, handoff, haproxy, haproxy-unix, reuseport)
//	BENCH_TABLES=pool,slow    run only these tables (throughput, idle, pool, slow)
//	BENCH_TIMEOUT=20m     the whole run stops after this, printing what it has
//	BENCH_QUICK=1         smoke run: one round of 2s runs, no warm-up, 2000 idle and 200 slow connections
//	BENCH_KEEP_LOGS=1     keep the server, HAProxy and config files after a clean run
//	BENCH_FILE=1          add a workload to the first table: a 64 KiB file that the
//	                      handler sends with http.ServeFile (sendfile where it can), keep-alive
//
// The server processes run with GOMAXPROCS as defuss sets it: all cores
// for "direct" and the defuss primary, cores/workers for each defuss
// worker, HAProxy backend and SO_REUSEPORT process.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A workload is one column group of the table: a path and whether each
// request closes its connection.
type workload struct {
	name  string
	path  string
	close bool
}

var workloads = []workload{
	{"13 B keep-alive", "/small", false},
	{"13 B close", "/small", true},
	{"64 KiB keep-alive", "/large", false},
	{"64 KiB close", "/large", true},
	{"1 MiB keep-alive", "/huge", false},
}

type harness struct {
	duration, warmup time.Duration
	conns, threads   int
	workers          int
	haproxyThreads   int
	idleConns        int
	slowConns        int
	poolWorkers      []int
	rounds           int
	only             map[string]bool // setups to run; nil: all
	tables           map[string]bool // tables to run; nil: all
	verbose          bool
	file             bool // the file workload (fileWorkload)

	ncpu    int
	nofile  uint64 // RLIMIT_NOFILE after raising it
	server  string // the bench server binary
	wrk     string
	haproxy string // "" when not installed
	tmp     string
	ownTmp  bool // tmp was made by the harness, which removes it after a clean run
	reg     *registry
}

// cell is the outcome of one workload on one setup, over the rounds.
type cell struct {
	runs []wrkResult // successful runs, one per round at most
	err  error       // the last failure, if any
	na   string      // "n/a (...)" reason: the setup was not run at all
}

// median is the run with the median req/s (the lower one of the middle
// two for an even count); min and max bound the req/s over the runs.
func (c cell) median() (med wrkResult, lo, hi float64) {
	runs := slices.Clone(c.runs)
	slices.SortFunc(runs, func(a, b wrkResult) int { return cmp.Compare(a.rps, b.rps) })
	return runs[(len(runs)-1)/2], runs[0].rps, runs[len(runs)-1].rps
}

// cpuMedians are the medians over c's runs of the CPU milliseconds per
// 10,000 requests of the proxy, of the servers, and of both, each taken on
// its own; -1 where unknown.
func (c cell) cpuMedians() (proxy, servers, total float64) {
	proxy = c.medianOf(func(r wrkResult) float64 { return r.cpuPer10k(r.cpu.proxy) })
	servers = c.medianOf(func(r wrkResult) float64 { return r.cpuPer10k(r.cpu.servers) })
	total = c.medianOf(func(r wrkResult) float64 { return r.cpuPer10k(r.cpu.proxy + r.cpu.servers) })
	return proxy, servers, total
}

// switchesMedian is the median over the runs of the proxy's context
// switches per request, -1 if no run measured them.
func (c cell) switchesMedian() float64 { return c.medianOf(wrkResult.switchesPerRequest) }

// medianOf is the median of f over the runs (the lower of the middle two
// for an even count), leaving out the runs where f is negative (unknown);
// -1 if every run is.
func (c cell) medianOf(f func(wrkResult) float64) float64 {
	var vs []float64
	for _, r := range c.runs {
		if v := f(r); v >= 0 {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return -1
	}
	slices.Sort(vs)
	return vs[(len(vs)-1)/2]
}

func main() {
	os.Exit(run())
}

func run() int {
	h := &harness{ncpu: runtime.NumCPU()}
	quick := envBool("BENCH_QUICK")
	defDur, defWarm, defIdle, defSlow, defRounds := "5s", "1s", 10000, 1000, 3
	if quick {
		defDur, defWarm, defIdle, defSlow, defRounds = "2s", "0s", 2000, 200, 1
	}
	flag.DurationVar(&h.duration, "duration", envDuration("BENCH_DURATION", defDur), "length of each wrk run")
	flag.DurationVar(&h.warmup, "warmup", envDuration("BENCH_WARMUP", defWarm), "unreported wrk run before each measured one (0 skips)")
	flag.IntVar(&h.conns, "conns", envInt("BENCH_CONNS", 64), "wrk connections")
	flag.IntVar(&h.threads, "threads", envInt("BENCH_THREADS", 2), "wrk threads")
	flag.IntVar(&h.workers, "workers", envInt("BENCH_WORKERS", 2), "defuss workers, HAProxy backends, SO_REUSEPORT processes")
	flag.IntVar(&h.haproxyThreads, "haproxy-threads", envInt("BENCH_HAPROXY_THREADS", 2), "HAProxy nbthread")
	flag.IntVar(&h.rounds, "rounds", envInt("BENCH_ROUNDS", defRounds), "rounds over every setup and workload; the table shows the median run")
	flag.IntVar(&h.idleConns, "idle-conns", envInt("BENCH_IDLE_CONNS", defIdle), "idle connections for the memory table (0 skips it)")
	flag.IntVar(&h.slowConns, "slow-conns", envInt("BENCH_SLOW_CONNS", defSlow), "slow readers of the slow-reader table (0 skips it)")
	pool := flag.String("pool-workers", envString("BENCH_POOL_WORKERS", "2,4,8"), "comma-separated worker counts of the pool table (empty skips it)")
	only := flag.String("only", os.Getenv("BENCH_ONLY"), "comma-separated setups to run: direct,defuss,handoff,haproxy,haproxy-unix,reuseport (empty: all)")
	tables := flag.String("tables", os.Getenv("BENCH_TABLES"), "comma-separated tables to run: throughput,idle,pool,slow (empty: all)")
	timeout := flag.Duration("timeout", envDuration("BENCH_TIMEOUT", "20m"), "stop the whole run after this")
	flag.StringVar(&h.server, "server", os.Getenv("BENCH_SERVER"), "bench server binary (empty: build ./bench/server)")
	flag.StringVar(&h.tmp, "tmp", os.Getenv("BENCH_TMP"), "directory for logs and configs (empty: a new temporary one)")
	pidfile := flag.String("pidfile", os.Getenv("BENCH_PIDFILE"), "append the pid of every started process here")
	flag.BoolVar(&h.verbose, "v", envBool("BENCH_VERBOSE"), "print every wrk report on stderr")
	flag.BoolVar(&h.file, "file", envBool("BENCH_FILE"), "add a workload to the first table: a 64 KiB file sent with http.ServeFile, keep-alive")
	flag.Parse()
	h.only, h.tables = keySet(*only), keySet(*tables)
	var err error
	if h.poolWorkers, err = parseCounts(*pool); err != nil {
		fmt.Fprintln(os.Stderr, "bench: -pool-workers:", err)
		return 2
	}
	if h.workers < 1 || h.conns < 1 || h.threads < 1 || h.rounds < 1 || h.idleConns < 0 || h.slowConns < 0 {
		fmt.Fprintln(os.Stderr, "bench: workers, conns, threads and rounds must be >= 1, idle-conns and slow-conns >= 0")
		return 2
	}

	if err = h.prepare(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	if h.file {
		if err = addFileWorkload(h.tmp); err != nil {
			fmt.Fprintln(os.Stderr, "bench: file workload:", err)
			return 1
		}
	}
	reg, err := newRegistry(h.tmp, *pidfile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	h.reg = reg
	defer reg.stopAll()

	// The first SIGINT/SIGTERM cancels the run: the processes are stopped
	// in order and what was measured is printed. A second one kills them
	// all at once and exits.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	sigCtx, interrupt := context.WithCancel(context.Background())
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "bench: signal: stopping (another signal kills everything at once)")
		interrupt()
		<-sigs
		reg.killAll()
		os.Exit(130)
	}()
	ctx, cancel := context.WithTimeout(sigCtx, *timeout)
	defer cancel()

	start := time.Now()
	fmt.Println(h.machine())
	fmt.Println()
	if h.table("throughput") {
		h.throughput(ctx)
		fmt.Println()
	}
	if h.table("idle") && h.idleConns > 0 {
		h.idleTable(ctx)
		fmt.Println()
	}
	if h.table("pool") && len(h.poolWorkers) > 0 {
		h.poolTable(ctx)
		fmt.Println()
	}
	if h.table("slow") && h.slowConns > 0 {
		h.slowTable(ctx)
		fmt.Println()
	}
	reg.stopAll()
	fmt.Printf("Load average after the run: %s. Run time: %v.\n", loadavg(), time.Since(start).Round(time.Second))
	// run.sh passes its own directory and decides about it.
	switch {
	case !h.ownTmp:
		fmt.Fprintf(os.Stderr, "bench: done in %v\n", time.Since(start).Round(time.Second))
	case ctx.Err() == nil && !envBool("BENCH_KEEP_LOGS"):
		os.RemoveAll(h.tmp)
		fmt.Fprintf(os.Stderr, "bench: done in %v\n", time.Since(start).Round(time.Second))
	default:
		fmt.Fprintf(os.Stderr, "bench: done in %v; logs in %s\n", time.Since(start).Round(time.Second), h.tmp)
	}
	switch {
	case sigCtx.Err() != nil:
		fmt.Fprintln(os.Stderr, "bench: interrupted; the tables above are partial")
		return 130
	case ctx.Err() != nil:
		fmt.Fprintf(os.Stderr, "bench: stopped after -timeout %v; the tables above are partial\n", *timeout)
		return 1
	}
	return 0
}

// prepare finds the tools, raises the descriptor limit and builds the
// server if none was given.
func (h *harness) prepare() error {
	var err error
	if h.wrk, err = exec.LookPath("wrk"); err != nil {
		return errors.New("wrk not found; bench/run.sh installs it (apt-get install wrk)")
	}
	if p, err := exec.LookPath("haproxy"); err == nil {
		h.haproxy = p
	}
	if h.tmp == "" {
		if h.tmp, err = os.MkdirTemp("", "defuss-bench-"); err != nil {
			return err
		}
		h.ownTmp = true
	}
	h.nofile = raiseNofile(uint64(6*max(h.idleConns, h.slowConns) + 1024))
	if h.server == "" {
		h.server = filepath.Join(h.tmp, "benchserver")
		fmt.Fprintln(os.Stderr, "bench: building ./bench/server")
		cmd := exec.Command("go", "build", "-o", h.server, "./bench/server")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("go build ./bench/server (run from the module root): %w", err)
		}
	}
	return nil
}

// raiseNofile raises RLIMIT_NOFILE's soft limit to the hard one, and the
// hard one to want if the process may; children inherit the result. It
// returns the soft limit in force.
func raiseNofile(want uint64) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	if lim.Max < want {
		raised := syscall.Rlimit{Cur: want, Max: want}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
			return want
		}
	}
	lim.Cur = lim.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Cur
}

// keySet is the set of a comma-separated list's entries; nil for an empty
// list.
func keySet(list string) map[string]bool {
	if strings.TrimSpace(list) == "" {
		return nil
	}
	set := map[string]bool{}
	for k := range strings.SplitSeq(list, ",") {
		set[strings.TrimSpace(k)] = true
	}
	return set
}

// table reports whether BENCH_TABLES keeps the named table.
func (h *harness) table(name string) bool { return h.tables == nil || h.tables[name] }

// selected are the setups BENCH_ONLY keeps.
func (h *harness) selected() []setup {
	var out []setup
	for _, s := range h.setups() {
		if h.only == nil || h.only[s.key] {
			out = append(out, s)
		}
	}
	return out
}

// throughput runs every workload on every setup, h.rounds times over, and
// prints the table. Rounds go over all setups in turn, so that a change in
// the machine's load during the run spreads over every row.
func (h *harness) throughput(ctx context.Context) {
	sets := h.selected()
	cells := make([][]cell, len(sets)) // [setup][workload]
	for i, s := range sets {
		cells[i] = make([]cell, len(workloads))
		if s.missing != "" {
			fill(cells[i], cell{na: s.missing})
		}
	}
	for round := 1; round <= h.rounds && ctx.Err() == nil; round++ {
		for i, s := range sets {
			if s.missing != "" || ctx.Err() != nil {
				continue
			}
			fmt.Fprintf(os.Stderr, "bench: round %d/%d: starting %s\n", round, h.rounds, s.name)
			t, err := s.start(h, ctx)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: %s: %v\n", s.name, err)
				for j := range workloads {
					cells[i][j].err = err
				}
				continue
			}
			for j, w := range workloads {
				if ctx.Err() != nil {
					break
				}
				if h.warmup > 0 {
					h.runWrk(ctx, w, t, h.warmup)
				}
				r, err := h.runWrk(ctx, w, t, h.duration)
				if err != nil {
					if ctx.Err() == nil {
						cells[i][j].err = err
						fmt.Fprintf(os.Stderr, "bench: %s, %s: %v\n", s.name, w.name, err)
					}
					continue
				}
				cells[i][j].runs = append(cells[i][j].runs, r)
				fmt.Fprintf(os.Stderr, "bench: %-32s %-18s %10.0f req/s  p50 %-9s p99 %-10s CPU/10k proxy %s servers %s  other CPU %.0f%%\n",
					s.name, w.name, r.rps, fmtLatency(r.p50), fmtLatency(r.p99),
					fmtCPU(r.cpuPer10k(r.cpu.proxy)), fmtCPU(r.cpuPer10k(r.cpu.servers)), 100*r.otherCPU)
			}
			h.stopTarget(t)
		}
	}
	if ctx.Err() != nil {
		for i := range cells {
			for j := range cells[i] {
				if c := &cells[i][j]; c.na == "" && c.err == nil && len(c.runs) == 0 {
					c.na = "not run: " + cause(ctx)
				}
			}
		}
	}
	h.printThroughput(sets, cells)
}

func fill(cs []cell, c cell) {
	for i := range cs {
		cs[i] = c
	}
}

func cause(ctx context.Context) string {
	if errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
		return "timeout"
	}
	return "interrupted"
}

func (h *harness) printThroughput(sets []setup, cells [][]cell) {
	header := []string{"workload", "config", "req/s", "p50", "p99", "ratio to direct",
		"proxy CPU / 10k", "servers CPU / 10k", "total CPU / 10k", "other CPU"}
	right := []bool{false, false, true, true, true, true, true, true, true, true}
	if h.rounds > 1 {
		header = append(header, "req/s min–max")
		right = append(right, true)
	}
	rows := [][]string{header}
	row := func(cells ...string) {
		rows = append(rows, append(cells, make([]string, len(header)-len(cells))...))
	}
	var notes []string
	for j, w := range workloads {
		direct := 0.0
		for i, s := range sets {
			if c := cells[i][j]; s.key == "direct" && len(c.runs) > 0 {
				med, _, _ := c.median()
				direct = med.rps
			}
		}
		for i, s := range sets {
			c := cells[i][j]
			if c.err != nil {
				notes = append(notes, fmt.Sprintf("%s, %s: %s", s.name, w.name, firstLine(c.err.Error())))
			}
			switch {
			case c.na != "":
				row(w.name, s.name, "n/a ("+c.na+")")
			case len(c.runs) == 0:
				row(w.name, s.name, "error")
			default:
				med, lo, hi := c.median()
				ratio := "–"
				if direct > 0 {
					ratio = fmt.Sprintf("%.2fx", med.rps/direct)
				}
				other := "?"
				if med.otherCPU >= 0 {
					other = fmt.Sprintf("%.0f%%", 100*med.otherCPU)
				}
				proxy, servers, total := c.cpuMedians()
				proxyCol := fmtCPU(proxy)
				if s.key == "direct" || s.key == "reuseport" {
					proxyCol = "none"
				}
				cols := []string{w.name, s.name, fmt.Sprintf("%.0f", med.rps), fmtLatency(med.p50), fmtLatency(med.p99), ratio,
					proxyCol, fmtCPU(servers), fmtCPU(total), other}
				if h.rounds > 1 {
					cols = append(cols, fmt.Sprintf("%.0f–%.0f (%d runs)", lo, hi, len(c.runs)))
				}
				row(cols...)
				for _, r := range c.runs {
					if r.problems != "" {
						notes = append(notes, fmt.Sprintf("%s, %s: wrk reported %s (of %d requests)", s.name, w.name, r.problems, r.requests))
					}
				}
			}
		}
	}
	fmt.Print(markdownTable(rows, right))
	fmt.Println()
	runs := "one run"
	if h.rounds > 1 {
		runs = fmt.Sprintf("the median of %d runs (by req/s; p50 and p99 are that run's), taken in %d rounds over all setups", h.rounds, h.rounds)
	}
	warm := "without a warm-up run"
	if h.warmup > 0 {
		warm = fmt.Sprintf("each after an unreported %v warm-up run", h.warmup)
	}
	fmt.Printf("Each row is %s of wrk %s on the same machine, %s; \"close\" adds -H 'Connection: close'.\n",
		runs, strings.Join(h.wrkArgs(workload{path: "/PATH"}, "http://127.0.0.1:PORT", h.duration), " "), warm)
	fmt.Println("\"CPU / 10k\" is milliseconds of CPU time (user and system, all threads, read from each process's CPU-time clock before and after the run) per 10,000 requests wrk completed: \"proxy\" is the process between client and handler (the defuss primary; HAProxy), \"servers\" the processes running the handler (the defuss workers; HAProxy's backends; direct's one process; the SO_REUSEPORT processes), \"total\" both; each is the median of its own values over the runs. Loopback packet processing that the kernel does on a process's time (softirqs, on kernels without IRQ_TIME_ACCOUNTING) is counted to that process; what ksoftirqd does is counted to none.")
	fmt.Println("\"other CPU\" is the share of the machine's CPU time that user processes outside the benchmark used during that run (kernel threads not counted); where it is high, the row measured a busy machine.")
	fmt.Printf("GOMAXPROCS: direct and the defuss primary %d; each defuss worker, HAProxy backend and SO_REUSEPORT process %d. HAProxy: mode tcp, balance roundrobin, nbthread %d.\n",
		h.ncpu, h.backendProcs(), h.haproxyThreads)
	for _, n := range notes {
		fmt.Println("- " + n)
	}
}

// idleTable measures the proxies' memory per idle connection and prints it.
func (h *harness) idleTable(ctx context.Context) {
	rows := [][]string{{"proxy", "idle conns open", "RSS before", "RSS after", "KiB / conn", "fds / conn"}}
	var notes []string
	for _, s := range h.selected() {
		if !s.idle {
			continue
		}
		if s.missing != "" {
			rows = append(rows, []string{s.name, "n/a (" + s.missing + ")", "", "", "", ""})
			continue
		}
		if ctx.Err() != nil {
			rows = append(rows, []string{s.name, "n/a (not run: " + cause(ctx) + ")", "", "", "", ""})
			continue
		}
		fmt.Fprintf(os.Stderr, "bench: idle connections: starting %s\n", s.name)
		t, err := s.start(h, ctx)
		if err != nil {
			rows = append(rows, []string{s.name, "error", "", "", "", ""})
			notes = append(notes, fmt.Sprintf("%s: %s", s.name, firstLine(err.Error())))
			continue
		}
		r := h.measureIdle(ctx, t)
		h.stopTarget(t)
		open := fmt.Sprintf("%d of %d", r.open, r.target)
		rows = append(rows, []string{s.name, open,
			fmt.Sprintf("%.1f MiB", float64(r.rssBefore)/1024), fmt.Sprintf("%.1f MiB", float64(r.rssAfter)/1024),
			fmt.Sprintf("%.1f", r.kibPerConn()), fmt.Sprintf("%.1f", r.fdsPerConn())})
		fmt.Fprintf(os.Stderr, "bench: %s: %s idle connections opened in %v, %.1f KiB and %.1f fds each\n",
			s.name, open, r.openTime.Round(time.Millisecond), r.kibPerConn(), r.fdsPerConn())
		if r.firstErr != nil {
			notes = append(notes, fmt.Sprintf("%s stopped at %d connections: %s (RLIMIT_NOFILE is %d)", s.name, r.open, firstLine(r.firstErr.Error()), h.nofile))
		}
	}
	fmt.Print(markdownTable(rows, []bool{false, true, true, true, true, true}))
	fmt.Println()
	fmt.Println("RSS is VmRSS of the proxying process only (the defuss primary; HAProxy), read 1s after the last connection completed one keep-alive request; kernel socket and pipe buffers are not in it. fds / conn counts that process's open descriptors.")
	for _, n := range notes {
		fmt.Println("- " + n)
	}
}

// machine describes where the run happened.
func (h *harness) machine() string {
	model := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "unknown"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	goVersion := runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH
	wrkVersion := firstLine(commandOutput(h.wrk, "-v"))
	haproxyVersion := "not installed"
	if h.haproxy != "" {
		haproxyVersion = firstLine(commandOutput(h.haproxy, "-v"))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## defuss benchmark, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "- machine: %d CPUs (nproc), %s, Linux %s\n", h.ncpu, model, kernel)
	fmt.Fprintf(&b, "- go: %s; %s; %s\n", goVersion, wrkVersion, haproxyVersion)
	fmt.Fprintf(&b, "- RLIMIT_NOFILE: %d; everything on 127.0.0.1\n", h.nofile)
	fmt.Fprintf(&b, "- before the run: %s CPU busy (1s sample, other processes), load average %s", cpuBusy(time.Second), loadavg())
	return b.String()
}

// cpuBusy is the share of all CPUs that was busy during d, from
// /proc/stat; the harness runs nothing meanwhile, so it is other load.
func cpuBusy(d time.Duration) string {
	read := func() (idle, total uint64, ok bool) {
		b, err := os.ReadFile("/proc/stat")
		if err != nil {
			return 0, 0, false
		}
		f := strings.Fields(firstLine(string(b)))
		if len(f) < 6 || f[0] != "cpu" {
			return 0, 0, false
		}
		for i, v := range f[1:] {
			n, _ := strconv.ParseUint(v, 10, 64)
			total += n
			if i == 3 || i == 4 { // idle, iowait
				idle += n
			}
		}
		return idle, total, true
	}
	i0, t0, ok0 := read()
	time.Sleep(d)
	i1, t1, ok1 := read()
	if !ok0 || !ok1 || t1 == t0 {
		return "unknown"
	}
	return fmt.Sprintf("%.0f%%", 100*(1-float64(i1-i0)/float64(t1-t0)))
}

// loadavg is the 1, 5 and 15 minute load averages.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	if f := strings.Fields(string(b)); len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

func commandOutput(name string, args ...string) string {
	out, _ := exec.Command(name, args...).CombinedOutput() // wrk -v exits 1
	return strings.TrimSpace(string(out))
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

// fmtCPU prints milliseconds of CPU per 10,000 requests; "?" if unknown.
func fmtCPU(ms float64) string {
	switch {
	case ms < 0:
		return "?"
	case ms < 10:
		return fmt.Sprintf("%.1f ms", ms)
	}
	return fmt.Sprintf("%.0f ms", ms)
}

// fmtLatency prints a latency in µs below 1ms, in s from 1s, in ms
// between.
func fmtLatency(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

// markdownTable renders rows (the first is the header) with aligned
// columns; right[i] right-aligns column i.
func markdownTable(rows [][]string, right []bool) string {
	widths := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r {
			widths[i] = max(widths[i], len([]rune(c)), 3)
		}
	}
	var b strings.Builder
	line := func(cells []string) {
		b.WriteString("|")
		for i, c := range cells {
			pad := strings.Repeat(" ", widths[i]-len([]rune(c)))
			if right[i] {
				b.WriteString(" " + pad + c + " |")
			} else {
				b.WriteString(" " + c + pad + " |")
			}
		}
		b.WriteString("\n")
	}
	line(rows[0])
	sep := make([]string, len(widths))
	for i, w := range widths {
		if right[i] {
			sep[i] = strings.Repeat("-", w-1) + ":"
		} else {
			sep[i] = strings.Repeat("-", w)
		}
	}
	line(sep)
	for _, r := range rows[1:] {
		line(r)
	}
	return b.String()
}

func envInt(k string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(k)); err == nil {
		return v
	}
	return def
}

// envString is the value of k, or def if k is not set; set and empty is
// empty.
func envString(k, def string) string {
	if v, ok := os.LookupEnv(k); ok {
		return v
	}
	return def
}

func envDuration(k, def string) time.Duration {
	v := os.Getenv(k)
	if v == "" {
		v = def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %s=%q: %v; using %s\n", k, v, err, def)
		d, _ = time.ParseDuration(def)
	}
	return d
}

func envBool(k string) bool {
	v, _ := strconv.ParseBool(os.Getenv(k))
	return v
}

// fileWorkload is the workload BENCH_FILE adds: the servers' /file route
// sends the file at $BENCH_FILE_PATH with http.ServeFile, which the
// servers inherit from the harness.
var fileWorkload = workload{"64 KiB file keep-alive", "/file", false}

// addFileWorkload writes the 64 KiB file into dir, points the servers at
// it, and adds fileWorkload to the first table.
func addFileWorkload(dir string) error {
	b := make([]byte, 64<<10)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	path := filepath.Join(dir, "file64k")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return err
	}
	if err := os.Setenv("BENCH_FILE_PATH", path); err != nil {
		return err
	}
	workloads = append(workloads, fileWorkload)
	return nil
}
