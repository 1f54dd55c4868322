//go:build unix && !linux

package defuss

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Without /proc, the tests ask ps(1) about processes. proc_linux_test.go
// reads /proc instead.

// children lists the pids whose parent is this process, zombies included.
func children() []int { return childrenOf(os.Getpid()) }

// childrenOf lists the pids whose parent is me, zombies included.
func childrenOf(me int) []int {
	ps := exec.Command("ps", "-A", "-o", "pid=,ppid=")
	out, err := ps.Output()
	if err != nil {
		return nil
	}
	var kids []int
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		pid, err1 := strconv.Atoi(f[0])
		ppid, err2 := strconv.Atoi(f[1])
		// ps itself is a child of this process while it runs.
		if err1 == nil && err2 == nil && ppid == me && pid != ps.Process.Pid {
			kids = append(kids, pid)
		}
	}
	return kids
}

// procStat returns the parent pid and state letter of pid.
func procStat(pid int) (ppid int, state byte, ok bool) {
	out, err := exec.Command("ps", "-o", "ppid=,stat=", "-p", strconv.Itoa(pid)).Output()
	if err != nil {
		return 0, 0, false // ps exits 1 when there is no such process
	}
	f := strings.Fields(string(out))
	if len(f) < 2 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[0])
	return ppid, f[1][0], err == nil
}
