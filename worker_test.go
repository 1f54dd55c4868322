package defuss

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"
)

// Issue 12: the workers serve with the settings of the program's own
// server; where it leaves a timeout to net/http's "none", a default stops
// idle and slow clients from holding connections forever.
func TestServerFor(t *testing.T) {
	h := http.NotFoundHandler()
	var ours []http.ConnState
	connState := func(_ net.Conn, st http.ConnState) { ours = append(ours, st) }
	errorLog := log.New(nil, "defuss", 0)

	t.Run("defaults", func(t *testing.T) {
		srv := serverFor(nil, h, connState, errorLog)
		if srv.ReadHeaderTimeout != DefaultReadHeaderTimeout || srv.IdleTimeout != DefaultIdleTimeout ||
			srv.ReadTimeout != 0 || srv.WriteTimeout != 0 || srv.ErrorLog != errorLog {
			t.Fatalf("default server: %+v", srv)
		}
	})

	t.Run("user settings", func(t *testing.T) {
		var theirs []http.ConnState
		type key struct{}
		userLog := log.New(nil, "user", 0)
		var protocols http.Protocols
		protocols.SetHTTP1(true)
		protocols.SetUnencryptedHTTP2(true)
		user := &http.Server{
			ReadTimeout: 3 * time.Second, ReadHeaderTimeout: time.Second, WriteTimeout: 4 * time.Second,
			IdleTimeout: 5 * time.Second, MaxHeaderBytes: 4096, ErrorLog: userLog,
			BaseContext: func(net.Listener) context.Context { return context.WithValue(context.Background(), key{}, 1) },
			ConnContext: func(ctx context.Context, _ net.Conn) context.Context { return ctx },
			ConnState:   func(_ net.Conn, st http.ConnState) { theirs = append(theirs, st) },
			Protocols:   &protocols, DisableGeneralOptionsHandler: true,
		}
		srv := serverFor(user, h, connState, errorLog)
		if srv.ReadTimeout != 3*time.Second || srv.ReadHeaderTimeout != time.Second || srv.WriteTimeout != 4*time.Second ||
			srv.IdleTimeout != 5*time.Second || srv.MaxHeaderBytes != 4096 || srv.ErrorLog != userLog ||
			srv.BaseContext == nil || srv.ConnContext == nil || srv.Protocols != &protocols || !srv.DisableGeneralOptionsHandler {
			t.Fatalf("server does not carry the user's settings: %+v", srv)
		}
		if srv.BaseContext(nil).Value(key{}) != 1 {
			t.Error("BaseContext is not the user's")
		}
		srv.ConnState(nil, http.StateNew)
		if len(ours) == 0 || len(theirs) != 1 || theirs[0] != http.StateNew {
			t.Errorf("ConnState: defuss saw %v, the user's hook %v; want both", ours, theirs)
		}
		if srv.Handler == nil {
			t.Error("no handler")
		}
	})

	t.Run("ReadTimeout alone bounds headers and idle time", func(t *testing.T) {
		srv := serverFor(&http.Server{ReadTimeout: 7 * time.Second}, h, connState, errorLog)
		if srv.ReadHeaderTimeout != 0 || srv.IdleTimeout != 0 {
			t.Fatalf("ReadHeaderTimeout %v, IdleTimeout %v; want both left to ReadTimeout", srv.ReadHeaderTimeout, srv.IdleTimeout)
		}
	})

	t.Run("TLS offers HTTP/2 by ALPN unless it is off", func(t *testing.T) {
		cert := tls.Certificate{Certificate: [][]byte{{1}}}
		user := &http.Server{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
		if got := serverFor(user, h, connState, errorLog).TLSConfig.NextProtos; !slices.Equal(got, []string{"h2", "http/1.1"}) {
			t.Errorf("NextProtos %q, want h2 and http/1.1", got)
		}
		if user.TLSConfig.NextProtos != nil {
			t.Error("the user's TLSConfig was changed")
		}
		var p http.Protocols
		p.SetHTTP1(true)
		user.Protocols = &p
		if got := serverFor(user, h, connState, errorLog).TLSConfig.NextProtos; !slices.Equal(got, []string{"http/1.1"}) {
			t.Errorf("with HTTP/2 off: NextProtos %q, want http/1.1 only", got)
		}
	})

	t.Run("negative turns a timeout off", func(t *testing.T) {
		srv := serverFor(&http.Server{IdleTimeout: -1, ReadHeaderTimeout: -1}, h, connState, errorLog)
		if srv.ReadHeaderTimeout != -1 || srv.IdleTimeout != -1 {
			t.Fatalf("ReadHeaderTimeout %v, IdleTimeout %v; want -1 kept", srv.ReadHeaderTimeout, srv.IdleTimeout)
		}
	})
}

// chunkRecorder records the size of each Write, and fails the one at
// index failAt (if ≥ 0) after taking half of it.
type chunkRecorder struct {
	sizes  []int
	got    []byte
	failAt int
}

func (r *chunkRecorder) Write(b []byte) (int, error) {
	r.sizes = append(r.sizes, len(b))
	if len(r.sizes)-1 == r.failAt {
		r.got = append(r.got, b[:len(b)/2]...)
		return len(b) / 2, errors.New("broken pipe")
	}
	r.got = append(r.got, b...)
	return len(b), nil
}

// A worker's connection writes a large body in pieces of writeChunk and
// lets other goroutines run between them; up to writeChunk goes in one
// Write, as before; an error stops it with the count of what went.
func TestWriteChunked(t *testing.T) {
	body := make([]byte, 1<<20+1)
	for i := range body {
		body[i] = byte(i % 251)
	}
	for _, c := range []struct {
		name       string
		n, failAt  int
		wantSizes  []int
		wantYields int
		wantN      int
		wantErr    bool
	}{
		{"empty", 0, -1, []int{0}, 0, 0, false},
		{"small", 13, -1, []int{13}, 0, 13, false},
		{"one chunk", writeChunk, -1, []int{writeChunk}, 0, writeChunk, false},
		{"one byte more", writeChunk + 1, -1, []int{writeChunk, 1}, 1, writeChunk + 1, false},
		{"1 MiB and a byte", 1<<20 + 1, -1, append(slices.Repeat([]int{writeChunk}, 16), 1), 16, 1<<20 + 1, false},
		{"fails in the third piece", 1 << 20, 2, slices.Repeat([]int{writeChunk}, 3), 2, 2*writeChunk + writeChunk/2, true},
	} {
		r := &chunkRecorder{failAt: c.failAt}
		yields := 0
		n, err := writeChunked(r, body[:c.n], func() { yields++ })
		if n != c.wantN || (err != nil) != c.wantErr {
			t.Errorf("%s: wrote %d (%v), want %d (error %v)", c.name, n, err, c.wantN, c.wantErr)
		}
		if !slices.Equal(r.sizes, c.wantSizes) || yields != c.wantYields {
			t.Errorf("%s: writes %v and %d yields, want %v and %d", c.name, r.sizes, yields, c.wantSizes, c.wantYields)
		}
		if !bytes.Equal(r.got, body[:n]) {
			t.Errorf("%s: the bytes written are not the body's first %d", c.name, n)
		}
	}
}

// shortWriter takes half of every write and reports no error.
type shortWriter struct{}

func (shortWriter) Write(b []byte) (int, error) { return len(b) / 2, nil }

// A writer that takes less than a piece without saying why stops the
// write with io.ErrShortWrite, rather than skipping what it left.
func TestWriteChunkedShortWrite(t *testing.T) {
	n, err := writeChunked(shortWriter{}, make([]byte, 3*writeChunk), func() {})
	if n != writeChunk/2 || !errors.Is(err, io.ErrShortWrite) {
		t.Fatalf("wrote %d (%v), want %d and io.ErrShortWrite", n, err, writeChunk/2)
	}
}

// Two goroutines writing large buffers to one worker connection (a
// hijacked one, say) each get their buffer through whole, as with a
// net.TCPConn: the pieces of one never land among the other's. (Found in
// review: they could, once large writes went in pieces.)
func TestWorkerConnWritesStayWhole(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	wc := &workerConn{TCPConn: server.(*net.TCPConn)}
	const size = 8 * writeChunk
	done := make(chan error, 2)
	for _, c := range []byte("ab") {
		go func() {
			_, err := wc.Write(bytes.Repeat([]byte{c}, size))
			done <- err
		}()
	}
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 2*size)
	if _, err := io.ReadFull(client, got); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	first, second := got[:size], got[size:]
	if !bytes.Equal(first, bytes.Repeat(first[:1], size)) || !bytes.Equal(second, bytes.Repeat(second[:1], size)) {
		t.Fatalf("the two writes interleaved: the first %d bytes hold %d a's and %d b's", size, bytes.Count(first, []byte("a")), bytes.Count(first, []byte("b")))
	}
}
