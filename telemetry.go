package defuss

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// ScopeName is the instrumentation scope of defuss's metrics.
const ScopeName = "github.com/defuss-go/defuss"

// Version is the library version, reported as the scope's version.
const Version = "0.1.0"

// Attribute keys on defuss metrics.
const (
	attrWorker    = attribute.Key("defuss.worker.index")
	attrDirection = attribute.Key("defuss.direction")     // "client_to_worker" or "worker_to_client"
	attrOutcome   = attribute.Key("defuss.sniff.outcome") // "complete", "timeout", "cap" or "eof"
	attrReason    = attribute.Key("defuss.reason")
)

// Sniff outcomes: why the primary stopped reading the head.
const (
	sniffComplete = "complete"
	sniffTimeout  = "timeout"
	sniffCap      = "cap"
	sniffEOF      = "eof"
)

// telemetry holds every instrument of the primary, created once in
// newTelemetry. Per-worker measurement options are precomputed so that the
// hot path records without allocating.
type telemetry struct {
	accepted     metric.Int64Counter
	active       metric.Int64UpDownCounter
	duration     metric.Float64Histogram
	bytes        metric.Int64Counter
	sniff        metric.Float64Histogram
	balance      metric.Float64Histogram
	fallbacks    metric.Int64Counter
	dialFailures metric.Int64Counter
	dialRetries  metric.Int64Counter
	unavailable  metric.Int64Counter
	restarts     metric.Int64Counter
	badFrames    metric.Int64Counter

	proxyRejected metric.Int64Counter
	refused       metric.Int64Counter
	rejectReason  map[string]metric.MeasurementOption

	outcome  map[string]attrOpts
	fallback map[pickResult]attrOpts
	reg      metric.Registration
}

// slotAttrs are the measurement options of one worker slot, made once per
// slot so that the hot path records without allocating.
type slotAttrs struct {
	worker   attrOpts // defuss.worker.index
	toWorker attrOpts // and direction client_to_worker
	toClient attrOpts // and direction worker_to_client
}

// attrOpts is an attribute set as the options of Add and Record, each a
// slice made once: a call that lists an option builds the slice of its
// variadic parameter, which escapes through the instrument's interface
// and is allocated on every call; a call passed a made slice (opts.add...)
// allocates nothing.
type attrOpts struct {
	add    []metric.AddOption
	record []metric.RecordOption
}

func newAttrOpts(kvs ...attribute.KeyValue) attrOpts {
	o := metric.WithAttributeSet(attribute.NewSet(kvs...))
	return attrOpts{add: []metric.AddOption{o}, record: []metric.RecordOption{o}}
}

func newSlotAttrs(i int) slotAttrs {
	return slotAttrs{
		worker:   newAttrOpts(attrWorker.Int(i)),
		toWorker: newAttrOpts(attrWorker.Int(i), attrDirection.String("client_to_worker")),
		toClient: newAttrOpts(attrWorker.Int(i), attrDirection.String("worker_to_client")),
	}
}

// newTelemetry creates the primary's instruments on mp. Errors go to
// otel.Handle and leave a no-op instrument in place: telemetry never fails
// Start.
func newTelemetry(mp metric.MeterProvider, view func() *poolView) *telemetry {
	m := mp.Meter(ScopeName, metric.WithInstrumentationVersion(Version))
	t := &telemetry{}
	check := func(err error) {
		if err != nil {
			otel.Handle(err)
		}
	}
	var err error
	t.accepted, err = m.Int64Counter("defuss.connections.accepted", metric.WithUnit("{connection}"),
		metric.WithDescription("Client connections accepted on the public listener."))
	check(err)
	t.active, err = m.Int64UpDownCounter("defuss.connections.active", metric.WithUnit("{connection}"),
		metric.WithDescription("Client connections being forwarded to a worker."))
	check(err)
	t.duration, err = m.Float64Histogram("defuss.connection.duration", metric.WithUnit("s"),
		metric.WithDescription("Lifetime of forwarded connections, from routing (hand-off mode: the hand-off) to close."))
	check(err)
	t.bytes, err = m.Int64Counter("defuss.connection.bytes", metric.WithUnit("By"),
		metric.WithDescription("Bytes forwarded, by direction, counted when a direction ends (hand-off mode: bytes the worker read and wrote, counted when the connection closes)."))
	check(err)
	t.sniff, err = m.Float64Histogram("defuss.sniff.duration", metric.WithUnit("s"),
		metric.WithDescription("Time spent reading the request head before routing, by outcome."))
	check(err)
	t.balance, err = m.Float64Histogram("defuss.balancer.duration", metric.WithUnit("s"),
		metric.WithDescription("Time the balancer took to pick a worker."))
	check(err)
	t.fallbacks, err = m.Int64Counter("defuss.balancer.fallbacks", metric.WithUnit("{decision}"),
		metric.WithDescription("Balancer calls that panicked or returned no candidate; round robin was used."))
	check(err)
	t.dialFailures, err = m.Int64Counter("defuss.dial.failures", metric.WithUnit("{dial}"),
		metric.WithDescription("Failed dials to a worker."))
	check(err)
	t.dialRetries, err = m.Int64Counter("defuss.dial.retries", metric.WithUnit("{dial}"),
		metric.WithDescription("Connections moved to another worker after a failed dial."))
	check(err)
	t.unavailable, err = m.Int64Counter("defuss.connections.unavailable", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections refused because no worker was available (503 for HTTP/1)."))
	check(err)
	t.restarts, err = m.Int64Counter("defuss.worker.restarts", metric.WithUnit("{restart}"),
		metric.WithDescription("Worker processes replaced, by reason."))
	check(err)
	t.badFrames, err = m.Int64Counter("defuss.worker.bad_frames", metric.WithUnit("{frame}"),
		metric.WithDescription("Malformed or misattributed frames received from workers."))
	check(err)

	t.proxyRejected, err = m.Int64Counter("defuss.proxy_header.rejected", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections closed for a PROXY header from an untrusted source, or a malformed or late one."))
	check(err)
	t.refused, err = m.Int64Counter("defuss.connections.refused", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections closed on accept because WithMaxConnections was reached."))
	check(err)
	t.rejectReason = map[string]metric.MeasurementOption{}
	for _, r := range []string{"untrusted", "malformed"} {
		t.rejectReason[r] = metric.WithAttributeSet(attribute.NewSet(attrReason.String(r)))
	}

	ready, err := m.Int64ObservableGauge("defuss.workers.ready", metric.WithUnit("{worker}"),
		metric.WithDescription("Workers that take new connections."))
	check(err)
	cpu, err := m.Float64ObservableGauge("defuss.worker.cpu.utilization", metric.WithUnit("1"),
		metric.WithDescription("Worker CPU time per wall time since its previous heartbeat (1 = one core)."))
	check(err)
	rss, err := m.Int64ObservableGauge("defuss.worker.memory.rss", metric.WithUnit("By"),
		metric.WithDescription("Worker resident set size."))
	check(err)
	heapInUse, err := m.Int64ObservableGauge("defuss.worker.memory.heap.in_use", metric.WithUnit("By"),
		metric.WithDescription("Worker Go heap in use."))
	check(err)
	heapTotal, err := m.Int64ObservableGauge("defuss.worker.memory.heap.total", metric.WithUnit("By"),
		metric.WithDescription("Worker Go heap obtained from the OS."))
	check(err)
	goroutines, err := m.Int64ObservableGauge("defuss.worker.goroutines", metric.WithUnit("{goroutine}"),
		metric.WithDescription("Worker live goroutines."))
	check(err)
	wconns, err := m.Int64ObservableGauge("defuss.worker.connections", metric.WithUnit("{connection}"),
		metric.WithDescription("HTTP connections open in the worker, by its own count."))
	check(err)

	t.outcome = map[string]attrOpts{}
	for _, o := range []string{sniffComplete, sniffTimeout, sniffCap, sniffEOF} {
		t.outcome[o] = newAttrOpts(attrOutcome.String(o))
	}
	t.fallback = map[pickResult]attrOpts{}
	for _, r := range []pickResult{pickPanic, pickNil, pickStranger} {
		t.fallback[r] = newAttrOpts(attrReason.String(r.String()))
	}

	t.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		v := view()
		o.ObserveInt64(ready, int64(len(v.cands)))
		for _, w := range v.all {
			if w.PID == 0 || w.LastHeartbeat.IsZero() {
				continue // no process, or nothing reported yet
			}
			opt := metric.WithAttributeSet(attribute.NewSet(attrWorker.Int(w.Index)))
			o.ObserveFloat64(cpu, w.Stats.CPUPercent/100, opt)
			o.ObserveInt64(rss, int64(w.Stats.RSS), opt)
			o.ObserveInt64(heapInUse, int64(w.Stats.HeapInUse), opt)
			o.ObserveInt64(heapTotal, int64(w.Stats.HeapTotal), opt)
			o.ObserveInt64(goroutines, int64(w.Stats.Goroutines), opt)
			o.ObserveInt64(wconns, int64(w.Stats.ActiveConnections), opt)
		}
		return nil
	}, ready, cpu, rss, heapInUse, heapTotal, goroutines, wconns)
	check(err)
	return t
}

// close unregisters the observable callback.
func (t *telemetry) close() {
	if t.reg != nil {
		if err := t.reg.Unregister(); err != nil {
			otel.Handle(err)
		}
	}
}

func (t *telemetry) restart(slot int, reason string) {
	t.restarts.Add(context.Background(), 1, metric.WithAttributeSet(
		attribute.NewSet(attrWorker.Int(slot), attrReason.String(reason))))
}
