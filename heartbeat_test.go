package defuss

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fixtureStats is a Stats with every field set to a distinct value, in the
// form decoding returns: Uptime in whole milliseconds and SampledAt without
// a monotonic clock reading.
func fixtureStats() Stats {
	return Stats{
		CPUPercent:        12.5,
		RSS:               48 << 20,
		HeapInUse:         3 << 20,
		HeapTotal:         8 << 20,
		Goroutines:        17,
		GCCycles:          42,
		ActiveConnections: 5,
		Uptime:            90*time.Minute + 1234*time.Millisecond,
		SampledAt:         time.Unix(1_760_000_000, 123_456_789),
	}
}

// fixtureMaxStats is a Stats with every field at the largest value decoding
// accepts.
func fixtureMaxStats() Stats {
	return Stats{
		CPUPercent:        1e6,
		RSS:               math.MaxUint64,
		HeapInUse:         math.MaxUint64,
		HeapTotal:         math.MaxUint64,
		Goroutines:        math.MaxInt32,
		GCCycles:          math.MaxUint64,
		ActiveConnections: math.MaxInt32,
		Uptime:            math.MaxInt64 / time.Millisecond * time.Millisecond,
		SampledAt:         time.Unix(0, math.MaxInt64),
	}
}

// fixtureSecret is a per-run secret with every byte distinct.
func fixtureSecret() (s [secretLen]byte) {
	for i := range s {
		s[i] = byte(0xa0 + i)
	}
	return s
}

// configFixedLen is the length of a config payload without its host,
// measured on the encoder rather than restated from the layout.
func configFixedLen(tb testing.TB) int {
	_, p := commandPayload(tb, command{kind: frameConfig, host: "h", heartbeat: 1, shutdownTimeout: 1})
	return len(p) - 1
}

// splitFrame reads the single frame in b with readFrame and returns its
// type and payload. It fails the test if b is not exactly one frame.
func splitFrame(tb testing.TB, b []byte) (byte, []byte) {
	tb.Helper()
	r := bytes.NewReader(b)
	typ, p, err := readFrame(r, make([]byte, maxFramePayload))
	if err != nil {
		tb.Fatalf("readFrame(%x): %v", b, err)
	}
	if r.Len() != 0 {
		tb.Fatalf("readFrame(%x) left %d bytes", b, r.Len())
	}
	return typ, bytes.Clone(p)
}

// messagePayload encodes m and returns the frame's type and payload.
func messagePayload(tb testing.TB, m message) (byte, []byte) {
	tb.Helper()
	return splitFrame(tb, appendMessage(nil, &m))
}

// commandPayload encodes c and returns the frame's type and payload.
func commandPayload(tb testing.TB, c command) (byte, []byte) {
	tb.Helper()
	return splitFrame(tb, appendCommand(nil, &c))
}

// equalStats compares a and b, SampledAt by instant (ignoring the
// monotonic reading and location) and everything else exactly.
func equalStats(a, b Stats) bool {
	if !a.SampledAt.Equal(b.SampledAt) {
		return false
	}
	a.SampledAt, b.SampledAt = time.Time{}, time.Time{}
	return a == b
}

func equalMessage(a, b message) bool {
	if !equalStats(a.stats, b.stats) || !slices.Equal(a.durations, b.durations) {
		return false
	}
	a.stats, b.stats = Stats{}, Stats{}
	a.durations, b.durations = nil, nil
	return reflect.DeepEqual(a, b)
}

// errDecodePanic is returned by decodeMessageSafe and decodeCommandSafe
// when the decoder panicked.
var errDecodePanic = errors.New("decoder panicked")

// decodeMessageSafe is decodeMessage with a panic turned into an error
// wrapping errDecodePanic, so that a panic fails one subtest or fuzz input
// instead of aborting the whole test binary.
func decodeMessageSafe(typ byte, p []byte) (m message, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: decodeMessage(%d, %d bytes): %v", errDecodePanic, typ, len(p), r)
		}
	}()
	return decodeMessage(typ, p)
}

// decodeCommandSafe is decodeCommand with a panic turned into an error
// wrapping errDecodePanic.
func decodeCommandSafe(typ byte, p []byte) (c command, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: decodeCommand(%d, %d bytes): %v", errDecodePanic, typ, len(p), r)
		}
	}()
	return decodeCommand(typ, p)
}

// Offsets into a frameStats payload: slot u16, pid u32, then the stats.
const (
	statsOffPID        = 2
	statsOffCPU        = 6
	statsOffHeapInUse  = 6 + 16
	statsOffHeapTotal  = 6 + 24
	statsOffGoroutines = 6 + 32
	statsOffActive     = 6 + 44
	statsOffUptime     = 6 + 48
)

// patched returns a copy of p with edit applied.
func patched(p []byte, edit func(p []byte)) []byte {
	p = bytes.Clone(p)
	edit(p)
	return p
}

func TestHeartbeatMessageRoundTrip(t *testing.T) {
	now := time.Now() // carries a monotonic reading and time.Local
	tests := []struct {
		name string
		in   message
		want message // as decoded
	}{
		{
			name: "ready",
			in:   message{kind: frameReady, slot: 3, pid: 4242, port: 40001, stats: fixtureStats()},
			want: message{kind: frameReady, slot: 3, pid: 4242, port: 40001, stats: fixtureStats()},
		},
		{
			name: "ready with every field at its maximum",
			in:   message{kind: frameReady, slot: math.MaxUint16, pid: math.MaxInt32, port: math.MaxUint16, stats: fixtureMaxStats()},
			want: message{kind: frameReady, slot: math.MaxUint16, pid: math.MaxInt32, port: math.MaxUint16, stats: fixtureMaxStats()},
		},
		{
			name: "stats",
			in:   message{kind: frameStats, slot: 0, pid: 1, stats: fixtureStats()},
			want: message{kind: frameStats, slot: 0, pid: 1, stats: fixtureStats()},
		},
		{
			name: "stats with only a timestamp",
			in:   message{kind: frameStats, slot: 7, pid: 99, stats: Stats{SampledAt: time.Unix(0, 0)}},
			want: message{kind: frameStats, slot: 7, pid: 99, stats: Stats{SampledAt: time.Unix(0, 0)}},
		},
		{
			name: "stats with negative zero CPU",
			in:   message{kind: frameStats, slot: 1, pid: 2, stats: Stats{CPUPercent: math.Copysign(0, -1), SampledAt: time.Unix(1, 0)}},
			want: message{kind: frameStats, slot: 1, pid: 2, stats: Stats{CPUPercent: math.Copysign(0, -1), SampledAt: time.Unix(1, 0)}},
		},
		{
			// Uptime travels in milliseconds; SampledAt in nanoseconds,
			// without the monotonic reading.
			name: "stats with sub-millisecond uptime and a wall clock now",
			in:   message{kind: frameStats, slot: 2, pid: 3, stats: Stats{Uptime: 1500*time.Microsecond + 7, SampledAt: now}},
			want: message{kind: frameStats, slot: 2, pid: 3, stats: Stats{Uptime: time.Millisecond, SampledAt: now.Round(0)}},
		},
		{
			name: "stopping",
			in:   message{kind: frameStopping, slot: 5, pid: 31337},
			want: message{kind: frameStopping, slot: 5, pid: 31337},
		},
		{
			// What workers before issue 14 send, and what a worker sends
			// a primary before it (version 1 hand-off messages).
			name: "closed, by count alone",
			in:   message{kind: frameClosed, slot: 1, pid: 77, closed: 3},
			want: message{kind: frameClosed, slot: 1, pid: 77, closed: 3},
		},
		{
			name: "closed with stats",
			in:   message{kind: frameClosed, slot: 1, pid: 77, closed: 2, durations: []time.Duration{1500 * time.Microsecond, time.Hour}, bytesIn: 123, bytesOut: 45678},
			want: message{kind: frameClosed, slot: 1, pid: 77, closed: 2, durations: []time.Duration{1500 * time.Microsecond, time.Hour}, bytesIn: 123, bytesOut: 45678},
		},
		{
			name: "closed with stats, a full frame at the largest values",
			in:   message{kind: frameClosed, slot: 1, pid: 77, closed: maxClosedStats, durations: slices.Repeat([]time.Duration{math.MaxInt64}, maxClosedStats), bytesIn: math.MaxInt64, bytesOut: math.MaxInt64},
			want: message{kind: frameClosed, slot: 1, pid: 77, closed: maxClosedStats, durations: slices.Repeat([]time.Duration{math.MaxInt64}, maxClosedStats), bytesIn: math.MaxInt64, bytesOut: math.MaxInt64},
		},
		{
			name: "failed",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: "listen tcp 127.0.0.1:40001: bind: address already in use"},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: "listen tcp 127.0.0.1:40001: bind: address already in use"},
		},
		{
			name: "failed with empty message",
			in:   message{kind: frameFailed, slot: 1, pid: 77},
			want: message{kind: frameFailed, slot: 1, pid: 77},
		},
		{
			name: "failed with multi-byte UTF-8",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: "open /srv/données/😀: permission denied"},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: "open /srv/données/😀: permission denied"},
		},
		{
			name: "failed with message of exactly maxFailMessage bytes",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("x", maxFailMessage)},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("x", maxFailMessage)},
		},
		{
			name: "failed with oversized message is truncated",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("y", 600)},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("y", maxFailMessage)},
		},
		{
			// The decoder insists on UTF-8, so the encoder repairs the
			// message rather than lose it.
			name: "failed with invalid UTF-8 is repaired",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: "bad \xff byte"},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: "bad \uFFFD byte"},
		},
		{
			// appendMessage used to cut a long failure message at exactly
			// maxFailMessage bytes. When that fell inside a multi-byte rune
			// the frame was not valid UTF-8, the primary rejected it, and
			// the reason the worker failed was lost.
			name: "failed with oversized message is truncated at a rune boundary",
			in:   message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("a", maxFailMessage-1) + "é and more"},
			want: message{kind: frameFailed, slot: 1, pid: 77, err: strings.Repeat("a", maxFailMessage-1)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			frame := appendMessage([]byte("prefix"), &tt.in)
			if !bytes.HasPrefix(frame, []byte("prefix")) {
				t.Fatalf("appendMessage clobbered the bytes it appends to: %q", frame)
			}
			r := bytes.NewReader(frame[len("prefix"):])
			typ, p, err := readFrame(r, make([]byte, maxFramePayload))
			if err != nil {
				t.Fatalf("readFrame: %v", err)
			}
			if typ != tt.in.kind {
				t.Errorf("readFrame type = %d, want %d", typ, tt.in.kind)
			}
			if _, _, err := readFrame(r, make([]byte, maxFramePayload)); !errors.Is(err, io.EOF) {
				t.Errorf("second readFrame = %v, want io.EOF", err)
			}
			got, err := decodeMessageSafe(typ, p)
			if err != nil {
				t.Fatalf("decodeMessage(%d, %d bytes): %v", typ, len(p), err)
			}
			if !equalMessage(got, tt.want) {
				t.Errorf("decoded\n\t%+v\nwant\n\t%+v", got, tt.want)
			}
		})
	}
}

func TestHeartbeatCommandRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		in   command
	}{
		{"config with ephemeral port", command{kind: frameConfig, slot: 2, port: 0, host: "127.0.0.1", heartbeat: time.Second, shutdownTimeout: 10 * time.Second, secret: fixtureSecret()}},
		{"config with base port and IPv6 host", command{kind: frameConfig, slot: 65535, port: 65535, host: "::1", heartbeat: time.Millisecond, shutdownTimeout: time.Nanosecond, secret: fixtureSecret()}},
		{"config with longest host and durations", command{kind: frameConfig, slot: 1, port: 40000, host: strings.Repeat("h", maxHostLen), heartbeat: math.MaxInt64, shutdownTimeout: math.MaxInt64, secret: fixtureSecret()}},
		{"config with zero secret", command{kind: frameConfig, slot: 0, port: 0, host: "localhost", heartbeat: time.Second, shutdownTimeout: time.Second}},
		{"drain", command{kind: frameDrain, shutdownTimeout: 10 * time.Second}},
		{"drain of one nanosecond", command{kind: frameDrain, shutdownTimeout: time.Nanosecond}},
		{"drain of the longest timeout", command{kind: frameDrain, shutdownTimeout: math.MaxInt64}},
		{"least report gap", command{kind: frameReportGap, reportGap: closeReportGap}},
		{"report gap of 8 workers", command{kind: frameReportGap, reportGap: closeReportGapFor(8)}},
		{"longest report gap this primary sends", command{kind: frameReportGap, reportGap: maxCloseReportGap}},
		{"longest report gap a worker takes", command{kind: frameReportGap, reportGap: maxReportGapFrame}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bytes.NewReader(appendCommand(nil, &tt.in))
			typ, p, err := readFrame(r, make([]byte, maxFramePayload))
			if err != nil {
				t.Fatalf("readFrame: %v", err)
			}
			if r.Len() != 0 {
				t.Errorf("readFrame left %d bytes", r.Len())
			}
			got, err := decodeCommandSafe(typ, p)
			if err != nil {
				t.Fatalf("decodeCommand(%d, %d bytes): %v", typ, len(p), err)
			}
			if got != tt.in {
				t.Errorf("decoded %+v, want %+v", got, tt.in)
			}
		})
	}
}

// TestFrameStream reads several frames of both directions back to back
// from one stream, as the pipes carry them.
func TestFrameStream(t *testing.T) {
	msgs := []message{
		{kind: frameReady, slot: 1, pid: 10, port: 4000, stats: fixtureStats()},
		{kind: frameStats, slot: 1, pid: 10, stats: fixtureStats()},
		{kind: frameFailed, slot: 1, pid: 10, err: "boom"},
		{kind: frameStopping, slot: 1, pid: 10},
	}
	var stream []byte
	for i := range msgs {
		stream = appendMessage(stream, &msgs[i])
	}
	r := bytes.NewReader(stream)
	buf := make([]byte, maxFramePayload)
	for i, want := range msgs {
		typ, p, err := readFrame(r, buf)
		if err != nil {
			t.Fatalf("frame %d: readFrame: %v", i, err)
		}
		got, err := decodeMessage(typ, p)
		if err != nil {
			t.Fatalf("frame %d: decodeMessage: %v", i, err)
		}
		if !equalMessage(got, want) {
			t.Errorf("frame %d = %+v, want %+v", i, got, want)
		}
	}
	if _, _, err := readFrame(r, buf); !errors.Is(err, io.EOF) {
		t.Errorf("readFrame after the last frame = %v, want io.EOF", err)
	}
}

func TestDecodeMessageMalformed(t *testing.T) {
	_, ready := messagePayload(t, message{kind: frameReady, slot: 1, pid: 1234, port: 4000, stats: fixtureStats()})
	_, stats := messagePayload(t, message{kind: frameStats, slot: 1, pid: 1234, stats: fixtureStats()})
	_, stopping := messagePayload(t, message{kind: frameStopping, slot: 1, pid: 1234})
	_, failed := messagePayload(t, message{kind: frameFailed, slot: 1, pid: 1234, err: "boom"})
	_, closed := messagePayload(t, message{kind: frameClosed, slot: 1, pid: 1234, closed: 2})
	_, closedStats := messagePayload(t, message{kind: frameClosed, slot: 1, pid: 1234, closed: 2,
		durations: []time.Duration{time.Second, time.Minute}, bytesIn: 10, bytesOut: 20})
	const closedOffCount, closedOffIn, closedOffOut, closedOffDurations = 6, 10, 18, 26
	setU32 := func(off int, v uint32) func([]byte) {
		return func(p []byte) { binary.BigEndian.PutUint32(p[off:], v) }
	}
	setU64 := func(off int, v uint64) func([]byte) {
		return func(p []byte) { binary.BigEndian.PutUint64(p[off:], v) }
	}
	setCPU := func(v float64) func([]byte) { return setU64(statsOffCPU, math.Float64bits(v)) }

	tests := []struct {
		name string
		typ  byte
		p    []byte
	}{
		{"unknown type 0", 0, stats},
		{"unknown type 5", 5, stats},
		{"unknown type 255", 255, stats},
		{"command type as a message", frameConfig, stats},

		{"ready one byte short", frameReady, ready[:len(ready)-1]},
		{"ready one byte long", frameReady, append(bytes.Clone(ready), 0)},
		{"ready with a stats payload", frameReady, stats},
		{"ready empty", frameReady, nil},
		{"stats one byte short", frameStats, stats[:len(stats)-1]},
		{"stats one byte long", frameStats, append(bytes.Clone(stats), 0)},
		{"stats with a ready payload", frameStats, ready},
		{"stopping one byte long", frameStopping, append(bytes.Clone(stopping), 0)},
		{"stopping one byte short", frameStopping, stopping[:5]},
		{"stopping empty", frameStopping, nil},
		// A failed frame's message has no fixed length, but the slot and
		// pid before it do. decodeMessage read them without checking the
		// length and panicked (index out of range) on these, on the
		// primary's frame-reader goroutine: one short frame from a worker
		// crashed the whole primary.
		{"failed empty", frameFailed, nil},
		{"failed with one byte", frameFailed, failed[:1]},
		{"failed with five bytes", frameFailed, failed[:5]},

		{"ready with port 0", frameReady, patched(ready, func(p []byte) { binary.BigEndian.PutUint16(p[6:], 0) })},
		{"stats with pid 0", frameStats, patched(stats, setU32(statsOffPID, 0))},
		{"stopping with pid 0", frameStopping, patched(stopping, setU32(statsOffPID, 0))},
		{"failed with pid 0", frameFailed, patched(failed, setU32(statsOffPID, 0))},
		{"pid over MaxInt32", frameStats, patched(stats, setU32(statsOffPID, math.MaxInt32+1))},

		{"CPU NaN", frameStats, patched(stats, setCPU(math.NaN()))},
		{"CPU +Inf", frameStats, patched(stats, setCPU(math.Inf(1)))},
		{"CPU -Inf", frameStats, patched(stats, setCPU(math.Inf(-1)))},
		{"CPU negative", frameStats, patched(stats, setCPU(-0.5))},
		{"CPU over 1e6", frameStats, patched(stats, setCPU(1e6+1))},
		{"CPU NaN in ready", frameReady, patched(ready, func(p []byte) { binary.BigEndian.PutUint64(p[statsOffCPU+2:], math.Float64bits(math.NaN())) })},
		{"heap in use over heap total", frameStats, patched(stats, func(p []byte) {
			binary.BigEndian.PutUint64(p[statsOffHeapInUse:], 2)
			binary.BigEndian.PutUint64(p[statsOffHeapTotal:], 1)
		})},
		{"goroutines over MaxInt32", frameStats, patched(stats, setU32(statsOffGoroutines, math.MaxInt32+1))},
		{"active connections over MaxInt32", frameStats, patched(stats, setU32(statsOffActive, math.MaxUint32))},
		{"uptime overflows a Duration", frameStats, patched(stats, setU64(statsOffUptime, math.MaxInt64/uint64(time.Millisecond)+1))},

		{"closed with no count", frameClosed, closed[:6]},
		{"closed one byte short", frameClosed, closed[:len(closed)-1]},
		{"closed with a count of 0", frameClosed, patched(closed, setU32(closedOffCount, 0))},
		{"closed with a count over MaxInt32", frameClosed, patched(closed, setU32(closedOffCount, math.MaxInt32+1))},
		{"closed with one byte of stats", frameClosed, append(bytes.Clone(closed), 0)},
		{"closed with stats one duration short", frameClosed, closedStats[:len(closedStats)-8]},
		{"closed with stats one byte short", frameClosed, closedStats[:len(closedStats)-1]},
		{"closed with stats one byte long", frameClosed, append(bytes.Clone(closedStats), 0)},
		{"closed with stats and a count of 0", frameClosed, patched(closedStats[:closedOffDurations], setU32(closedOffCount, 0))},
		{"closed with stats for more connections than a frame holds", frameClosed,
			patched(append(bytes.Clone(closedStats[:closedOffDurations]), make([]byte, 8*(maxClosedStats+1))...), setU32(closedOffCount, maxClosedStats+1))},
		{"closed with bytes in over MaxInt64", frameClosed, patched(closedStats, setU64(closedOffIn, math.MaxInt64+1))},
		{"closed with bytes out over MaxInt64", frameClosed, patched(closedStats, setU64(closedOffOut, math.MaxUint64))},
		{"closed with a duration over MaxInt64", frameClosed, patched(closedStats, setU64(closedOffDurations+8, math.MaxInt64+1))},

		{"failed with non-UTF-8 message", frameFailed, append(bytes.Clone(failed[:6]), 'o', 'k', 0xff)},
		{"failed with truncated rune", frameFailed, append(bytes.Clone(failed[:6]), "é"[0])},
		{"failed with oversized message", frameFailed, append(bytes.Clone(failed[:6]), bytes.Repeat([]byte("z"), maxFailMessage+1)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			orig := bytes.Clone(tt.p)
			m, err := decodeMessageSafe(tt.typ, tt.p)
			switch {
			case err == nil:
				t.Fatalf("decodeMessage(%d, %x) = %+v, want an error wrapping errFrame", tt.typ, tt.p, m)
			case !errors.Is(err, errFrame):
				t.Fatalf("decodeMessage(%d, %x) error = %v, want one wrapping errFrame", tt.typ, tt.p, err)
			}
			if !bytes.Equal(tt.p, orig) {
				t.Errorf("decodeMessage modified its input")
			}
		})
	}
}

func TestDecodeCommandMalformed(t *testing.T) {
	_, config := commandPayload(t, command{kind: frameConfig, slot: 1, port: 4000, host: "127.0.0.1", heartbeat: time.Second, shutdownTimeout: time.Second, secret: fixtureSecret()})
	fixed := configFixedLen(t)
	_, drain := commandPayload(t, command{kind: frameDrain, shutdownTimeout: time.Second})
	_, gap := commandPayload(t, command{kind: frameReportGap, reportGap: closeReportGap})
	setU64 := func(off int, v uint64) func([]byte) {
		return func(p []byte) { binary.BigEndian.PutUint64(p[off:], v) }
	}
	tests := []struct {
		name string
		typ  byte
		p    []byte
	}{
		{"unknown type 0", 0, drain},
		{"unknown type 19", 19, drain},
		{"message type as a command", frameStats, drain},

		{"config shorter than its fixed part", frameConfig, config[:fixed-1]},
		{"config without secret", frameConfig, append(bytes.Clone(config[:20]), "127.0.0.1"...)},
		{"config empty", frameConfig, nil},
		{"config with empty host", frameConfig, config[:fixed]},
		{"config with host over maxHostLen", frameConfig, append(bytes.Clone(config[:fixed]), bytes.Repeat([]byte("h"), maxHostLen+1)...)},
		{"config with zero heartbeat", frameConfig, patched(config, setU64(4, 0))},
		{"config with negative heartbeat", frameConfig, patched(config, setU64(4, math.MaxUint64))},
		{"config with zero shutdown timeout", frameConfig, patched(config, setU64(12, 0))},
		{"config with negative shutdown timeout", frameConfig, patched(config, setU64(12, 1<<63))},

		{"drain one byte short", frameDrain, drain[:7]},
		{"drain one byte long", frameDrain, append(bytes.Clone(drain), 0)},
		{"drain empty", frameDrain, nil},
		{"drain with zero timeout", frameDrain, patched(drain, setU64(0, 0))},
		{"drain with negative timeout", frameDrain, patched(drain, setU64(0, 1<<63))},

		{"report gap one byte short", frameReportGap, gap[:7]},
		{"report gap one byte long", frameReportGap, append(bytes.Clone(gap), 0)},
		{"report gap empty", frameReportGap, nil},
		{"report gap of zero", frameReportGap, patched(gap, setU64(0, 0))},
		{"report gap 1 ns under the least", frameReportGap, patched(gap, setU64(0, uint64(closeReportGap-1)))},
		{"report gap 1 ns over the longest", frameReportGap, patched(gap, setU64(0, uint64(maxReportGapFrame+1)))},
		{"negative report gap", frameReportGap, patched(gap, setU64(0, 1<<63))},
		{"a drain's payload as a report gap", frameReportGap, drain},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := decodeCommandSafe(tt.typ, tt.p)
			switch {
			case err == nil:
				t.Fatalf("decodeCommand(%d, %x) = %+v, want an error wrapping errFrame", tt.typ, tt.p, c)
			case !errors.Is(err, errFrame):
				t.Fatalf("decodeCommand(%d, %x) error = %v, want one wrapping errFrame", tt.typ, tt.p, err)
			}
		})
	}
}

func TestReadFrame(t *testing.T) {
	header := func(typ byte, n int) []byte { return []byte{typ, byte(n >> 8), byte(n)} }
	tests := []struct {
		name        string
		in          []byte
		wantTyp     byte
		wantPayload []byte
		wantErr     []error // each must match with errors.Is; nil means success
	}{
		{name: "empty payload", in: header(frameStopping, 0), wantTyp: frameStopping, wantPayload: []byte{}},
		{name: "payload of maxFramePayload bytes", in: append(header(9, maxFramePayload), bytes.Repeat([]byte{7}, maxFramePayload)...),
			wantTyp: 9, wantPayload: bytes.Repeat([]byte{7}, maxFramePayload)},
		{name: "nothing at all", in: nil, wantErr: []error{io.EOF}},
		{name: "truncated header", in: header(frameStats, 4)[:2], wantErr: []error{io.ErrUnexpectedEOF}},
		{name: "length over maxFramePayload", in: append(header(frameStats, maxFramePayload+1), make([]byte, maxFramePayload+1)...), wantErr: []error{errFrame}},
		{name: "largest length", in: header(frameStats, math.MaxUint16), wantErr: []error{errFrame}},
		{name: "truncated payload", in: append(header(frameStats, 70), make([]byte, 69)...), wantErr: []error{errFrame, io.ErrUnexpectedEOF}},
		{name: "header without payload", in: header(frameStats, 70), wantErr: []error{errFrame, io.ErrUnexpectedEOF}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typ, p, err := readFrame(bytes.NewReader(tt.in), make([]byte, maxFramePayload))
			if tt.wantErr == nil {
				if err != nil || typ != tt.wantTyp || !bytes.Equal(p, tt.wantPayload) {
					t.Fatalf("readFrame = %d, %x, %v; want %d, %x, nil", typ, p, err, tt.wantTyp, tt.wantPayload)
				}
				return
			}
			for _, want := range tt.wantErr {
				if !errors.Is(err, want) {
					t.Errorf("readFrame error = %v; want it to wrap %v", err, want)
				}
			}
			// A clean EOF between frames is how the peer says goodbye;
			// it must not look like a protocol error.
			if errors.Is(err, io.EOF) && errors.Is(err, errFrame) {
				t.Errorf("readFrame error %v wraps both io.EOF and errFrame", err)
			}
		})
	}
}

// TestSampler takes a real sample of this process and sends it through the
// heartbeat encoding.
func TestSampler(t *testing.T) {
	var conns atomic.Int64
	conns.Store(3)
	s := newSampler(&conns, &atomic.Uint64{})
	before := time.Now()
	st := s.sample()
	after := time.Now()

	if st.RSS == 0 {
		t.Errorf("RSS = 0, want > 0")
	}
	if st.HeapInUse == 0 || st.HeapTotal < st.HeapInUse {
		t.Errorf("HeapInUse = %d, HeapTotal = %d; want 0 < HeapInUse <= HeapTotal", st.HeapInUse, st.HeapTotal)
	}
	if st.Goroutines <= 0 {
		t.Errorf("Goroutines = %d, want > 0", st.Goroutines)
	}
	if st.ActiveConnections != 3 {
		t.Errorf("ActiveConnections = %d, want 3 (the counter's value)", st.ActiveConnections)
	}
	if math.IsNaN(st.CPUPercent) || math.IsInf(st.CPUPercent, 0) || st.CPUPercent < 0 {
		t.Errorf("CPUPercent = %v, want finite and >= 0", st.CPUPercent)
	}
	if st.SampledAt.Before(before) || st.SampledAt.After(after) {
		t.Errorf("SampledAt = %v, want within [%v, %v]", st.SampledAt, before, after)
	}
	if st.Uptime < 0 || st.Uptime > after.Sub(s.start) {
		t.Errorf("Uptime = %v, want within [0, %v]", st.Uptime, after.Sub(s.start))
	}

	in := message{kind: frameStats, slot: 4, pid: os.Getpid(), stats: st}
	typ, p := messagePayload(t, in)
	got, err := decodeMessage(typ, p)
	if err != nil {
		t.Fatalf("decodeMessage of a real sample: %v", err)
	}
	want := in
	want.stats.Uptime = st.Uptime.Truncate(time.Millisecond) // sent in ms
	if !equalMessage(got, want) {                            // SampledAt to the ns
		t.Errorf("decoded\n\t%+v\nwant\n\t%+v", got, want)
	}
}

// seedMessages are the frames a worker really sends, for the fuzz seeds.
func seedMessages() []message {
	return []message{
		// Readiness on an ephemeral port.
		{kind: frameReady, slot: 0, pid: 4242, port: 40001, stats: fixtureStats()},
		// A heartbeat, and one at the largest values accepted.
		{kind: frameStats, slot: 1, pid: 4243, stats: fixtureStats()},
		{kind: frameStats, slot: math.MaxUint16, pid: math.MaxInt32, stats: fixtureMaxStats()},
		// A graceful stop.
		{kind: frameStopping, slot: 2, pid: 4244},
		// Handed-off connections closed: by count alone, and with their
		// bytes and durations (issue 14).
		{kind: frameClosed, slot: 1, pid: 4243, closed: 7},
		{kind: frameClosed, slot: 1, pid: 4243, closed: 3, durations: []time.Duration{850 * time.Microsecond, 2 * time.Second, 90 * time.Minute}, bytesIn: 1 << 20, bytesOut: 3 << 30},
		// A start-up failure, ASCII and with multi-byte runes.
		{kind: frameFailed, slot: 3, pid: 4245, err: "listen tcp 127.0.0.1:40003: bind: address already in use"},
		{kind: frameFailed, slot: 3, pid: 4245, err: "open /srv/données/😀: permission denied"},
	}
}

// checkFrameRoundTrip checks that readFrame returns what appendFrame
// wrote, or rejects a payload too long for the protocol.
func checkFrameRoundTrip(t *testing.T, typ byte, p []byte) {
	if len(p) > math.MaxUint16 {
		return // the length field cannot express it
	}
	frame := appendFrame(nil, typ, func(b []byte) []byte { return append(b, p...) })
	r := bytes.NewReader(frame)
	gotTyp, got, err := readFrame(r, make([]byte, maxFramePayload))
	if len(p) > maxFramePayload {
		if !errors.Is(err, errFrame) {
			t.Fatalf("readFrame of a %d-byte payload = %v, want errFrame", len(p), err)
		}
		return
	}
	if err != nil || gotTyp != typ || !bytes.Equal(got, p) || r.Len() != 0 {
		t.Fatalf("readFrame(appendFrame(%d, %x)) = %d, %x, %v (%d bytes left)", typ, p, gotTyp, got, err, r.Len())
	}
}

// FuzzDecodeMessage checks that decodeMessage never panics, that what it
// accepts survives re-encoding, and that frames survive the pipe.
//
// Every accepted field is stored exactly (the layouts are fixed, and the
// encoder's only lossy steps, Uptime in ms and a failure message repaired
// to UTF-8 and cut at maxFailMessage, change nothing in a decoded value),
// so re-encoding a decoded message must give back the very same payload,
// not just an equal value.
func FuzzDecodeMessage(f *testing.F) {
	for _, m := range seedMessages() {
		typ, p := messagePayload(f, m)
		f.Add(typ, p)
	}
	_, stats := messagePayload(f, seedMessages()[1])
	// A heartbeat cut short, and one whose heap in use exceeds its total.
	f.Add(frameStats, stats[:len(stats)-1])
	f.Add(frameStats, patched(stats, func(p []byte) { binary.BigEndian.PutUint64(p[statsOffHeapInUse:], math.MaxUint64) }))
	// A command sent down the wrong pipe.
	typ, p := commandPayload(f, command{kind: frameDrain, shutdownTimeout: time.Second})
	f.Add(typ, p)

	f.Fuzz(func(t *testing.T, typ byte, p []byte) {
		checkFrameRoundTrip(t, typ, p)
		orig := bytes.Clone(p)
		m, err := decodeMessageSafe(typ, p)
		if errors.Is(err, errDecodePanic) {
			t.Fatal(err)
		}
		if !bytes.Equal(p, orig) {
			t.Fatalf("decodeMessage modified its input")
		}
		if err != nil {
			if !errors.Is(err, errFrame) {
				t.Fatalf("decodeMessage error %v does not wrap errFrame", err)
			}
			return
		}
		if m.kind != typ {
			t.Fatalf("decoded kind %d from type %d", m.kind, typ)
		}
		typ2, p2 := splitFrame(t, appendMessage(nil, &m))
		if typ2 != typ || !bytes.Equal(p2, p) {
			t.Fatalf("re-encoding %+v gave %d %x, want %d %x", m, typ2, p2, typ, p)
		}
		m2, err := decodeMessage(typ2, p2)
		if err != nil {
			t.Fatalf("decoding the re-encoded %+v: %v", m, err)
		}
		if !equalMessage(m, m2) {
			t.Fatalf("round trip changed %+v into %+v", m, m2)
		}
	})
}

// FuzzDecodeCommand is FuzzDecodeMessage for the primary's commands.
func FuzzDecodeCommand(f *testing.F) {
	// The configuration a primary sends each worker: ephemeral port, and
	// base port with an IPv6 loopback host.
	seeds := []command{
		{kind: frameConfig, slot: 2, host: "127.0.0.1", heartbeat: time.Second, shutdownTimeout: 10 * time.Second, secret: fixtureSecret()},
		{kind: frameConfig, slot: 1, port: 40001, host: "::1", heartbeat: 50 * time.Millisecond, shutdownTimeout: 5 * time.Second, secret: fixtureSecret()},
		// A graceful drain.
		{kind: frameDrain, shutdownTimeout: 10 * time.Second},
		// The close report gap of a hand-off pool of 8.
		{kind: frameReportGap, reportGap: 8 * time.Millisecond},
	}
	for _, c := range seeds {
		typ, p := commandPayload(f, c)
		f.Add(typ, p)
	}
	// A config with no host, and a drain with no timeout.
	f.Add(frameConfig, make([]byte, configFixedLen(f)))
	f.Add(frameDrain, make([]byte, 8))
	// A heartbeat sent down the wrong pipe.
	typ, p := messagePayload(f, seedMessages()[1])
	f.Add(typ, p)

	f.Fuzz(func(t *testing.T, typ byte, p []byte) {
		checkFrameRoundTrip(t, typ, p)
		orig := bytes.Clone(p)
		c, err := decodeCommandSafe(typ, p)
		if errors.Is(err, errDecodePanic) {
			t.Fatal(err)
		}
		if !bytes.Equal(p, orig) {
			t.Fatalf("decodeCommand modified its input")
		}
		if err != nil {
			if !errors.Is(err, errFrame) {
				t.Fatalf("decodeCommand error %v does not wrap errFrame", err)
			}
			return
		}
		if c.kind != typ {
			t.Fatalf("decoded kind %d from type %d", c.kind, typ)
		}
		typ2, p2 := splitFrame(t, appendCommand(nil, &c))
		if typ2 != typ || !bytes.Equal(p2, p) {
			t.Fatalf("re-encoding %+v gave %d %x, want %d %x", c, typ2, p2, typ, p)
		}
		c2, err := decodeCommand(typ2, p2)
		if err != nil {
			t.Fatalf("decoding the re-encoded %+v: %v", c, err)
		}
		if c2 != c {
			t.Fatalf("round trip changed %+v into %+v", c, c2)
		}
	})
}
