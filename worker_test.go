package defuss

import (
	"context"
	"crypto/tls"
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
