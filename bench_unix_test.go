//go:build unix

package defuss

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"golang.org/x/sys/unix"
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

// BenchmarkHandoffConn is one whole connection through the primary's
// hand-off path on real loopback sockets: peek, parse, balance, pass the
// descriptor over a real hand-off socket pair, forget the connection. A
// goroutine stands in for the worker: it receives each descriptor and
// closes it.
func BenchmarkHandoffConn(b *testing.B) {
	ours, theirs, err := handoffPair()
	if err != nil {
		b.Fatal(err)
	}
	defer ours.Close()
	worker, err := net.FileConn(theirs)
	theirs.Close()
	if err != nil {
		b.Fatal(err)
	}
	defer worker.Close()
	go discardHandedOff(worker.(*net.UnixConn))
	p := newTestPrimary(b, nil, optionFunc(func(c *config) {
		c.logger = slog.New(slog.DiscardHandler)
		c.handoff = true
	}), "127.0.0.1:1")
	v := p.pool.view.Load()
	v.cands[0].proc = &process{handoffSock: ours}
	v.cands[0].proc.handoffVersion.Store(uint32(handoffV3)) // as a worker of this version announces
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	head := browserHead(b)
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
		client.Write(head)
		p.admit(server)
		p.serveConn(server) // hands off and returns
		client.Close()
	}
}

// discardHandedOff receives descriptors on uc and closes them, until uc
// closes.
func discardHandedOff(uc *net.UnixConn) {
	b := make([]byte, 64)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		_, oobn, _, _, err := uc.ReadMsgUnix(b, oob)
		if err != nil {
			return
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			fds, _ := unix.ParseUnixRights(&m)
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}
}
