package defuss

import (
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenConfig is how the primary opens its public socket. On Linux an
// accepted connection inherits TCP keep-alive and TCP_NODELAY from the
// listening socket, so they are set there once (publicSocketOpts), rather
// than with five system calls on every connection.
func listenConfig() net.ListenConfig {
	return net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = publicSocketOpts(int(fd)) }); err != nil {
			return err
		}
		return serr
	}}
}

// publicOpts are the options publicSocketOpts sets.
var publicOpts = [...]struct{ level, opt, v int }{
	{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
	{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
	{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
	{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
}

// publicSocketOpts sets on a listening socket what net's Accept sets on
// each connection by default: TCP_NODELAY, and keep-alive probes after
// 15 s idle, every 15 s, 9 of them. Accepted sockets inherit them.
func publicSocketOpts(fd int) error {
	for _, o := range publicOpts {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return os.NewSyscallError("setsockopt", err)
		}
	}
	return nil
}

// hasPublicSocketOpts reports whether the listening socket fd has what
// publicSocketOpts sets.
func hasPublicSocketOpts(fd int) bool {
	for _, o := range publicOpts {
		if v, err := unix.GetsockoptInt(fd, o.level, o.opt); err != nil || v != o.v {
			return false
		}
	}
	return true
}
