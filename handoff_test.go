package defuss

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
)

// The hand-off messages a primary sends, as the worker decodes them.
func TestDecodeHandoff(t *testing.T) {
	v4 := netip.MustParseAddrPort("203.0.113.7:5555")
	v6 := netip.MustParseAddrPort("[2001:db8::1]:443")
	mapped := netip.AddrPortFrom(netip.AddrFrom16(v4.Addr().As16()), 80)
	for _, tc := range []struct {
		name string
		msg  handoffMsg
		want []byte
	}{
		{"version 1: a primary before version 2", handoffMsg{version: handoffV1}, []byte{1}},
		{"no PROXY header", handoffMsg{version: handoffV2}, []byte{2, 0, 0}},
		{"v1 header, IPv4 client", handoffMsg{version: handoffV2, proxied: 45, client: v4},
			[]byte{2, 0, 45, 4, 203, 0, 113, 7, 0x15, 0xb3}},
		{"v2 header, IPv6 client", handoffMsg{version: handoffV2, proxied: proxyV2Max, client: v6},
			append(append([]byte{2, 2, 16, 6}, v6.Addr().AsSlice()...), 1, 187)},
		{"IPv4-mapped IPv6 client stays IPv6", handoffMsg{version: handoffV2, proxied: 28, client: mapped},
			append(append([]byte{2, 0, 28, 6}, mapped.Addr().AsSlice()...), 0, 80)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := appendHandoff(nil, tc.msg)
			if !bytes.Equal(b, tc.want) {
				t.Fatalf("encoded %x, want %x", b, tc.want)
			}
			if len(b) > handoffMsgMax {
				t.Fatalf("%d bytes, over handoffMsgMax %d", len(b), handoffMsgMax)
			}
			m, err := decodeHandoff(b)
			if err != nil || m != tc.msg {
				t.Fatalf("decoded %+v, %v; want %+v", m, err, tc.msg)
			}
		})
	}
	good := appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 45, client: v4})
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"version 0", []byte{0}},
		{"version 3: a newer primary", []byte{3, 0, 0}},
		{"version 1 with more bytes", []byte{1, 0, 0}},
		{"version 2 cut short", []byte{2, 0}},
		{"no header, with an address", append([]byte{2, 0, 0}, good[3:]...)},
		{"a header, without an address", []byte{2, 0, 45}},
		{"header longer than any accepted", append([]byte{2, 2, 17}, good[3:]...)},
		{"family 5", append([]byte{2, 0, 45, 5}, good[4:]...)},
		{"family 4 with an IPv6 address", append(append([]byte{2, 0, 45, 4}, v6.Addr().AsSlice()...), 0, 1)},
		{"one byte long", append(bytes.Clone(good), 0)},
		{"one byte short", good[:len(good)-1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if m, err := decodeHandoff(tc.b); !errors.Is(err, errFrame) {
				t.Fatalf("decodeHandoff(%x) = %+v, %v; want errFrame", tc.b, m, err)
			}
		})
	}
}

// FuzzDecodeHandoff checks that decodeHandoff never panics and that what
// it accepts re-encodes to the very same bytes.
func FuzzDecodeHandoff(f *testing.F) {
	f.Add([]byte{1})
	f.Add([]byte{2, 0, 0})
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 45, client: netip.MustParseAddrPort("203.0.113.7:5555")}))
	f.Add(appendHandoff(nil, handoffMsg{version: handoffV2, proxied: 64, client: netip.MustParseAddrPort("[2001:db8::1]:443")}))
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := bytes.Clone(b)
		m, err := decodeHandoff(b)
		if !bytes.Equal(b, orig) {
			t.Fatal("decodeHandoff modified its input")
		}
		if err != nil {
			if !errors.Is(err, errFrame) {
				t.Fatalf("error %v does not wrap errFrame", err)
			}
			return
		}
		if b2 := appendHandoff(nil, m); !bytes.Equal(b2, b) {
			t.Fatalf("re-encoding %+v gave %x, want %x", m, b2, b)
		}
		if m.proxied > 0 && !m.client.IsValid() {
			t.Fatalf("%+v: a PROXY header without a client address", m)
		}
	})
}
