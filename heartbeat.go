package defuss

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime/metrics"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	psprocess "github.com/shirou/gopsutil/v4/process"
)

// Stats is a worker's self-reported resource use, sent with every heartbeat.
type Stats struct {
	// CPUPercent is the CPU time used since the previous sample, as a
	// percentage of one core; it can exceed 100 on several cores.
	CPUPercent float64
	// RSS is the resident set size in bytes.
	RSS uint64
	// HeapInUse is the Go heap in use (objects and unused span space), in bytes.
	HeapInUse uint64
	// HeapTotal is the Go heap obtained from the OS, in bytes.
	HeapTotal uint64
	// Goroutines is the number of live goroutines.
	Goroutines int
	// GCCycles is the number of completed GC cycles.
	GCCycles uint64
	// ActiveConnections is the number of HTTP connections the worker's
	// server has open, by its own count.
	ActiveConnections int
	// Requests is the number of requests the worker has served.
	Requests uint64
	// Uptime is how long the worker process has run.
	Uptime time.Duration
	// SampledAt is when the sample was taken, by the worker's clock.
	SampledAt time.Time
}

// Frames are the heartbeat pipe's (worker → primary) and the control pipe's
// (primary → worker) unit: a type byte, a big-endian uint16 payload length,
// then the payload. Every type has a fixed layout, checked on decode.
const (
	frameHeaderLen  = 3
	maxFramePayload = 1024

	// worker → primary
	frameReady    byte = 1 // slot u16, pid u32, port u16, stats
	frameStats    byte = 2 // slot u16, pid u32, stats
	frameStopping byte = 3 // slot u16, pid u32
	frameFailed   byte = 4 // slot u16, pid u32, message (UTF-8, ≤ maxFailMessage)
	frameClosed   byte = 5 // slot u16, pid u32, count u32[, bytes in u64, bytes out u64, count × duration ns u64]: handed-off connections closed

	// primary → worker
	frameConfig byte = 16 // slot u16, port u16, heartbeat ns u64, shutdown ns u64, secret [32], flags u8, host
	frameDrain  byte = 17 // timeout ns u64, connections u64
	// frameReportGap sets a hand-off worker's least time between close
	// reports (closeReportGapFor), from closeReportGap to
	// maxReportGapFrame.
	frameReportGap byte = 18 // gap ns u64

	// maxReportGapFrame is the longest gap a worker takes: more than this
	// version's primary sends (maxCloseReportGap), so that a later one may
	// send more.
	maxReportGapFrame = time.Second

	statsLen       = 8*8 + 4*2
	maxFailMessage = 512
	maxHostLen     = 255

	// maxClosedStats is how many connections' durations a frameClosed
	// carries at most.
	maxClosedStats = (maxFramePayload - 6 - 4 - 16) / 8
)

// A frameClosed reports handed-off connections closed. A worker sends the
// count alone (all that workers of earlier versions send, and all that
// primaries of earlier versions decode) for connections that arrived in
// version 1 hand-off messages. For those that arrived in version 2 or 3
// messages, whose primary decodes both forms, it adds what the clients
// sent and what the worker sent, in bytes, and each connection's life,
// from hand-off to close, for defuss.connection.bytes and
// defuss.connection.duration.

// errFrame is wrapped by every decoding error.
var errFrame = errors.New("defuss: malformed frame")

// message is a decoded frame from a worker.
type message struct {
	kind   byte
	slot   int
	pid    int
	port   int    // frameReady
	stats  Stats  // frameReady, frameStats
	err    string // frameFailed
	closed int    // frameClosed

	// frameClosed with stats: each connection's life (closed of them), and
	// the bytes the clients sent (in) and the worker sent (out).
	durations []time.Duration
	bytesIn   uint64
	bytesOut  uint64
}

// command is a decoded frame from the primary.
type command struct {
	kind            byte
	slot            int             // frameConfig
	port            int             // frameConfig; 0 = ephemeral
	host            string          // frameConfig
	heartbeat       time.Duration   // frameConfig
	shutdownTimeout time.Duration   // frameConfig, frameDrain
	conns           uint64          // frameDrain: connections the primary made to this worker, all told
	secret          [secretLen]byte // frameConfig: proves a connection comes from the primary
	handoff         bool            // frameConfig: connections also arrive on fd 5
	listener        bool            // frameConfig: the listening socket comes first on fd 5 (fixed ports)
	reportGap       time.Duration   // frameReportGap
}

// secretLen is the size of the per-run secret that the primary puts in the
// PROXY header of every connection it makes to a worker.
const secretLen = 32

// readFrame reads one frame into buf (which must hold maxFramePayload
// bytes) and returns its type and payload, a sub-slice of buf.
func readFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return 0, nil, fmt.Errorf("%w: cut off in its header: %w", errFrame, err)
		}
		return 0, nil, err // io.EOF: the peer closed between frames
	}
	n := int(binary.BigEndian.Uint16(h[1:]))
	if n > maxFramePayload {
		return 0, nil, fmt.Errorf("%w: type %d: length %d over %d", errFrame, h[0], n, maxFramePayload)
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, fmt.Errorf("%w: type %d: %w", errFrame, h[0], err)
	}
	return h[0], buf[:n], nil
}

// appendFrame appends a frame of type typ whose payload append adds.
func appendFrame(b []byte, typ byte, payload func([]byte) []byte) []byte {
	start := len(b)
	b = append(b, typ, 0, 0)
	b = payload(b)
	binary.BigEndian.PutUint16(b[start+1:], uint16(len(b)-start-frameHeaderLen))
	return b
}

func appendMessage(b []byte, m *message) []byte {
	return appendFrame(b, m.kind, func(b []byte) []byte {
		b = binary.BigEndian.AppendUint16(b, uint16(m.slot))
		b = binary.BigEndian.AppendUint32(b, uint32(m.pid))
		switch m.kind {
		case frameReady:
			b = binary.BigEndian.AppendUint16(b, uint16(m.port))
			b = appendStats(b, &m.stats)
		case frameStats:
			b = appendStats(b, &m.stats)
		case frameClosed:
			b = binary.BigEndian.AppendUint32(b, uint32(m.closed))
			if len(m.durations) > 0 { // closed == len(durations)
				b = binary.BigEndian.AppendUint64(b, m.bytesIn)
				b = binary.BigEndian.AppendUint64(b, m.bytesOut)
				for _, d := range m.durations {
					b = binary.BigEndian.AppendUint64(b, uint64(d))
				}
			}
		case frameFailed:
			msg := strings.ToValidUTF8(m.err, "\uFFFD")
			if len(msg) > maxFailMessage {
				n := maxFailMessage
				for n > 0 && !utf8.RuneStart(msg[n]) {
					n-- // cut on a rune boundary: the decoder insists on UTF-8
				}
				msg = msg[:n]
			}
			b = append(b, msg...)
		}
		return b
	})
}

func appendStats(b []byte, s *Stats) []byte {
	b = binary.BigEndian.AppendUint64(b, math.Float64bits(s.CPUPercent))
	b = binary.BigEndian.AppendUint64(b, s.RSS)
	b = binary.BigEndian.AppendUint64(b, s.HeapInUse)
	b = binary.BigEndian.AppendUint64(b, s.HeapTotal)
	b = binary.BigEndian.AppendUint32(b, uint32(s.Goroutines))
	b = binary.BigEndian.AppendUint64(b, s.GCCycles)
	b = binary.BigEndian.AppendUint32(b, uint32(s.ActiveConnections))
	b = binary.BigEndian.AppendUint64(b, uint64(s.Uptime/time.Millisecond))
	b = binary.BigEndian.AppendUint64(b, uint64(s.SampledAt.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, s.Requests)
	return b
}

// decodeMessage decodes and validates a worker's frame. It checks the
// frame on its own; whether the frame fits the slot and process it came
// from is the supervisor's check.
func decodeMessage(typ byte, p []byte) (message, error) {
	m := message{kind: typ}
	want := 6
	switch typ {
	case frameReady:
		want += 2 + statsLen
	case frameStats:
		want += statsLen
	case frameStopping:
	case frameClosed:
		want += 4
		if len(p) > want { // with stats: bytes in and out, a duration per connection
			want += 16 + 8*min(int(binary.BigEndian.Uint32(p[6:])), maxClosedStats+1)
		}
	case frameFailed:
		if len(p) > want+maxFailMessage {
			return m, fmt.Errorf("%w: failure message of %d bytes", errFrame, len(p)-want)
		}
		want = max(len(p), want)
	default:
		return m, fmt.Errorf("%w: unknown type %d", errFrame, typ)
	}
	if len(p) != want {
		return m, fmt.Errorf("%w: type %d: %d bytes, want %d", errFrame, typ, len(p), want)
	}
	m.slot = int(binary.BigEndian.Uint16(p))
	m.pid = int(binary.BigEndian.Uint32(p[2:]))
	if m.pid <= 0 || m.pid > math.MaxInt32 {
		return m, fmt.Errorf("%w: pid %d", errFrame, m.pid)
	}
	p = p[6:]
	switch typ {
	case frameReady:
		if m.port = int(binary.BigEndian.Uint16(p)); m.port == 0 {
			return m, fmt.Errorf("%w: ready with port 0", errFrame)
		}
		p = p[2:]
		fallthrough
	case frameStats:
		var err error
		if m.stats, err = decodeStats(p); err != nil {
			return m, err
		}
	case frameClosed:
		if m.closed = int(binary.BigEndian.Uint32(p)); m.closed <= 0 || m.closed > math.MaxInt32 {
			return m, fmt.Errorf("%w: closed count %d", errFrame, m.closed)
		}
		if p = p[4:]; len(p) == 0 {
			return m, nil // the count alone
		}
		if m.closed > maxClosedStats {
			return m, fmt.Errorf("%w: %d closes with stats, over %d", errFrame, m.closed, maxClosedStats)
		}
		m.bytesIn, m.bytesOut = binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])
		if m.bytesIn > math.MaxInt64 || m.bytesOut > math.MaxInt64 {
			return m, fmt.Errorf("%w: closed connections' bytes out of range", errFrame)
		}
		m.durations = make([]time.Duration, m.closed)
		for i := range m.durations {
			d := binary.BigEndian.Uint64(p[16+8*i:])
			if d > math.MaxInt64 {
				return m, fmt.Errorf("%w: closed connection's duration out of range", errFrame)
			}
			m.durations[i] = time.Duration(d)
		}
	case frameFailed:
		if !utf8.Valid(p) {
			return m, fmt.Errorf("%w: failure message is not UTF-8", errFrame)
		}
		m.err = string(p)
	}
	return m, nil
}

func decodeStats(p []byte) (Stats, error) {
	var s Stats
	s.CPUPercent = math.Float64frombits(binary.BigEndian.Uint64(p))
	s.RSS = binary.BigEndian.Uint64(p[8:])
	s.HeapInUse = binary.BigEndian.Uint64(p[16:])
	s.HeapTotal = binary.BigEndian.Uint64(p[24:])
	s.Goroutines = int(binary.BigEndian.Uint32(p[32:]))
	s.GCCycles = binary.BigEndian.Uint64(p[36:])
	s.ActiveConnections = int(binary.BigEndian.Uint32(p[44:]))
	uptime := binary.BigEndian.Uint64(p[48:])
	s.SampledAt = time.Unix(0, int64(binary.BigEndian.Uint64(p[56:])))
	s.Requests = binary.BigEndian.Uint64(p[64:])
	switch {
	case math.IsNaN(s.CPUPercent) || math.IsInf(s.CPUPercent, 0) || s.CPUPercent < 0 || s.CPUPercent > 1e6:
		return s, fmt.Errorf("%w: cpu percent %v", errFrame, s.CPUPercent)
	case s.HeapInUse > s.HeapTotal:
		return s, fmt.Errorf("%w: heap in use %d over heap total %d", errFrame, s.HeapInUse, s.HeapTotal)
	case s.Goroutines > math.MaxInt32 || s.ActiveConnections > math.MaxInt32:
		return s, fmt.Errorf("%w: counts out of range", errFrame)
	case uptime > uint64(math.MaxInt64/time.Millisecond):
		return s, fmt.Errorf("%w: uptime %dms out of range", errFrame, uptime)
	}
	s.Uptime = time.Duration(uptime) * time.Millisecond
	return s, nil
}

func appendCommand(b []byte, c *command) []byte {
	return appendFrame(b, c.kind, func(b []byte) []byte {
		switch c.kind {
		case frameConfig:
			b = binary.BigEndian.AppendUint16(b, uint16(c.slot))
			b = binary.BigEndian.AppendUint16(b, uint16(c.port))
			b = binary.BigEndian.AppendUint64(b, uint64(c.heartbeat))
			b = binary.BigEndian.AppendUint64(b, uint64(c.shutdownTimeout))
			b = append(b, c.secret[:]...)
			var flags byte
			if c.handoff {
				flags |= 1
			}
			if c.listener {
				flags |= 2
			}
			b = append(b, flags)
			b = append(b, c.host...)
		case frameDrain:
			b = binary.BigEndian.AppendUint64(b, uint64(c.shutdownTimeout))
			b = binary.BigEndian.AppendUint64(b, c.conns)
		case frameReportGap:
			b = binary.BigEndian.AppendUint64(b, uint64(c.reportGap))
		}
		return b
	})
}

func decodeCommand(typ byte, p []byte) (command, error) {
	c := command{kind: typ}
	switch typ {
	case frameConfig:
		const fixed = 20 + secretLen + 1
		if len(p) < fixed || len(p) > fixed+maxHostLen {
			return c, fmt.Errorf("%w: config of %d bytes", errFrame, len(p))
		}
		c.slot = int(binary.BigEndian.Uint16(p))
		c.port = int(binary.BigEndian.Uint16(p[2:]))
		c.heartbeat = time.Duration(binary.BigEndian.Uint64(p[4:]))
		c.shutdownTimeout = time.Duration(binary.BigEndian.Uint64(p[12:]))
		copy(c.secret[:], p[20:20+secretLen])
		flags := p[20+secretLen]
		if flags&^3 != 0 {
			return c, fmt.Errorf("%w: config flags %#x", errFrame, flags)
		}
		c.handoff = flags&1 != 0
		c.listener = flags&2 != 0
		c.host = string(p[fixed:])
		if c.heartbeat <= 0 || c.shutdownTimeout <= 0 || c.host == "" {
			return c, fmt.Errorf("%w: config out of range", errFrame)
		}
	case frameDrain:
		if len(p) != 16 {
			return c, fmt.Errorf("%w: drain of %d bytes", errFrame, len(p))
		}
		c.conns = binary.BigEndian.Uint64(p[8:])
		if c.shutdownTimeout = time.Duration(binary.BigEndian.Uint64(p)); c.shutdownTimeout <= 0 {
			return c, fmt.Errorf("%w: drain timeout out of range", errFrame)
		}
	case frameReportGap:
		if len(p) != 8 {
			return c, fmt.Errorf("%w: report gap of %d bytes", errFrame, len(p))
		}
		if c.reportGap = time.Duration(binary.BigEndian.Uint64(p)); c.reportGap < closeReportGap || c.reportGap > maxReportGapFrame {
			return c, fmt.Errorf("%w: report gap %d ns out of range", errFrame, uint64(c.reportGap))
		}
	default:
		return c, fmt.Errorf("%w: unknown command %d", errFrame, typ)
	}
	return c, nil
}

// sampler takes a worker's Stats.
type sampler struct {
	proc     *psprocess.Process // nil where gopsutil cannot see the process
	start    time.Time
	conns    *atomic.Int64
	requests *atomic.Uint64
	samples  []metrics.Sample
}

func newSampler(conns *atomic.Int64, requests *atomic.Uint64) *sampler {
	s := &sampler{start: time.Now(), conns: conns, requests: requests, samples: []metrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
		{Name: "/sched/goroutines:goroutines"},
		{Name: "/gc/cycles/total:gc-cycles"},
	}}
	if p, err := psprocess.NewProcess(int32(os.Getpid())); err == nil {
		s.proc = p
		s.proc.Percent(0) // prime the CPU delta
	}
	return s
}

func (s *sampler) sample() Stats {
	metrics.Read(s.samples)
	u := func(i int) uint64 {
		if s.samples[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return s.samples[i].Value.Uint64()
	}
	st := Stats{
		HeapInUse:         u(0) + u(1),
		HeapTotal:         u(0) + u(1) + u(2) + u(3),
		Goroutines:        int(u(4)),
		GCCycles:          u(5),
		ActiveConnections: int(s.conns.Load()),
		Requests:          s.requests.Load(),
		Uptime:            time.Since(s.start),
		SampledAt:         time.Now(),
	}
	if s.proc != nil {
		if cpu, err := s.proc.Percent(0); err == nil && cpu >= 0 && !math.IsInf(cpu, 0) && !math.IsNaN(cpu) {
			st.CPUPercent = cpu
		}
		if mem, err := s.proc.MemoryInfo(); err == nil {
			st.RSS = mem.RSS
		}
	}
	return st
}
