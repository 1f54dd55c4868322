//go:build unix

package defuss

import (
	"io"
	"log/slog"
	"net"
	"testing"
)

// BenchmarkServeConn is one whole connection through the primary's
// connection path on real loopback sockets: sniff, parse, balance, dial,
// PROXY header, splice both ways, close; the worker is a raw echo server.
func BenchmarkServeConn(b *testing.B) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	p := newTestPrimary(b, nil, WithLogger(slog.New(slog.DiscardHandler)), echo.Addr().String())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	head := browserHead(b)
	reply := make([]byte, len(head)+64)
	b.ReportAllocs()
	for b.Loop() {
		client, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		server, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		p.admit(server)
		done := make(chan struct{})
		go func() {
			p.serveConn(server)
			close(done)
		}()
		client.Write(head)
		client.(*net.TCPConn).CloseWrite()
		n, _ := io.ReadFull(client, reply[:proxyV2Len(head)])
		if n == 0 {
			b.Fatal("no echo")
		}
		io.Copy(io.Discard, client)
		client.Close()
		<-done
	}
}

// proxyV2Len is what the echo returns first: the PROXY header the primary
// wrote (IPv4, with the secret TLV), then the head.
func proxyV2Len(head []byte) int { return 16 + 12 + 3 + secretLen + len(head) }
