//go:build unix && !linux

package defuss

import (
	"io"
	"net"
	"syscall"
)

// spliceQueued does nothing where there is no splice(2): copyStream reads
// on with its pooled buffer, which is a plain buffered copy.
func spliceQueued(syscall.RawConn, *net.TCPConn, *io.LimitedReader) (int64, error) { return 0, nil }
