//go:build !unix

package defuss

import (
	"io"
	"net"
	"sync/atomic"
)

// copyStream copies src to dst until EOF. The primary does not run on
// this platform (Start returns ErrNotSupported); this lets the shared code
// build.
func copyStream(dst, src net.Conn, _ *atomic.Bool) (int64, error) { return io.Copy(dst, src) }
