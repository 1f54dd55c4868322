//go:build linux

package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// poolWorkloads are the workloads of the pool table: the small body, with
// and without keep-alive, where the primary's own work per request is the
// largest share of the cost.
var poolWorkloads = workloads[:2]

// poolModes are the rows of the pool table, by BENCH_ONLY key.
var poolModes = []struct {
	key, name string
	handoff   bool
}{
	{"defuss", "defuss splice", false},
	{"handoff", "defuss hand-off", true},
}

// poolTable measures the defuss primary's CPU time per 10,000 requests
// with each worker count of h.poolWorkers, in splice and hand-off mode,
// and prints it. Like the throughput table it goes over every
// configuration once per round and shows the median.
func (h *harness) poolTable(ctx context.Context) {
	type config struct {
		mode    int // index in poolModes
		workers int
	}
	var configs []config
	for m, pm := range poolModes {
		if h.only != nil && !h.only[pm.key] {
			continue
		}
		for _, n := range h.poolWorkers {
			configs = append(configs, config{m, n})
		}
	}
	if len(configs) == 0 {
		return
	}
	cells := make([][]cell, len(configs)) // [config][workload]
	for i := range cells {
		cells[i] = make([]cell, len(poolWorkloads))
	}
	for round := 1; round <= h.rounds && ctx.Err() == nil; round++ {
		for i, c := range configs {
			if ctx.Err() != nil {
				break
			}
			name := fmt.Sprintf("%s (%d workers)", poolModes[c.mode].name, c.workers)
			fmt.Fprintf(os.Stderr, "bench: pool, round %d/%d: starting %s\n", round, h.rounds, name)
			t, err := h.startDefuss(ctx, c.workers, poolModes[c.mode].handoff)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: %s: %v\n", name, err)
				for j := range poolWorkloads {
					cells[i][j].err = err
				}
				continue
			}
			for j, w := range poolWorkloads {
				if ctx.Err() != nil {
					break
				}
				if h.warmup > 0 {
					h.runWrk(ctx, w, t, h.warmup)
				}
				r, err := h.runWrk(ctx, w, t, h.duration)
				if err != nil {
					if ctx.Err() == nil {
						cells[i][j].err = err
						fmt.Fprintf(os.Stderr, "bench: %s, %s: %v\n", name, w.name, err)
					}
					continue
				}
				cells[i][j].runs = append(cells[i][j].runs, r)
				fmt.Fprintf(os.Stderr, "bench: %-32s %-18s %10.0f req/s  CPU/10k primary %s workers %s\n",
					name, w.name, r.rps, fmtCPU(r.cpuPer10k(r.cpu.proxy)), fmtCPU(r.cpuPer10k(r.cpu.servers)))
			}
			h.stopTarget(t)
		}
	}

	header := []string{"workload", "mode"}
	right := []bool{false, false}
	for _, n := range h.poolWorkers {
		header = append(header, fmt.Sprintf("%d workers", n))
		right = append(right, true)
	}
	rows := [][]string{header}
	var notes []string
	for j, w := range poolWorkloads {
		for m, pm := range poolModes {
			row := []string{w.name, pm.name}
			found := false
			for i, c := range configs {
				if c.mode != m {
					continue
				}
				found = true
				cl := cells[i][j]
				switch {
				case len(cl.runs) > 0:
					med, _, _ := cl.median()
					proxy, servers, _ := cl.cpuMedians()
					sw := "switches n/a"
					if v := cl.switchesMedian(); v >= 0 {
						sw = fmt.Sprintf("%.2f switches/req", v)
					}
					row = append(row, fmt.Sprintf("%s + %s (%.0f req/s, %s)", fmtCPU(proxy), fmtCPU(servers), med.rps, sw))
				case cl.err != nil:
					row = append(row, "error")
					notes = append(notes, fmt.Sprintf("%s, %d workers, %s: %s", pm.name, c.workers, w.name, firstLine(cl.err.Error())))
				default:
					row = append(row, "not run: "+cause(ctx))
				}
			}
			if found {
				rows = append(rows, row)
			}
		}
	}
	fmt.Print(markdownTable(rows, right))
	fmt.Println()
	fmt.Printf("Each cell is the defuss primary's CPU time per 10,000 requests, plus the workers' together, the req/s, and how many times per request the primary's threads were switched out (voluntary and not, from /proc/PID/task/*/status), from wrk runs as in the first table (the median of %d, each figure taken on its own). The primary's share must not grow with the pool. Its switches per request show how often it slept and woke, which costs more with more processes sharing the CPUs.\n", h.rounds)
	fmt.Printf("On %d CPUs this shows the primary's own cost per request as the pool grows: its accept, peek and balancing, and in splice mode the copying, with more workers to choose among, more sockets and more heartbeats. It cannot show the pool scaling: beyond %d workers they only share the same cores (each runs with GOMAXPROCS %s), so req/s cannot rise and the workers' CPU per request may grow with the switching between them.\n",
		h.ncpu, h.ncpu, poolProcs(h.ncpu, h.poolWorkers))
	for _, n := range notes {
		fmt.Println("- " + n)
	}
}

// poolProcs lists each worker count's GOMAXPROCS per worker, as defuss
// sets it: the cores shared among the workers, at least 1.
func poolProcs(ncpu int, counts []int) string {
	var parts []string
	for _, n := range counts {
		parts = append(parts, fmt.Sprintf("%d with %d", max(1, ncpu/n), n))
	}
	return strings.Join(parts, ", ")
}

// parseCounts parses a comma-separated list of worker counts; empty
// entries are skipped.
func parseCounts(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("worker count %q: want a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}
