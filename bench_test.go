package defuss

import (
	"bytes"
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
