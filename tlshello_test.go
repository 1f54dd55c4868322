package defuss

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"slices"
	"testing"
)

// helloFor is the first TLS record a real crypto/tls client sends with
// cfg: its ClientHello.
func helloFor(tb testing.TB, cfg *tls.Config) []byte {
	tb.Helper()
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = tls.Client(client, cfg).Handshake() // fails once the pipe closes
	}()
	defer func() {
		server.Close()
		client.Close()
		<-done
	}()
	rec := make([]byte, 5)
	if _, err := io.ReadFull(server, rec); err != nil {
		tb.Fatal(err)
	}
	rec = append(rec, make([]byte, binary.BigEndian.Uint16(rec[3:5]))...)
	if _, err := io.ReadFull(server, rec[5:]); err != nil {
		tb.Fatal(err)
	}
	return rec
}

// Issue 12: the primary reads the server name and the ALPN list of a
// ClientHello, with crypto/tls itself, so that a Balancer can route by
// name; the HTTP/2 preface is "h2c".
func TestClassify(t *testing.T) {
	hello := helloFor(t, &tls.Config{ServerName: "app.example", NextProtos: []string{"h2", "http/1.1"}})
	noSNI := helloFor(t, &tls.Config{InsecureSkipVerify: true})
	for _, tc := range []struct {
		name  string
		in    []byte
		proto string
		host  string
		alpn  []string
	}{
		{"ClientHello", hello, ProtocolTLS, "app.example", []string{"h2", "http/1.1"}},
		{"ClientHello and more", append(slices.Clone(hello), 0x17, 3, 3, 0, 1, 0), ProtocolTLS, "app.example", []string{"h2", "http/1.1"}},
		{"ClientHello without SNI", noSNI, ProtocolTLS, "", nil},
		{"ClientHello cut short", hello[:len(hello)/2], ProtocolTLS, "", nil},
		{"record header only", hello[:5], ProtocolTLS, "", nil},
		{"TLS record of garbage", []byte{0x16, 3, 1, 0, 4, 1, 0, 0, 9}, ProtocolTLS, "", nil},
		{"h2c preface", []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), ProtocolH2C, "", nil},
		{"binary", []byte{0, 1, 2, 3, 4, 5}, ProtocolUnknown, "", nil},
		{"http1", []byte("GET / HTTP/1.1\r\nHost: h\r\n\r\n"), ProtocolHTTP1, "h", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r Request
			parseRequest(&r, tc.in)
			classify(&r, tc.in)
			if r.Protocol != tc.proto || r.Host != tc.host || !slices.Equal(r.ALPN, tc.alpn) {
				t.Fatalf("Protocol %q Host %q ALPN %q, want %q %q %q", r.Protocol, r.Host, r.ALPN, tc.proto, tc.host, tc.alpn)
			}
		})
	}
	// The primary stops sniffing at the end of the ClientHello's record.
	if !headComplete(hello, 0) || headComplete(hello[:len(hello)-1], 0) {
		t.Error("headComplete does not end at the ClientHello's record")
	}
}

// FuzzParseClientHello: any bytes, never a panic; a server name, when
// found, is one crypto/tls accepted from this very input.
func FuzzParseClientHello(f *testing.F) {
	hello := helloFor(f, &tls.Config{ServerName: "app.example", NextProtos: []string{"h2", "http/1.1"}})
	f.Add(hello)
	f.Add(hello[:len(hello)/2])
	f.Add(helloFor(f, &tls.Config{InsecureSkipVerify: true}))
	f.Add([]byte{0x16, 3, 1, 0, 0})
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Request
		parseRequest(&r, b)
		classify(&r, b)
		if r.Protocol == ProtocolTLS && tlsRecordLen(b) == 0 {
			t.Fatalf("tls without a TLS record header: % x", b[:min(len(b), 8)])
		}
		if r.Protocol != ProtocolTLS && len(r.ALPN) > 0 {
			t.Fatalf("ALPN set for %q", r.Protocol)
		}
		if hello, ok := parseClientHello(b); ok && hello.ServerName != "" && r.Protocol == ProtocolTLS && hello.ServerName != r.Host {
			t.Fatalf("server name %q, Host %q", hello.ServerName, r.Host)
		}
	})
}
