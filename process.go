package defuss

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/defuss-go/defuss/internal/proc"
)

// process is one worker process of a slot and what the supervisor knows of
// it. Only the slot's supervisor goroutine touches it.
type process struct {
	cmd     *exec.Cmd
	pid     int
	status  *os.File
	control *os.File
	events  chan frameEvent // from readFrames; closed at EOF
	exited  chan error      // cmd.Wait's result
	started time.Time
	dialed  atomic.Uint64 // connections the primary made (or handed) to this process
	handoff *net.UnixConn // hand-off mode: connections' descriptors go here (fd 5 in the worker)
	open    atomic.Int64  // hand-off mode: handed connections the worker has not reported closed

	ready     bool
	addr      string
	lastBeat  time.Time
	failMsg   string
	limit     uint64 // recycle after this many requests; 0 = never
	reason    string // why the primary ended it; "" = it died by itself
	reasonErr error
	timer     *time.Timer // start timeout before ready, shutdown timeout while draining
	draining  bool
}

func (pr *process) eventsC() <-chan frameEvent {
	if pr == nil {
		return nil
	}
	return pr.events
}

func (pr *process) exitC() <-chan error {
	if pr == nil {
		return nil
	}
	return pr.exited
}

func (pr *process) timerC() <-chan time.Time {
	if pr == nil || pr.timer == nil {
		return nil
	}
	return pr.timer.C
}

// kill ends the process, remembering the first reason given.
func (pr *process) kill(reason string, err error) {
	if pr.reason == "" {
		pr.reason, pr.reasonErr = reason, err
	}
	pr.cmd.Process.Kill()
}

// drainProc asks the process to stop gracefully within timeout, and arms
// the timer that kills it after that.
func (pr *process) drainProc(timeout time.Duration, reason string) {
	if pr.draining {
		return
	}
	pr.draining = true
	if pr.reason == "" {
		pr.reason = reason
	}
	// The worker serves until it has accepted every connection the primary
	// made to it, then stops accepting: the callers made sure that no
	// connection to it is still being dialed.
	drain := &command{kind: frameDrain, shutdownTimeout: timeout, conns: pr.dialed.Load()}
	if _, err := pr.control.Write(appendCommand(nil, drain)); err != nil {
		pr.cmd.Process.Signal(syscall.SIGTERM)
	}
	if pr.timer != nil {
		pr.timer.Stop()
	}
	pr.timer = time.NewTimer(timeout)
}

// finish releases the pipes of an exited process. Frames still in the
// pipe are read first (a failure frame says why the process died), for a
// bounded time in case a descendant still holds the write end.
func (pr *process) finish() {
	if pr.events != nil {
		t := time.NewTimer(200 * time.Millisecond)
	drain:
		for {
			select {
			case ev, ok := <-pr.events:
				if !ok {
					break drain
				}
				if ev.err == nil && ev.msg.kind == frameFailed {
					pr.failMsg = ev.msg.err
				}
			case <-t.C:
				break drain
			}
		}
		t.Stop()
	}
	pr.status.Close() // unblocks readFrames if it still waits
	pr.control.Close()
	if pr.handoff != nil {
		pr.handoff.Close()
	}
	if pr.events != nil {
		for range pr.events {
		}
	}
}

// spawn starts a worker process for slot i with its two pipes, sends it
// its configuration, and starts the goroutines that watch it.
func (p *primary) spawn(i int) (*process, error) {
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
	var handoff *net.UnixConn
	if p.cfg.handoff {
		var theirs *os.File
		if handoff, theirs, err = handoffPair(); err != nil {
			statusR.Close()
			statusW.Close()
			controlR.Close()
			controlW.Close()
			return nil, err
		}
		cmd.ExtraFiles = append(cmd.ExtraFiles, theirs) // fd 5
		defer theirs.Close()
	}
	err = cmd.Start()
	statusW.Close()
	controlR.Close()
	if err != nil {
		statusR.Close()
		controlW.Close()
		if handoff != nil {
			handoff.Close()
		}
		return nil, err
	}
	pr := &process{
		cmd:     cmd,
		pid:     cmd.Process.Pid,
		status:  statusR,
		control: controlW,
		handoff: handoff,
		events:  make(chan frameEvent, 8),
		exited:  make(chan error, 1),
		started: time.Now(),
		timer:   time.NewTimer(p.cfg.startTimeout),
	}
	go readFrames(statusR, pr.events)
	go func() { pr.exited <- cmd.Wait() }()
	port := 0
	if p.cfg.baseWorkerPort > 0 {
		port = p.cfg.baseWorkerPort + i
	}
	// The pipe buffer takes this small frame without blocking, even if the
	// worker never reads it.
	_, err = controlW.Write(appendCommand(nil, &command{kind: frameConfig, slot: i, port: port,
		host: p.cfg.workerHost, heartbeat: p.cfg.heartbeat, shutdownTimeout: p.cfg.shutdownTimeout, secret: p.secret,
		handoff: p.cfg.handoff}))
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
		if strings.HasPrefix(kv, envSlot+"=") {
			continue
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
