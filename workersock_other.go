//go:build !linux

package defuss

import "net"

// workerSocket is a worker's abstract Unix socket on Linux
// (workersock_linux.go). Elsewhere the primary reaches every worker on
// its loopback TCP port.
type workerSocket struct{}

func newWorkerSocket(*[secretLen]byte, int) *workerSocket       { return nil }
func listenWorkerSocket(*[secretLen]byte) (net.Listener, error) { return nil, nil }
func dialWorkerSocket(*workerSocket, int) (int, error)          { return -1, errSocketAbsent }
