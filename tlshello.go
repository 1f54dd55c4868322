package defuss

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"time"
)

// The primary recognises two kinds of connections besides HTTP/1: TLS,
// whose ClientHello it reads for the server name (SNI) and the ALPN list
// without terminating TLS, and HTTP/2 with prior knowledge (h2c), by its
// preface. Either way the bytes go to the worker unchanged.

// h2cPreface starts every HTTP/2 connection with prior knowledge; the
// primary sniffs up to its blank line, where an HTTP/1 head would end.
const h2cPreface = "PRI * HTTP/2.0\r\n\r\n"

// tlsRecordLen is the length of the TLS handshake record at the start of
// b, header included, or 0 if b does not start with one.
func tlsRecordLen(b []byte) int {
	if len(b) < 5 || b[0] != 0x16 || b[1] != 3 {
		return 0
	}
	return 5 + int(binary.BigEndian.Uint16(b[3:5]))
}

// headComplete reports whether b holds all that the primary inspects: a
// complete HTTP/1 head (looking for its end from from on), or a complete
// first TLS record.
func headComplete(b []byte, from int) bool {
	if n := tlsRecordLen(b); n > 0 {
		return len(b) >= n
	}
	return headEnd(b, from) >= 0
}

// classify recognises TLS and h2c in bytes that are not an HTTP/1 head,
// and fills in r: Protocol, and for TLS the server name as Host and the
// ALPN list.
func classify(r *Request, b []byte) {
	if r.Protocol != ProtocolUnknown {
		return
	}
	switch {
	case bytes.HasPrefix(b, []byte(h2cPreface)):
		r.Protocol = ProtocolH2C
	case tlsRecordLen(b) > 0:
		r.Protocol = ProtocolTLS
		if hello, ok := parseClientHello(b); ok {
			r.Host, r.ALPN = hello.ServerName, hello.SupportedProtos
		}
	}
}

// errHelloRead stops the handshake parseClientHello runs.
var errHelloRead = errors.New("defuss: ClientHello read")

// parseClientHello reads the ClientHello at the start of b with crypto/tls
// itself (as tcpproxy does): a server handshake on a connection that only
// replays b, stopped as soon as the ClientHello is parsed. It reports
// false when b holds no complete, valid ClientHello.
func parseClientHello(b []byte) (*tls.ClientHelloInfo, bool) {
	var hello *tls.ClientHelloInfo
	conn := tls.Server(&replayConn{r: bytes.NewReader(b)}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = &tls.ClientHelloInfo{ServerName: h.ServerName, SupportedProtos: h.SupportedProtos}
			return nil, errHelloRead
		},
	})
	conn.HandshakeContext(context.Background())
	return hello, hello != nil
}

// replayConn is a net.Conn that reads from r and discards what is written
// to it (the alert that ends parseClientHello's handshake).
type replayConn struct{ r io.Reader }

var _ net.Conn = (*replayConn)(nil)

func (c *replayConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *replayConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }
