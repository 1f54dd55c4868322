package defuss

// Processes as /proc shows them; proc_other_test.go asks ps(1) instead.

import (
	"os"
	"strconv"
	"strings"
)

// children lists the pids whose parent is this process, from /proc.
func children() []int { return childrenOf(os.Getpid()) }

// childrenOf lists the pids whose parent is me, from /proc.
func childrenOf(me int) []int {
	ents, _ := os.ReadDir("/proc")
	var kids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, _, ok := procStat(pid); ok && ppid == me {
			kids = append(kids, pid)
		}
	}
	return kids
}

// procStat returns the parent pid and state letter of pid.
func procStat(pid int) (ppid int, state byte, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// pid (comm) state ppid ...; comm may hold spaces and parens.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+4 > len(b) {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+2:]))
	if len(f) < 2 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return ppid, f[0][0], err == nil
}
