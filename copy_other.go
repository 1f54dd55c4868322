//go:build !unix

package defuss

import (
	"io"
	"net"
)

// copyStream copies src to dst until EOF. The primary does not run on
// this platform (Start returns ErrNotSupported); this lets the shared code
// build.
func copyStream(dst, src net.Conn) (int64, error) { return io.Copy(dst, src) }
