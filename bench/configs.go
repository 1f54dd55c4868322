//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// A setup is one row group of the table: a way of serving the handler.
type setup struct {
	key  string // for BENCH_ONLY
	name string
	// missing, when set, says why the row cannot run; it is printed as
	// "n/a (missing)". A setup whose library feature does not exist yet
	// carries it; deleting the line enables the row.
	missing string
	start   func(h *harness, ctx context.Context) (*target, error)
	idle    bool // also measured in the idle-connection memory table
	slow    bool // also measured in the slow-reader table
}

// setups are the rows of the table, in order.
func (h *harness) setups() []setup {
	n := strconv.Itoa(h.workers)
	return []setup{
		{key: "direct", name: "direct (1 process)", start: (*harness).startDirect, slow: true},
		{key: "defuss", name: "defuss splice (" + n + " workers)", start: defussStarter(false), idle: true, slow: true},
		{key: "handoff", name: "defuss hand-off (" + n + " workers)", start: defussStarter(true), idle: true, slow: true},
		{key: "haproxy", name: "HAProxy tcp rr (" + n + " backends)", start: haproxyStarter("plain"), idle: true, slow: true},
		// HAProxy's backends on Unix sockets, as splice mode's workers on
		// Linux (theirs are abstract): the like-for-like comparison of the
		// two proxies.
		{key: "haproxy-unix", name: "HAProxy tcp rr (" + n + " Unix backends)", start: haproxyStarter("plainunix")},
		{key: "reuseport", name: "SO_REUSEPORT (" + n + " processes)", start: (*harness).startReusePort},
	}
}

// A target is a running setup.
type target struct {
	addr       string  // where wrk connects
	proxyPID   int     // the process that proxies (defuss primary, haproxy), 0 if none
	serverPIDs []int   // the processes that run the handler: defuss workers, HAProxy backends, the plain servers
	procs      []*proc // what to stop, in start order
}

// frontPID is the process that accepts the public connections: the proxy,
// or the first server where there is none.
func (t *target) frontPID() int {
	if t.proxyPID != 0 {
		return t.proxyPID
	}
	return t.serverPIDs[0]
}

// cpu is the CPU time that t's proxy and t's servers have used so far;
// ok is false if a process could not be read (it has gone).
func (t *target) cpu() (c cpuTimes, ok bool) {
	ok = true
	if t.proxyPID != 0 {
		var err error
		c.proxy, err = procCPU(t.proxyPID)
		ok = err == nil
	}
	for _, pid := range t.serverPIDs {
		d, err := procCPU(pid)
		c.servers += d
		ok = ok && err == nil
	}
	return c, ok
}

// switches is procSwitches of the proxy; an error where there is none.
func (t *target) switches() (int64, error) {
	if t.proxyPID == 0 {
		return 0, errors.New("no proxy")
	}
	return procSwitches(t.proxyPID)
}

func (t *target) url() string { return "http://" + t.addr }

// stop stops the target's processes, the front first.
func (h *harness) stopTarget(t *target) {
	for i := len(t.procs) - 1; i >= 0; i-- {
		h.reg.stop(t.procs[i], 5*time.Second)
	}
}

// serverEnv is the harness's environment with GOMAXPROCS set to procs, or
// removed when procs is 0 (all cores; for defuss, the library's default
// split among workers).
func serverEnv(procs int) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GOMAXPROCS=") {
			env = append(env, kv)
		}
	}
	if procs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(procs))
	}
	return env
}

// startServer starts the bench server and waits for it to listen.
func (h *harness) startServer(ctx context.Context, name string, procs int, args ...string) (*proc, string, error) {
	p, err := h.reg.start(name, serverEnv(procs), h.server, args...)
	if err != nil {
		return nil, "", err
	}
	addr, err := p.waitListening(ctx, 60*time.Second)
	if err != nil {
		h.reg.stop(p, 5*time.Second)
		return nil, "", err
	}
	return p, addr, nil
}

func (h *harness) startDirect(ctx context.Context) (*target, error) {
	p, addr, err := h.startServer(ctx, "direct", 0, "-mode", "direct", "-addr", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return h.ready(ctx, &target{addr: addr, serverPIDs: []int{p.pid()}, procs: []*proc{p}})
}

// defussStarter starts the server under defuss with h.workers workers,
// in hand-off mode if handoff is set.
func defussStarter(handoff bool) func(*harness, context.Context) (*target, error) {
	return func(h *harness, ctx context.Context) (*target, error) {
		return h.startDefuss(ctx, h.workers, handoff)
	}
}

// startDefuss starts the server under defuss with the given number of
// workers. The primary prints its address once its workers are ready, so
// they are all there to be recorded.
func (h *harness) startDefuss(ctx context.Context, workers int, handoff bool) (*target, error) {
	args := []string{"-mode", "defuss", "-workers", strconv.Itoa(workers), "-addr", "127.0.0.1:0"}
	name := "defuss"
	if handoff {
		args = append(args, "-handoff")
		name += "-handoff"
	}
	p, addr, err := h.startServer(ctx, name, 0, args...)
	if err != nil {
		return nil, err
	}
	h.reg.rememberKids(p)
	t := &target{addr: addr, proxyPID: p.pid(), procs: []*proc{p}}
	for _, k := range p.kids {
		t.serverPIDs = append(t.serverPIDs, k.pid)
	}
	return h.ready(ctx, t)
}

// backendProcs is the GOMAXPROCS of each process in the two-process
// setups: the cores shared among them, as defuss shares them among its
// workers.
func (h *harness) backendProcs() int { return max(1, h.ncpu/h.workers) }

// startBackends starts h.workers servers of the bench server's mode on
// ephemeral ports (plainunix: on Unix sockets in h.tmp).
func (h *harness) startBackends(ctx context.Context, t *target, mode string) ([]string, error) {
	var addrs []string
	for i := range h.workers {
		args := []string{"-mode", mode, "-addr", "127.0.0.1:0"}
		if mode == "plainunix" {
			args[3] = filepath.Join(h.tmp, fmt.Sprintf("backend%d.sock", i))
		}
		if mode == "reuseport" && i > 0 {
			args[3] = addrs[0] // the others join the first one's port
		}
		p, addr, err := h.startServer(ctx, fmt.Sprintf("%s%d", mode, i), h.backendProcs(), args...)
		if err != nil {
			h.stopTarget(t)
			return nil, err
		}
		t.procs = append(t.procs, p)
		t.serverPIDs = append(t.serverPIDs, p.pid())
		addrs = append(addrs, addr)
	}
	return addrs, nil
}

func (h *harness) startReusePort(ctx context.Context) (*target, error) {
	t := &target{}
	addrs, err := h.startBackends(ctx, t, "reuseport")
	if err != nil {
		return nil, err
	}
	t.addr = addrs[0]
	return h.ready(ctx, t)
}

// haproxyStarter starts HAProxy in front of h.workers servers of the
// bench server's mode: "plain" (loopback TCP) or "plainunix" (Unix
// sockets in h.tmp).
func haproxyStarter(mode string) func(*harness, context.Context) (*target, error) {
	return func(h *harness, ctx context.Context) (*target, error) {
		return h.startHAProxy(ctx, mode)
	}
}

func (h *harness) startHAProxy(ctx context.Context, mode string) (*target, error) {
	if h.haproxy == "" {
		return nil, fmt.Errorf("haproxy is not installed (bench/run.sh installs it)")
	}
	t := &target{}
	backends, err := h.startBackends(ctx, t, mode)
	if err != nil {
		return nil, err
	}
	if mode == "plainunix" {
		for i, a := range backends {
			backends[i] = "unix@" + a
		}
	}
	port, err := freePort()
	if err != nil {
		h.stopTarget(t)
		return nil, err
	}
	t.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cfg := filepath.Join(h.tmp, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(h.haproxyConfig(t.addr, backends)), 0o644); err != nil {
		h.stopTarget(t)
		return nil, err
	}
	p, err := h.reg.start("haproxy", nil, h.haproxy, "-db", "-f", cfg)
	if err != nil {
		h.stopTarget(t)
		return nil, err
	}
	t.procs = append(t.procs, p)
	t.proxyPID = p.pid()
	return h.ready(ctx, t)
}

// haproxyMaxconn is HAProxy's connection limit: enough for the idle and
// slow-reader tests, within the descriptors it may open (two per proxied
// connection).
func (h *harness) haproxyMaxconn() int {
	return max(1000, min(max(h.idleConns, h.slowConns)+1000, int(h.nofile-200)/2))
}

func (h *harness) haproxyConfig(front string, backends []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
    nbthread %d
    maxconn %d

defaults
    mode tcp
    maxconn %d
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend bench
    bind %s
    default_backend workers

backend workers
    balance roundrobin
`, h.haproxyThreads, h.haproxyMaxconn(), h.haproxyMaxconn(), front)
	for i, a := range backends {
		fmt.Fprintf(&b, "    server w%d %s\n", i, a)
	}
	return b.String()
}

// freePort returns a loopback port that was free a moment ago. Only
// HAProxy needs one chosen for it; the Go servers listen on port 0 and
// report the port they got.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// ready waits until t answers GET /small with 200, and stops it if it
// does not within 30s.
func (h *harness) ready(ctx context.Context, t *target) (*target, error) {
	client := &http.Client{
		Timeout:   time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil},
	}
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		for _, p := range t.procs {
			select {
			case <-p.exited:
				h.stopTarget(t)
				return nil, fmt.Errorf("%s exited (%v); log %s:\n%s", p.name, p.waitErr, p.logPath, tail(p.logPath, 12))
			default:
			}
		}
		resp, err := client.Get(t.url() + "/small")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return t, nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			h.stopTarget(t)
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	h.stopTarget(t)
	return nil, fmt.Errorf("%s does not answer: %w", t.addr, last)
}
