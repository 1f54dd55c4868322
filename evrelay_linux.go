package defuss

import (
	"bytes"
	"cmp"
	"container/heap"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// evRelay is splice mode's relay on Linux: a few event loops, one per
// core, each carrying many spliced connections with epoll, in place of
// two goroutines per connection. An idle connection costs a small struct
// and two descriptors, not two goroutine stacks; moving a message costs a
// read and a write, with no goroutine to wake.
//
// A connection enters once it is routed (relay.take): its two descriptors
// are taken out of Go's poller (dup, then the net.Conns close) and belong
// to one loop from then on. The loop owns everything about them; other
// goroutines talk to it through its inbox (post).
type evRelay struct {
	loops []*evLoop
	wg    sync.WaitGroup
	mu    sync.Mutex
	next  int
}

// newEvRelay starts n event loops. It returns nil, and splice mode uses
// goroutines, if the system refuses one.
func newEvRelay(n int) *evRelay {
	r := &evRelay{}
	for range max(n, 1) {
		l, err := newEvLoop()
		if err != nil {
			r.stop()
			return nil
		}
		r.loops = append(r.loops, l)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			l.run()
		}()
	}
	return r
}

// stop ends the loops, closing what they still carry, and waits for them.
func (r *evRelay) stop() {
	if r == nil {
		return
	}
	for _, l := range r.loops {
		l.post(evCmd{op: evStop})
	}
	r.wg.Wait()
}

// take moves the routed connection rl into a loop. It reports false if
// the relay cannot carry it (the client is not a *net.TCPConn; its
// worker connection is then not raw either), and rl is to be run by
// goroutines instead.
func (r *evRelay) take(rl *relay) bool {
	if r == nil {
		return false
	}
	// raw: the raw accept loop's client, whose descriptor was never in
	// Go's poller. Any other is detached.
	var raw *fileConn
	switch c := rl.client.(type) {
	case *net.TCPConn:
	case *fileConn:
		if c.f == nil {
			raw = c
		}
	default:
		return false
	}
	wfd, err := rl.worker.detach()
	if err != nil {
		// Aborted (the head could not be written), or closed under us
		// by a shutdown: nothing to relay.
		if raw != nil {
			unix.Close(raw.fd)
		} else {
			rl.client.Close()
		}
		rl.finish(0, 0)
		return true
	}
	var cfd int
	if raw != nil {
		cfd = raw.fd
	} else {
		cfd, err = detach(rl.client.(detachable))
	}
	if err != nil {
		unix.Close(wfd)
		rl.finish(0, 0)
		return true
	}
	r.mu.Lock()
	l := r.loops[r.next%len(r.loops)]
	r.next++
	r.mu.Unlock()
	pr := &evPair{loop: l, rl: rl, cfd: cfd, wfd: wfd, halfOpen: rl.p.cfg.halfOpen}
	pr.up = evDir{src: cfd, dst: wfd}
	pr.down = evDir{src: wfd, dst: cfd}
	l.post(evCmd{op: evAdd, pair: pr})
	if !rl.p.conns.relayed(rl.client, pr) {
		pr.close() // the table closed meanwhile: shutdown has ended it
	}
	return true
}

// detach returns the worker socket for a loop: the raw one, or the
// net.TCPConn's, detached. An aborted relay has neither.
func (u upstream) detach() (int, error) {
	switch {
	case u.fd >= 0:
		return u.fd, nil
	case u.conn == nil:
		return -1, net.ErrClosed
	}
	return detach(u.conn)
}

// detachable is a client socket in Go's poller: a *net.TCPConn, or a
// fileConn with its file.
type detachable interface {
	SyscallConn() (syscall.RawConn, error)
	Close() error
}

// detach takes c's socket out of Go's poller: it returns a duplicate of
// its descriptor (non-blocking, close-on-exec, as the original) and closes
// c, which closes the original without touching the connection.
func detach(c detachable) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl", derr)
	}
	c.Close()
	return fd, nil
}

// An evPair is one spliced connection in a loop: the client's socket and
// the worker's, and a direction each way.
type evPair struct {
	loop     *evLoop
	rl       *relay
	cfd, wfd int
	halfOpen bool

	// Owned by the loop.
	id, gen  int32
	mask     [2]uint32 // epoll interest registered for cfd, wfd
	parked   [2]bool   // cfd, wfd out of epoll: hung up while what they sent waits (see event)
	up, down evDir     // client to worker; worker to client
	finAt    time.Time
	turn     uint64 // the loop's turn count at the pair's last bulk turn
	closed   bool
}

// An evDir is one direction of a pair.
//
// It reads what src has, evPlainRead at most, and writes it to dst. A
// receiver that does not take a whole read (a slow reader, a full socket)
// must not make the primary hold what it sends: the rest of that read
// waits in pending, and from then on the direction peeks (MSG_PEEK, up to
// evBufSize), writes, and consumes from src only what dst took
// (MSG_TRUNC), so that the rest waits in src's socket and TCP's flow
// control slows the sender. A read that fills its buffer (bulk data)
// switches to peeking too. Once dst takes all that was queued, plain reads
// resume: peeking costs one system call more per read, and saves reads
// on bulk data.
type evDir struct {
	src, dst int
	done     bool
	peek     bool   // dst did not take a whole read lately: peek, write, consume
	stalled  bool   // peeking, and dst is full: wait until it is writable
	pending  []byte // read from src, not yet written to dst
	n        int64  // bytes written to dst
	// discard: dst refused a write (the worker has closed); what src
	// still sends is read and dropped (writeFailed).
	discard bool
}

// end and close are what the connection table asks of a relayed pair
// (see connTable.end and closeAll).
func (pr *evPair) end()   { pr.loop.post(evCmd{op: evEnd, pair: pr}) }
func (pr *evPair) close() { pr.loop.post(evCmd{op: evClose, pair: pr}) }

type evOp int

const (
	evAdd evOp = iota
	evEnd
	evClose
	evStop
)

type evCmd struct {
	op   evOp
	pair *evPair
}

// evLoop is one event loop. Its epoll descriptor sits in Go's own poller,
// so the loop's goroutine waits as any network read does, holding no
// thread; timers (finTimeout) are the descriptor's read deadline.
type evLoop struct {
	epfd int
	efd  int // an eventfd: wakes the loop for its inbox
	file *os.File
	rc   syscall.RawConn

	mu      sync.Mutex
	inbox   []evCmd
	woken   bool // an eventfd write is pending
	stopped bool // the loop has taken its stop: nothing reaches it any more

	// Owned by the loop's goroutine.
	spare  []evCmd // the inbox's other buffer
	events []unix.EpollEvent
	bulk   []unix.EpollEvent // this look's bulk events (see evBulkBudget)
	turn   uint64            // bulk turns given, ever (see runBulk)
	moved  int64             // bytes written, ever
	buf    []byte
	pairs  []*evPair // by id
	free   []int32
	gen    int32 // of the last pair added: tells a slot's pairs apart
	timers finTimers
	armed  time.Time // the file's read deadline
}

// evWake is the epoll data of the eventfd.
const evWake = -1

// evPlainRead is how much a direction reads (and consumes) at once, which
// bounds what a receiver that does not take it makes the primary hold;
// evBufSize how much it peeks at once.
const (
	evPlainRead = 16 << 10
	evBufSize   = 64 << 10
)

func newEvLoop() (*evLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	l := &evLoop{epfd: epfd, efd: efd, events: make([]unix.EpollEvent, 256), bulk: make([]unix.EpollEvent, 0, 256), buf: make([]byte, evBufSize)}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: evWake}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		l.closeFDs()
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	// Non-blocking, so that os.NewFile puts it in Go's poller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		l.closeFDs()
		return nil, os.NewSyscallError("fcntl", err)
	}
	l.file = os.NewFile(uintptr(epfd), "epoll")
	if l.rc, err = l.file.SyscallConn(); err != nil {
		l.file.Close()
		unix.Close(efd)
		return nil, err
	}
	return l, nil
}

func (l *evLoop) closeFDs() {
	unix.Close(l.epfd)
	unix.Close(l.efd)
}

// post hands a command to the loop.
func (l *evLoop) post(c evCmd) {
	l.mu.Lock()
	if l.stopped {
		// Cannot happen: the primary stops its loops once every
		// connection has ended. Were it to, the eventfd is closed.
		l.mu.Unlock()
		return
	}
	l.inbox = append(l.inbox, c)
	wake := !l.woken
	l.woken = true
	l.mu.Unlock()
	if wake {
		var one = [8]byte{1}
		writeNow(l.efd, one[:]) // cannot fail short of a full counter, which a pending wake-up already covers
	}
}

// run is the loop: wait for events, act on them, run due timers.
func (l *evLoop) run() {
	defer l.shut()
	var n int
	var werr error
	wait := func(fd uintptr) bool {
		for {
			n, werr = epollWaitNow(int(fd), l.events)
			if werr != unix.EINTR {
				return n != 0 || werr != nil
			}
		}
	}
	for {
		err := l.rc.Read(wait)
		if err == nil && werr != nil {
			err = os.NewSyscallError("epoll_wait", werr)
		}
		switch {
		case err == nil:
			bulk := l.bulk[:0]
			for _, ev := range l.events[:n] {
				switch {
				case ev.Fd == evWake:
					if l.drainInbox() {
						return
					}
				case l.isBulk(ev):
					bulk = append(bulk, ev)
				default:
					l.event(ev)
				}
			}
			l.runBulk(bulk, l.event)
			l.bulk = bulk[:0] // as long as events: append never grew it
		case errors.Is(err, os.ErrDeadlineExceeded):
		default:
			return // cannot happen: the loop alone closes its descriptor
		}
		l.runTimers()
	}
}

// evBulkBudget is how many bytes a loop moves for bulk transfers between
// two looks at its sockets. A direction is bulk from a read that fills
// its buffer, or that its receiver does not take whole, until its sender
// has nothing more queued (a download, a large upload, a slow reader's
// answer). A socket with a bulk direction on it gets its turn after
// everything else the look found, and only as much as the budget allows,
// the longest-waiting first, so that a small exchange waits behind about
// one budget's worth of copying per loop, however many transfers are in
// flight (by construction; bench/NOTES.md's "While a slow-read attack
// opens" has what the benchmark saw). Before, every ready download moved a buffer per
// look, and small requests were answered about every 59 ms while 500
// large answers started at once. HAProxy's scheduler keeps bulk work in a
// class of its own for the same reason. What a look skips stays ready
// (the sockets are level-triggered) and comes back in the next one.
const evBulkBudget = 1 << 20

// isBulk reports whether ev is for a socket with a bulk transfer on it:
// the direction reading it, or the one writing to it, is peeking.
func (l *evLoop) isBulk(ev unix.EpollEvent) bool {
	pr := l.pairOf(ev)
	return pr != nil && (pr.up.peek || pr.down.peek)
}

// runBulk acts on bulk events (act is l.event) until evBulkBudget bytes
// have moved, the pairs that had their turn longest ago first. (epoll
// returns sockets that stay ready in the same order look after look, at
// most len(l.events) of them: taking them in that order would serve the
// first few for ever.)
func (l *evLoop) runBulk(evs []unix.EpollEvent, act func(unix.EpollEvent)) {
	slices.SortStableFunc(evs, func(a, b unix.EpollEvent) int {
		return cmp.Compare(l.lastTurn(a), l.lastTurn(b))
	})
	start := l.moved
	for _, ev := range evs {
		if l.moved-start >= evBulkBudget {
			return
		}
		l.turn++
		if pr := l.pairOf(ev); pr != nil {
			pr.turn = l.turn
		}
		act(ev)
	}
}

// pairOf returns the pair ev is for, nil if it is gone.
func (l *evLoop) pairOf(ev unix.EpollEvent) *evPair {
	id := ev.Fd >> 1
	if id < 0 || int(id) >= len(l.pairs) {
		return nil
	}
	if pr := l.pairs[id]; pr != nil && pr.gen == ev.Pad {
		return pr
	}
	return nil
}

// lastTurn is when ev's pair last had a bulk turn: 0 for never, or for a
// pair that is gone.
func (l *evLoop) lastTurn(ev unix.EpollEvent) uint64 {
	if pr := l.pairOf(ev); pr != nil {
		return pr.turn
	}
	return 0
}

// shut closes every pair left and the loop's descriptors.
func (l *evLoop) shut() {
	for _, pr := range l.pairs {
		if pr != nil {
			l.finish(pr)
		}
	}
	l.file.Close()
	unix.Close(l.efd)
}

// drainInbox runs the posted commands. It reports whether one was stop.
func (l *evLoop) drainInbox() (stop bool) {
	var b [8]byte
	readNow(l.efd, b[:])
	l.mu.Lock()
	cmds := l.inbox
	l.inbox = l.spare[:0]
	l.woken = false
	for _, c := range cmds {
		if c.op == evStop {
			l.stopped, stop = true, true
		}
	}
	l.mu.Unlock()
	defer func() {
		clear(cmds)
		l.spare = cmds[:0]
	}()
	for _, c := range cmds {
		pr := c.pair
		switch c.op {
		case evStop:
		case evAdd:
			l.add(pr)
		case evEnd:
			if !pr.closed {
				l.endUp(pr)
			}
		case evClose:
			l.finish(pr)
		}
	}
	return stop
}

// add registers a new pair.
func (l *evLoop) add(pr *evPair) {
	if k := len(l.free); k > 0 {
		pr.id = l.free[k-1]
		l.free = l.free[:k-1]
	} else {
		pr.id = int32(len(l.pairs))
		l.pairs = append(l.pairs, nil)
	}
	l.pairs[pr.id] = pr
	l.gen++
	pr.gen = l.gen
	pr.mask = [2]uint32{unix.EPOLLIN, unix.EPOLLIN}
	if l.ctl(unix.EPOLL_CTL_ADD, pr, 0) != nil || l.ctl(unix.EPOLL_CTL_ADD, pr, 1) != nil {
		l.finish(pr) // out of memory for epoll: drop the connection, as a failed accept would
	}
}

// event acts on one epoll event of a pair's socket.
func (l *evLoop) event(ev unix.EpollEvent) {
	id, side := ev.Fd>>1, ev.Fd&1
	if int(id) >= len(l.pairs) {
		return
	}
	pr := l.pairs[id]
	if pr == nil || pr.gen != ev.Pad {
		return // a pair finished earlier in this batch
	}
	// The socket's outgoing direction reads from it; its incoming one
	// writes to it.
	out, in := &pr.up, &pr.down
	if side == 1 {
		out, in = &pr.down, &pr.up
	}
	acted := false
	if ev.Events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) != 0 && out.reading() {
		l.read(pr, out)
		acted = true
	}
	if !pr.closed && ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 && in.blocked() {
		l.resume(pr, in)
		acted = true
	}
	if !pr.closed && !acted && ev.Events&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		if (ev.Events&unix.EPOLLERR == 0 || side == 1) && !out.done && out.blocked() {
			// Closed both ways (its FIN came after ours), or the worker
			// reset it (it closed with bytes unread: a Unix socket
			// reports that at once), while what it sent waits for the
			// other side to take it: the rest is still to be read, and
			// the error comes after it. EPOLLHUP and EPOLLERR cannot be
			// masked, so the socket leaves epoll until its direction
			// reads again (rearm).
			epollCtlNow(l.epfd, unix.EPOLL_CTL_DEL, pr.fd(int(side)), nil)
			pr.parked[side], pr.mask[side] = true, 0
			return
		}
		l.finish(pr) // reset, or closed both ways, with nothing left to do on it
	}
	if !pr.closed {
		l.rearm(pr)
	}
}

func (d *evDir) reading() bool { return !d.done && !d.blocked() }

// blocked reports whether d waits for dst to be writable.
func (d *evDir) blocked() bool { return d.pending != nil || d.stalled }

// read moves what src has to dst.
func (l *evLoop) read(pr *evPair, d *evDir) {
	if d.peek {
		l.peekRead(pr, d)
		return
	}
	buf := l.buf[:evPlainRead]
	n, err := readNow(d.src, buf)
	switch {
	case n > 0 && d.discard:
	case n > 0:
		w, err := l.write(pr, d, buf[:n])
		switch {
		case err != nil:
			l.writeFailed(pr, d)
		case w < n:
			d.pending = bytes.Clone(buf[w:n])
			d.peek = true
		case n == len(buf):
			d.peek = true // more is queued, likely: a bulk transfer
		}
	case err == unix.EAGAIN || err == unix.EINTR:
	case err == nil: // EOF
		l.ended(pr, d, true)
	default:
		l.ended(pr, d, false)
	}
}

// peekRead moves what src has to dst, consuming from src only what dst
// takes.
func (l *evLoop) peekRead(pr *evPair, d *evDir) {
	n, err := recvNow(d.src, l.buf, unix.MSG_PEEK)
	switch {
	case n > 0:
	case err == unix.EAGAIN:
		d.peek = false // src is drained and dst took it all: plain reads again, and no longer bulk
		return
	case err == unix.EINTR:
		return
	case err == nil: // EOF
		l.ended(pr, d, true)
		return
	default:
		l.ended(pr, d, false)
		return
	}
	w, err := l.write(pr, d, l.buf[:n])
	if w > 0 {
		if m, derr := recvNow(d.src, l.buf[:w], unix.MSG_TRUNC); derr != nil || m != w {
			l.ended(pr, d, false) // cannot happen: what was peeked is there
			return
		}
	}
	switch {
	case err != nil:
		l.writeFailed(pr, d)
	case w < n:
		d.stalled = true
	case n < len(l.buf):
		d.peek = false // dst took all there was: plain reads again
	}
}

// write writes what it can of b to d's destination without waiting, and
// returns how much it wrote and the error that stopped it, if not a full
// socket.
func (l *evLoop) write(pr *evPair, d *evDir, b []byte) (int, error) {
	w := 0
	for w < len(b) {
		n, err := sendRaw(d.dst, b[w:])
		if n > 0 {
			w += n
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			break
		}
		if err == nil {
			err = io.ErrShortWrite
		}
		d.n += int64(w)
		return w, err
	}
	d.n += int64(w)
	l.moved += int64(w)
	if w > 0 && d == &pr.up && pr.down.done && !pr.finAt.IsZero() {
		// The worker has finished sending and the client still does:
		// it gets finTimeout more after every chunk.
		pr.finAt = time.Now().Add(finTimeout)
	}
	return w, nil
}

// resume carries on once d's destination is writable: it writes what
// waits in pending, or peeks again.
func (l *evLoop) resume(pr *evPair, d *evDir) {
	if d.stalled {
		d.stalled = false
		l.read(pr, d)
		return
	}
	w, err := l.write(pr, d, d.pending)
	switch {
	case err != nil:
		l.writeFailed(pr, d)
	case w == len(d.pending):
		d.pending = nil
	default:
		d.pending = d.pending[w:]
	}
}

// ended ends direction d: its source reached EOF (clean) or a read or
// write failed. With halfOpen, a clean EOF passes on as a FIN while the
// other direction flows on; otherwise the whole connection ends.
func (l *evLoop) ended(pr *evPair, d *evDir, clean bool) {
	other := &pr.up
	if d == &pr.up {
		other = &pr.down
	}
	d.done = true
	if !clean || (!pr.halfOpen && !other.discard) || other.done {
		// Closing sends the FIN (the other side is read to its EOF, or
		// done with): no shutdown first. (A client whose bytes are
		// being dropped is read on until its FIN or finTimeout, half
		// open or not.)
		l.finish(pr)
		return
	}
	shutdownNow(d.dst, unix.SHUT_WR)
	l.progress(pr)
}

// writeFailed ends d after a write to its destination failed. A worker
// that has closed its socket refuses writes (a Unix socket at once, TCP
// after its reset) while what it sent before may still wait to be read:
// then the worker's last bytes still go to the client, and what the
// client sends meanwhile is read and dropped, as the worker would have
// (a socket closed with bytes unread resets its connection, and the
// reset drops what it had not sent yet). Any other failure ends the
// connection.
func (l *evLoop) writeFailed(pr *evPair, d *evDir) {
	if d == &pr.up && !pr.down.done {
		d.release()
		d.peek, d.discard = false, true
		return
	}
	l.ended(pr, d, false)
}

// endUp ends the client-to-worker direction without a FIN from the
// client: its worker has exited, or the client neither sent nor closed
// within finTimeout of the worker's close. The other direction still
// delivers the worker's last bytes.
func (l *evLoop) endUp(pr *evPair) {
	d := &pr.up
	if d.done {
		return
	}
	d.done = true
	d.release()
	d.peek = false
	if pr.down.done {
		l.finish(pr) // the close sends the FIN
		return
	}
	shutdownNow(d.dst, unix.SHUT_WR)
	l.progress(pr) // starts no timer: the worker's direction is still on
	l.rearm(pr)
}

// progress finishes a pair whose two directions are done, and starts the
// client's finTimeout once the worker's direction is.
func (l *evLoop) progress(pr *evPair) {
	switch {
	case pr.up.done && pr.down.done:
		l.finish(pr)
	case pr.down.done && pr.finAt.IsZero():
		pr.finAt = time.Now().Add(finTimeout)
		heap.Push(&l.timers, finTimer{at: pr.finAt, pair: pr})
	}
}

func (d *evDir) release() { d.pending, d.stalled = nil, false }

// rearm brings the epoll interest of the pair's sockets up to date.
func (l *evLoop) rearm(pr *evPair) {
	want := [2]uint32{interest(&pr.up, &pr.down), interest(&pr.down, &pr.up)}
	for side, m := range want {
		switch {
		case pr.parked[side]:
			if m == 0 {
				continue
			}
			pr.parked[side] = false
			pr.mask[side] = m
			l.ctl(unix.EPOLL_CTL_ADD, pr, side)
		case m != pr.mask[side]:
			pr.mask[side] = m
			l.ctl(unix.EPOLL_CTL_MOD, pr, side)
		}
	}
}

// interest is the epoll interest of the socket that out reads from and
// in writes to.
func interest(out, in *evDir) uint32 {
	var m uint32
	if out.reading() {
		m |= unix.EPOLLIN
	}
	if in.blocked() {
		m |= unix.EPOLLOUT
	}
	return m
}

// ctl registers side's socket (0 the client's, 1 the worker's) with its
// interest in pr.mask.
func (l *evLoop) ctl(op int, pr *evPair, side int) error {
	ev := unix.EpollEvent{Events: pr.mask[side], Fd: pr.id<<1 | int32(side), Pad: pr.gen}
	return epollCtlNow(l.epfd, op, pr.fd(side), &ev)
}

func (pr *evPair) fd(side int) int {
	if side == 0 {
		return pr.cfd
	}
	return pr.wfd
}

// finish closes both sockets and reports the pair's end.
func (l *evLoop) finish(pr *evPair) {
	if pr.closed {
		return
	}
	pr.closed = true
	pr.rl.p.closeClient(pr.cfd)
	closeRaw(pr.wfd)
	pr.up.release()
	pr.down.release()
	l.pairs[pr.id] = nil // every pair was added: commands follow its add
	l.free = append(l.free, pr.id)
	pr.rl.finish(pr.up.n, pr.down.n)
}

// runTimers ends the client direction of pairs whose finTimeout passed,
// and sets the loop's deadline to the next timer.
func (l *evLoop) runTimers() {
	now := time.Now()
	for len(l.timers) > 0 && !l.timers[0].at.After(now) {
		t := heap.Pop(&l.timers).(finTimer)
		pr := t.pair
		switch {
		case pr.closed:
		case pr.finAt.After(now): // extended since: wait on
			heap.Push(&l.timers, finTimer{at: pr.finAt, pair: pr})
		default:
			l.endUp(pr)
		}
	}
	var next time.Time
	if len(l.timers) > 0 {
		next = l.timers[0].at
	}
	if !next.Equal(l.armed) {
		l.armed = next
		l.file.SetReadDeadline(next)
	}
}

type finTimer struct {
	at   time.Time
	pair *evPair
}

// finTimers is a min-heap of timers by time.
type finTimers []finTimer

func (h finTimers) Len() int           { return len(h) }
func (h finTimers) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h finTimers) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *finTimers) Push(x any)        { *h = append(*h, x.(finTimer)) }
func (h *finTimers) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = finTimer{}
	*h = old[:len(old)-1]
	return t
}

// dialWorkerRaw connects to a worker at addr on a socket of its own,
// non-blocking and outside Go's poller, for an event loop to carry. ok is
// false, and nothing was done, when addr is not an IP address and port.
// A refused connection fails here, so that offer tries the next worker.
func dialWorkerRaw(addr string, timeout time.Duration) (fd int, ok bool, err error) {
	ap, perr := netip.ParseAddrPort(addr)
	if perr != nil {
		return -1, false, nil
	}
	var sa unix.Sockaddr
	family := unix.AF_INET
	if a := ap.Addr().Unmap(); a.Is4() {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}
	}
	fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, true, os.NewSyscallError("socket", err)
	}
	if err := connectRaw(fd, sa, timeout); err != nil {
		unix.Close(fd)
		return -1, true, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(ap), Err: err}
	}
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1) // as net/http's connections
	return fd, true, nil
}

// connectRaw connects fd to sa within timeout. Over loopback the
// handshake is done by the time connect returns, EINPROGRESS or not:
// one getpeername tells. Otherwise (a worker's full accept queue drops
// the SYN) it waits in Go's poller; with no timeout it does not wait,
// and that is errWouldWait.
func connectRaw(fd int, sa unix.Sockaddr, timeout time.Duration) error {
	switch err := unix.Connect(fd, sa); err {
	case nil:
		return nil
	case unix.EINPROGRESS, unix.EINTR, unix.EALREADY:
	default:
		return os.NewSyscallError("connect", err)
	}
	connected := func() (bool, error) {
		// syscall's, not x/sys's: that asks an IPv4 socket for its
		// protocol too, to tell L2TP.
		if _, err := syscall.Getpeername(fd); err == nil {
			return true, nil
		}
		switch e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); {
		case err != nil:
			return false, os.NewSyscallError("getsockopt", err)
		case e != 0:
			return false, os.NewSyscallError("connect", unix.Errno(e))
		}
		return false, nil
	}
	if ok, err := connected(); ok || err != nil {
		return err
	}
	if timeout <= 0 {
		return errWouldWait
	}
	return waitWritable(fd, timeout, connected)
}

// writeRaw writes all of b to fd, waiting in Go's poller, within
// timeout, if fd's send buffer is full; with no timeout, that is
// errWouldWait.
func writeRaw(fd int, b []byte, timeout time.Duration) error {
	try := func() (bool, error) {
		for len(b) > 0 {
			n, err := sendRaw(fd, b)
			switch {
			case n > 0:
				b = b[n:]
			case err == unix.EINTR:
			case err == unix.EAGAIN:
				return false, nil
			default:
				return false, os.NewSyscallError("sendto", err)
			}
		}
		return true, nil
	}
	if ok, err := try(); ok || err != nil {
		return err
	}
	if timeout <= 0 {
		return errWouldWait
	}
	return waitWritable(fd, timeout, try)
}

// waitWritable calls try each time fd turns writable until it is done
// or fails, or timeout passes: the slow path of a raw socket, in Go's
// poller through a duplicate descriptor, so that fd itself stays out.
func waitWritable(fd int, timeout time.Duration, try func() (bool, error)) error {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	f := os.NewFile(uintptr(d), "worker") // non-blocking: in the poller
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	f.SetWriteDeadline(time.Now().Add(timeout))
	var terr error
	err = rc.Write(func(uintptr) bool {
		// Try first, every time: the poller may have taken the edge
		// before this call began, and no other comes.
		var done bool
		done, terr = try()
		return done || terr != nil
	})
	if err != nil {
		return err // os.ErrDeadlineExceeded
	}
	return terr
}

// sendRaw writes b to the socket fd without waiting and without SIGPIPE
// (which a write to a Unix socket whose peer has closed raises, and a
// program that asked for it with signal.Notify would see): a raw
// sendto with MSG_NOSIGNAL, which allocates nothing. Where the system
// has no sendto call of its own (linux/386 before 4.3: it goes through
// socketcall), a write, which may raise SIGPIPE.
func sendRaw(fd int, b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if !noSendto.Load() {
		raceBeforeWrite()
		n, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
			unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			raceWrote(b, int(n))
			return int(n), nil
		case unix.ENOSYS:
			noSendto.Store(true)
		default:
			return 0, errno
		}
	}
	return unix.Write(fd, b)
}

// noSendto is set once sendto has failed with ENOSYS: the system has
// none, for every socket.
var noSendto atomic.Bool
