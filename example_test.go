package defuss_test

import (
	"fmt"
	"hash/maphash"
	"log"
	"net/http"
	"os"
	"strings"

	"github.com/defuss-go/defuss"
)

// A whole program. Everything in main before Run also runs in every
// worker, so it should stay cheap. (This example is only compiled: running
// it would start workers.)
func Example() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from worker pid %d\n", os.Getpid())
	})
	// Listens on :3000 (or $PORT) with one worker per CPU, and returns
	// after a graceful shutdown on SIGINT or SIGTERM.
	if err := defuss.Run(mux); err != nil {
		log.Fatal(err)
	}
}

// A custom Balancer. Connections of one tenant (by the X-Tenant header) go
// to the same worker while the set of healthy workers stays the same, so
// that worker's in-memory cache stays warm; "/admin/" connections go to the
// first healthy worker; everything else goes round robin. (This example is
// only compiled: running it would start workers.)
func ExampleWithBalancer() {
	seed := maphash.MakeSeed() // the Balancer runs only in the primary
	rr := defuss.RoundRobin()
	byTenant := func(req *defuss.Request, cands []defuss.WorkerInfo) *defuss.WorkerInfo {
		// Header is "" for a missing header and for non-HTTP/1 bytes
		// (TLS, HTTP/2), which then take the round-robin path.
		if tenant := req.Header("X-Tenant"); tenant != "" {
			return &cands[maphash.String(seed, tenant)%uint64(len(cands))]
		}
		if strings.HasPrefix(req.Path, "/admin/") {
			return &cands[0]
		}
		return rr(req, cands)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "tenant %q served by pid %d\n", r.Header.Get("X-Tenant"), os.Getpid())
	})
	if err := defuss.Run(mux, defuss.WithBalancer(byTenant)); err != nil {
		log.Fatal(err)
	}
}

func ExampleRoundRobin() {
	b := defuss.RoundRobin()
	// The healthy workers: slot 1 is being replaced, so it is no candidate.
	cands := []defuss.WorkerInfo{{Index: 0}, {Index: 2}, {Index: 3}}
	req := &defuss.Request{Protocol: defuss.ProtocolHTTP1, Method: "GET", Path: "/"}

	var picked []int
	for range 7 {
		picked = append(picked, b(req, cands).Index)
	}
	fmt.Println(picked)
	// Output: [0 2 3 0 2 3 0]
}

func ExampleLeastConnections() {
	b := defuss.LeastConnections()
	// ActiveConnections counts are kept by the primary. These candidates
	// are built by hand, so every count is 0: a tie, which is broken at
	// random, so that a burst of new connections spreads over all three.
	cands := []defuss.WorkerInfo{{Index: 1}, {Index: 2}, {Index: 3}}
	req := &defuss.Request{Protocol: defuss.ProtocolHTTP1, Method: "GET", Path: "/"}

	picked := map[int]bool{}
	for range 300 {
		picked[b(req, cands).Index] = true
	}
	fmt.Println(len(picked), "candidates picked")
	// Output: 3 candidates picked
}

func ExampleResourceAware() {
	b := defuss.ResourceAware()
	// Scores (connections*10 + cpu*2 + heapInUse/heapTotal*100, with no
	// connections here): slot 0 is 40*2 + 60 = 140, slot 1 is 5*2 + 10 = 20,
	// slot 2 is 20*2 + 50 = 90.
	cands := []defuss.WorkerInfo{
		{Index: 0, Stats: defuss.Stats{CPUPercent: 40, HeapInUse: 60 << 20, HeapTotal: 100 << 20}},
		{Index: 1, Stats: defuss.Stats{CPUPercent: 5, HeapInUse: 10 << 20, HeapTotal: 100 << 20}},
		{Index: 2, Stats: defuss.Stats{CPUPercent: 20, HeapInUse: 50 << 20, HeapTotal: 100 << 20}},
	}
	req := &defuss.Request{Protocol: defuss.ProtocolHTTP1, Method: "GET", Path: "/"}

	fmt.Println("slot", b(req, cands).Index)
	// Output: slot 1
}
