package defuss

import (
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
)

// testCandidates returns n candidates whose slot indexes differ from their
// positions (slots 1, 3, 5, ...), as when some slots are unhealthy, each
// with its own connection counter set to conns[i] (0 when conns is short).
func testCandidates(n int, conns ...int64) []WorkerInfo {
	cands := make([]WorkerInfo, n)
	for i := range cands {
		c := new(atomic.Int64)
		if i < len(conns) {
			c.Store(conns[i])
		}
		cands[i] = WorkerInfo{Index: 2*i + 1, Ready: true, Healthy: true, State: WorkerReady, conns: c}
	}
	return cands
}

// position returns the position of w in cands, by pointer identity, or -1
// if w does not point into cands.
func position(cands []WorkerInfo, w *WorkerInfo) int {
	for i := range cands {
		if w == &cands[i] {
			return i
		}
	}
	return -1
}

func TestRoundRobin(t *testing.T) {
	b := RoundRobin()
	cands := testCandidates(3)
	req := &Request{Protocol: ProtocolHTTP1, Method: "GET", Path: "/"}
	for i := range 3 * len(cands) {
		if got := position(cands, b(req, cands)); got != i%len(cands) {
			t.Fatalf("call %d picked position %d, want %d", i, got, i%len(cands))
		}
	}

	// The candidates change between calls (a worker went stale): the
	// counter carries on over the new set.
	fewer := cands[:2]
	if got := position(fewer, b(req, fewer)); got != 9%2 {
		t.Errorf("after the set shrank, picked position %d, want %d", got, 9%2)
	}

	// Each RoundRobin has its own counter.
	if got := position(cands, RoundRobin()(req, cands)); got != 0 {
		t.Errorf("a new RoundRobin started at position %d, want 0", got)
	}
}

// TestRoundRobinConcurrent calls one RoundRobin from 8 goroutines; with
// -race it also checks the counter is safe for concurrent use.
func TestRoundRobinConcurrent(t *testing.T) {
	const goroutines, rounds = 8, 1000
	b := RoundRobin()
	cands := testCandidates(3)
	counts := make([][]int, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		counts[g] = make([]int, len(cands))
		wg.Go(func() {
			req := &Request{}
			for range rounds * len(cands) {
				i := position(cands, b(req, cands))
				if i < 0 {
					t.Errorf("picked a worker that is not a candidate")
					return
				}
				counts[g][i]++
			}
		})
	}
	wg.Wait()
	total := make([]int, len(cands))
	for _, c := range counts {
		for i, n := range c {
			total[i] += n
		}
	}
	lo, hi := math.MaxInt, 0
	for _, n := range total {
		lo, hi = min(lo, n), max(hi, n)
	}
	if hi-lo > 1 {
		t.Errorf("picks per candidate = %v, want them to differ by at most 1", total)
	}
}

func TestLeastConnections(t *testing.T) {
	tests := []struct {
		name  string
		conns []int64
		want  int // position
	}{
		{"single candidate", []int64{7}, 0},
		{"fewest in the middle", []int64{5, 2, 7}, 1},
		{"fewest last", []int64{4, 4, 3}, 2},
		{"fewest first", []int64{0, 1, 2}, 0},
		{"large counts", []int64{math.MaxInt64, math.MaxInt64 - 1}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cands := testCandidates(len(tt.conns), tt.conns...)
			if got := position(cands, LeastConnections()(&Request{}, cands)); got != tt.want {
				t.Errorf("picked position %d, want %d", got, tt.want)
			}
		})
	}

	t.Run("missing counter counts as zero", func(t *testing.T) {
		cands := testCandidates(3, 2, 1, 1)
		cands[0].conns = nil // a WorkerInfo built outside the primary
		if got := position(cands, LeastConnections()(&Request{}, cands)); got != 0 {
			t.Errorf("picked position %d, want 0", got)
		}
	})

	// Issue 11, point 16: ties used to go to the first candidate, so a
	// burst of simultaneous connections piled onto slot 0. They are broken
	// at random: every tied candidate gets its share, no other one any.
	t.Run("ties spread", func(t *testing.T) {
		for _, tc := range []struct {
			conns []int64
			tied  []int // positions
		}{
			{[]int64{2, 2, 2, 2}, []int{0, 1, 2, 3}},
			{[]int64{3, 1, 1}, []int{1, 2}},
			{[]int64{1, 5, 1, 0, 9, 0, 0}, []int{3, 5, 6}},
		} {
			b := LeastConnections()
			cands := testCandidates(len(tc.conns), tc.conns...)
			const n = 3000
			got := map[int]int{}
			for range n {
				got[position(cands, b(&Request{}, cands))]++
			}
			for pos, k := range got {
				if !slices.Contains(tc.tied, pos) {
					t.Errorf("%v: picked position %d (not among the fewest) %d times", tc.conns, pos, k)
				}
			}
			for _, pos := range tc.tied {
				if share := n / len(tc.tied); got[pos] < share/2 {
					t.Errorf("%v: tied position %d picked %d times of %d, want about %d", tc.conns, pos, got[pos], n, share)
				}
			}
		}
	})

	t.Run("counts are live", func(t *testing.T) {
		b := LeastConnections()
		cands := testCandidates(2, 0, 1)
		if got := position(cands, b(&Request{}, cands)); got != 0 {
			t.Fatalf("picked position %d, want 0", got)
		}
		cands[0].conns.Add(2) // connections opened after the snapshot
		if got := position(cands, b(&Request{}, cands)); got != 1 {
			t.Errorf("after the counter moved, picked position %d, want 1", got)
		}
	})
}

// statsCandidate is a candidate with conns connections and the given stats.
func statsCandidate(index int, conns int64, s Stats) WorkerInfo {
	c := new(atomic.Int64)
	c.Store(conns)
	return WorkerInfo{Index: index, Stats: s, conns: c}
}

func TestResourceScore(t *testing.T) {
	tests := []struct {
		name string
		w    WorkerInfo
		want float64 // conns*10 + cpu*2 + heapInUse/heapTotal*100
	}{
		{"nothing", WorkerInfo{}, 0},
		{"connections only", statsCandidate(0, 3, Stats{}), 30},
		{"CPU only", statsCandidate(0, 0, Stats{CPUPercent: 12.5}), 25},
		{"heap only", statsCandidate(0, 0, Stats{HeapInUse: 1 << 20, HeapTotal: 4 << 20}), 25},
		{"everything", statsCandidate(0, 2, Stats{CPUPercent: 10, HeapInUse: 50, HeapTotal: 100}), 20 + 20 + 50},
		{"CPU over one core", statsCandidate(0, 1, Stats{CPUPercent: 250, HeapInUse: 80, HeapTotal: 200}), 10 + 500 + 40},
		{"heap fully in use", statsCandidate(0, 0, Stats{HeapInUse: 7, HeapTotal: 7}), 100},
		{"missing heap total counts as zero", statsCandidate(0, 1, Stats{HeapInUse: 10}), 10},
		{"missing counter counts as zero", WorkerInfo{Stats: Stats{CPUPercent: 1}}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := resourceScore(&tt.w); math.Abs(got-tt.want) > 1e-9 {
				t.Errorf("resourceScore = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestResourceAware(t *testing.T) {
	tests := []struct {
		name  string
		cands []WorkerInfo
		want  int // position
	}{
		{
			name: "lowest score wins",
			cands: []WorkerInfo{
				statsCandidate(0, 2, Stats{CPUPercent: 10, HeapInUse: 50, HeapTotal: 100}), // 20+20+50 = 90
				statsCandidate(1, 0, Stats{CPUPercent: 30}),                                // 0+60+0 = 60
				statsCandidate(2, 1, Stats{HeapInUse: 80, HeapTotal: 200}),                 // 10+0+40 = 50
			},
			want: 2,
		},
		{
			name: "missing stats count as zero",
			cands: []WorkerInfo{
				statsCandidate(0, 1, Stats{}),              // 10
				{Index: 1},                                 // 0: no counter, no stats yet
				statsCandidate(2, 0, Stats{CPUPercent: 1}), // 2
			},
			want: 1,
		},
		{
			name: "tie goes to the first",
			cands: []WorkerInfo{
				statsCandidate(0, 2, Stats{CPUPercent: 5}),                 // 20+10 = 30
				statsCandidate(1, 1, Stats{CPUPercent: 10}),                // 10+20 = 30
				statsCandidate(2, 0, Stats{HeapInUse: 30, HeapTotal: 100}), // 30
			},
			want: 0,
		},
		{
			name: "a full heap outweighs connections",
			cands: []WorkerInfo{
				statsCandidate(0, 0, Stats{HeapInUse: 99, HeapTotal: 100}), // 99
				statsCandidate(1, 9, Stats{}),                              // 90
			},
			want: 1,
		},
		{
			name: "CPU counts double",
			cands: []WorkerInfo{
				statsCandidate(0, 0, Stats{CPUPercent: 10}),               // 20
				statsCandidate(1, 1, Stats{HeapInUse: 5, HeapTotal: 100}), // 10+5 = 15
			},
			want: 1,
		},
		{
			name:  "single candidate",
			cands: []WorkerInfo{statsCandidate(4, 100, Stats{CPUPercent: 400})},
			want:  0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := position(tt.cands, ResourceAware()(&Request{}, tt.cands)); got != tt.want {
				t.Errorf("picked position %d, want %d", got, tt.want)
			}
		})
	}
}

func TestPick(t *testing.T) {
	tests := []struct {
		name    string
		b       Balancer
		want    int // position
		wantRes pickResult
	}{
		{
			name:    "pointer into candidates",
			b:       func(_ *Request, c []WorkerInfo) *WorkerInfo { return &c[2] },
			want:    2,
			wantRes: pickOK,
		},
		{
			name: "copy of a candidate",
			b: func(_ *Request, c []WorkerInfo) *WorkerInfo {
				w := c[1]
				return &w
			},
			want:    1,
			wantRes: pickOK,
		},
		{
			name:    "panics",
			b:       func(*Request, []WorkerInfo) *WorkerInfo { panic("balancer bug") },
			want:    0, // the fallback's first pick
			wantRes: pickPanic,
		},
		{
			name:    "panics with nil",
			b:       func(*Request, []WorkerInfo) *WorkerInfo { panic(nil) },
			want:    0,
			wantRes: pickPanic,
		},
		{
			name:    "indexes past the candidates",
			b:       func(_ *Request, c []WorkerInfo) *WorkerInfo { return &c[len(c)] },
			want:    0,
			wantRes: pickPanic,
		},
		{
			name:    "returns nil",
			b:       func(*Request, []WorkerInfo) *WorkerInfo { return nil },
			want:    0,
			wantRes: pickNil,
		},
		{
			name:    "returns a stranger",
			b:       func(*Request, []WorkerInfo) *WorkerInfo { return &WorkerInfo{Index: 99} },
			want:    0,
			wantRes: pickStranger,
		},
		{
			name:    "returns a slot that is not a candidate",
			b:       func(*Request, []WorkerInfo) *WorkerInfo { return &WorkerInfo{Index: 2} }, // candidates are slots 1, 3, 5
			want:    0,
			wantRes: pickStranger,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cands := testCandidates(3)
			fallbackCalls := 0
			rr := RoundRobin()
			fallback := func(req *Request, c []WorkerInfo) *WorkerInfo {
				fallbackCalls++
				return rr(req, c)
			}
			i, res := pick(tt.b, fallback, &Request{}, cands)
			if i < 0 || i >= len(cands) {
				t.Fatalf("pick = %d, outside the %d candidates", i, len(cands))
			}
			if i != tt.want || res != tt.wantRes {
				t.Errorf("pick = %d, %v; want %d, %v", i, res, tt.want, tt.wantRes)
			}
			wantCalls := 1
			if tt.wantRes == pickOK {
				wantCalls = 0
			}
			if fallbackCalls != wantCalls {
				t.Errorf("fallback called %d times, want %d", fallbackCalls, wantCalls)
			}
		})
	}
}

func TestPickResultString(t *testing.T) {
	tests := []struct {
		res  pickResult
		want string
	}{
		{pickOK, "ok"},
		{pickPanic, "panic"},
		{pickNil, "nil"},
		{pickStranger, "not a candidate"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := tt.res.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestBalancerAllocs checks that the built-in balancers and pick do not
// allocate: they run once per connection on the primary's hot path.
func TestBalancerAllocs(t *testing.T) {
	cands := testCandidates(8, 5, 3, 9, 1, 4, 4, 2, 7)
	req := &Request{}
	rr, lc, ra := RoundRobin(), LeastConnections(), ResourceAware()
	tests := []struct {
		name string
		f    func()
	}{
		{"RoundRobin", func() { rr(req, cands) }},
		{"LeastConnections", func() { lc(req, cands) }},
		{"ResourceAware", func() { ra(req, cands) }},
		{"pick", func() { pick(rr, rr, req, cands) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if n := testing.AllocsPerRun(100, tt.f); n != 0 {
				t.Errorf("allocates %v times per call, want 0", n)
			}
		})
	}
}

func BenchmarkRoundRobin(b *testing.B) {
	bal := RoundRobin()
	cands := testCandidates(8)
	req := &Request{}
	b.ReportAllocs()
	for b.Loop() {
		bal(req, cands)
	}
}

func BenchmarkLeastConnections(b *testing.B) {
	bal := LeastConnections()
	cands := testCandidates(8, 5, 3, 9, 1, 4, 4, 2, 7)
	req := &Request{}
	b.ReportAllocs()
	for b.Loop() {
		bal(req, cands)
	}
}

func BenchmarkResourceAware(b *testing.B) {
	bal := ResourceAware()
	cands := testCandidates(8, 5, 3, 9, 1, 4, 4, 2, 7)
	for i := range cands {
		cands[i].Stats = Stats{CPUPercent: float64(i * 3), HeapInUse: uint64(i), HeapTotal: 16}
	}
	req := &Request{}
	b.ReportAllocs()
	for b.Loop() {
		bal(req, cands)
	}
}

// BenchmarkRoundRobinParallel measures the shared counter under
// contention, as the primary's connection goroutines call it.
func BenchmarkRoundRobinParallel(b *testing.B) {
	bal := RoundRobin()
	cands := testCandidates(8)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		req := &Request{}
		for pb.Next() {
			bal(req, cands)
		}
	})
}
