//go:build linux

package defuss

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketLingers tells a listening socket whose accepted sockets may wait
// when closed: SO_LINGER on with a time. Off, or on with 0 (a reset at
// close, which does not wait), does not; a listener it cannot ask does.
func TestSocketLingers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		linger *unix.Linger
		want   bool
	}{
		{"net's default", nil, false},
		{"on, 5 s", &unix.Linger{Onoff: 1, Linger: 5}, true},
		{"on, 0 s", &unix.Linger{Onoff: 1, Linger: 0}, false},
		{"off, 5 s", &unix.Linger{Onoff: 0, Linger: 5}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln := lingeringListener(t, tc.linger)
			if got := socketLingers(ln); got != tc.want {
				t.Fatalf("socketLingers = %v, want %v", got, tc.want)
			}
		})
	}
	uln, err := net.Listen("unix", "@defuss-test-lingers-"+t.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer uln.Close()
	if !socketLingers(uln) {
		t.Fatal("socketLingers of a Unix listener = false, want true: it cannot be asked")
	}
}

// lingeringListener listens on loopback with SO_LINGER set to l (none:
// net's default) until the test ends.
func lingeringListener(t *testing.T, l *unix.Linger) *net.TCPListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if l != nil {
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, l) }); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
	}
	return ln.(*net.TCPListener)
}

// A WithListener listener with SO_LINGER is seen (primary.lingers, which
// makes closeClient close through the scheduler) and served as any
// other, in both modes, on keep-alive and Connection: close. Which close
// runs is not observed here: on loopback neither waits.
func TestLingeringListenerIsServed(t *testing.T) {
	ln := lingeringListener(t, &unix.Linger{Onoff: 1, Linger: 5})
	s := startTest(t, WithListener(ln))
	if !s.p.lingers {
		t.Fatal("primary.lingers = false for a listener with SO_LINGER 5 s")
	}
	addr := s.Addr().String()
	for i := range 20 {
		req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
		req.Close = i%2 == 0
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || len(body) == 0 {
			t.Fatalf("request %d: %s, %q, %v", i, resp.Status, body, err)
		}
	}
}

// A primary on net's own listener closes without the scheduler.
func TestPrimaryOnItsOwnListenerDoesNotLinger(t *testing.T) {
	s := startTest(t)
	if s.p.lingers {
		t.Fatal("primary.lingers = true on the primary's own listener")
	}
	if code, _ := get(t, s.Addr().String(), "/"); code != http.StatusOK {
		t.Fatalf("GET / answered %d", code)
	}
}

// pipeReader reads a non-blocking pipe with raw reads: what was written,
// then io.EOF once the write end is closed; after its file is closed, an
// error. A blocking pipe, which Go's poller does not hold, is read
// through its file.
func TestPipeReader(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	pr := pipeReader(r)
	if _, ok := pr.(*rawStream); !ok {
		t.Fatalf("pipeReader of os.Pipe's read end is %T, want *rawStream", pr)
	}
	want := bytes.Repeat([]byte("frame"), 20000) // more than a pipe holds: the reads wait
	go func() {
		w.Write(want)
		w.Close()
	}()
	if n, err := pr.Read(nil); n != 0 || err != nil {
		t.Fatalf("Read(nil) = %d, %v; want 0, nil", n, err)
	}
	got, err := io.ReadAll(pr)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("ReadAll: %d bytes, %v; want the %d written and EOF", len(got), err, len(want))
	}
	if n, err := pr.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("Read after EOF = %d, %v; want 0, EOF", n, err)
	}
	r.Close()
	if _, err := pr.Read(make([]byte, 8)); err == nil || err == io.EOF {
		t.Fatalf("Read of a closed file: %v, want an error other than EOF", err)
	}

	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	br, bw := os.NewFile(uintptr(fds[0]), "blocking-r"), os.NewFile(uintptr(fds[1]), "blocking-w")
	defer br.Close()
	defer bw.Close()
	if got := pipeReader(br); got != io.Reader(br) {
		t.Fatalf("pipeReader of a blocking pipe is %T, want the *os.File itself", got)
	}
}

// unixPair is a connected pair of Unix stream sockets on an abstract
// name: the client as net's, the server as the worker's unixConn, with
// raw reads and writes or, for comparison, without (net's own).
func unixPair(t *testing.T, raw bool) (client *net.UnixConn, server unixConn) {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: "@defuss-test-" + t.Name(), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.DialUnix("unix", nil, ln.Addr().(*net.UnixAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	sc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.Close() })
	server = unixConn{UnixConn: sc}
	if raw {
		server = newUnixConn(sc)
		if server.raw == nil {
			t.Fatal("newUnixConn made no raw stream")
		}
	}
	return client, server
}

// The worker's side of a worker-socket connection reads and writes with
// raw calls (rawStream) and gives what *net.UnixConn gives, each check
// run on both: the errors net/http tells apart, a write larger than the
// socket holds, which waits for the reader, and a read and a write at
// once.
func TestUnixConnAsNetUnixConn(t *testing.T) {
	for _, raw := range []bool{false, true} {
		name := "net.UnixConn"
		if raw {
			name = "rawStream"
		}
		t.Run(name, func(t *testing.T) {
			t.Run("read timeout", func(t *testing.T) {
				_, server := unixPair(t, raw)
				server.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
				_, err := server.Read(make([]byte, 1))
				var ne net.Error
				var oe *net.OpError
				if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) ||
					!errors.As(err, &oe) || oe.Op != "read" || oe.Net != "unix" {
					t.Fatalf("read past the deadline: %#v; want a *net.OpError \"read\" that is a timeout", err)
				}
				if inner := (*net.OpError)(nil); errors.As(oe.Err, &inner) {
					t.Fatalf("read past the deadline: %v; a *net.OpError in a *net.OpError", err)
				}
			})
			t.Run("write timeout", func(t *testing.T) {
				_, server := unixPair(t, raw)
				server.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
				n, err := server.Write(make([]byte, 64<<20)) // more than a socket holds: nobody reads
				var oe *net.OpError
				if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &oe) || oe.Op != "write" || n < 0 || n >= 64<<20 {
					t.Fatalf("write past the deadline: %d, %v; want less than all written and a *net.OpError \"write\" that is a timeout", n, err)
				}
			})
			t.Run("EOF", func(t *testing.T) {
				client, server := unixPair(t, raw)
				client.Write([]byte("ab"))
				client.Close()
				readExactly(t, server, "ab")
				if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Fatalf("read after the peer's close: %d, %v; want io.EOF", n, err)
				}
				if n, err := server.Read(nil); n != 0 || err != nil {
					t.Fatalf("empty read: %d, %v; want 0, nil", n, err)
				}
			})
			t.Run("closed", func(t *testing.T) {
				_, server := unixPair(t, raw)
				if err := server.Close(); err != nil {
					t.Fatal(err)
				}
				_, err := server.Read(make([]byte, 1))
				var oe *net.OpError
				if !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) || oe.Op != "read" || oe.Err != net.ErrClosed {
					t.Errorf("read after Close: %v; want net.ErrClosed in a *net.OpError", err)
				}
				if _, err := server.Write([]byte("x")); !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) || oe.Op != "write" || oe.Err != net.ErrClosed {
					t.Errorf("write after Close: %v; want net.ErrClosed in a *net.OpError", err)
				}
			})
			t.Run("peer gone", func(t *testing.T) {
				client, server := unixPair(t, raw)
				client.Close()
				_, err := server.Write([]byte("x"))
				var se *os.SyscallError
				if !errors.Is(err, unix.EPIPE) || !errors.As(err, &se) || se.Syscall != "write" {
					t.Fatalf("write to a closed peer: %#v; want EPIPE as a *os.SyscallError \"write\"", err)
				}
			})
			t.Run("large write and a read at once", func(t *testing.T) {
				client, server := unixPair(t, raw)
				big := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
				done := make(chan error, 1)
				go func() {
					n, err := server.Write(big)
					if err == nil && n != len(big) {
						err = io.ErrShortWrite
					}
					done <- err
				}()
				client.Write([]byte("ping"))
				readExactly(t, server, "ping") // while the write waits for room
				got := make([]byte, len(big))
				if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, big) {
					t.Fatalf("client read: %v, equal %v", err, bytes.Equal(got, big))
				}
				if err := <-done; err != nil {
					t.Fatalf("write: %v", err)
				}
			})
		})
	}
}

// TestUnixConnSendsFilesWithSendfile: a splice-mode worker's connection
// on its Unix socket sends a regular file, whole or a part of one (as
// http.ServeFile sends it), with sendfile(2), also more than the socket
// holds while its reader reads, and copies what sendfile cannot send
// from; every byte arrives in order. A unixConn without a raw stream leaves files to
// io.Copy.
func TestUnixConnSendsFilesWithSendfile(t *testing.T) {
	client, server := unixPair(t, true)
	data := make([]byte, 6<<20) // more than the socket holds
	for i := range data {
		data[i] = byte(i*7 + i>>11)
	}
	path := writeTempFile(t, data)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(client)
		got <- b
	}()
	f, f2, dir := openFile(t, path), openFile(t, path), openFile(t, t.TempDir())
	server.SetWriteDeadline(time.Now().Add(10 * time.Second)) // a send that never ends fails
	var want []byte
	for _, tc := range []struct {
		name    string
		r       io.Reader
		handled bool
		sent    []byte
	}{
		{"part of a file", &io.LimitedReader{R: f, N: 100_000}, true, data[:100_000]},
		{"the rest of the file", f, true, data[100_000:]},
		{"a directory", dir, false, nil},
		{"a pipe", pipeOf(t, []byte("piped")), false, nil},
		{"a file in a wrapper, as io.Copy passes os's", struct{ *os.File }{f2}, true, data},
		{"bytes", bytes.NewReader([]byte("bytes")), false, nil},
	} {
		n, handled, err := rawSendFile(server.raw, tc.r)
		if n != int64(len(tc.sent)) || handled != tc.handled || err != nil {
			t.Errorf("%s: rawSendFile = %d, %v, %v; want %d, %v", tc.name, n, handled, err, len(tc.sent), tc.handled)
		}
		want = append(want, tc.sent...)
	}
	// ReadFrom, as net/http calls it: a part of a file, which only
	// sendfile can send (the file's Read fails), then bytes.
	if n, err := server.ReadFrom(&io.LimitedReader{R: unreadable{openFile(t, path)}, N: 12345}); n != 12345 || err != nil {
		t.Errorf("ReadFrom of a part of a file = %d, %v; want 12345 sent with sendfile", n, err)
	}
	if n, err := server.ReadFrom(strings.NewReader("tail")); n != 4 || err != nil {
		t.Errorf("ReadFrom of bytes = %d, %v; want 4", n, err)
	}
	want = append(append(want, data[:12345]...), "tail"...)
	if err := server.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, want) {
			t.Errorf("the reader got %d bytes, not the %d sent in order", len(b), len(want))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the reader did not get EOF within 10s")
	}

	_, plain := unixPair(t, false)
	if n, handled, err := rawSendFile(plain.raw, openFile(t, path)); handled || n != 0 || err != nil {
		t.Errorf("without a raw stream: rawSendFile = %d, %v, %v; want it unhandled", n, handled, err)
	}
}

// unreadable is a file whose Read fails: only sendfile sends it.
type unreadable struct{ *os.File }

func (unreadable) Read([]byte) (int, error) { return 0, errors.New("read: a copy, not sendfile") }
