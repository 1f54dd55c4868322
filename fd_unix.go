//go:build unix

package defuss

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// The descriptors a process inherits from defuss (in a worker, the status
// and control pipes, with the per-run secret, and the hand-off socket; in
// a primary started by Upgrade, the public socket and the ready pipe) and
// those systemd passes by socket activation are made close-on-exec when
// this package is initialised: before main, and before every package that
// imports defuss, so that a process that code starts before Start does not
// inherit them. This is the one thing defuss does before Start.
func init() {
	var fds []int
	switch {
	case os.Getenv(envSlot) != "":
		fds = []int{fdStatus, fdControl, fdHandoff}
	case upgradeChild():
		fds = []int{fdUpgradeLn, fdUpgradeRdy}
	case os.Getenv(envListenPID) == strconv.Itoa(os.Getpid()):
		n, _ := strconv.Atoi(os.Getenv(envListenFDs))
		for fd := fdListenStart; fd < fdListenStart+min(n, maxListenFDs); fd++ {
			fds = append(fds, fd)
		}
	}
	for _, fd := range fds {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && (uint32(st.Mode)&unix.S_IFMT == unix.S_IFIFO || uint32(st.Mode)&unix.S_IFMT == unix.S_IFSOCK) {
			unix.CloseOnExec(fd)
		}
	}
}

// checkInherited checks that fd is of the kind (unix.S_IFIFO,
// unix.S_IFSOCK) the primary passes there, and marks it close-on-exec so
// that the worker's own children do not inherit it.
func checkInherited(fd int, kind uint32) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fd %d: %w", fd, err)
	}
	if uint32(st.Mode)&unix.S_IFMT != kind {
		what := "pipe"
		if kind == unix.S_IFSOCK {
			what = "socket"
		}
		return fmt.Errorf("fd %d is not a %s", fd, what)
	}
	unix.CloseOnExec(fd)
	return nil
}

// inheritedPipe returns the pipe at fd, non-blocking so that deadlines and
// Close work on it.
func inheritedPipe(fd int, name string) (*os.File, error) {
	if err := checkInherited(fd, unix.S_IFIFO); err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// inheritedSocket returns the Unix socket at fd.
func inheritedSocket(fd int) (*net.UnixConn, error) {
	if err := checkInherited(fd, unix.S_IFSOCK); err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "defuss-handoff")
	defer f.Close() // FileConn made its own descriptor
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("fd %d is not a Unix socket", fd)
	}
	return uc, nil
}

// passedListener returns the listening socket passed at fd (by systemd,
// or by the primary that Upgrade replaces), and closes fd: the listener
// holds a close-on-exec copy of it.
func passedListener(fd int, from string) (net.Listener, error) {
	if err := checkInherited(fd, unix.S_IFSOCK); err != nil {
		return nil, fmt.Errorf("defuss: %s: %w", from, err)
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil && v == 0 {
		return nil, fmt.Errorf("defuss: %s: fd %d is a socket that does not listen", from, fd)
	}
	f := os.NewFile(uintptr(fd), "defuss-listener")
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("defuss: %s: fd %d: %w", from, fd, err)
	}
	return ln, nil
}

// hasUnread reports whether bytes have arrived on c that nobody has read
// yet (closing c now would reset it and lose them).
func hasUnread(c syscall.Conn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var n int
	var b [1]byte
	rc.Control(func(fd uintptr) { n, _, _ = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT) })
	return n > 0
}

// readAvailable reads into b what has arrived on c, without waiting: 0
// and no error when nothing has (or the socket cannot be read this way:
// a waiting read after it tells), io.EOF when the peer has closed.
func readAvailable(c syscall.Conn, b []byte) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, nil
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = syscall.Read(int(fd), b)
		return true // done, whatever came: do not wait
	}); err != nil || rerr != nil {
		return 0, nil
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}
