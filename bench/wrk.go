//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// wrkResult is what one wrk run measured.
type wrkResult struct {
	rps           float64
	p50, p99, max time.Duration
	requests      int64
	problems      string   // socket errors or non-2xx answers, empty if none
	otherCPU      float64  // share of the CPUs used by processes outside the harness meanwhile; -1 unknown
	cpu           cpuTimes // CPU time the target's proxy and servers used during the run
	cpuOK         bool     // cpu was measured
	switches      int64    // times the proxy's threads were switched out during the run; -1 unknown
}

// switchesPerRequest is the proxy's context switches per request, or -1
// if unknown.
func (r wrkResult) switchesPerRequest() float64 {
	if r.switches < 0 || r.requests <= 0 {
		return -1
	}
	return float64(r.switches) / float64(r.requests)
}

// cpuPer10k is d per 10,000 of the run's requests, in milliseconds, or
// -1 if unknown.
func (r wrkResult) cpuPer10k(d time.Duration) float64 {
	if !r.cpuOK || r.requests <= 0 {
		return -1
	}
	return float64(d) / float64(time.Millisecond) * 10000 / float64(r.requests)
}

// wrkArgs is the wrk command line for a workload against url.
func (h *harness) wrkArgs(w workload, url string, d time.Duration) []string {
	args := []string{
		"-t" + strconv.Itoa(h.threads),
		"-c" + strconv.Itoa(h.conns),
		"-d" + strconv.Itoa(wrkSeconds(d)) + "s",
		"--latency",
	}
	if w.close {
		args = append(args, "-H", "Connection: close")
	}
	return append(args, url+w.path)
}

// wrkSeconds rounds d to wrk's unit: whole seconds, at least one.
func wrkSeconds(d time.Duration) int {
	return max(1, int((d+time.Second/2)/time.Second))
}

// runWrk runs wrk against t and parses its report. It reads the CPU time
// of t's processes just after wrk starts and just after it ends: the
// difference is wrk's run plus its start-up and tear-down, a few
// milliseconds against whole seconds.
func (h *harness) runWrk(ctx context.Context, w workload, t *target, d time.Duration) (wrkResult, error) {
	args := h.wrkArgs(w, t.url(), d)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(wrkSeconds(d))*time.Second+30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.wrk, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return wrkResult{}, err
	}
	h.reg.notePID(cmd.Process.Pid)
	before := sampleCPU()
	cpu0, ok0 := t.cpu()
	sw0, swErr0 := t.switches()
	err := cmd.Wait()
	sw1, swErr1 := t.switches()
	cpu1, ok1 := t.cpu()
	after := sampleCPU()
	if err != nil {
		if ctx.Err() != nil {
			return wrkResult{}, ctx.Err()
		}
		return wrkResult{}, fmt.Errorf("wrk %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()+out.String()))
	}
	if h.verbose {
		fmt.Fprintf(os.Stderr, "$ wrk %s\n%s", strings.Join(args, " "), out.String())
	}
	r, err := parseWrk(out.String())
	r.otherCPU = otherCPU(before, after)
	r.cpu, r.cpuOK = cpu1.sub(cpu0), ok0 && ok1
	r.switches = -1
	if swErr0 == nil && swErr1 == nil {
		r.switches = sw1 - sw0
	}
	return r, err
}

// parseWrk reads requests/s, the 50th and 99th latency percentiles, the
// maximum latency and any errors from wrk's --latency report.
func parseWrk(s string) (wrkResult, error) {
	var r wrkResult
	var problems []string
	var haveRPS, have50, have99 bool
	var err error
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "Requests/sec:") && len(f) == 2:
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("wrk: bad Requests/sec line %q", line)
			}
			r.rps, haveRPS = v, true
		case (f != nil && (f[0] == "50%" || f[0] == "99%")) && len(f) == 2:
			d, err := parseWrkDuration(f[1])
			if err != nil {
				return r, err
			}
			if f[0] == "50%" {
				r.p50, have50 = d, true
			} else {
				r.p99, have99 = d, true
			}
		case f != nil && f[0] == "Latency" && len(f) == 5: // Latency avg stdev max +/-stdev
			if r.max, err = parseWrkDuration(f[3]); err != nil {
				return r, err
			}
		case strings.Contains(line, " requests in ") && len(f) > 0:
			r.requests, _ = strconv.ParseInt(f[0], 10, 64)
		case strings.HasPrefix(line, "Socket errors:"):
			problems = append(problems, "socket errors:"+strings.TrimPrefix(line, "Socket errors:"))
		case strings.HasPrefix(line, "Non-2xx or 3xx responses:"):
			problems = append(problems, strings.ToLower(line[:1])+line[1:])
		}
	}
	if !haveRPS || !have50 || !have99 {
		return r, errors.New("wrk: report without Requests/sec or latency distribution:\n" + s)
	}
	r.problems = strings.Join(problems, "; ")
	return r, nil
}

// parseWrkDuration parses wrk's latency format: "812.00us", "1.23ms", "2.01s", "1.05m".
func parseWrkDuration(s string) (time.Duration, error) {
	units := []struct {
		suffix string
		unit   time.Duration
	}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"s", time.Second}, {"m", time.Minute}, {"h", time.Hour}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil {
				break
			}
			return time.Duration(v * float64(u.unit)), nil
		}
	}
	return 0, fmt.Errorf("wrk: unknown latency %q", s)
}
