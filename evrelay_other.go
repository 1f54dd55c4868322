//go:build !linux

package defuss

import (
	"errors"
	"time"
)

// evRelay is the event-driven relay of splice mode on Linux
// (evrelay_linux.go). Elsewhere splice mode relays with goroutines.
type evRelay struct{}

func newEvRelay(int) *evRelay     { return nil }
func (*evRelay) take(*relay) bool { return false }
func (*evRelay) stop()            {}

// Raw worker sockets go with the event loops: there are none here.
func dialWorkerRaw(string, time.Duration) (int, bool, error) { return -1, false, nil }
func writeRaw(int, []byte, time.Duration) error              { return errors.ErrUnsupported }
func closeRaw(int)                                           {}
