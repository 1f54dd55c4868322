//go:build !unix

package defuss

import (
	"net"
	"os"
	"syscall"
)

// This platform cannot pass descriptors to a child process (Start returns
// ErrNotSupported); these exist so that the shared code builds.

func inheritedPipe(int, string) (*os.File, error) { return nil, ErrNotSupported }

func inheritedSocket(int) (*net.UnixConn, error) { return nil, ErrNotSupported }

func passedListener(int, string) (net.Listener, error) { return nil, ErrNotSupported }

func hasUnread(syscall.Conn) bool { return false }

// readAvailable is the waiting read's job here: it reads nothing.
func readAvailable(c syscall.Conn, b []byte) (int, error) { return 0, nil }
