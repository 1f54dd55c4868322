package defuss

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"testing"
)

// browserHead is a typical browser GET, built by net/http.
func browserHead(b *testing.B) []byte {
	b.Helper()
	req, _ := http.NewRequest("GET", "http://shop.example.com/products/42?ref=home", nil)
	for k, v := range map[string]string{
		"User-Agent":      "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
		"Accept":          "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
		"Accept-Language": "en-US,en;q=0.9",
		"Accept-Encoding": "gzip, deflate, br",
		"Cookie":          "session=0123456789abcdef; theme=dark",
		"Referer":         "http://shop.example.com/",
	} {
		req.Header.Set(k, v)
	}
	var buf bytes.Buffer
	req.Write(&buf)
	return buf.Bytes()
}

// BenchmarkRoute is the per-connection decision: find the end of the head,
// parse it, and pick a worker with the default balancer, from a pooled
// Request, as serveConn does.
func BenchmarkRoute(b *testing.B) {
	head := browserHead(b)
	cands := make([]WorkerInfo, 4)
	for i := range cands {
		cands[i] = WorkerInfo{Index: i}
	}
	rr, fallback := RoundRobin(), RoundRobin()
	var pool sync.Pool
	pool.New = func() any { return new(Request) }
	b.ReportAllocs()
	b.SetBytes(int64(len(head)))
	for b.Loop() {
		if headEnd(head, 0) < 0 {
			b.Fatal("no head end")
		}
		req := pool.Get().(*Request)
		parseRequest(req, head)
		if req.Protocol != ProtocolHTTP1 {
			b.Fatal("not http1")
		}
		if _, res := pick(rr, fallback, req, cands); res != pickOK {
			b.Fatal(res)
		}
		req.reset()
		pool.Put(req)
	}
}

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
		p.track(server)
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
