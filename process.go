package defuss

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/defuss-go/defuss/internal/proc"
)

// process is one worker process of a slot and what the supervisor knows of
// it. The supervisor goroutine of the slot owns the plain fields; the
// connection path reads handoffSock (set before the process is published)
// and uses the atomic ones.
type process struct {
	pid         int
	started     time.Time
	sys         osProcess       // the operating system's side; a fake in tests
	handoffSock *net.UnixConn   // hand-off mode: connections' descriptors go here (fd 5 in the worker)
	handoffRC   syscall.RawConn // handoffSock's, made once: the raw accept loop sends on it
	dialed      atomic.Uint64   // connections the primary made (or handed) to this process
	// sock is the worker socket that the event loops dial (splice mode
	// on Linux), set before the process is a candidate; sockOff is set
	// once a dial there failed in a way that will recur (nobody listens:
	// an earlier version's worker; another process listens; the system
	// refuses Unix sockets), and the primary uses the TCP port since.
	sock    *workerSocket
	sockOff atomic.Bool
	open    atomic.Int64 // hand-off mode: handed connections the worker has not reported closed
	// handoffVersion is the highest hand-off message version the worker
	// announced it decodes, set when its ready frame comes (2 if it
	// announced none); 0, read as 2, before.
	handoffVersion atomic.Uint32
	// handMu is held for reading by every hand-off in flight to this
	// process, and for writing when its exit settles open (handGone).
	handMu   sync.RWMutex
	handGone bool

	events chan<- procEvent // the supervisor's: frames, exit, timers
	gone   chan struct{}    // closed by release: nothing more is delivered

	ready     bool
	draining  bool
	addr      string
	lastBeat  time.Time
	failMsg   string
	limit     uint64 // recycle after this many requests; 0 = never
	reason    string // why the primary ended it; "" = it died by itself
	reasonErr error
	timer     *time.Timer // start timeout before ready, shutdown timeout while draining
	timerGen  uint64      // which arming of timer an evTimer event is for

	// sharedListener: the process serves the slot's listening socket,
	// which outlives it and which its successor serves too (fixed ports):
	// in splice mode the primary cannot tell which of the two accepted a
	// connection. (Hand-off mode passes connections on the process's own
	// socket.)
	sharedListener bool
	// reportGap is the gap between close reports the worker was last
	// told (hand-off mode): see supervisor.tellReportGap.
	reportGap time.Duration
}

// osProcess is what the supervisor asks of a running worker process: the
// seam between its state machine and the operating system. A process
// reports what happens to it as procEvents: its frames in order, then its
// exit. The exit waits a little for the frames still in the pipe
// (exitFrameWait); a frame that comes later is dropped.
type osProcess interface {
	// drain sends c (a drain command) on the control pipe, or SIGTERM when
	// the pipe is gone.
	drain(c *command)
	// send sends c on the control pipe.
	send(c *command) error
	// kill ends the process with SIGKILL.
	kill()
	// release closes the primary's ends of the process's pipes and sockets
	// and waits for the goroutines that read them. It is called once, after
	// the exit event.
	release()
}

// procEvent is something that happened to one process of a slot.
type procEvent struct {
	pr    *process
	kind  procEventKind
	frame frameEvent // evFrame
	err   error      // evExit: how it ended, as exec.Cmd.Wait says
	gen   uint64     // evTimer: the arming of pr.timer that fired
}

type procEventKind int

const (
	evFrame procEventKind = iota // a frame, or why one could not be read
	evExit                       // the process has exited; its last event
	evTimer                      // its start or shutdown timeout passed
)

func newProcess(pid int, osp osProcess, events chan<- procEvent) *process {
	return &process{pid: pid, sys: osp, started: time.Now(), events: events, gone: make(chan struct{})}
}

// emit delivers ev to the supervisor, or drops it once the process is
// released. It reports whether ev was delivered.
func (pr *process) emit(ev procEvent) bool {
	ev.pr = pr
	select {
	case pr.events <- ev:
		return true
	case <-pr.gone:
		return false
	}
}

// arm (re)starts the process's timer: an evTimer event after d.
func (pr *process) arm(d time.Duration) {
	pr.disarm()
	gen := pr.timerGen
	pr.timer = time.AfterFunc(d, func() { pr.emit(procEvent{kind: evTimer, gen: gen}) })
}

// disarm stops the timer; an event it may have sent already is stale.
func (pr *process) disarm() {
	if pr.timer != nil {
		pr.timer.Stop()
		pr.timer = nil
	}
	pr.timerGen++
}

// kill ends the process, remembering the first reason given.
func (pr *process) kill(reason string, err error) {
	if pr.reason == "" {
		pr.reason, pr.reasonErr = reason, err
	}
	pr.sys.kill()
}

// drain asks the process to stop gracefully within timeout, and arms the
// timer that kills it after that. replaced says that a successor serves
// the slot from now on.
func (pr *process) drain(timeout time.Duration, reason string, replaced bool) {
	if pr.draining {
		return
	}
	pr.draining = true
	if pr.reason == "" {
		pr.reason = reason
	}
	// The worker serves until it has accepted every connection the primary
	// made to it, then stops accepting: the callers made sure that no
	// connection to it is still being dialed. With a fixed port in splice
	// mode, those connections wait on the slot's socket, which a successor
	// accepts from: no need to wait for them then.
	conns := pr.dialed.Load()
	if replaced && pr.sharedListener && pr.handoffSock == nil {
		conns = 0
	}
	pr.sys.drain(&command{kind: frameDrain, shutdownTimeout: timeout, conns: conns})
	pr.arm(timeout)
}

// release ends the process's part in the supervisor: after its exit,
// nothing more is delivered and its pipes close.
func (pr *process) release() {
	pr.disarm()
	close(pr.gone)
	pr.sys.release()
}

// readFrames reads frames from a worker's status pipe and emits them,
// until EOF, an unrecoverable error, or the process is released.
func readFrames(r io.Reader, pr *process) {
	// Buffered: a frame's header and payload come in one read, and the
	// frames a worker wrote meanwhile with them, rather than two reads a
	// frame (close reports come every 2 ms or more from each busy worker).
	r = bufio.NewReaderSize(r, frameHeaderLen+maxFramePayload)
	buf := make([]byte, maxFramePayload)
	for {
		typ, payload, err := readFrame(r, buf)
		if err != nil {
			if errors.Is(err, errFrame) {
				pr.emit(procEvent{kind: evFrame, frame: frameEvent{err: err, fatal: true}})
			}
			return
		}
		m, err := decodeMessage(typ, payload)
		if !pr.emit(procEvent{kind: evFrame, frame: frameEvent{msg: m, err: err}}) {
			return
		}
	}
}

// execProcess is a worker process started from this binary: the real
// osProcess.
type execProcess struct {
	cmd     *exec.Cmd
	status  *os.File       // frames from the worker (fd 3 there)
	control *os.File       // commands to the worker (fd 4 there)
	handoff *net.UnixConn  // also process.handoffSock; closed here
	wg      sync.WaitGroup // the frame reader and the waiter
}

var _ osProcess = (*execProcess)(nil)

func (e *execProcess) drain(c *command) {
	if err := e.send(c); err != nil {
		e.cmd.Process.Signal(syscall.SIGTERM)
	}
}

// send writes c in one write, which a pipe's buffer takes without
// blocking unless the worker has left about 64 KiB of commands unread.
func (e *execProcess) send(c *command) error {
	_, err := e.control.Write(appendCommand(nil, c))
	return err
}

func (e *execProcess) kill() { e.cmd.Process.Kill() }

func (e *execProcess) release() {
	e.status.Close() // unblocks the frame reader if it still waits
	e.control.Close()
	if e.handoff != nil {
		e.handoff.Close()
	}
	e.wg.Wait()
}

// exitFrameWait bounds how long the exit event waits, after the process
// has exited, for the frames still in its pipe (a failure frame says why
// it died), in case a descendant still holds the pipe's write end.
const exitFrameWait = 200 * time.Millisecond

// watch starts the goroutines that turn what the process does into
// events: its frames, then its exit.
func (e *execProcess) watch(pr *process) {
	framesDone := make(chan struct{})
	e.wg.Add(2)
	go func() {
		defer e.wg.Done()
		defer close(framesDone)
		readFrames(pipeReader(e.status), pr)
	}()
	go func() {
		defer e.wg.Done()
		err := e.cmd.Wait()
		t := time.NewTimer(exitFrameWait)
		select {
		case <-framesDone:
		case <-t.C:
		}
		t.Stop()
		pr.emit(procEvent{kind: evExit, err: err})
	}()
}

// spawnExec starts a worker process for slot i with its pipes, sends it
// its configuration, and starts the goroutines that watch it. It is the
// primary's spawn outside tests.
func (p *primary) spawnExec(i int, events chan<- procEvent) (*process, error) {
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	controlR, controlW, err := os.Pipe()
	if err != nil {
		statusR.Close()
		statusW.Close()
		return nil, err
	}
	cmd := exec.Command(p.exe, os.Args[1:]...)
	cmd.Env = p.workerEnv(i)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{statusW, controlR} // fd 3, fd 4
	cmd.SysProcAttr = proc.SysProcAttr()
	closePipes := func() {
		statusR.Close()
		statusW.Close()
		controlR.Close()
		controlW.Close()
	}
	// fd 5, a Unix socket pair: connections' descriptors in hand-off mode,
	// and first of all the slot's listening socket with fixed ports.
	fixed := p.cfg.baseWorkerPort > 0
	var sock *net.UnixConn
	if p.cfg.handoff || fixed {
		var theirs *os.File
		if sock, theirs, err = handoffPair(); err != nil {
			closePipes()
			return nil, err
		}
		cmd.ExtraFiles = append(cmd.ExtraFiles, theirs) // fd 5
		defer theirs.Close()
	}
	err = cmd.Start()
	statusW.Close()
	controlR.Close()
	if err == nil && fixed {
		// Passed over the socket, not as an inherited file: exec.Cmd would
		// call Fd on it, which turns the socket, shared by every process of
		// the slot, to blocking mode.
		if err = p.sendFixedListener(sock, i); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}
	if err != nil {
		statusR.Close()
		controlW.Close()
		if sock != nil {
			sock.Close()
		}
		return nil, err
	}
	if !p.cfg.handoff && sock != nil {
		sock.Close() // it carried the listener only
		sock = nil
	}
	e := &execProcess{cmd: cmd, status: statusR, control: controlW, handoff: sock}
	pr := newProcess(cmd.Process.Pid, e, events)
	pr.handoffSock = sock
	if sock != nil {
		if rc, err := sock.SyscallConn(); err == nil {
			pr.handoffRC = rc // else the raw accept loop sends with sendNow
		}
	}
	pr.sharedListener = fixed
	e.watch(pr)
	port := 0
	if p.cfg.baseWorkerPort > 0 {
		port = p.cfg.baseWorkerPort + i
	}
	// The pipe buffer takes these small frames without blocking, even if
	// the worker never reads them.
	b := appendCommand(nil, &command{kind: frameConfig, slot: i, port: port,
		host: p.cfg.workerHost, heartbeat: p.cfg.heartbeat, shutdownTimeout: p.cfg.shutdownTimeout, secret: p.secret,
		handoff: p.cfg.handoff, listener: fixed})
	if p.cfg.handoff {
		pr.reportGap = p.reportGap()
		b = appendCommand(b, &command{kind: frameReportGap, reportGap: pr.reportGap})
	}
	_, err = controlW.Write(b)
	if err != nil {
		// The process is gone already (or going): its exit status says why.
		p.log.Warn("cannot send configuration to worker", "worker", i, "worker_pid", pr.pid, "err", err)
		cmd.Process.Kill()
	}
	return pr, nil
}

// workerEnv is the environment of slot i's process.
func (p *primary) workerEnv(i int) []string {
	env := make([]string, 0, len(os.Environ())+len(p.cfg.workerEnv)+2)
	procsSet := false
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, envSlot+"=") || isInheritEnv(kv) || strings.HasPrefix(kv, envNotifySocket+"=") {
			continue // the primary's own
		}
		procsSet = procsSet || strings.HasPrefix(kv, "GOMAXPROCS=")
		env = append(env, kv)
	}
	for _, kv := range p.cfg.workerEnv {
		procsSet = procsSet || strings.HasPrefix(kv, "GOMAXPROCS=")
	}
	env = append(env, p.cfg.workerEnv...)
	if !procsSet {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(p.cfg.workerProcs()))
	}
	return append(env, envSlot+"="+strconv.Itoa(i))
}

func exitStatus(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "signal " + ws.Signal().String()
		}
		return "exit " + strconv.Itoa(ee.ExitCode())
	}
	if err == nil {
		return "exit 0"
	}
	return err.Error()
}
