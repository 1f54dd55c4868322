package defuss

import (
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// spliceQueued moves what is queued on src's socket (rc; lr reads src) to
// dst in the kernel: TCPConn.ReadFrom between two TCP connections uses
// splice(2). It returns 0 when nothing is queued.
func spliceQueued(rc syscall.RawConn, dst *net.TCPConn, lr *io.LimitedReader) (int64, error) {
	var n int
	var qerr error
	err := rc.Control(func(fd uintptr) { n, qerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	if err != nil || qerr != nil || n == 0 {
		return 0, nil
	}
	lr.N = int64(n)
	return dst.ReadFrom(lr)
}
