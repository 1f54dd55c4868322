//go:build !unix

package proc

import "syscall"

// Supported reports whether defuss can run workers on this platform:
// inherited pipes (exec.Cmd.ExtraFiles) are not available here.
const Supported = false

// SysProcAttr returns nil.
func SysProcAttr() *syscall.SysProcAttr { return nil }
