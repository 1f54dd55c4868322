//go:build unix

package defuss

import (
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// startSuccessor starts the new primary of an upgrade: the binary on disk
// with this process's arguments, environment (successorEnv), working
// directory, stdin, stdout and stderr; the public listening socket as fd
// 3 and its end of a socket pair (upgradePair) as fd 4. It is a child of this
// process, but nothing ties its life to this one: no parent-death signal,
// the same process group.
//
// syscall.ForkExec, not exec.Cmd: exec.Cmd takes its extra descriptors as
// *os.File and calls Fd on them, which switches the listening socket,
// shared with this process's accept loop, to blocking mode. Here the
// socket's descriptor is passed as it is, held by RawConn.Control so that
// it cannot be closed meanwhile.
func (p *primary) startSuccessor() (*successor, error) {
	sc, ok := p.ln.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%w: the listener (%T) has no descriptor to pass", ErrNotSupported, p.ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	ours, theirs, err := upgradePair()
	if err != nil {
		return nil, err
	}
	defer theirs.Close()
	files := []uintptr{stdFD(0), stdFD(1), stdFD(2), 0, theirs.Fd()}
	attr := &syscall.ProcAttr{Env: successorEnv(p.cfg.inherited != nil && p.cfg.inherited.activated), Files: files}
	var pid int
	var startErr error
	err = rc.Control(func(fd uintptr) {
		files[fdUpgradeLn] = fd
		pid, startErr = syscall.ForkExec(p.exe, os.Args, attr)
	})
	if err == nil {
		err = startErr
	}
	if err != nil {
		ours.Close()
		return nil, err
	}
	proc, err := os.FindProcess(pid)
	if err != nil { // not on Unix; for completeness
		syscall.Kill(pid, syscall.SIGKILL)
		ours.Close()
		return nil, err
	}
	return &successor{pid: pid, proc: proc, conn: ours}, nil
}

// upgradePair makes the stream socket pair between a primary and the new
// primary of its upgrade, both ends close-on-exec (under ForkLock, as not
// every system has SOCK_CLOEXEC).
func upgradePair() (*net.UnixConn, *os.File, error) {
	syscall.ForkLock.RLock()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	return filePair(fds, "defuss-upgrade")
}

// stdFD returns fd, one of 0, 1 and 2, to pass as it is, or -1 (closed in
// the child) when this process does not have it open.
func stdFD(fd int) uintptr {
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		return ^uintptr(0)
	}
	return uintptr(fd)
}
