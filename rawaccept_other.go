//go:build !linux

package defuss

// rawAcceptLoop is Linux's: elsewhere acceptLoop serves every mode.
func (p *primary) rawAcceptLoop() (handled bool, err error) { return false, nil }
