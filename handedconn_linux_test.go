package defuss

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// handedPair is a connected pair whose server end is a handedConn, made
// as a worker makes one of a descriptor the primary handed off: the
// descriptor is the only one of its socket.
func handedPair(t *testing.T) (client net.Conn, server tcpConn) {
	t.Helper()
	client, s := tcpPair(t)
	rc, err := s.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	var derr error
	rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
	if derr != nil {
		t.Fatal(derr)
	}
	s.Close()
	hc, err := newHandedConn(fd, client.LocalAddr().(*net.TCPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hc.Close() })
	return client, hc
}

// netPair is a connected pair whose server end is net's own.
func netPair(t *testing.T) (client net.Conn, server tcpConn) {
	client, s := tcpPair(t)
	return client, s.(*net.TCPConn)
}

// A handed-off connection behaves as *net.TCPConn does, each check run on
// both: its errors (which net/http tells apart), its addresses, its
// half-closes and options, and the sendfile path of ReadFrom.
func TestHandedConnAsNetTCPConn(t *testing.T) {
	for _, kind := range []struct {
		name string
		pair func(*testing.T) (net.Conn, tcpConn)
	}{
		{"net.TCPConn", netPair},
		{"handedConn", handedPair},
	} {
		t.Run(kind.name, func(t *testing.T) {
			t.Run("addresses", func(t *testing.T) {
				client, server := kind.pair(t)
				if got, want := server.RemoteAddr().String(), client.LocalAddr().String(); got != want {
					t.Errorf("RemoteAddr %s, want %s", got, want)
				}
				if got, want := server.LocalAddr().String(), client.RemoteAddr().String(); got != want {
					t.Errorf("LocalAddr %s, want %s", got, want)
				}
				if _, ok := server.RemoteAddr().(*net.TCPAddr); !ok {
					t.Errorf("RemoteAddr is a %T, want *net.TCPAddr", server.RemoteAddr())
				}
			})
			t.Run("read timeout", func(t *testing.T) {
				_, server := kind.pair(t)
				server.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
				_, err := server.Read(make([]byte, 1))
				var ne net.Error
				var oe *net.OpError
				if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) ||
					!errors.As(err, &oe) || oe.Op != "read" {
					t.Fatalf("read past the deadline: %#v; want a *net.OpError \"read\" that is a timeout", err)
				}
			})
			t.Run("EOF", func(t *testing.T) {
				client, server := kind.pair(t)
				client.Close()
				if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Fatalf("read after the peer's close: %d, %v; want io.EOF", n, err)
				}
			})
			t.Run("closed", func(t *testing.T) {
				_, server := kind.pair(t)
				if err := server.Close(); err != nil {
					t.Fatal(err)
				}
				_, err := server.Read(make([]byte, 1))
				var oe *net.OpError
				if !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) || oe.Op != "read" {
					t.Errorf("read after Close: %v; want net.ErrClosed in a *net.OpError", err)
				}
				if _, err := server.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
					t.Errorf("write after Close: %v; want net.ErrClosed", err)
				}
				if err := server.Close(); !errors.Is(err, net.ErrClosed) {
					t.Errorf("second Close: %v; want net.ErrClosed", err)
				}
				for name, err := range map[string]error{
					"SetDeadline": server.SetDeadline(time.Now()),
					"CloseWrite":  server.CloseWrite(),
					"SetNoDelay":  server.SetNoDelay(true),
				} {
					if !errors.Is(err, net.ErrClosed) {
						t.Errorf("%s after Close: %v; want net.ErrClosed", name, err)
					}
				}
				if _, err := server.ReadFrom(bytes.NewReader([]byte("x"))); !errors.Is(err, net.ErrClosed) {
					t.Errorf("ReadFrom after Close: %v; want net.ErrClosed", err)
				}
			})
			t.Run("CloseWrite", func(t *testing.T) {
				client, server := kind.pair(t)
				if err := server.CloseWrite(); err != nil {
					t.Fatal(err)
				}
				client.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Fatalf("client read %d, %v; want io.EOF after CloseWrite", n, err)
				}
				client.Write([]byte("still open"))
				readExactly(t, server, "still open")
			})
			t.Run("options", func(t *testing.T) {
				_, server := kind.pair(t)
				must := func(err error) {
					t.Helper()
					if err != nil {
						t.Fatal(err)
					}
				}
				must(server.SetNoDelay(false))
				must(server.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 30 * time.Second, Interval: 2500 * time.Millisecond, Count: 4}))
				must(server.SetReadBuffer(64 << 10))
				must(server.SetLinger(3))
				got := sockOpts(t, server)
				want := map[string]int{"TCP_NODELAY": 0, "SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 3, "TCP_KEEPCNT": 4, "SO_LINGER": 3}
				for k, v := range want {
					if got[k] != v {
						t.Errorf("%s = %d, want %d", k, got[k], v)
					}
				}
				if got["SO_RCVBUF"] < 64<<10 {
					t.Errorf("SO_RCVBUF = %d, want at least 64 KiB", got["SO_RCVBUF"])
				}
				must(server.SetKeepAlivePeriod(0)) // net's default
				must(server.SetKeepAlive(false))
				if got := sockOpts(t, server); got["TCP_KEEPIDLE"] != 15 || got["SO_KEEPALIVE"] != 0 {
					t.Errorf("after SetKeepAlivePeriod(0), SetKeepAlive(false): %v", got)
				}
			})
			t.Run("File", func(t *testing.T) {
				client, server := kind.pair(t)
				f, err := server.File()
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.Write([]byte("through the copy")); err != nil {
					t.Fatal(err)
				}
				readExactly(t, client, "through the copy")
			})
			t.Run("ReadFrom", func(t *testing.T) {
				client, server := kind.pair(t)
				data := make([]byte, 3<<20+123)
				for i := range data {
					data[i] = byte(i * 7)
				}
				f := openFile(t, writeTempFile(t, data))
				pr := pipeOf(t, data[:5000])
				// A part (as http.ServeContent sends a range), the rest
				// of the file from its offset, and a pipe's bytes, which
				// sendfile cannot send from.
				got := make(chan []byte, 1)
				want := len(data) - 100 + 5000
				go func() {
					b := make([]byte, want)
					client.SetReadDeadline(time.Now().Add(10 * time.Second))
					n, _ := io.ReadFull(client, b)
					got <- b[:n]
				}()
				f.Seek(100, io.SeekStart)
				lr := &io.LimitedReader{R: f, N: 1 << 20}
				if n, err := server.ReadFrom(lr); n != 1<<20 || err != nil || lr.N != 0 {
					t.Fatalf("ReadFrom a part of a file: %d, %v, %d left; want 1 MiB", n, err, lr.N)
				}
				if n, err := server.ReadFrom(f); n != int64(len(data)-100-1<<20) || err != nil {
					t.Fatalf("ReadFrom the rest of the file: %d, %v", n, err)
				}
				if n, err := server.ReadFrom(pr); n != 5000 || err != nil {
					t.Fatalf("ReadFrom a pipe: %d, %v", n, err)
				}
				b := <-got
				exp := append(append(bytes.Clone(data[100:100+1<<20]), data[100+1<<20:]...), data[:5000]...)
				if !bytes.Equal(b, exp) {
					t.Fatalf("the client got %d bytes, not the %d sent", len(b), len(exp))
				}
			})
			t.Run("ReadFrom past a write deadline", func(t *testing.T) {
				_, server := kind.pair(t) // the client reads nothing
				f, err := os.Create(filepath.Join(t.TempDir(), "sparse"))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				const size = 256 << 20 // more than the socket buffers hold
				if err := f.Truncate(size); err != nil {
					t.Fatal(err)
				}
				server.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
				lr := &io.LimitedReader{R: f, N: size}
				n, err := server.ReadFrom(lr)
				var ne net.Error
				if n <= 0 || n >= size || !errors.As(err, &ne) || !ne.Timeout() || lr.N != size-n {
					t.Fatalf("ReadFrom past the deadline: %d bytes, %v, %d left; want some bytes, a timeout, and the rest left", n, err, lr.N)
				}
				if off, _ := f.Seek(0, io.SeekCurrent); off != n {
					t.Errorf("the file's offset is %d after %d bytes sent", off, n)
				}
			})
			t.Run("WriteTo", func(t *testing.T) {
				client, server := kind.pair(t)
				data := bytes.Repeat([]byte("0123456789"), 10_000)
				go func() {
					client.Write(data)
					client.(*net.TCPConn).CloseWrite()
				}()
				var buf bytes.Buffer
				if n, err := server.WriteTo(&buf); n != int64(len(data)) || err != nil || !bytes.Equal(buf.Bytes(), data) {
					t.Fatalf("WriteTo: %d, %v; want the %d bytes sent", n, err, len(data))
				}
			})
		})
	}
}

// sockOpts reads c's options that TestHandedConnAsNetTCPConn sets.
func sockOpts(t *testing.T, c syscall.Conn) map[string]int {
	t.Helper()
	got, err := readSockOpts(c)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// readSockOpts reads c's TCP_NODELAY, keep-alive, SO_RCVBUF and
// SO_LINGER (absent when off).
func readSockOpts(c syscall.Conn) (map[string]int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	got := map[string]int{}
	var errs []error
	rc.Control(func(fd uintptr) {
		for _, o := range []struct {
			name       string
			level, opt int
		}{
			{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY},
			{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE},
			{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE},
			{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL},
			{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT},
			{"SO_RCVBUF", unix.SOL_SOCKET, unix.SO_RCVBUF},
		} {
			v, err := unix.GetsockoptInt(int(fd), o.level, o.opt)
			if err != nil {
				errs = append(errs, fmt.Errorf("getsockopt %s: %w", o.name, err))
			}
			got[o.name] = v
		}
		l, err := unix.GetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER)
		if err != nil {
			errs = append(errs, fmt.Errorf("getsockopt SO_LINGER: %w", err))
		} else if l.Onoff != 0 {
			got["SO_LINGER"] = int(l.Linger)
		}
	})
	return got, errors.Join(errs...)
}

func init() {
	// /conn hijacks the connection and answers what the worker serves
	// it through ("*net.TCPConn", "*defuss.handedConn", "defuss.unixConn") and its
	// options, as "NAME=VALUE" words.
	platformRoutes["/conn"] = func(w http.ResponseWriter, r *http.Request) {
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer c.Close()
		body := fmt.Sprintf("%T", c)
		if wc, ok := c.(*workerConn); ok {
			opts, err := readSockOpts(wc)
			body = fmt.Sprintf("%T", wc.tcpConn)
			for _, k := range []string{"TCP_NODELAY", "SO_KEEPALIVE", "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"} {
				body += fmt.Sprintf(" %s=%d", k, opts[k])
			}
			if err != nil {
				body += " " + err.Error()
			}
		}
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	}
}

// netOpts is what /conn answers after the type for a connection with the
// options net's Accept sets.
const netOpts = "TCP_NODELAY=1 SO_KEEPALIVE=1 TCP_KEEPIDLE=15 TCP_KEEPINTVL=15 TCP_KEEPCNT=9"

// In hand-off mode a worker serves each connection with the options
// net's Accept sets, as a handedConn, which sets none of them: the
// primary's listener gave them. (In splice mode the primary's sockets
// have them: TestPublicConnectionsKeepAlive.)
func TestHandedOffConnectionsHaveNetsOptions(t *testing.T) {
	s := startTest(t, WithHandoff(true))
	want := "*defuss.handedConn " + netOpts
	for range 3 {
		if code, got := get(t, s.Addr().String(), "/conn"); code != http.StatusOK || got != want {
			t.Fatalf("/conn answered %d %q, want %q", code, got, want)
		}
	}
}

// A WithListener listener keeps its owner's options, and the raw accept
// loop sets none on what it accepts: so in hand-off mode a worker serves
// those connections with net.FileConn, which sets net's, as before
// handedConn.
func TestHandedOffWithListenerConnectionsGetNetsOptions(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := startTest(t, WithListener(ln), WithHandoff(true))
	want := "*net.TCPConn " + netOpts
	if code, got := get(t, s.Addr().String(), "/conn"); code != http.StatusOK || got != want {
		t.Fatalf("/conn answered %d %q, want %q", code, got, want)
	}
}

// http.ServeFile serves a file whole and in ranges, in both modes (in
// hand-off mode, with handedConn's sendfile).
func TestServeFile(t *testing.T) {
	data := make([]byte, 1<<20+333)
	for i := range data {
		data[i] = byte(i * 13)
	}
	path := filepath.Join(t.TempDir(), "data.bin")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startTest(t)
	url := "http://" + s.Addr().String() + "/file?path=" + path
	for _, tc := range []struct {
		rng  string
		want []byte
	}{
		{"", data},
		{"bytes=100-70099", data[100:70100]},
		{"bytes=-5000", data[len(data)-5000:]},
	} {
		req, _ := http.NewRequest("GET", url, nil)
		if tc.rng != "" {
			req.Header.Set("Range", tc.rng)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Fatalf("Range %q: %s, %d bytes (%v); want %d bytes of the file", tc.rng, resp.Status, len(got), err, len(tc.want))
		}
	}
}

// A descriptor that is not non-blocking cannot be served with deadlines:
// newHandedConn refuses it, and closes it.
func TestHandedConnRefusesABlockingSocket(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fds[1], true) // in Go's poller, for its deadline
	peer := os.NewFile(uintptr(fds[1]), "peer")
	defer peer.Close()
	if c, err := newHandedConn(fds[0], netip.MustParseAddrPort("127.0.0.1:1")); err == nil {
		c.Close()
		t.Fatal("a blocking socket was taken")
	}
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := peer.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("the refused socket's peer read %d, %v; want EOF: the descriptor was not closed", n, err)
	}
}

// ReadFrom sends a file, or a part of one, with sendfile(2), and copies
// what sendfile cannot send from.
func TestHandedConnSendsFilesWithSendfile(t *testing.T) {
	client, server := handedPair(t)
	go io.Copy(io.Discard, client)
	path := writeTempFile(t, bytes.Repeat([]byte("x"), 100_000))
	f, f2, dir := openFile(t, path), openFile(t, path), openFile(t, t.TempDir())
	pr := pipeOf(t, []byte("piped"))
	hc := server.(*handedConn)
	for _, tc := range []struct {
		name    string
		r       io.Reader
		handled bool
		n       int64
	}{
		{"part of a file", &io.LimitedReader{R: f, N: 30_000}, true, 30_000},
		{"the rest of the file", f, true, 70_000},
		{"a directory", dir, false, 0},
		{"a pipe", pr, false, 0},
		{"a file in a wrapper, as io.Copy passes os's", struct{ *os.File }{f2}, true, 100_000},
		{"bytes", bytes.NewReader([]byte("bytes")), false, 0},
	} {
		n, handled, err := sendFile(hc.io.rc, tc.r)
		if n != tc.n || handled != tc.handled || err != nil {
			t.Errorf("%s: sendFile = %d, %v, %v; want %d, %v", tc.name, n, handled, err, tc.n, tc.handled)
		}
	}
}

// writeTempFile writes b to a new file in the test's directory, and
// returns its path.
func writeTempFile(t *testing.T, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// openFile opens path for reading until the test ends.
func openFile(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// pipeOf is the read end of a pipe that holds b (at most a pipe buffer,
// 64 KiB on Linux) and is closed at its other end.
func pipeOf(t *testing.T, b []byte) *os.File {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
	_, err = pw.Write(b)
	pw.Close()
	if err != nil {
		t.Fatal(err)
	}
	return pr
}
