//go:build !linux

package defuss

import (
	"errors"
	"net"
)

// listenConfig is how the primary opens its public socket: with net's
// defaults, which set TCP keep-alive on each accepted connection. (On
// Linux the listening socket carries it; see listen_linux.go.)
func listenConfig() net.ListenConfig { return net.ListenConfig{} }

// stopHandshakes is not done here: the listener closes at once, and
// connections in its accept queue are reset (see listen_linux.go).
func stopHandshakes(net.Listener) error { return errors.ErrUnsupported }

// allowHandshakes has nothing to undo here.
func allowHandshakes(net.Listener) error { return errors.ErrUnsupported }

// acceptQueue is not known here.
func acceptQueue(net.Listener) (int, error) { return 0, errors.ErrUnsupported }

// limitUnsent is Linux's: TCP_NOTSENT_LOWAT is left as the system has it.
func limitUnsent(net.Listener) (bool, error) { return false, errors.ErrUnsupported }

// socketLingers is not asked here: only Linux's loops close raw.
func socketLingers(net.Listener) bool { return true }
