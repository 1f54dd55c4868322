//go:build unix

package defuss

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
)

// The test binary is its own worker: a primary started by a test
// re-executes it with envSlot set, and TestMain then serves testApp instead
// of running the tests. With envTestPrimary set it runs a whole primary in
// its own process instead, for tests that signal or kill the primary.
const (
	envTestPrimary = "DEFUSS_TEST_PRIMARY" // value: number of workers
	envTestApp     = "DEFUSS_TEST_APP"     // extra behaviour of the worker

	envTestPrimaryOpts = "DEFUSS_TEST_PRIMARY_OPTS" // options of a primary process
	envTestFDCheck     = "DEFUSS_TEST_FDCHECK"      // print which of fds 3-5 are open, and exit
	envTestServer      = "DEFUSS_TEST_SERVER"       // the worker serves with WithServer: "hooks;idle=1s;readheader=1s"
	envTestRole        = "DEFUSS_TEST_ROLE"         // run the helper of testRoles by that name, and exit
)

// testRoles are helper processes that a test runs from its own binary
// (envTestRole), registered by platform-specific test files.
var testRoles = map[string]func() int{}

// handoffMode runs the tests' primaries in hand-off mode instead of
// splice mode: DEFUSS_TEST_HANDOFF=1 go test ./... runs the core tests in
// the other mode.
var handoffMode = os.Getenv("DEFUSS_TEST_HANDOFF") != ""

// selfSignedCert makes a certificate for localhost and 127.0.0.1, as a
// test worker's HTTPS server needs (envTestServer=tls).
func selfSignedCert() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "defuss test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// drainBegan is closed by a RegisterOnShutdown hook of the test worker's
// server (envTestServer=hooks): the worker has begun to drain.
var drainBegan = make(chan struct{})

// childFDs is what a child started before Start saw of fds 3-5
// (envTestApp=fdcheck).
var childFDs string

// fdCheckMain prints which of the descriptors 3, 4 and 5 are open pipes
// or sockets, as a worker's inherited ones are (the Go runtime of this
// process may open descriptors of its own there, of other kinds).
func fdCheckMain() int {
	var open []string
	for fd := 3; fd <= 5; fd++ {
		var st syscall.Stat_t
		if syscall.Fstat(fd, &st) == nil && (st.Mode&syscall.S_IFMT == syscall.S_IFIFO || st.Mode&syscall.S_IFMT == syscall.S_IFSOCK) {
			open = append(open, strconv.Itoa(fd))
		}
	}
	if len(open) == 0 {
		open = []string{"none"}
	}
	fmt.Println(strings.Join(open, " "))
	return 0
}

// workerServer is the Server of this process when it runs as a test worker.
var workerServer atomic.Pointer[Server]

func TestMain(m *testing.M) {
	switch {
	case testRoles[os.Getenv(envTestRole)] != nil:
		os.Exit(testRoles[os.Getenv(envTestRole)]())
	case os.Getenv(envTestFDCheck) != "":
		os.Exit(fdCheckMain())
	case IsWorker():
		os.Exit(testWorkerMain())
	case os.Getenv(envTestPrimary) != "":
		os.Exit(testPrimaryMain())
	}
	os.Exit(m.Run())
}

func testWorkerMain() int {
	level := slog.LevelError
	if os.Getenv("DEFUSS_TEST_WORKER_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	switch os.Getenv(envTestApp) {
	case "exit-before-start":
		fmt.Fprintln(os.Stderr, "test worker: exiting before Start, as asked")
		return 3
	case "hang-before-start":
		select {} // until the primary kills it
	}
	exeSize() // as the binary is now, before anyone replaces it
	if os.Getenv(envTestApp) == "fdcheck" {
		// User code before Start that starts a child process: which of
		// the worker's inherited descriptors does the child get?
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), envTestFDCheck+"=1")
		out, err := cmd.Output()
		if err != nil {
			out = []byte("error: " + err.Error())
		}
		childFDs = strings.TrimSpace(string(out))
	}
	handler, opts := testApp(), []Option{WithLogger(log)}
	if os.Getenv(envTestApp) == "no-worker-socket" {
		opts = append(opts, optionFunc(func(c *config) { c.noWorkerSocket = true }))
	}
	if spec, ok := os.LookupEnv(envTestServer); ok {
		srv := &http.Server{Handler: handler}
		for _, kv := range strings.Split(spec, ";") {
			k, v, _ := strings.Cut(kv, "=")
			d, _ := time.ParseDuration(v)
			switch k {
			case "hooks":
				srv.RegisterOnShutdown(func() { close(drainBegan) })
			case "idle":
				srv.IdleTimeout = d
			case "readheader":
				srv.ReadHeaderTimeout = d
			case "tls":
				srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSignedCert()}}
			case "h2c":
				srv.Protocols = new(http.Protocols)
				srv.Protocols.SetHTTP1(true)
				srv.Protocols.SetUnencryptedHTTP2(true)
			}
		}
		handler, opts = nil, append(opts, WithServer(srv))
	}
	s, err := Start(handler, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test worker:", err)
		return 1
	}
	if os.Getenv(envTestApp) == "exit-after-ready" {
		return 1 // a crash loop: ready, then dead
	}
	workerServer.Store(s)
	if err := s.Wait(); err != nil {
		fmt.Fprintln(os.Stderr, "test worker:", err)
		return 1
	}
	return 0
}

// testPrimaryMain runs a primary with signal handling on, and prints
// "ready <addr> <pid,pid,...>" to stdout once it serves.
func testPrimaryMain() int {
	n, _ := strconv.Atoi(os.Getenv(envTestPrimary))
	level := slog.LevelWarn
	if os.Getenv("DEFUSS_TEST_PRIMARY_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	opts := []Option{WithAddr("127.0.0.1:0"), WithWorkers(n), WithLogger(log),
		WithHeartbeat(100*time.Millisecond, 3*time.Second), WithShutdownTimeout(5 * time.Second)}
	// DEFUSS_TEST_PRIMARY_OPTS: "trusted=CIDR;health=/path;drain=1s;
	// pidfile=/path;start=2s;socket=name;badsuccessor=/path"
	for _, kv := range strings.Split(os.Getenv(envTestPrimaryOpts), ";") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "trusted":
			opts = append(opts, WithTrustedProxies(v))
		case "health":
			opts = append(opts, WithHealthPath(v))
		case "drain":
			d, _ := time.ParseDuration(v)
			opts = append(opts, WithDrainDelay(d))
		case "pidfile":
			opts = append(opts, WithPIDFile(v))
		case "start":
			d, _ := time.ParseDuration(v)
			opts = append(opts, WithStartTimeout(d))
		case "socket":
			opts = append(opts, WithActivatedSocket(v))
		case "badsuccessor":
			// badsuccessor=/path: while the file exists, the new primary
			// of an upgrade fails its Start.
			if _, err := os.Stat(v); err == nil && os.Getenv(envUpgradeFrom) != "" {
				opts = append(opts, WithWorkers(-1))
			}
		}
	}
	if handoffMode {
		opts = append(opts, WithHandoff(true))
	}
	s, err := Start(testApp(), opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test primary:", err)
		return 1
	}
	var pids []string
	for _, w := range s.Workers() {
		pids = append(pids, strconv.Itoa(w.PID))
	}
	fmt.Printf("ready %s %s\n", s.Addr(), strings.Join(pids, ","))
	if err := s.Wait(); err != nil {
		fmt.Fprintln(os.Stderr, "test primary:", err)
		return 1
	}
	fmt.Println("stopped")
	return 0
}

// testApp is the handler every test worker serves.
func testApp() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "pid=%d slot=%s procs=%d remote=%s\n", os.Getpid(), os.Getenv(envSlot), runtime.GOMAXPROCS(0), r.RemoteAddr)
	})
	mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, os.Getpid())
	})
	// /version identifies the binary this worker runs: its size on disk
	// when the worker started (a rolling restart test appends to a copy).
	mux.HandleFunc("/version", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, exeSize())
	})
	// /env?k=NAME answers whether the variable is set, and its value.
	mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
		v, ok := os.LookupEnv(r.URL.Query().Get("k"))
		fmt.Fprintf(w, "%v %s", ok, v)
	})
	mux.HandleFunc("/args", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, strings.Join(os.Args, "\x00"))
	})
	// /sleep?d=2s sends the header at once, then the body "done" after d.
	mux.HandleFunc("/sleep", func(w http.ResponseWriter, r *http.Request) {
		d, _ := time.ParseDuration(r.URL.Query().Get("d"))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		time.Sleep(d)
		fmt.Fprint(w, "done")
	})
	// /upload answers the byte count and SHA-256 of the body.
	mux.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %s %s", n, hex.EncodeToString(h.Sum(nil)), strings.Join(r.TransferEncoding, ","))
	})
	// /download?n=N streams N bytes of a repeating pattern.
	mux.HandleFunc("/download", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		io.Copy(w, io.LimitReader(patternReader{}, n))
	})
	// /sse sends five events, flushing each, 10ms apart.
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 5 {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(10 * time.Millisecond)
		}
	})
	// /upgrade switches protocols (as a WebSocket handshake does) and then
	// echoes every byte back until the client closes.
	mux.HandleFunc("/upgrade", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(c, rw) // rw's reader holds what arrived with the head
	})
	// /exit answers "exiting", flushes, and ends the worker with status 0.
	mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "7") // complete once flushed
		fmt.Fprint(w, "exiting")
		w.(http.Flusher).Flush()
		os.Exit(0)
	})
	// /panic panics in the handler (net/http recovers); with ?process=1,
	// in a goroutine of its own, which ends the process (exit status 2).
	mux.HandleFunc("/panic", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("process") {
			go panic("test: panic outside a handler")
			select {}
		}
		panic("test: panic in a handler")
	})
	// /shutdown-cancelled calls the worker's Server.Shutdown with a
	// context that is already cancelled (and has no deadline), in the
	// background, and answers "ok".
	mux.HandleFunc("/shutdown-cancelled", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		go workerServer.Load().Shutdown(ctx)
		fmt.Fprint(w, "ok")
	})
	// /fdcheck answers what a child started before Start saw of fds 3-5.
	mux.HandleFunc("/fdcheck", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, childFDs)
	})
	// /sse-goodbye streams an event every 50ms until the worker drains,
	// then sends a last event, "bye", and returns: the pattern the README
	// shows for SSE handlers.
	mux.HandleFunc("/sse-goodbye", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				fmt.Fprint(w, "data: tick\n\n")
			case <-drainBegan:
				fmt.Fprint(w, "event: bye\ndata: restart\n\n")
				return
			case <-r.Context().Done():
				return
			}
			w.(http.Flusher).Flush()
		}
	})
	// /ws echoes WebSocket messages until the worker drains, then closes
	// with 1001 (going away): the pattern the README shows.
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		go func() {
			select {
			case <-drainBegan:
				c.Close(websocket.StatusGoingAway, "server restarting")
			case <-r.Context().Done():
			}
		}()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	})
	// gRPC's health service, mounted on the mux by its path, as a program
	// serves gRPC beside its HTTP handlers on one port (HTTP/2 only: h2c or
	// HTTPS).
	grpcServer := grpc.NewServer()
	healthpb.RegisterHealthServer(grpcServer, health.NewServer())
	mux.Handle("/grpc.health.v1.Health/", grpcServer)
	// /tlsinfo answers "<tls> <proto> <remote addr>": whether r.TLS is
	// set, the protocol, and the client's address as the handler sees it.
	mux.HandleFunc("/tlsinfo", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%v %s %s", r.TLS != nil, r.Proto, r.RemoteAddr)
	})
	// /log writes a line to the worker's stderr and answers "logged".
	mux.HandleFunc("/log", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(os.Stderr, "test worker: a log line")
		fmt.Fprint(w, "logged")
	})
	// /forge?slot=N makes this worker send a frame that claims slot N.
	mux.HandleFunc("/forge", func(w http.ResponseWriter, r *http.Request) {
		slot, _ := strconv.Atoi(r.URL.Query().Get("slot"))
		f := appendMessage(nil, &message{kind: frameStats, slot: slot, pid: os.Getpid()})
		if r.URL.Query().Has("oversize") {
			f = []byte{frameStats, 0xff, 0xff} // a length no frame may have
		}
		if _, err := syscall.Write(fdStatus, f); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "forged")
	})
	// /file?path=P serves the file at P with http.ServeFile, ranges too.
	mux.HandleFunc("/file", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, r.URL.Query().Get("path"))
	})
	for path, h := range platformRoutes {
		mux.HandleFunc(path, h)
	}
	return mux
}

// platformRoutes are testApp's routes that only some platforms' tests
// have, added by their files' init.
var platformRoutes = map[string]http.HandlerFunc{}

// exeSize is the size of this process's binary when first asked.
var exeSize = sync.OnceValue(func() int64 {
	exe, err := os.Executable()
	if err != nil {
		return -1
	}
	fi, err := os.Stat(exe)
	if err != nil {
		return -1
	}
	return fi.Size()
})

// patternReader yields an endless repeating byte pattern without allocating.
type patternReader struct{}

func (patternReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(i % 251)
	}
	return len(p), nil
}

// testLogger writes the primary's log into the test's output.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// startTest starts a primary in this process with real workers (this test
// binary), listening on 127.0.0.1:0, and stops it when the test ends,
// checking that no worker process is left.
func startTest(t *testing.T, opts ...Option) *Server {
	t.Helper()
	base := []Option{
		WithAddr("127.0.0.1:0"),
		WithWorkers(2),
		WithSignalHandling(false),
		WithLogger(testLogger(t)),
		WithHeartbeat(50*time.Millisecond, 2*time.Second),
		WithShutdownTimeout(5 * time.Second),
		// Workers built with -race would sleep 1s at exit, and a race in a
		// worker must fail the test, not just print.
		WithWorkerEnv("GORACE=atexit_sleep_ms=0 halt_on_error=1 exitcode=66"),
		optionFunc(func(c *config) {
			c.onExit = func(slot, pid int, err error) {
				var ee *exec.ExitError
				if errors.As(err, &ee) && ee.ExitCode() == 66 {
					t.Errorf("worker %d (pid %d) exited with the race detector's code 66", slot, pid)
				}
			}
		}),
	}
	if handoffMode {
		base = append(base, WithHandoff(true))
	}
	s, err := Start(http.NotFoundHandler(), append(base, opts...)...)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		assertNoChildren(t)
	})
	return s
}

// assertNoChildren fails the test if any process started by this test
// process is still there (zombies included).
func assertNoChildren(t *testing.T) {
	t.Helper()
	if kids := children(); len(kids) > 0 {
		t.Errorf("leaked child processes: %v", kids)
		for _, pid := range kids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// alive reports whether pid is a running (not zombie) process.
func alive(pid int) bool {
	_, state, ok := procStat(pid)
	return ok && state != 'Z' && state != 'X'
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitRefused waits until a new connection to addr is refused: the
// listener has closed.
func waitRefused(t *testing.T, addr string, timeout time.Duration, what string) {
	t.Helper()
	waitFor(t, timeout, what, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
}

// waitWorkers waits on the primary's change notifications until cond holds
// for the slot table.
func waitWorkers(t *testing.T, s *Server, timeout time.Duration, what string, cond func([]WorkerInfo) bool) []WorkerInfo {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		ch := s.p.pool.changes()
		if ws := s.Workers(); cond(ws) {
			return ws
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("timed out after %v waiting for %s; workers: %+v", timeout, what, s.Workers())
		}
	}
}

// get does one request on a new connection and returns status and body.
func get(t *testing.T, addr, path string) (int, string) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	return resp.StatusCode, string(b)
}

// rawConn is a client connection that speaks HTTP/1.1 by hand, for tests
// that hold connections open or send odd bytes.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

// echo writes msg on an upgraded connection of the test app's /upgrade
// and checks that the same bytes come back.
func (c *rawConn) echo(msg string) error {
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c.r, got); err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("echoed %q, want %q", got, msg)
	}
	return nil
}

// roundTrip sends a GET for path and returns the response body.
func (c *rawConn) roundTrip(t *testing.T, path string) string {
	t.Helper()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return string(b)
}

// primaryProc is a primary running in its own process.
type primaryProc struct {
	cmd     *exec.Cmd
	stdout  *os.File // read end of its stdout, after the ready line
	addr    string
	pids    []int         // its workers at start
	exited  chan struct{} // closed once it has exited and been reaped
	waitErr error         // how it exited; read after exited is closed
}

// startPrimaryProcess runs a primary with n workers in its own process
// (this test binary), its stderr going to stderr (nil: this process's),
// and returns once it has printed its ready line on stdout. When the test
// ends it kills the primary and fails if a worker outlives it by 2s.
func startPrimaryProcess(t *testing.T, n int, stderr *os.File, env ...string) *primaryProc {
	t.Helper()
	return startPrimaryCmd(t, exec.Command(os.Args[0], "-test.run=^$"), n, stderr, env...)
}

// startPrimaryCmd is startPrimaryProcess with the command given: another
// copy of the test binary, or a wrapper (systemd-socket-activate) that
// execs it.
func startPrimaryCmd(t *testing.T, cmd *exec.Cmd, n int, stderr *os.File, env ...string) *primaryProc {
	t.Helper()
	cmd.Env = append(append(os.Environ(), envTestPrimary+"="+strconv.Itoa(n), "GORACE=atexit_sleep_ms=0"), env...)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	if stderr == nil {
		stderr = os.Stderr
	}
	cmd.Stdout, cmd.Stderr = w, stderr
	// Its own process group, which the new primary of an upgrade shares:
	// the cleanup kills the group, whatever the test got to.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	p := &primaryProc{cmd: cmd, stdout: r, exited: make(chan struct{})}
	go func() { p.waitErr = cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
		r.Close()
		deadline := time.Now().Add(2 * time.Second)
		for _, pid := range p.pids {
			for alive(pid) && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if alive(pid) {
				t.Errorf("worker %d outlived its primary by 2s", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	r.SetReadDeadline(time.Now().Add(time.Minute))
	line, err := p.readLine()
	if err != nil {
		t.Fatalf("primary process: %v after %q", err, line)
	}
	r.SetReadDeadline(time.Time{})
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "ready" {
		t.Fatalf("primary process said %q", line)
	}
	p.addr = f[1]
	for _, s := range strings.Split(f[2], ",") {
		pid, _ := strconv.Atoi(s)
		p.pids = append(p.pids, pid)
	}
	return p
}

// readLine reads the primary's next line of stdout, with its "\n". It
// reads byte by byte so that nothing after the line is consumed.
func (p *primaryProc) readLine() (string, error) {
	var line []byte
	for b := make([]byte, 1); ; {
		if _, err := p.stdout.Read(b); err != nil {
			return string(line), err
		}
		line = append(line, b[0])
		if b[0] == '\n' {
			return string(line), nil
		}
	}
}

// wait waits until the primary has exited and returns how it exited.
func (p *primaryProc) wait() error {
	<-p.exited
	return p.waitErr
}
