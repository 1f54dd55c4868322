//go:build unix

package defuss

import "syscall"

// Signals the primary acts on besides SIGINT and SIGTERM (see
// WithSignalHandling).
const (
	sigRestart   = syscall.SIGHUP  // Server.Restart
	sigScaleUp   = syscall.SIGTTIN // Server.Scale by +1
	sigScaleDown = syscall.SIGTTOU // Server.Scale by -1
	sigUpgrade   = syscall.SIGUSR2 // Server.Upgrade
)
