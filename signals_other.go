//go:build !unix

package defuss

import "syscall"

// This platform has no SIGTTIN, SIGTTOU or SIGUSR2; out-of-range values never
// arrive (signal.Notify ignores them). The primary does not run here
// anyway: Start returns ErrNotSupported.
const (
	sigRestart   = syscall.SIGHUP
	sigScaleUp   = syscall.Signal(-1)
	sigScaleDown = syscall.Signal(-2)
	sigUpgrade   = syscall.Signal(-3)
)
