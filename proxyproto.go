package defuss

import (
	"bufio"
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/pires/go-proxyproto"
)

// PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt). The
// primary writes a v2 header in front of every connection to a worker:
// it carries the client's address and, in a custom TLV, the per-run secret
// that proves to the worker that the connection comes from its primary.
var proxyV2Sig = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

const (
	proxyRoom      = 128      // room for the outgoing header: 16 + 36 (IPv6) + 3 + secretLen
	tlvSecret      = 0xE0     // PP2_TYPE_MIN_CUSTOM
	proxyV1Max     = 107      // longest v1 line, CRLF included
	proxyV2Max     = 16 + 512 // longest v2 header accepted: far more than any address block and TLVs a balancer sends
	proxyUnknown   = -2       // proxyHeaderLen: more bytes needed to tell
	proxyMalformed = -1       // proxyHeaderLen: a PROXY header that cannot be valid
)

// appendProxyV2 appends a v2 header for a TCP connection from src to dst
// (LOCAL, without addresses, when either is not known) with the secret.
func appendProxyV2(b []byte, src, dst netip.AddrPort, secret *[secretLen]byte) []byte {
	const tlvLen = 3 + secretLen
	b = append(b, proxyV2Sig[:]...)
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	switch {
	case !src.IsValid() || !dst.IsValid():
		b = append(b, 0x20, 0x00) // v2 LOCAL, UNSPEC
		b = binary.BigEndian.AppendUint16(b, tlvLen)
	case s.Is4() && d.Is4():
		b = append(b, 0x21, 0x11) // v2 PROXY, TCP over IPv4
		b = binary.BigEndian.AppendUint16(b, 12+tlvLen)
		s4, d4 := s.As4(), d.As4()
		b = append(append(b, s4[:]...), d4[:]...)
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	default:
		b = append(b, 0x21, 0x21) // v2 PROXY, TCP over IPv6
		b = binary.BigEndian.AppendUint16(b, 36+tlvLen)
		s16, d16 := src.Addr().As16(), dst.Addr().As16()
		b = append(append(b, s16[:]...), d16[:]...)
		b = binary.BigEndian.AppendUint16(b, src.Port())
		b = binary.BigEndian.AppendUint16(b, dst.Port())
	}
	b = append(b, tlvSecret, 0, secretLen)
	return append(b, secret[:]...)
}

// proxyHeaderLen looks at the start of what a client sent: the length of
// the PROXY header there, 0 if b does not start with one, proxyUnknown if
// more bytes are needed to tell, or proxyMalformed.
func proxyHeaderLen(b []byte) int {
	const v1 = "PROXY "
	switch {
	case len(b) < len(v1) && bytes.HasPrefix([]byte(v1), b),
		len(b) < 16 && bytes.HasPrefix(proxyV2Sig[:], b[:min(len(b), 12)]):
		return proxyUnknown
	case bytes.HasPrefix(b, []byte(v1)):
		if i := bytes.Index(b[:min(len(b), proxyV1Max)], []byte("\r\n")); i >= 0 {
			return i + 2
		}
		if len(b) >= proxyV1Max {
			return proxyMalformed
		}
		return proxyUnknown
	case bytes.HasPrefix(b, proxyV2Sig[:]):
		if b[12]>>4 != 2 {
			return proxyMalformed
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > proxyV2Max {
			return proxyMalformed
		}
		if len(b) < n {
			return proxyUnknown
		}
		return n
	}
	return 0
}

// proxiedClient checks a PROXY header that a client sent, and returns the
// client address it carries, or why the connection must be refused.
func (p *primary) proxiedClient(peer netip.AddrPort, header []byte, hdr int) (netip.AddrPort, string) {
	if !p.cfg.trusts(peer.Addr()) {
		return peer, "untrusted"
	}
	if hdr < 0 {
		return peer, "malformed"
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(header)))
	if err != nil {
		return peer, "malformed"
	}
	if h.Command.IsLocal() {
		return peer, "" // a health check of the balancer itself: keep the socket address
	}
	if a, ok := h.SourceAddr.(*net.TCPAddr); ok {
		return a.AddrPort(), ""
	}
	return peer, "malformed"
}

// errNotFromPrimary rejects a connection to a worker that does not start
// with its primary's PROXY header: none, another kind, a malformed one,
// or one without the secret.
var errNotFromPrimary = errors.New("defuss: connection does not come from this worker's primary")

// workerHeader is what a worker reads from its primary's PROXY header:
// the client's address and the public one it connected to, both invalid
// for a LOCAL header (the primary knew neither).
type workerHeader struct {
	src, dst netip.AddrPort
}

// decodeWorkerHeader decodes the PROXY v2 header at the start of b, as
// appendProxyV2 writes it, and checks that it carries secret. It returns
// the header's length, 0 if b holds only a prefix of a header that may
// still be valid (read more), or an error wrapping errNotFromPrimary.
//
// It accepts only what a primary sends: version 2; PROXY over TCP/IPv4 or
// TCP/IPv6, or LOCAL with no addresses; well-formed TLVs, one of which is
// the secret. The public side's headers, from load balancers, go through
// go-proxyproto (proxiedClient), which reads every form the protocol has.
// This one reads one form, with no allocation: every connection to a
// worker in splice mode starts with it.
func decodeWorkerHeader(b []byte, secret *[secretLen]byte) (h workerHeader, n int, err error) {
	if len(b) < 16 {
		if !bytes.HasPrefix(proxyV2Sig[:], b[:min(len(b), len(proxyV2Sig))]) {
			return h, 0, fmt.Errorf("%w: no PROXY v2 header", errNotFromPrimary)
		}
		return h, 0, nil
	}
	if !bytes.Equal(b[:12], proxyV2Sig[:]) {
		return h, 0, fmt.Errorf("%w: no PROXY v2 header", errNotFromPrimary)
	}
	n = 16 + int(binary.BigEndian.Uint16(b[14:16]))
	if n > proxyV2Max {
		return h, 0, fmt.Errorf("%w: PROXY header of %d bytes", errNotFromPrimary, n)
	}
	var addrLen int
	switch cmd, fam := b[12], b[13]; {
	case cmd == 0x21 && fam == 0x11:
		addrLen = 12
	case cmd == 0x21 && fam == 0x21:
		addrLen = 36
	case cmd == 0x20 && fam == 0x00:
	default:
		return h, 0, fmt.Errorf("%w: PROXY header of command %#x, family %#x", errNotFromPrimary, cmd, fam)
	}
	if n < 16+addrLen {
		return h, 0, fmt.Errorf("%w: PROXY header of %d bytes, too short for its addresses", errNotFromPrimary, n)
	}
	if len(b) < n {
		return h, 0, nil
	}
	a := b[16 : 16+addrLen]
	switch addrLen {
	case 12:
		h.src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(a[0:4])), binary.BigEndian.Uint16(a[8:10]))
		h.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(a[4:8])), binary.BigEndian.Uint16(a[10:12]))
	case 36:
		h.src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(a[0:16])).Unmap(), binary.BigEndian.Uint16(a[32:34]))
		h.dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(a[16:32])).Unmap(), binary.BigEndian.Uint16(a[34:36]))
	}
	found := false
	for tlvs := b[16+addrLen : n]; len(tlvs) > 0; {
		if len(tlvs) < 3 {
			return workerHeader{}, 0, fmt.Errorf("%w: PROXY header with a truncated TLV", errNotFromPrimary)
		}
		typ, l := tlvs[0], int(binary.BigEndian.Uint16(tlvs[1:3]))
		if len(tlvs) < 3+l {
			return workerHeader{}, 0, fmt.Errorf("%w: PROXY header with a truncated TLV", errNotFromPrimary)
		}
		if typ == tlvSecret && l == secretLen && subtle.ConstantTimeCompare(tlvs[3:3+l], secret[:]) == 1 {
			found = true
		}
		tlvs = tlvs[3+l:]
	}
	if !found {
		return workerHeader{}, 0, fmt.Errorf("%w: PROXY header without the secret", errNotFromPrimary)
	}
	return h, n, nil
}
