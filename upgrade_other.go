//go:build !unix

package defuss

// startSuccessor: the primary does not run here (Start returns
// ErrNotSupported).
func (p *primary) startSuccessor() (*successor, error) { return nil, ErrNotSupported }
