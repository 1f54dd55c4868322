package defuss

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Hand-off messages. Each descriptor the primary passes travels in a
// message of its own (SOCK_SEQPACKET, or SOCK_DGRAM), whose bytes tell the
// worker how to serve it. The first byte is the message's version:
//
//	1  the descriptor alone. Primaries before version 2 sent only this;
//	   it still carries a fixed port's listening socket.
//	2  proxied u16, the length of the PROXY header from a trusted load
//	   balancer at the start of the stream, which the worker consumes
//	   before serving; if proxied > 0, then the client's address (see
//	   below), which the handler gets as r.RemoteAddr. The worker
//	   reports the close of such a connection with its duration and
//	   bytes (see frameClosed), which a primary that sends version 2 or
//	   3 decodes; of a version 1 connection, by count alone.
//	3  flags u8, proxied u16 as in version 2, the peer's address (the
//	   socket's own, as the primary accepted it), and, if proxied > 0,
//	   the client's address. Flag handoffOptsSet: the socket has the
//	   options its accept gave it (net's, from the listening socket or
//	   net's Accept, or a WithListener ListenConfig's), so the worker sets
//	   nothing on it (see acceptedWithOpts and the raw accept loop's optsSet for
//	   when the primary says so).
//	4  a batch: count u8 (1 to handoffBatchMax), then count records, each
//	   what follows the version byte in a version 3 message; the message
//	   carries count descriptors, the nth for the nth record. The raw
//	   accept loop gathers a worker's connections of one pass into one
//	   message (handBatch), so that one sendmsg, and one recvmsg in the
//	   worker, carries several.
//
// An address is family u8 (4 or 6), the address (4 or 16 bytes) and the
// port u16.
//
// The primary and its workers run one binary, but the binary on disk may
// be replaced while the primary runs, by a newer one or an older one, and
// the workers it starts then run that. So a worker decodes every earlier
// version, and a primary sends version 3 or 4 only to a worker that
// announced it decodes it: a worker of version 3 or later writes, before its ready
// frame, a one-byte message on the hand-off socket, the highest version
// it decodes (announceHandoff), which the primary reads at ready
// (handoffAnnounced). To any other worker it sends version 2. A message of
// a later version than a worker knows is refused, and its connection
// closed. handoffFor also falls back to version 2 for a peer the message
// cannot carry.
const (
	handoffV1     byte = 1
	handoffV2     byte = 2
	handoffV3     byte = 3
	handoffV4     byte = 4
	handoffMsgMax      = 1 + handoffRecordMax

	// handoffRecordMax is the longest version 3 message after its
	// version byte: a version 4 record.
	handoffRecordMax = 1 + 2 + 2*handoffAddrMax
	handoffAddrMax   = 1 + 16 + 2

	// handoffBatchMax bounds the descriptors of a version 4 message.
	handoffBatchMax    = 16
	handoffBatchMsgMax = 2 + handoffBatchMax*handoffRecordMax

	// handoffOptsSet: version 3's flag for a socket that has the
	// options its accept gave it already.
	handoffOptsSet byte = 1 << 0
)

// handoffMsg is a decoded hand-off message.
type handoffMsg struct {
	version byte
	optsSet bool           // version 3: handoffOptsSet
	proxied int            // version 2 and 3: bytes of PROXY header to consume before serving
	peer    netip.AddrPort // version 3: the socket's peer
	client  netip.AddrPort // version 2 and 3 with proxied > 0: the client's address
}

// handoffFor is the message for a connection from peer, whose socket has
// net's accept-time options already if optsSet, behind a trusted PROXY
// header of proxied bytes that names client (if proxied > 0). A peer the
// message cannot carry (a link-local IPv6 address's zone) makes it a
// version 2 message: the worker then asks the socket, and sets the
// options itself.
func handoffFor(peer netip.AddrPort, optsSet bool, proxied int, client netip.AddrPort) handoffMsg {
	if !peer.IsValid() || peer.Addr().Zone() != "" {
		return handoffMsg{version: handoffV2, proxied: proxied, client: client}
	}
	return handoffMsg{version: handoffV3, optsSet: optsSet, proxied: proxied, peer: peer, client: client}
}

// upTo is m as a worker that decodes versions up to v gets it: version 3
// becomes version 2, with what version 2 carries.
func (m handoffMsg) upTo(v byte) handoffMsg {
	if m.version <= v {
		return m
	}
	return handoffMsg{version: handoffV2, proxied: m.proxied, client: m.client}
}

// appendHandoff appends the encoding of m.
func appendHandoff(b []byte, m handoffMsg) []byte {
	b = append(b, m.version)
	switch m.version {
	case handoffV1:
		return b
	case handoffV3:
		return appendHandoffRecord(b, m)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(m.proxied))
	if m.proxied == 0 {
		return b
	}
	return appendHandoffAddr(b, m.client)
}

// appendHandoffRecord appends what follows the version byte of m as a
// version 3 message: a record of a version 4 message.
func appendHandoffRecord(b []byte, m handoffMsg) []byte {
	var flags byte
	if m.optsSet {
		flags |= handoffOptsSet
	}
	b = binary.BigEndian.AppendUint16(append(b, flags), uint16(m.proxied))
	b = appendHandoffAddr(b, m.peer)
	if m.proxied == 0 {
		return b
	}
	return appendHandoffAddr(b, m.client)
}

// appendHandoffAddr appends the encoding of the address a.
func appendHandoffAddr(b []byte, a netip.AddrPort) []byte {
	if ip := a.Addr(); ip.Is4() {
		a4 := ip.As4()
		b = append(append(b, 4), a4[:]...)
	} else {
		a16 := ip.As16()
		b = append(append(b, 6), a16[:]...)
	}
	return binary.BigEndian.AppendUint16(b, a.Port())
}

// decodeHandoff decodes and validates a hand-off message of version 1 to
// 3 (decodeHandoffBatch: 4).
func decodeHandoff(b []byte) (handoffMsg, error) {
	switch {
	case len(b) == 0:
		return handoffMsg{}, fmt.Errorf("%w: empty hand-off message", errFrame)
	case b[0] == handoffV1 && len(b) == 1:
		return handoffMsg{version: handoffV1}, nil
	}
	m, rest, err := decodeHandoffBody(b[0], b[1:])
	if err == nil && len(rest) != 0 {
		err = fmt.Errorf("%w: hand-off message of %d bytes, %d of them left over", errFrame, len(b), len(rest))
	}
	return m, err
}

// decodeHandoffBatch decodes and validates a version 4 message, appending
// its records to ms, as version 3 messages.
func decodeHandoffBatch(b []byte, ms []handoffMsg) ([]handoffMsg, error) {
	if len(b) < 2 || b[0] != handoffV4 || b[1] == 0 || b[1] > handoffBatchMax {
		return ms, fmt.Errorf("%w: hand-off batch of %d bytes, not version 4 with 1 to %d records", errFrame, len(b), handoffBatchMax)
	}
	rest := b[2:]
	for range b[1] {
		var m handoffMsg
		var err error
		if m, rest, err = decodeHandoffBody(handoffV3, rest); err != nil {
			return ms, err
		}
		ms = append(ms, m)
	}
	if len(rest) != 0 {
		return ms, fmt.Errorf("%w: hand-off batch of %d bytes, %d of them left over", errFrame, len(b), len(rest))
	}
	return ms, nil
}

// decodeHandoffBody decodes what follows the version byte of a version 2
// or 3 message (a version 4 record is version 3's), and returns what
// follows it.
func decodeHandoffBody(version byte, b []byte) (handoffMsg, []byte, error) {
	m := handoffMsg{version: version}
	rest := b
	switch {
	case version == handoffV2 && len(rest) >= 2:
	case version == handoffV3 && len(rest) >= 3 && rest[0]&^handoffOptsSet == 0:
		m.optsSet = rest[0]&handoffOptsSet != 0
		rest = rest[1:]
	default:
		return m, nil, fmt.Errorf("%w: hand-off message version %d, %d bytes", errFrame, version, 1+len(b))
	}
	m.proxied = int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if m.proxied > proxyV2Max {
		return m, nil, fmt.Errorf("%w: PROXY header of %d bytes in a hand-off message", errFrame, m.proxied)
	}
	var err error
	if m.version == handoffV3 {
		if m.peer, rest, err = decodeHandoffAddr(rest); err != nil {
			return m, nil, err
		}
	}
	if m.proxied > 0 {
		if m.client, rest, err = decodeHandoffAddr(rest); err != nil {
			return m, nil, err
		}
	}
	return m, rest, nil
}

// decodeHandoffAddr decodes the address at the start of b, and returns
// what follows it.
func decodeHandoffAddr(b []byte) (netip.AddrPort, []byte, error) {
	var a netip.Addr
	switch {
	case len(b) >= 1+4+2 && b[0] == 4:
		a, b = netip.AddrFrom4([4]byte(b[1:])), b[1+4:]
	case len(b) >= 1+16+2 && b[0] == 6:
		a, b = netip.AddrFrom16([16]byte(b[1:])), b[1+16:]
	default:
		return netip.AddrPort{}, nil, fmt.Errorf("%w: hand-off message with an address cut short, or not of family 4 or 6", errFrame)
	}
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(b)), b[2:], nil
}

// handTo passes a client's descriptor to process pr with send, which
// writes it, in its hand-off message (of a version up to the one it is
// given, what pr decodes), to pr's hand-off socket. The
// connection counts as open in pr before it is sent, so that a close the
// worker reports at once finds it there. With nowait (the raw accept
// loop), it does not wait for an exit being settled either, which waits
// for sends that may each take up to handoffTimeout: errWouldWait.
func handTo(pr *process, send func(*process, byte) error, nowait bool) error {
	if !nowait {
		pr.handMu.RLock()
	} else if !pr.handMu.TryRLock() {
		return errWouldWait
	}
	defer pr.handMu.RUnlock()
	if pr.handGone {
		return errWorkerExited
	}
	pr.open.Add(1)
	if err := send(pr, byte(max(pr.handoffVersion.Load(), uint32(handoffV2)))); err != nil {
		pr.open.Add(-1)
		return err
	}
	return nil
}

// errWouldWait: a worker cannot take a connection without a wait (its
// hand-off queue is full, its exit is being settled, its accept queue is
// full), and the raw accept loop, which must not wait, did not.
var errWouldWait = errors.New("defuss: the worker cannot take the connection without a wait")

// peeker is a client socket whose head can be peeked at: a
// *net.TCPConn, or the raw accept loop's fileConn.
type peeker interface {
	syscall.Conn
	SetReadDeadline(time.Time) error
}

// serveHandoff serves the connections the primary hands off.
func (w *worker) serveHandoff() {
	defer w.wg.Done()
	if err := w.srv.Serve(w.withTLS(w.handed)); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		w.log.Error("serve handed-off connections", "err", err)
	}
}

// reportCloses tells the primary, in batches, which handed-off
// connections have closed, so that its connection counts stay exact and
// it can record their durations and bytes. A close is reported at once,
// and the closes that follow it within the report gap together after
// it: one frame then carries many under load, not one each. The gap is
// the primary's to set (closeReportGapFor, frameReportGap); until it
// says, it is closeReportGap. When the worker stops it reports the closes
// that stopping made.
func (w *worker) reportCloses() {
	defer w.wg.Done()
	var batch closeBatch
	gap := time.NewTimer(closeReportGap)
	gap.Stop()
	for {
		select {
		case <-w.kick:
		case <-w.done:
			w.flushCloses(&batch)
			return
		}
		if err := w.flushCloses(&batch); err != nil {
			return
		}
		gap.Reset(w.reportGap())
		select {
		case <-gap.C:
		case <-w.done:
			gap.Stop()
			w.flushCloses(&batch)
			return
		}
	}
}

// reportGap is the least time between two close reports now.
func (w *worker) reportGap() time.Duration {
	if g := time.Duration(w.closeGap.Load()); g > 0 {
		return g
	}
	return closeReportGap
}

// closeReportGap and the two below set the least time between two close
// reports of one worker: the primary's counts of a worker's connections
// lag by about that (by construction; no test measures the lag). It grows
// with the pool (closeReportGapFor).
const (
	closeReportGap          = 2 * time.Millisecond  // the least, for a pool of 2 workers or fewer
	closeReportGapPerWorker = time.Millisecond      // for larger pools
	maxCloseReportGap       = 16 * time.Millisecond // for 16 workers and more
)

// closeReportGapFor is the gap between close reports for a pool of n
// workers: 1 ms a worker, from closeReportGap to maxCloseReportGap. A
// worker takes about 1/n of the closes, so under load, in pools of up to
// 16, a report carries as many closes in a pool of 8 as in a pool of 2, a
// count lags by as many closes, and the primary reads about 1,000 reports
// a second from the whole pool where it read 500 from each worker. Each
// report costs a wake-up on both sides, and on a machine with fewer cores
// than workers, context switches: with 8 workers on 2 cores this cut the
// primary's CPU per connection by about a third and the workers' by a
// quarter to a third (bench/NOTES.md, *Close reports in larger pools*).
func closeReportGapFor(n int) time.Duration {
	return min(max(time.Duration(n)*closeReportGapPerWorker, closeReportGap), maxCloseReportGap)
}

// maxPendingCloses bounds the closes with stats that wait for the
// reporter (when the primary reads its pipe too slowly); past it, a close
// is reported by count alone, without its duration and bytes.
const maxPendingCloses = 1 << 16

// closeLog holds the closes of handed-off connections not yet reported.
type closeLog struct {
	mu    sync.Mutex
	batch closeBatch
}

// closeBatch is closes to report: count of them by count alone, and the
// others with their durations and bytes.
type closeBatch struct {
	count     int
	durations []time.Duration
	in, out   uint64
}

// handedClose records the close of a handed-off connection (nil: one that
// could not be served) and wakes the reporter.
func (w *worker) handedClose(c *workerConn) {
	l := &w.closes
	l.mu.Lock()
	if c != nil && c.stats && len(l.batch.durations) < maxPendingCloses {
		l.batch.durations = append(l.batch.durations, time.Since(c.since))
		l.batch.in += uint64(c.in.Load())
		l.batch.out += uint64(c.out.Load())
	} else {
		l.batch.count++
	}
	l.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// flushCloses sends the closes recorded so far, taking them into batch
// (whose memory it reuses).
func (w *worker) flushCloses(batch *closeBatch) error {
	l := &w.closes
	l.mu.Lock()
	*batch, l.batch = l.batch, closeBatch{durations: batch.durations[:0]}
	l.mu.Unlock()
	if batch.count > 0 {
		if err := w.send(&message{kind: frameClosed, closed: batch.count}); err != nil {
			return err
		}
	}
	in, out := batch.in, batch.out // sent with the first frame
	for ds := batch.durations; len(ds) > 0; {
		n := min(len(ds), maxClosedStats)
		m := &message{kind: frameClosed, closed: n, durations: ds[:n], bytesIn: in, bytesOut: out}
		if err := w.send(m); err != nil {
			return err
		}
		ds, in, out = ds[n:], 0, 0
	}
	return nil
}

// handoffListener yields the connections whose descriptors arrive on the
// hand-off socket.
type handoffListener struct {
	uc       *net.UnixConn
	addr     net.Addr
	conns    chan net.Conn
	done     chan struct{}
	once     sync.Once
	accepted *atomic.Uint64
	w        *worker // for close reports
}

var _ net.Listener = (*handoffListener)(nil)

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		l.accepted.Add(1)
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept; the socket itself closes when the worker stops.
func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// settleHanded is called once the process has exited: it returns the
// handed connections the worker had not reported closed, which died with
// it. It waits for the hand-offs in flight, and refuses later ones, so
// that a failed send and the exit never both take a connection out.
func (pr *process) settleHanded() int64 {
	pr.handMu.Lock()
	defer pr.handMu.Unlock()
	pr.handGone = true
	return pr.open.Swap(0)
}

// errWorkerExited: a hand-off to a process whose exit has been settled.
var errWorkerExited = errors.New("defuss: the worker has exited")
