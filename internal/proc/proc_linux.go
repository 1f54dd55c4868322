//go:build linux

package proc

import "syscall"

// Supported reports whether defuss can run workers on this platform.
const Supported = true

// SysProcAttr returns the attributes for a worker process: its own process
// group, so that a terminal's Ctrl-C reaches only the primary (which then
// drains the workers), and SIGKILL when the primary dies, as a second layer
// under the pipe EOF that workers watch.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
