package defuss

import (
	"os"

	"golang.org/x/sys/unix"
)

// handoffSocketpair makes the hand-off socket pair: SOCK_SEQPACKET, so
// that each descriptor travels in a message of its own and a send fails
// at once when the worker's end has closed; close-on-exec atomically.
func handoffSocketpair() ([2]int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fds, os.NewSyscallError("socketpair", err)
	}
	return fds, nil
}
