//go:build linux

package defuss

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"os"
	"testing"

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

// A WithListener listener with SO_LINGER is served as any other, in both
// modes, with the primary closing its client sockets through the
// scheduler (closeClient), as a close that may wait must be.
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
	if _, ok := pr.(*rawPipeReader); !ok {
		t.Fatalf("pipeReader of os.Pipe's read end is %T, want *rawPipeReader", pr)
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
