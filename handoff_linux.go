package defuss

import "golang.org/x/sys/unix"

// handoffSocketType is SOCK_SEQPACKET: each descriptor travels in a
// message of its own, and the primary's send fails at once when the
// worker's end has closed.
const handoffSocketType = unix.SOCK_SEQPACKET
