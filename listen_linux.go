package defuss

import (
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenConfig is how the primary opens its public socket. On Linux an
// accepted connection inherits TCP keep-alive from the listening socket,
// so it is set there once, with net's defaults (probes after 15 s idle,
// every 15 s, 9 of them), rather than with four system calls on every
// connection.
func listenConfig() net.ListenConfig {
	return net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			for _, o := range [...]struct{ level, opt, v int }{
				{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
				{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
				{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
				{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
			} {
				if e := unix.SetsockoptInt(int(fd), o.level, o.opt, o.v); e != nil && serr == nil {
					serr = os.NewSyscallError("setsockopt", e)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
}
