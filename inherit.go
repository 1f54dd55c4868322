package defuss

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// The public socket a primary can inherit instead of binding its
// address: from systemd (socket activation), or from the primary it
// replaces (Server.Upgrade). Both pass descriptors at exec, from fd 3 on.

// Environment of socket activation (sd_listen_fds(3)), and of a primary
// started by Upgrade. Workers see none of them.
const (
	envListenPID     = "LISTEN_PID"
	envListenFDs     = "LISTEN_FDS"
	envListenFDNames = "LISTEN_FDNAMES"
	envNotifySocket  = "NOTIFY_SOCKET"
	// envUpgradeFrom marks a primary started by Upgrade and names the pid
	// of its predecessor, its parent: fd 3 is the public listening socket,
	// fd 4 a stream socket to the predecessor.
	envUpgradeFrom = "DEFUSS_UPGRADE_FROM"
	// envUpgradeActivated, "1", tells the new primary of an Upgrade that
	// the socket came from systemd, which holds it too (passedSocket's
	// activated).
	envUpgradeActivated = "DEFUSS_UPGRADE_ACTIVATED"
)

// Descriptors at exec. Socket activation passes its sockets from fd 3
// (SD_LISTEN_FDS_START); an upgraded primary gets its listener there too.
const (
	fdListenStart = 3
	fdUpgradeLn   = 3
	fdUpgradeRdy  = 4
)

// maxListenFDs bounds LISTEN_FDS: a unit passes a handful of sockets.
const maxListenFDs = 1024

// A passedSocket is where the public socket comes from when the
// primary does not bind it.
type passedSocket struct {
	fd        int
	from      string // for logs and errors: "systemd socket activation", "upgrade from pid 123"
	activated bool   // from systemd, which holds the socket too
}

// inheritedFromEnv reads which socket this process inherits, if any: an
// Upgrade's first, when envUpgradeFrom names ppid, the parent (the
// variable stays in the new primary's environment, and a child it starts
// must not take it for its own); then systemd's when LISTEN_PID is pid.
// name is WithActivatedSocket's. It returns nil when there is none, and an
// error wrapping ErrInvalidOption for an environment that names this
// process but makes no sense.
func inheritedFromEnv(getenv func(string) string, pid, ppid int, name string) (*passedSocket, error) {
	if v := getenv(envUpgradeFrom); v != "" {
		from, err := strconv.Atoi(v)
		if err != nil || from <= 0 {
			return nil, fmt.Errorf("%w: %s=%q: not a process id", ErrInvalidOption, envUpgradeFrom, v)
		}
		if from == ppid {
			return &passedSocket{fd: fdUpgradeLn, from: "upgrade from pid " + v, activated: getenv(envUpgradeActivated) == "1"}, nil
		}
		// Inherited by a process that user code started: not for it.
	}
	v := getenv(envListenPID)
	if v == "" {
		return nil, nil
	}
	if lp, err := strconv.Atoi(v); err != nil || lp != pid {
		return nil, nil // for another process (sd_listen_fds(3) ignores it too)
	}
	fds := getenv(envListenFDs)
	n, err := strconv.Atoi(fds)
	if err != nil || n < 1 || n > maxListenFDs {
		return nil, fmt.Errorf("%w: socket activation: %s=%q: want a number of sockets from 1 to %d", ErrInvalidOption, envListenFDs, fds, maxListenFDs)
	}
	names := strings.Split(getenv(envListenFDNames), ":")
	i := 0
	switch {
	case name != "":
		i = slices.Index(names[:min(len(names), n)], name)
		if i < 0 {
			return nil, fmt.Errorf("%w: WithActivatedSocket(%q): systemd passed no socket of that name (%s=%q)", ErrInvalidOption, name, envListenFDNames, getenv(envListenFDNames))
		}
	case n > 1:
		return nil, fmt.Errorf("%w: socket activation: systemd passed %d sockets (%s=%q); choose one with WithActivatedSocket(name)", ErrInvalidOption, n, envListenFDNames, getenv(envListenFDNames))
	}
	return &passedSocket{fd: fdListenStart + i, from: "systemd socket activation", activated: true}, nil
}

// isInheritEnv reports whether kv, an environment entry, passes
// descriptors or notifications to this process only: a child must not
// see it.
func isInheritEnv(kv string) bool {
	for _, k := range [...]string{envListenPID, envListenFDs, envListenFDNames, envUpgradeFrom, envUpgradeActivated} {
		if strings.HasPrefix(kv, k+"=") {
			return true
		}
	}
	return false
}

// upgradeChild reports whether this process is the new primary of an
// Upgrade: envUpgradeFrom names its parent.
func upgradeChild() bool {
	return os.Getenv(envUpgradeFrom) == strconv.Itoa(os.Getppid())
}
