//go:build unix

package defuss

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// metricsReader wires a ManualReader for a test.
type metricsReader struct {
	t      *testing.T
	reader *sdkmetric.ManualReader
}

func newMetrics(t *testing.T) (*metricsReader, Option) {
	r := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))
	t.Cleanup(func() { mp.Shutdown(context.Background()) })
	return &metricsReader{t: t, reader: r}, WithMeterProvider(mp)
}

// collect returns defuss's metrics by name.
func (m *metricsReader) collect() map[string]metricdata.Metrics {
	m.t.Helper()
	var rm metricdata.ResourceMetrics
	if err := m.reader.Collect(context.Background(), &rm); err != nil {
		m.t.Fatal(err)
	}
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != ScopeName || sm.Scope.Version != Version {
			m.t.Errorf("scope %q %q, want %q %q", sm.Scope.Name, sm.Scope.Version, ScopeName, Version)
		}
		for _, mm := range sm.Metrics {
			out[mm.Name] = mm
		}
	}
	return out
}

// point is one data point reduced to what tests compare.
type point struct {
	attrs string  // "k=v,k=v" sorted
	value float64 // sum or gauge value; histogram: count
	sum   float64 // histogram sum
}

func points(t *testing.T, ms map[string]metricdata.Metrics, name, unit string) map[string]point {
	t.Helper()
	mm, ok := ms[name]
	if !ok {
		t.Fatalf("metric %s not reported", name)
	}
	if mm.Unit != unit {
		t.Errorf("%s unit %q, want %q", name, mm.Unit, unit)
	}
	out := map[string]point{}
	add := func(set attribute.Set, p point) {
		var kv []string
		for _, a := range set.ToSlice() {
			kv = append(kv, string(a.Key)+"="+a.Value.String())
		}
		p.attrs = strings.Join(kv, ",")
		out[p.attrs] = p
	}
	switch d := mm.Data.(type) {
	case metricdata.Sum[int64]:
		for _, dp := range d.DataPoints {
			add(dp.Attributes, point{value: float64(dp.Value)})
		}
	case metricdata.Gauge[int64]:
		for _, dp := range d.DataPoints {
			add(dp.Attributes, point{value: float64(dp.Value)})
		}
	case metricdata.Gauge[float64]:
		for _, dp := range d.DataPoints {
			add(dp.Attributes, point{value: dp.Value})
		}
	case metricdata.Histogram[float64]:
		for _, dp := range d.DataPoints {
			add(dp.Attributes, point{value: float64(dp.Count), sum: dp.Sum})
		}
	default:
		t.Fatalf("%s: unexpected data %T", name, mm.Data)
	}
	return out
}

func total(ps map[string]point) (n float64) {
	for _, p := range ps {
		n += p.value
	}
	return n
}

// Every primary metric after real traffic through real workers: names,
// units, attributes and values.
func TestMetricsAfterTraffic(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt)
	addr := s.Addr().String()
	const requests = 10
	for range requests {
		if code, _ := get(t, addr, "/pid"); code != 200 {
			t.Fatalf("status %d", code)
		}
	}
	body := strings.Repeat("x", 1000)
	resp, err := http.Post("http://"+addr+"/upload", "text/plain", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	const conns = requests + 1
	waitFor(t, 5*time.Second, "connections closed", func() bool {
		ws := s.Workers()
		return ws[0].ActiveConnections()+ws[1].ActiveConnections() == 0
	})
	// Heartbeats carry stats; wait for one after the traffic.
	after := time.Now()
	waitWorkers(t, s, 5*time.Second, "fresh heartbeats", func(ws []WorkerInfo) bool {
		return ws[0].LastHeartbeat.After(after) && ws[1].LastHeartbeat.After(after)
	})
	ms := m.collect()

	if got := points(t, ms, "defuss.connections.accepted", "{connection}"); total(got) != conns {
		t.Errorf("connections.accepted = %v, want %d", got, conns)
	}
	active := points(t, ms, "defuss.connections.active", "{connection}")
	for i := range 2 {
		if p, ok := active[fmt.Sprintf("defuss.worker.index=%d", i)]; !ok || p.value != 0 {
			t.Errorf("connections.active for worker %d = %+v (present %v), want 0", i, p, ok)
		}
	}
	// Splice mode records each connection's duration and bytes when its
	// relay ends, hand-off mode when the worker's close report arrives.
	checkConnectionMetrics(t, ms, conns, len(body)+requests*30)
	checkPoolMetrics(t, ms, conns)
	// A crash is counted as a restart of that worker, with its reason.
	victim := s.Workers()[1].PID
	syscall.Kill(victim, syscall.SIGKILL)
	waitWorkers(t, s, 5*time.Second, "worker 1 respawned", func(ws []WorkerInfo) bool {
		return ws[1].Healthy && ws[1].PID != victim
	})
	restarts := points(t, m.collect(), "defuss.worker.restarts", "{restart}")
	if p := restarts["defuss.reason=crash,defuss.worker.index=1"]; p.value != 1 || len(restarts) != 1 {
		t.Errorf("worker.restarts = %v, want 1 crash of worker 1", restarts)
	}
}

// checkConnectionMetrics checks each connection's duration and bytes.
func checkConnectionMetrics(t *testing.T, ms map[string]metricdata.Metrics, conns int, upMin int) {
	t.Helper()
	dur := points(t, ms, "defuss.connection.duration", "s")
	if total(dur) != float64(conns) || len(dur) != 2 {
		t.Errorf("connection.duration counts %v, want %d over 2 workers", dur, conns)
	}
	bytes := points(t, ms, "defuss.connection.bytes", "By")
	var up, down float64
	for k, p := range bytes {
		switch {
		case strings.Contains(k, "defuss.direction=client_to_worker"):
			up += p.value
		case strings.Contains(k, "defuss.direction=worker_to_client"):
			down += p.value
		default:
			t.Errorf("connection.bytes point without direction: %q", k)
		}
		if !strings.Contains(k, "defuss.worker.index=") {
			t.Errorf("connection.bytes point without worker index: %q", k)
		}
	}
	if up < float64(upMin) || down < float64(conns*40) {
		t.Errorf("bytes forwarded up %v, down %v: too few for the traffic sent", up, down)
	}
}

// Issue 14: defuss.connection.bytes counts exactly what the client and
// the worker sent (a trusted PROXY header not included), and
// defuss.connection.duration has one point per connection, for a plain
// request, one behind a PROXY header and an upgraded connection that
// echoes 256 KiB; the same numbers in both modes, which measure them in
// different processes.
func TestConnectionMetricsExact(t *testing.T) {
	m, opt := newMetrics(t)
	s := startTest(t, opt, WithTrustedProxies("127.0.0.2/32"))
	addr := s.Addr().String()
	var in, out int64 // what the clients sent and received, headers of the proxy not included
	roundTrip := func(from string, header, req string) {
		c := dialFrom(t, from, addr)
		c.Write([]byte(header + req))
		got, err := io.ReadAll(c.r)
		if err != nil || !strings.HasPrefix(string(got), "HTTP/1.1 200 ") {
			t.Fatalf("response %q, %v", got, err)
		}
		c.Close()
		in, out = in+int64(len(req)), out+int64(len(got))
	}
	roundTrip("127.0.0.1", "", "GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	roundTrip("127.0.0.2", "PROXY TCP4 203.0.113.7 127.0.0.1 5555 3000\r\n", "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")

	c := dialRaw(t, addr)
	c.Write([]byte(upgradeHead))
	head := 0
	for line := ""; line != "\r\n"; head += len(line) {
		var err error
		if line, err = c.r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), 16<<10)
	echoThrough(t, c, payload)
	c.Close()
	in, out = in+int64(len(upgradeHead)+len(payload)), out+int64(head+len(payload))

	var ms map[string]metricdata.Metrics
	waitFor(t, 10*time.Second, "three connections recorded", func() bool {
		ms = m.collect()
		_, ok := ms["defuss.connection.duration"]
		return ok && total(points(t, ms, "defuss.connection.duration", "s")) == 3
	})
	var sum float64
	for _, p := range points(t, ms, "defuss.connection.duration", "s") {
		sum += p.sum
	}
	if sum <= 0 {
		t.Errorf("connection.duration sums to %v, want > 0", sum)
	}
	var up, down float64
	for k, p := range points(t, ms, "defuss.connection.bytes", "By") {
		switch {
		case strings.Contains(k, "defuss.direction=client_to_worker"):
			up += p.value
		case strings.Contains(k, "defuss.direction=worker_to_client"):
			down += p.value
		}
	}
	if up != float64(in) || down != float64(out) {
		t.Errorf("connection.bytes client_to_worker %v, worker_to_client %v; want exactly %d and %d", up, down, in, out)
	}
}

// checkPoolMetrics checks the metrics of both modes.
func checkPoolMetrics(t *testing.T, ms map[string]metricdata.Metrics, conns int) {
	t.Helper()
	sniff := points(t, ms, "defuss.sniff.duration", "s")
	if sniff["defuss.sniff.outcome=complete"].value != float64(conns) || len(sniff) != 1 {
		t.Errorf("sniff.duration %v, want %d complete", sniff, conns)
	}
	if got := points(t, ms, "defuss.balancer.duration", "s"); total(got) != float64(conns) {
		t.Errorf("balancer.duration %v, want %d", got, conns)
	}
	if got := points(t, ms, "defuss.workers.ready", "{worker}"); total(got) != 2 {
		t.Errorf("workers.ready %v, want 2", got)
	}
	for _, g := range []struct{ name, unit string }{
		{"defuss.worker.memory.rss", "By"},
		{"defuss.worker.memory.heap.in_use", "By"},
		{"defuss.worker.memory.heap.total", "By"},
		{"defuss.worker.goroutines", "{goroutine}"},
	} {
		ps := points(t, ms, g.name, g.unit)
		for i := range 2 {
			if p := ps[fmt.Sprintf("defuss.worker.index=%d", i)]; p.value <= 0 {
				t.Errorf("%s for worker %d = %v, want > 0", g.name, i, p.value)
			}
		}
	}
	cpu := points(t, ms, "defuss.worker.cpu.utilization", "1")
	wconns := points(t, ms, "defuss.worker.connections", "{connection}")
	for i := range 2 {
		k := fmt.Sprintf("defuss.worker.index=%d", i)
		if p, ok := cpu[k]; !ok || p.value < 0 {
			t.Errorf("cpu.utilization for worker %d = %+v", i, p)
		}
		if _, ok := wconns[k]; !ok {
			t.Errorf("worker.connections for worker %d missing", i)
		}
	}
}

// The status handler serves the pool as JSON.
func TestStatusHandler(t *testing.T) {
	s := startTest(t)
	rec := httptest.NewRecorder()
	StatusHandler(s).ServeHTTP(rec, httptest.NewRequest("GET", "/status", nil))
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, content type %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	var out struct {
		PID     int `json:"pid"`
		Ready   int `json:"ready"`
		Workers []struct {
			Index    int     `json:"index"`
			PID      int     `json:"pid"`
			State    string  `json:"state"`
			Healthy  bool    `json:"healthy"`
			RSS      uint64  `json:"rss_bytes"`
			Uptime   float64 `json:"uptime_seconds"`
			BeatAge  float64 `json:"heartbeat_age_seconds"`
			Restarts int     `json:"restarts"`
		} `json:"workers"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatalf("%v: %s", err, rec.Body)
	}
	ws := s.Workers()
	if out.Ready != 2 || len(out.Workers) != 2 {
		t.Fatalf("status %s", rec.Body)
	}
	for i, w := range out.Workers {
		if w.Index != i || w.PID != ws[i].PID || w.State != "ready" || !w.Healthy || w.RSS == 0 || w.Uptime <= 0 || w.BeatAge < 0 {
			t.Errorf("worker %d in status: %+v", i, w)
		}
	}
}

// Issue 14: the primary takes both forms of a worker's close report: the
// count alone (from a worker of an earlier version, or one whose primary
// sent version 1 hand-off messages) and the count with durations and
// bytes, which it records for the worker's slot. A report of more closes
// than connections handed is a bad frame and changes nothing; a worker's
// exit takes the rest out of the counts, WithMaxConnections's included.
func TestSupervisorCloseReports(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m, opt := newMetrics(t)
		sv := superviseFake(t, opt)
		f := sv.startReady()
		// Five connections handed off, counted as offer and serveConn
		// count them.
		f.pr.open.Add(5)
		sv.s.conns.Add(5)
		sv.p.conns.handed.Add(5)
		sv.p.tel.active.Add(bg, 5, sv.s.attrs.worker.add...)
		closed := func(msg message) {
			msg.kind, msg.slot, msg.pid = frameClosed, 0, f.pr.pid
			f.pr.emit(procEvent{kind: evFrame, frame: frameEvent{msg: msg}})
			synctest.Wait()
		}
		closed(message{closed: 2})
		closed(message{closed: 2, durations: []time.Duration{time.Second, 3 * time.Second}, bytesIn: 100, bytesOut: 2000})
		closed(message{closed: 2}) // one more than are open
		if n, open, held := sv.s.conns.Load(), f.pr.open.Load(), sv.p.conns.handed.Load(); n != 1 || open != 1 || held != 1 {
			t.Errorf("slot counts %d connections, process %d, connection table %d; want 1, 1 and 1", n, open, held)
		}
		ms := m.collect()
		dur := points(t, ms, "defuss.connection.duration", "s")["defuss.worker.index=0"]
		if dur.value != 2 || dur.sum != 4 {
			t.Errorf("connection.duration: %d points summing to %vs, want 2 summing to 4s", int(dur.value), dur.sum)
		}
		moved := points(t, ms, "defuss.connection.bytes", "By")
		if in, out := moved["defuss.direction=client_to_worker,defuss.worker.index=0"].value, moved["defuss.direction=worker_to_client,defuss.worker.index=0"].value; in != 100 || out != 2000 {
			t.Errorf("connection.bytes in %v, out %v; want 100 and 2000", in, out)
		}
		if got := points(t, ms, "defuss.connections.active", "{connection}")["defuss.worker.index=0"].value; got != 1 {
			t.Errorf("connections.active %v, want 1", got)
		}
		if got := points(t, ms, "defuss.worker.bad_frames", "{frame}")["defuss.worker.index=0"].value; got != 1 {
			t.Errorf("worker.bad_frames %v, want 1", got)
		}
		f.exit(errors.New("exit status 1"))
		synctest.Wait()
		if n, held := sv.s.conns.Load(), sv.p.conns.handed.Load(); n != 0 || held != 0 {
			t.Errorf("after the worker's exit the slot counts %d connections, the connection table %d; want 0 and 0", n, held)
		}
		sv.next() // respawned
	})
}
