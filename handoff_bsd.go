//go:build unix && !linux

package defuss

import "golang.org/x/sys/unix"

// handoffSocketType is SOCK_DGRAM: macOS has no SOCK_SEQPACKET for Unix
// sockets, and datagrams keep each descriptor in a message of its own as
// well. Go sees a datagram pair as a *net.UnixConn like any other.
const handoffSocketType = unix.SOCK_DGRAM
