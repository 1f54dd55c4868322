//go:build linux

package defuss

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawAcceptLoop is acceptLoop on a TCP listener: the raw accept loop. It
// accepts with accept4 and, when a connection's head has already arrived
// (as it has for most, since a client sends it right after the
// handshake), peeks at it, routes it and serves it there and then. In
// hand-off mode: recv(MSG_PEEK), sendmsg and close. In splice mode: a raw
// dial of the worker, the head read and written behind its PROXY header,
// and the pair given to an event loop. Either way with no goroutine and
// no registration in Go's poller. A connection whose head is still on its
// way waits in the loop's own epoll set, for at most rawGrace, and is
// served the same way when it arrives. Any other connection goes to
// route as a fileConn in a goroutine of its own, as acceptLoop's do: a
// head that takes longer, a health check, every connection with trusted
// proxies, no worker that takes it without a wait.
//
// The Balancer runs in this one goroutine, as its contract allows ("return
// quickly without blocking"): a slow one delays every accept.
//
// It reports handled=false, having done nothing, where it does not apply
// (another kind of listener, no epoll; in splice mode, no event loops or
// a WithListener listener); acceptLoop then serves.
func (p *primary) rawAcceptLoop() (handled bool, err error) {
	tl, ok := p.ln.(*net.TCPListener)
	if !ok || !p.cfg.handoff && p.relay() == nil {
		return false, nil // splice mode relays with goroutines: it needs net.Conns
	}
	lrc, err := tl.SyscallConn()
	if err != nil {
		return false, nil
	}
	// Accepted sockets inherit from the listener what net's Accept
	// would set on each: TCP_NODELAY and keep-alive. So they are set
	// there, on a socket from systemd or an upgrade too: for the
	// primary's own client sockets in splice mode, and, in hand-off
	// mode, so that a worker need not set them (handoffOptsSet). A
	// socket takes them from the listener when its handshake completes,
	// so those already waiting in the accept queue of an inherited
	// listener lack them: the loop sets them on each it accepts until it
	// has emptied the queue once (optsEach; the raw tests' receive checks
	// every socket a message says has them, queued ones too). The
	// ListenConfig behind WithListener's listener may say other: in splice
	// mode net's Accept serves those, and in hand-off mode the workers set
	// net's defaults (no handoffOptsSet).
	optsSet, optsEach := false, false
	if p.cfg.listener == nil {
		var oerr error
		err := lrc.Control(func(fd uintptr) {
			if optsEach = !hasPublicSocketOpts(int(fd)); optsEach {
				oerr = publicSocketOpts(int(fd))
			}
		})
		if err = errors.Join(err, oerr); err == nil {
			optsSet = true
		} else if p.cfg.handoff {
			p.log.Warn("socket options of the listener not set; workers set them on each connection", "err", err)
		} else {
			p.log.Warn("no raw accept loop: socket options of the listener", "err", err)
		}
	}
	if !p.cfg.handoff && !optsSet {
		return false, nil
	}
	if p.cfg.listener == nil {
		var derr error
		lrc.Control(func(fd uintptr) { derr = deferAccept(int(fd)) })
		if derr != nil {
			p.log.Debug("TCP_DEFER_ACCEPT not set; connections are accepted before their heads", "err", derr)
		}
	}
	a, err := newRawAccepter(p, lrc)
	if err != nil {
		p.log.Warn("no raw accept loop; accepting through Go's poller", "err", err)
		return false, nil
	}
	a.optsSet, a.optsEach = optsSet, optsSet && optsEach
	// The same for TCP_NOTSENT_LOWAT where Start set it on the listener
	// (limitUnsent): sockets queued before then (on a socket from systemd
	// or from an upgrade's older primary) lack it.
	a.unsentEach = p.unsentSet
	// The drain closes the epoll set, which wakes the loop (the listener
	// is closed by then, and its registration gone with it).
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-p.life.drain:
		case <-done:
		}
		a.file.Close()
	}()
	defer wg.Wait()
	defer close(done)
	defer a.shut()

	var n int
	var werr error
	wait := func(fd uintptr) bool {
		for {
			n, werr = epollWaitNow(int(fd), a.events)
			if werr != unix.EINTR {
				return n != 0 || werr != nil
			}
		}
	}
	var delay time.Duration
	for {
		err := a.rc.Read(wait)
		if err == nil && werr != nil {
			err = os.NewSyscallError("epoll_wait", werr)
		}
		switch {
		case err == nil:
			accepted, closed, aerr := a.pass(lrc, a.events[:n])
			if closed {
				return true, nil
			}
			if aerr != nil {
				if stop, err := p.acceptFailed(aerr, &delay); stop {
					return true, err
				}
			} else if accepted {
				delay = 0
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
		default:
			// The drain closed the set; or, if it cannot be read, no
			// more connections come this way.
			if p.stopping() {
				return true, nil
			}
			return true, err
		}
		a.expire(time.Now())
	}
}

// deferAccept sets TCP_DEFER_ACCEPT on the listening socket fd: the
// kernel completes the handshake as always but queues a connection for
// accept only once its first bytes arrive (or, with none, after about
// rawDeferSecs, when it is accepted as before). So the loop finds the head
// already there, as a rule, and serves the connection in the pass that
// accepts it. Before, many connections of a Connection: close load
// arrived before their heads and took the pending path (two epoll_ctl
// calls, a peek that finds nothing, a wake-up more): in a perf profile of
// the splice primary under wrk it took 13% of the primary, against 23%
// for heads already there. HAProxy's
// defer-accept and nginx's deferred do the same. A connection that sends
// nothing costs the primary nothing for that second, and its inspection
// timeout starts when it is accepted.
//
// Only on a socket the primary opened or inherited (not WithListener's,
// whose owner configured it), and only where it is not set: a value from
// systemd's DeferAcceptSec= (socket activation) is kept.
func deferAccept(fd int) error {
	if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT); err != nil || v != 0 {
		return os.NewSyscallError("getsockopt", err) // set already (systemd's DeferAcceptSec=): kept
	}
	return os.NewSyscallError("setsockopt", unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, rawDeferSecs))
}

// rawDeferSecs is TCP_DEFER_ACCEPT's value: Linux keeps a silent
// connection out of the accept queue until it has retransmitted its
// SYN-ACK for this long (once, for 1 s), and then accepts it at the
// client's next ACK.
const rawDeferSecs = 1

const (
	// rawBatch bounds the connections accepted in one pass, which holds a
	// reference on the listener that the listener's Close waits for.
	rawBatch = 64
	// rawListener marks the listener's events in the epoll set; the
	// others carry the descriptor of a pending connection.
	rawListener = -1
	// rawPendingMax bounds the connections waiting for their heads in
	// the loop; more go to route at once.
	rawPendingMax = 256
)

// rawAccepter is the raw accept loop's state, which only its goroutine
// touches.
type rawAccepter struct {
	p          *primary
	file       *os.File // the epoll set, in Go's poller; its read deadline is the next due
	rc         syscall.RawConn
	events     []unix.EpollEvent
	buf        []byte                      // proxyRoom for the hand-off message, then the peek
	oob        []byte                      // SCM_RIGHTS for one descriptor, set for each send
	pending    []rawPending                // in the epoll set, waiting for their heads, oldest (first due) first
	deadline   time.Time                   // file's read deadline: when the oldest pending is due
	optsSet    bool                        // accepted sockets have net's options, from the listener
	optsEach   bool                        // until the accept queue is first empty: set them on each
	unsentEach bool                        // until the accept queue is first empty: set unsentLimit on each
	msg        handoffMsg                  // handOff's message, for send
	cur        handed                      // handOff's connection, for send
	send       func(*process, byte) error  // queue
	queued     *handBatch                  // the batch send added cur to, if it did
	full       []*process                  // a batch to it failed in this pass
	batches    []*handBatch                // filled in this pass, a worker each
	spare      []*handBatch                // flushed, for reuse
	rights     [handoffBatchMax + 1][]byte // SCM_RIGHTS for n descriptors, made when first used
	op         epollOp                     // ctl's call
	doOp       func(ep uintptr)
	snd        sendOp // sendBatch's call
	doSend     func(fd uintptr)
	accept     func(lfd uintptr) // acceptPass
	acceptErr  error
	epoch      uint64              // of the dial gate, which the pass holds
	peer       unix.RawSockaddrAny // accept4's client address
	peerLen    uint32
	socketcall bool // the kernel has no accept4 system call: syscall.Accept4
}

// rawPending is an accepted connection whose head has not arrived.
type rawPending struct {
	fd   int
	peer netip.AddrPort
	at   time.Time // accepted
	due  time.Time // when it goes to route
}

// newRawAccepter makes the loop's epoll set, with the listener in it
// (level-triggered: it is reported as long as connections wait to be
// accepted).
func newRawAccepter(p *primary, lrc syscall.RawConn) (*rawAccepter, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	var cerr error
	err = lrc.Control(func(lfd uintptr) {
		cerr = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, int(lfd), &unix.EpollEvent{Events: unix.EPOLLIN, Fd: rawListener})
	})
	if err == nil {
		err = os.NewSyscallError("epoll_ctl", cerr)
	}
	if err == nil {
		// Non-blocking, so that os.NewFile puts it in Go's poller.
		err = os.NewSyscallError("fcntl", unix.SetNonblock(epfd, true))
	}
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	a := &rawAccepter{
		p:      p,
		file:   os.NewFile(uintptr(epfd), "defuss-accept-epoll"),
		events: make([]unix.EpollEvent, rawBatch),
		buf:    make([]byte, proxyRoom+p.cfg.maxHeaderBytes),
		oob:    unix.UnixRights(0),
	}
	if a.rc, err = a.file.SyscallConn(); err != nil {
		a.file.Close()
		return nil, err
	}
	a.doOp = func(ep uintptr) { a.op.err = epollCtlNow(int(ep), a.op.op, a.op.fd, a.op.ev) }
	a.doSend = func(fd uintptr) { a.snd.err = sendmsgNow(int(fd), a.snd.msg, a.snd.oob) }
	a.accept = a.acceptPass
	a.send = a.queue
	return a, nil
}

// pass handles the events of one wake-up: bytes of pending connections,
// new connections; then it sends the hand-off batches it filled (flush).
// It holds the dial gate meanwhile, and counts as routing: a batch is
// sent after the offers that filled it have ended, and a worker must not
// be told to drain (quiesce), nor the drain begin (awaitRoutingIdle),
// before what was handed to it is sent. A quiesce that begins during the
// pass waits only for the connection being served (yieldGate).
func (a *rawAccepter) pass(lrc syscall.RawConn, events []unix.EpollEvent) (accepted, closed bool, aerr error) {
	g := a.p.gate
	a.epoch = g.enter()
	g.routing.Add(1)
	a.full = a.full[:0]
	defer func() {
		a.flushAll()
		g.routing.Add(-1)
		g.exit(a.epoch)
	}()
	for _, ev := range events {
		if ev.Fd != rawListener {
			a.ready(int(ev.Fd), ev.Events) // edge-triggered: not reported again
			a.yieldGate()
			continue
		}
		accepted = true
		if closed, aerr = a.acceptBatch(lrc); closed {
			return
		}
	}
	return
}

// yieldGate lets a quiesce that began during the pass go on: once the
// gate's epoch has moved, the loop sends the batches it has gathered,
// which the quiesce is to see sent before its worker drains, and joins
// the new epoch, whose offers pick from the new set of workers. So a
// quiesce waits for one connection's offer (one Balancer call), not for a
// pass of up to rawBatch accepts and the events of a wake-up; and, if a
// batch's send fails in that flush, for its connections' offers again
// (flush), which is rare: a worker's full queue, or its exit. The pass
// calls it after each connection: one atomic load.
func (a *rawAccepter) yieldGate() {
	g := a.p.gate
	if g.epoch.Load() == a.epoch {
		return
	}
	a.flushAll()
	g.exit(a.epoch)
	a.epoch = g.enter()
}

// acceptBatch accepts up to rawBatch connections. It reports closed once
// the listener is closed, and a failure of accept4.
func (a *rawAccepter) acceptBatch(lrc syscall.RawConn) (closed bool, err error) {
	a.acceptErr = nil
	cerr := lrc.Control(a.accept) // made once: no closure a pass
	return cerr != nil, a.acceptErr
}

// acceptPass is acceptBatch's pass on the listener's descriptor lfd.
func (a *rawAccepter) acceptPass(lfd uintptr) {
	for range rawBatch {
		fd, peer, err := a.accept4(int(lfd))
		switch err {
		case nil:
			if a.optsEach {
				publicSocketOpts(fd) // an error is ignored: the message still says they are set
			}
			if a.unsentEach {
				unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, unsentLimit) // as the listener has it; an error is ignored
			}
			a.conn(fd, peer)
			a.yieldGate()
		case syscall.EINTR, syscall.ECONNABORTED:
		case syscall.EAGAIN:
			a.optsEach, a.unsentEach = false, false // what comes now was made with the listener's options
			return
		default:
			a.acceptErr = os.NewSyscallError("accept4", err)
			return
		}
	}
	// A full batch: the set reports the listener again at once.
}

// accept4 accepts a connection on lfd, non-blocking and close-on-exec,
// and returns it with the client's address, read from a.peer. (Both
// syscall's and x/sys's Accept4 allocate the address they return; x/sys's
// also asks each IPv4 socket for its protocol, to tell L2TP.) A kernel
// without the accept4 system call (linux/386 before 4.3, where it goes
// through socketcall) gets syscall's.
func (a *rawAccepter) accept4(lfd int) (int, netip.AddrPort, error) {
	if !a.socketcall {
		a.peerLen = unix.SizeofSockaddrAny
		fd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&a.peer)), uintptr(unsafe.Pointer(&a.peerLen)),
			unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		switch errno {
		case 0:
			return int(fd), rawAddrPort(&a.peer), nil
		case unix.ENOSYS:
			a.socketcall = true
		default:
			return -1, netip.AddrPort{}, errno
		}
	}
	fd, sa, err := syscall.Accept4(lfd, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
	if err != nil {
		return -1, netip.AddrPort{}, err
	}
	return fd, sockaddrAddrPort(sa), nil
}

// conn serves one accepted connection, fd, from the client at peer.
func (a *rawAccepter) conn(fd int, peer netip.AddrPort) {
	p := a.p
	p.tel.accepted.Add(bg, 1)
	if ok, full := p.conns.reserve(); !ok {
		p.refused(full)
		unix.Close(fd)
		return
	}
	now := time.Now()
	watched := false
	done, wait := a.serve(fd, peer, now, &watched)
	switch {
	case done:
	case wait && len(a.pending) < rawPendingMax && a.watch(fd):
		// The loop sets its deadline for it (expire) before it waits.
		a.pending = append(a.pending, rawPending{fd: fd, peer: peer, at: now, due: now.Add(p.rawGrace)})
	default:
		a.route(fd, peer)
	}
}

// watch adds fd to the set, edge-triggered: the loop hears of each new
// arrival of bytes (it only peeks, so what came stays readable). Bytes
// that came before it was added are reported too.
func (a *rawAccepter) watch(fd int) bool {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd)}
	return a.ctl(unix.EPOLL_CTL_ADD, fd, &ev) == nil
}

// unwatch takes fd out of the set before the loop lets go of it: the
// set would hear of it for as long as its socket lives, in a worker too.
func (a *rawAccepter) unwatch(fd int) { a.ctl(unix.EPOLL_CTL_DEL, fd, nil) }

// ctl is epoll_ctl on the set, through its file: once the drain has
// closed it, a call fails rather than reach a descriptor reused since.
// (Its arguments travel in a.op, made once, so that a call allocates
// nothing.)
func (a *rawAccepter) ctl(op, fd int, ev *unix.EpollEvent) error {
	a.op = epollOp{op: op, fd: fd, ev: ev}
	if err := a.rc.Control(a.doOp); err != nil {
		return err
	}
	return a.op.err
}

// epollOp is one epoll_ctl call of ctl.
type epollOp struct {
	op, fd int
	ev     *unix.EpollEvent
	err    error
}

// ready handles the events (bytes, a close) of the pending connection
// fd.
func (a *rawAccepter) ready(fd int, events uint32) {
	i := slices.IndexFunc(a.pending, func(e rawPending) bool { return e.fd == fd })
	if i < 0 {
		return // cannot happen: the loop watches only what is pending
	}
	e := a.pending[i]
	watched := true
	done, wait := a.serve(fd, e.peer, e.at, &watched)
	if wait && events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return // more of the head to come; new bytes wake the loop again
	}
	a.pending = slices.Delete(a.pending, i, i+1)
	if watched {
		a.unwatch(fd) // before route has it
	}
	if !done {
		a.route(fd, e.peer)
	}
}

// expire gives route the pending connections that are due by now, and
// sets the loop's deadline for the next. The loop calls it after every
// wake-up, before it waits again.
func (a *rawAccepter) expire(now time.Time) {
	k := 0
	for k < len(a.pending) && !a.pending[k].due.After(now) {
		e := a.pending[k]
		a.unwatch(e.fd)
		a.route(e.fd, e.peer)
		k++
	}
	if k > 0 {
		a.pending = slices.Delete(a.pending, 0, k)
	}
	a.setDeadline(a.due())
}

// shut gives route every connection still pending, when the loop ends,
// and closes the set.
func (a *rawAccepter) shut() {
	for _, e := range a.pending {
		a.unwatch(e.fd)
		a.route(e.fd, e.peer)
	}
	a.pending = nil
	a.file.Close()
}

// due is when the oldest pending connection is due; zero if none is.
func (a *rawAccepter) due() time.Time {
	if len(a.pending) == 0 {
		return time.Time{}
	}
	return a.pending[0].due
}

func (a *rawAccepter) setDeadline(t time.Time) {
	if !t.Equal(a.deadline) {
		a.file.SetReadDeadline(t)
		a.deadline = t
	}
}

// claimFile makes the reserved connection fd, from the client at peer, a
// live fileConn. It returns nil, having closed fd, if the connection
// failed already (getsockname) or the table is closed.
func (a *rawAccepter) claimFile(fd int, peer netip.AddrPort) *fileConn {
	c, err := newFileConn(fd, peer, true)
	if err != nil {
		unix.Close(fd)
		a.p.conns.closedHanded(1)
		return nil
	}
	c.optsSet = a.optsSet
	if !a.p.conns.claim(c) {
		c.Close()
		return nil
	}
	return c
}

// route gives the connection fd, from the client at peer, to route, in a
// goroutine of its own, as a fileConn.
func (a *rawAccepter) route(fd int, peer netip.AddrPort) {
	p := a.p
	c := a.claimFile(fd, peer)
	if c == nil {
		return
	}
	p.gate.routing.Add(1)
	go p.serveConn(c)
}

// serve gives fd, from the client at peer accepted at start, to a worker if
// its head is complete and nothing needs route's path: handed off, or
// spliced by an event loop. done: fd is no longer the caller's. Else it
// reports whether the head is still on its way (no bytes yet, or part of
// a head), so that waiting a little may let the loop serve it after all.
//
// A connection in the loop's set (*watched) leaves it as soon as its head
// is complete, before the descriptor goes anywhere: the set would hear of
// it for as long as its socket lives, in a worker or an event loop too.
// One whose head is not complete stays, so that only new bytes wake the
// loop for it (adding it again would report what is there at once).
func (a *rawAccepter) serve(fd int, peer netip.AddrPort, start time.Time, watched *bool) (done, wait bool) {
	req, n, wait := a.inspect(fd, peer)
	if req == nil {
		return false, wait
	}
	defer func() {
		req.reset()
		a.p.reqs.Put(req)
	}()
	if *watched {
		a.unwatch(fd)
		*watched = false
	}
	if a.p.cfg.handoff {
		done = a.handOff(fd, peer, req, start)
	} else {
		done = a.splice(fd, peer, req, n, start)
	}
	return done, false
}

// unavailable answers a connection that no worker can take, as route
// does (503 for HTTP/1, else a plain close), in a goroutine of its own:
// the answer waits for the client. The Balancer is not asked again.
func (a *rawAccepter) unavailable(fd int, peer netip.AddrPort, isHTTP bool) {
	p := a.p
	c := a.claimFile(fd, peer)
	if c == nil {
		return
	}
	go func() {
		defer p.conns.untrack(c)
		p.refuseUnavailable(c, isHTTP)
	}()
}

// inspect peeks at fd's head without waiting. It returns the request
// parsed from a complete head (from p.reqs, for the caller to put back)
// and the head's length, or nil, and whether the head is still on its
// way. A head that needs route (a trusted proxy's PROXY header may come
// first; a health check) is nil too.
func (a *rawAccepter) inspect(fd int, peer netip.AddrPort) (req *Request, n int, wait bool) {
	p := a.p
	if len(p.cfg.trusted) > 0 {
		return nil, 0, false
	}
	head := a.buf[proxyRoom:]
	n, err := recvNow(fd, head, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN:
		return nil, 0, true
	case err != nil || n == 0:
		return nil, 0, false // an error, or EOF: route sees it
	case !headComplete(head[:n], 0):
		return nil, 0, n < len(head)
	}
	head = head[:n]
	req = p.reqs.Get().(*Request)
	parseRequest(req, head)
	classify(req, head)
	req.RemoteAddr = peer
	if p.isHealthCheck(req) {
		req.reset()
		p.reqs.Put(req)
		return nil, 0, false
	}
	return req, n, false
}

// handOff hands fd to the worker the Balancer picks for req, and closes
// it then: at once, or when the worker's batch is sent. With no worker
// that can take it, it answers unavailable. It reports done unless a
// worker could take it after a wait, which route does.
func (a *rawAccepter) handOff(fd int, peer netip.AddrPort, req *Request, start time.Time) (done bool) {
	p := a.p
	a.msg = handoffFor(req.RemoteAddr, a.optsSet, 0, netip.AddrPort{})
	a.cur, a.queued = handed{fd: fd, peer: peer, at: start}, nil
	p.gate.routing.Add(1)
	p.rawServed.Add(1) // before the worker can see it
	// A worker that takes it only after a wait: route asks the Balancer
	// again, and waits. A stateful Balancer sees the connection twice,
	// in that rare case.
	w, busy := p.offer(req, a.send, nil, offerRaw|offerNowait)
	p.gate.routing.Add(-1)
	if w == nil {
		p.rawServed.Add(^uint64(0))
		if busy {
			return false
		}
		a.unavailable(fd, peer, req.Protocol == ProtocolHTTP1)
		return true
	}
	if b := a.queued; b != nil {
		b.s = w.slot // the batch has fd now
		if len(b.conns) == handoffBatchMax {
			a.flush(b)
		}
		return true
	}
	p.closeClient(fd) // the worker has its own descriptor
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[sniffComplete].record...)
	return true
}

// handBatch is what the raw accept loop hands one worker in a pass: its
// connections, sent in one version 4 message when the pass ends (flush),
// or as soon as it is full. While it is open it holds the process's
// handMu for reading, as a send in flight does, so that the worker's exit
// is settled only after the batch was sent, or given back.
type handBatch struct {
	pr    *process
	s     *slot
	msg   []byte   // version 4: the header, then a record a connection
	conns []handed // the descriptors, in the records' order
}

// handed is a connection in a handBatch. Its head is not kept: a parsed
// Request aliases the loop's buffer, which the next peek overwrites. To
// offer it again the loop peeks again (its bytes are still there).
type handed struct {
	fd   int
	peer netip.AddrPort
	at   time.Time // accepted
}

// queue is handOff's send, under handTo: to a worker that decodes version
// 4 it adds the connection (a.cur, a.msg) to the worker's batch, which
// takes the descriptor; to any other it sends the message now (sendMsg).
func (a *rawAccepter) queue(pr *process, v byte) error {
	if v < handoffV4 || a.msg.version != handoffV3 {
		// An older worker; or a peer a record cannot carry (handoffFor's
		// version 2), which goes in a message of its own.
		return a.sendMsg(pr.handoffSock, v)
	}
	if slices.Contains(a.full, pr) {
		return errWouldWait // a batch to it failed in this pass
	}
	var b *handBatch
	for _, o := range a.batches {
		if o.pr == pr {
			b = o
			break
		}
	}
	if b == nil {
		// handTo holds a read lock already, checked handGone, and releases
		// it on return: the batch takes one of its own, which only a
		// settle waiting to begin refuses.
		if !pr.handMu.TryRLock() {
			return errWouldWait
		}
		if n := len(a.spare); n > 0 {
			b, a.spare = a.spare[n-1], a.spare[:n-1]
		} else {
			b = &handBatch{msg: make([]byte, 0, handoffBatchMsgMax), conns: make([]handed, 0, handoffBatchMax)}
		}
		b.pr, b.msg = pr, append(b.msg[:0], handoffV4, 0)
		a.batches = append(a.batches, b)
	}
	b.msg = appendHandoffRecord(b.msg, a.msg)
	b.conns = append(b.conns, a.cur)
	a.queued = b
	return nil
}

// flushAll sends every batch of the pass.
func (a *rawAccepter) flushAll() {
	for len(a.batches) > 0 {
		a.flush(a.batches[len(a.batches)-1])
	}
}

// flush sends batch b in one message, without waiting, and closes the
// primary's descriptors. If the send fails (the worker's queue is full;
// it has exited), it takes back what offer and handTo counted for each
// connection, and serves each again as the loop does a new one (a peek,
// the Balancer, a hand-off), with that worker left out for the rest of
// the pass (a.full): to another worker, or to route, which waits for
// room.
func (a *rawAccepter) flush(b *handBatch) {
	p := a.p
	i := slices.Index(a.batches, b)
	a.batches = slices.Delete(a.batches, i, i+1)
	n := len(b.conns)
	b.msg[1] = byte(n)
	oob := a.rights[n]
	if oob == nil {
		oob = unix.UnixRights(make([]int, n)...)
		a.rights[n] = oob
	}
	for i, c := range b.conns {
		binary.NativeEndian.PutUint32(oob[unix.CmsgLen(0)+4*i:], uint32(c.fd))
	}
	err := a.sendBatch(b.pr, b.msg, oob)
	if err != nil {
		for range b.conns {
			p.unoffer(b.s, b.pr)
			p.rawServed.Add(^uint64(0))
		}
	}
	b.pr.handMu.RUnlock()
	if err == nil {
		now := time.Now()
		for _, c := range b.conns {
			p.closeClient(c.fd) // the worker has its own descriptor
			p.tel.sniff.Record(bg, now.Sub(c.at).Seconds(), p.tel.outcome[sniffComplete].record...)
		}
	} else {
		a.full = append(a.full, b.pr)
		if !errors.Is(err, errWouldWait) {
			p.tel.dialFailures.Add(bg, int64(n), b.s.attrs.worker.add...)
			if ok, k := p.logs.dial.allow(); ok {
				p.log.Warn("hand-off to worker failed; offering its connections again", "worker", b.s.index, "conns", n, "err", err, "suppressed", k)
			}
		}
		for _, c := range b.conns {
			watched := false
			if done, _ := a.serve(c.fd, c.peer, c.at, &watched); !done {
				a.route(c.fd, c.peer)
			}
		}
	}
	b.pr, b.s = nil, nil
	clear(b.conns)
	b.conns = b.conns[:0]
	a.spare = append(a.spare, b)
}

// rawSpliceMax bounds the heads the loop splices itself: a head and its
// PROXY header go to the worker's new socket in one write that cannot
// wait, as its send buffer (16 KiB to begin with) holds them. Longer
// ones go to route.
const rawSpliceMax = 8 << 10

// splice connects fd (whose head of n bytes is in a.buf) to the worker
// the Balancer picks for req, sends it the PROXY header and the head,
// and gives the pair to an event loop: route's work for splice mode,
// with no goroutine, no registration in Go's poller and no dial that
// waits. It reports done once fd is no longer the caller's: carried by
// a loop, or closed (the connection limit, a shutdown).
func (a *rawAccepter) splice(fd int, peer netip.AddrPort, req *Request, n int, start time.Time) (done bool) {
	p := a.p
	if n > rawSpliceMax {
		return false
	}
	c, err := newFileConn(fd, peer, false)
	if err != nil {
		return false
	}
	local := c.laddr.AddrPort()
	if !p.conns.claim(c) {
		unix.Close(fd) // shutting down
		return true
	}
	p.gate.routing.Add(1)
	defer p.gate.routing.Add(-1)
	var up upstream
	w, busy := p.offer(req, nil, &up, offerRaw|offerNowait)
	if w == nil {
		// A worker that takes it only after a wait: route dials again,
		// and waits, with a connection it can use. None at all: 503.
		p.conns.unclaim(c)
		if busy {
			return false
		}
		a.unavailable(fd, peer, req.Protocol == ProtocolHTTP1)
		return true
	}
	p.rawServed.Add(1)
	p.tel.sniff.Record(bg, time.Since(start).Seconds(), p.tel.outcome[sniffComplete].record...)
	r := &relay{p: p, client: c, worker: up, s: w.slot, sent: int64(n), routed: time.Now()}
	p.conns.routed(c, nil, w.Index, w.PID)
	// The head leaves the client's socket now, and goes to the worker
	// behind its PROXY header, which goes in the buffer's spare room.
	if m, err := unix.Read(fd, a.buf[proxyRoom:proxyRoom+n]); err != nil || m != n {
		r.abort()
	} else {
		var hb [proxyRoom]byte
		h := appendProxyV2(hb[:0], req.RemoteAddr, local, &p.secret)
		copy(a.buf[proxyRoom-len(h):], h)
		// A new socket's send buffer (16 KiB at first) takes it all:
		// it never waits (no timeout), and were it to, it is aborted.
		if err := up.write(a.buf[proxyRoom-len(h):proxyRoom+n], 0); err != nil {
			r.abort()
		}
	}
	// In splice mode the loop runs only where there are event loops, and
	// they take a fileConn: take reports true.
	p.relay().take(r)
	return true
}

// sendMsg sends handOff's message (a.msg, up to version v) with the
// descriptor in a.oob, without waiting, to a worker that does not decode
// version 4.
func (a *rawAccepter) sendMsg(uc *net.UnixConn, v byte) error {
	binary.NativeEndian.PutUint32(a.oob[unix.CmsgLen(0):], uint32(a.cur.fd))
	return sendNow(uc, appendHandoff(a.buf[:0:proxyRoom], a.msg.upTo(v)), a.oob)
}

// sendNow writes the hand-off message msg with the descriptor in oob to
// uc without waiting: a full queue is errWouldWait.
func sendNow(uc *net.UnixConn, msg, oob []byte) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = sendmsgNow(int(fd), msg, oob) }); err != nil {
		return err
	}
	return serr
}

// sendmsgNow is sendNow's sendmsg on the descriptor fd: msg, which must
// not be empty, with the descriptors in oob, through sendmsgRaw.
func sendmsgNow(fd int, msg, oob []byte) error {
	for {
		switch err := sendmsgRaw(fd, msg, oob, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL); err {
		case nil:
			return nil
		case unix.EINTR:
		case unix.EAGAIN:
			return errWouldWait
		default:
			return os.NewSyscallError("sendmsg", err)
		}
	}
}

// sendBatch is sendNow for flush, allocating nothing: on the hand-off
// socket's RawConn, made once with the process (handoffRC; sendNow for a
// process made without it, in tests), through a.doSend, made once.
func (a *rawAccepter) sendBatch(pr *process, msg, oob []byte) error {
	if pr.handoffRC == nil {
		return sendNow(pr.handoffSock, msg, oob)
	}
	a.snd = sendOp{msg: msg, oob: oob}
	if err := pr.handoffRC.Control(a.doSend); err != nil {
		return err
	}
	return a.snd.err
}

// sendOp is one sendmsg call of sendBatch.
type sendOp struct {
	msg, oob []byte
	err      error
}

// recvNow is recv(2) with flags on fd into b, which must not be empty:
// the accept loop's peek, and an event loop's peek and consume. x/sys's
// Recvfrom also asks for the sender's address, into a buffer it
// allocates on every call. A kernel without the recvfrom system call
// (linux/386 before 4.3, where it goes through socketcall) gets x/sys's.
func recvNow(fd int, b []byte, flags int) (int, error) {
	n, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
		uintptr(flags), 0, 0)
	switch errno {
	case 0:
		raceRead(b, int(n), nil)
		return int(n), nil
	case unix.ENOSYS:
		n, _, err := unix.Recvfrom(fd, b, flags)
		return n, err
	}
	return 0, errno
}

// newFileConn makes fd, from the client at peer, a fileConn: with its
// file (in Go's poller), or with the raw descriptor alone.
func newFileConn(fd int, peer netip.AddrPort, file bool) (*fileConn, error) {
	lsa, err := syscall.Getsockname(fd)
	if err != nil {
		return nil, os.NewSyscallError("getsockname", err)
	}
	c := &fileConn{
		fd:    fd,
		laddr: net.TCPAddrFromAddrPort(sockaddrAddrPort(lsa)),
		raddr: net.TCPAddrFromAddrPort(peer),
	}
	if file {
		c.f = os.NewFile(uintptr(fd), "defuss-client")
	}
	return c, nil
}

// CloseWrite shuts down the sending side, as *net.TCPConn's does.
func (c *fileConn) CloseWrite() error {
	rc, err := c.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return err
	}
	return os.NewSyscallError("shutdown", serr)
}

// rawAddrPort is the address and port in rsa, as sockaddrAddrPort gives
// them, without making a syscall.Sockaddr.
func rawAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), netPort(&in.Port))
	case unix.AF_INET6:
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(withZoneID(netip.AddrFrom16(in.Addr), in.Scope_id), netPort(&in.Port))
	}
	return netip.AddrPort{}
}

// netPort reads a port in network byte order.
func netPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// withZoneID is ip with the zone of interface id, named as Go's accept
// names it (its name, or its index if it has none); ip itself for id 0.
func withZoneID(ip netip.Addr, id uint32) netip.Addr {
	if id == 0 {
		return ip
	}
	zone := strconv.Itoa(int(id))
	if ifi, err := net.InterfaceByIndex(int(id)); err == nil {
		zone = ifi.Name
	}
	return ip.WithZone(zone)
}

// sockaddrAddrPort is sa's address and port, with the zone of a link-local
// IPv6 address as Go's accept names it; the zero AddrPort for a socket
// address that is not IP.
func sockaddrAddrPort(sa syscall.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(withZoneID(netip.AddrFrom16(a.Addr), a.ZoneId), uint16(a.Port))
	}
	return netip.AddrPort{}
}
