//go:build unix && !linux

package proc

import "syscall"

// Supported reports whether defuss can run workers on this platform.
const Supported = true

// SysProcAttr returns the attributes for a worker process: its own process
// group, so that a terminal's Ctrl-C reaches only the primary. There is no
// parent-death signal here; workers rely on EOF on their control pipe.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
