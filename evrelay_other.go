//go:build !linux

package defuss

// evRelay is the event-driven relay of splice mode on Linux
// (evrelay_linux.go). Elsewhere splice mode relays with goroutines.
type evRelay struct{}

func newEvRelay(int) *evRelay     { return nil }
func (*evRelay) take(*relay) bool { return false }
func (*evRelay) stop()            {}
