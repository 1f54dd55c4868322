//go:build linux

// Command server is the HTTP server that the benchmark harness in ../ runs
// in each configuration. One binary, several modes:
//
//	server -mode direct    -addr 127.0.0.1:0                # plain net/http, all cores
//	server -mode defuss    -addr 127.0.0.1:0 -workers 2     # defuss.Start: primary + workers
//	server -mode reuseport -addr 127.0.0.1:PORT             # SO_REUSEPORT listener
//	server -mode plain     -addr 127.0.0.1:0                # a backend behind HAProxy
//	server -mode plainunix -addr /tmp/x.sock                # the same on a Unix socket
//
// Once it accepts, the server prints "listening HOST:PORT" on stdout (the
// primary only, under defuss), so the harness can pass port 0 and learn the
// port. It serves /small (the 13-byte body "Hello, World!"), /large (a
// preallocated 64 KiB body) and /huge (a preallocated 1 MiB body, which
// the slow readers of the harness ask for).
//
// Under -mode defuss the binary is re-executed once per worker with the same
// arguments, so everything before defuss.Start (flag parsing, building the
// handler) runs in the workers too; that is cheap and idempotent here.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/defuss-go/defuss"
	"golang.org/x/sys/unix"
)

var (
	smallBody = []byte("Hello, World!")
	largeBody = make([]byte, 64<<10)
	hugeBody  = make([]byte, 1<<20)
)

func main() {
	mode := flag.String("mode", "direct", "direct, defuss, reuseport, plain or plainunix")
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	workers := flag.Int("workers", 2, "defuss workers (-mode defuss)")
	handoff := flag.Bool("handoff", false, "defuss hand-off mode (-mode defuss)")
	flag.Parse()

	for i := range largeBody {
		largeBody[i] = 'a' + byte(i%26)
	}
	for i := range hugeBody {
		hugeBody[i] = 'a' + byte(i%26)
	}
	var err error
	switch *mode {
	case "direct", "plain":
		var ln net.Listener
		if ln, err = net.Listen("tcp", *addr); err == nil {
			err = serve(ln)
		}
	case "plainunix":
		// -addr is the socket's path. (Not an abstract name: HAProxy 2.6
		// pads those to the whole sun_path, which Go does not.) The
		// harness ends a server with SIGTERM, which leaves the file: the
		// next round's server of the same path removes it.
		os.Remove(*addr)
		var ln net.Listener
		if ln, err = net.Listen("unix", *addr); err == nil {
			err = serve(ln)
		}
	case "reuseport":
		var ln net.Listener
		if ln, err = listenReusePort(*addr); err == nil {
			err = serve(ln)
		}
	case "defuss":
		err = runDefuss(*addr, *workers, *handoff)
	default:
		err = fmt.Errorf("unknown -mode %q", *mode)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "benchserver (%s, pid %d): %v\n", *mode, os.Getpid(), err)
		os.Exit(1)
	}
}

func handler() http.Handler {
	mux := http.NewServeMux()
	small := strconv.Itoa(len(smallBody))
	large := strconv.Itoa(len(largeBody))
	huge := strconv.Itoa(len(hugeBody))
	// /file sends the file the harness named (BENCH_FILE=1), as a
	// static-file handler does: http.ServeFile, an io.LimitedReader of
	// an *os.File, which net sends with sendfile to a TCP socket.
	mux.HandleFunc("/file", func(w http.ResponseWriter, r *http.Request) {
		path := os.Getenv("BENCH_FILE_PATH")
		if path == "" {
			http.NotFound(w, r)
			return
		}
		http.ServeFile(w, r, path)
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["Content-Type"] = []string{"text/plain; charset=utf-8"}
		h["Content-Length"] = []string{small}
		w.Write(smallBody)
	})
	mux.HandleFunc("/large", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["Content-Type"] = []string{"application/octet-stream"}
		h["Content-Length"] = []string{large}
		w.Write(largeBody)
	})
	mux.HandleFunc("/huge", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["Content-Type"] = []string{"application/octet-stream"}
		h["Content-Length"] = []string{huge}
		w.Write(hugeBody)
	})
	return mux
}

// serve serves the handler on ln until SIGTERM or SIGINT ends the process
// (the default action; the harness needs no graceful stop here).
func serve(ln net.Listener) error {
	fmt.Printf("listening %s\n", ln.Addr())
	srv := &http.Server{Handler: handler(), ReadHeaderTimeout: 10 * time.Second}
	return srv.Serve(ln)
}

// runDefuss runs the handler under defuss: the primary prints its public
// address, workers print nothing. defuss handles SIGTERM itself (graceful
// stop, bounded by the shutdown timeout).
func runDefuss(addr string, workers int, handoff bool) error {
	// Warnings and errors only, to stderr (the harness keeps it in a log
	// file): a library problem during a run must stay visible.
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	opts := []defuss.Option{
		defuss.WithAddr(addr),
		defuss.WithWorkers(workers),
		defuss.WithLogger(log),
		defuss.WithShutdownTimeout(2 * time.Second),
		defuss.WithHandoff(handoff),
	}
	s, err := defuss.Start(handler(), opts...)
	if err != nil {
		return err
	}
	if !defuss.IsWorker() {
		fmt.Printf("listening %s\n", s.Addr())
	}
	return s.Wait()
}

// listenReusePort listens on addr with SO_REUSEPORT set (from x/sys/unix,
// which the module already requires: package syscall lacks the constant), so that several
// processes can share the port and the kernel spreads connections.
func listenReusePort(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}
